"""The run directory: how the tool recognises its own, which of its entries it may delete, the one-run lock.

- **Identity.** A run directory holds `stages/run_directory.json`, written by the tool when it first uses the
  directory (`{"tool": "frugal_spin", "owned": [...], ...}`). Only a directory with that file counts as a run
  directory; a user's directory that happens to hold a `recipe.yaml` does not. (A run directory of an earlier
  version, which had no identity file, is recognised by its stage marker `stages/setup.json` with a fingerprint,
  next to `recipe.yaml`, and gets the file on its next run.)
- **Ownership.** The tool deletes or replaces only top-level entries it wrote. `owned` in the identity file lists
  them: the names a run of the recipe writes (`run_entries`; `compare` adds its arms with `claim`) are recorded,
  under the lock, before the run writes them, and names the run did not create are dropped again when it ends.
  A name a run would write that already exists and is not owned (a project's own `base/`, `eval/`, `traces/`,
  `tb/`) is refused with one line before anything is written: the tool never writes into, replaces or deletes it.
  Migration: an identity file without `owned` (written by versions before this list existed) or an earlier
  version's run directory owns the entries of the names that code writes (`TOOL_ENTRIES`, `iter_<t>`,
  `spin_<loss>`) present when it is first opened again; from then on the list is kept exactly.
  The one gap: a name recorded for a run that was killed (SIGKILL) before creating it stays recorded, so an entry
  a user creates under that exact name before the next run counts as the tool's.
- **Refusals** (before anything is written): `/`, the home directory, any ancestor of the current directory or of
  the home directory, and top-level directories such as `/tmp` are never used as `output_dir` (an unset shell
  variable makes `output_dir=$OUT/` read `/`); a non-empty directory that is not a run directory is refused unless
  the user passes `--allow-existing-dir`; `--restart` deletes only inside a run directory; an owned entry, or
  anything under one, that is a symbolic link is refused (the tool never makes links, and would write through it).
- **What `--restart` deletes**: the owned entries, each with everything in it (a symlink among them is unlinked,
  never followed), and the hidden temporary siblings the atomic writers leave after a SIGKILL, recognised by their
  exact shape (`.<owned name>.<8 random chars>.tmp`, `.<owned name>.partial-<8 random chars>`). Every other file
  or directory, dot-files included, is kept. Those temporaries of a dead run are also removed whenever the
  directory is opened: under the lock no live run of the tool can be writing them.
- **Lock.** `lock_run_dir` takes an exclusive `flock` on `<run_dir>/.frugal_spin.lock` and writes the holder's
  pid into it. The file is opened without following a symbolic link and must be a plain file of this user with
  one link, so a planted link or hard link never makes a run truncate another file; a directory holding only
  such a lock is not empty. The kernel drops the lock when the holder exits, however it exits (SIGKILL included),
  so a lock left by a dead process never blocks a rerun; a second live run gets one line naming the holder's pid.
  On a filesystem without `flock` the pid in the file is checked instead (a dead or foreign-host holder is stale).
  In a distributed run only rank 0 holds it.
- **Other directories the tool writes into**: `compare`'s `<output_dir>/compare/` carries `OWNER_FILE`
  (`own_directory`), and `report` writes only into a run directory (`require_run_dir`).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from frugal_spin.errors import UserError

IDENTITY = Path("stages") / "run_directory.json"
IDENTITY_FORMAT = 2  # 1: no `owned` list (migrated, see the module docstring)
LOCK_NAME = ".frugal_spin.lock"
OWNER_FILE = ".frugal_spin_owner.json"  # marks a directory other than a run directory as the tool's (compare/)
# Every name a run (or compare's arms) writes at the top of its directory (see README, "What a run directory
# holds"). A module that adds a new top-level output adds its name here and to `run_entries`.
TOOL_ENTRIES = ("recipe.yaml", "metrics.jsonl", "report.md", "report.json", "timeline.png", "metrics.png",
                "base", "sft", "eval", "stages", "traces", "tb", "wandb", "sft_equal_steps", "sft_equal_time")
# Written by every run, whatever the recipe: also what a caller that does not know the recipe checks.
ALWAYS_WRITTEN = ("recipe.yaml", "metrics.jsonl", "report.md", "report.json", "timeline.png", "metrics.png",
                  "stages", "sft", "eval")
_ITERATION = re.compile(r"^(iter_\d+|spin_[a-z0-9_]+)$")  # iterations; compare's other-loss arms (spin_<loss>/)
# The hidden temporaries of the atomic writers: io.mkstemp(".<name>.", ".tmp") and mkdtemp(".<name>.partial-"),
# whose random part is 8 characters of tempfile's alphabet.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?:[a-z0-9_]{8}\.tmp|partial-[a-z0-9_]{8})$")


def is_tool_name(name: str) -> bool:
    """A name the tool writes at the top of a run directory (whether this directory's copy is the tool's is what
    `owned_entries` says)."""
    return name in TOOL_ENTRIES or bool(_ITERATION.match(name))


def run_entries(recipe) -> list[str]:
    """The top-level names a pipeline run of `recipe` writes."""
    from frugal_spin.config import BUILTIN_MODEL

    names = list(ALWAYS_WRITTEN)
    names += ["base"] if recipe.model.name == BUILTIN_MODEL else []
    names += ["traces"] if recipe.profile.trace_steps else []
    names += ["tb"] if recipe.log.tensorboard else []
    names += ["wandb"] if recipe.log.wandb else []
    from frugal_spin.plan import iteration_folder

    return names + [iteration_folder(t) for t in range(recipe.spin.iterations)]


def _read_identity(path: Path) -> dict | None:
    try:
        identity = json.loads((Path(path) / IDENTITY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return identity if isinstance(identity, dict) and identity.get("tool") == "frugal_spin" else None


def is_run_dir(path: Path) -> bool:
    """True if `path` carries the tool's identity file (or is an earlier version's run directory)."""
    return _read_identity(Path(path)) is not None or _is_legacy_run_dir(Path(path))


def _is_legacy_run_dir(path: Path) -> bool:
    """A run directory written before identity files existed: recipe.yaml plus a setup marker with a fingerprint."""
    try:
        setup = json.loads((path / "stages" / "setup.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (path / "recipe.yaml").is_file() and isinstance(setup, dict) and setup.get("stage") == "setup" \
        and isinstance(setup.get("fingerprint"), str)


def owned_entries(run_dir: Path) -> set[str]:
    """The top-level names of `run_dir` the tool wrote (module docstring, "Ownership"); empty for a directory
    that is not a run directory."""
    run_dir = Path(run_dir)
    identity = _read_identity(run_dir)
    if identity is not None and isinstance(identity.get("owned"), list):
        # Only plain names of the tool's own shapes: a hand-edited list can never reach "../x" or a user's file.
        return {n for n in identity["owned"] if isinstance(n, str) and is_tool_name(n) and Path(n).name == n}
    if identity is None and not _is_legacy_run_dir(run_dir):
        return set()
    try:  # migration: what today's code writes, as found at the top of a directory it marked as its own
        return {name for name in os.listdir(run_dir) if is_tool_name(name)}
    except OSError:
        return set()


def refuse_wrong_root(run_dir: Path, what: str = "output_dir") -> None:
    """`/`, home, ancestors of the current or home directory, and top-level directories are never a run's home."""
    resolved = Path(run_dir).expanduser().resolve()
    home = Path.home().resolve()
    cwd = Path.cwd().resolve()
    reason = None
    if resolved == Path(resolved.anchor):
        reason = "the filesystem root"
    elif resolved == home:
        reason = "your home directory"
    elif resolved in cwd.parents:
        reason = "an ancestor of the current directory"
    elif resolved in home.parents:
        reason = "an ancestor of your home directory"
    elif len(resolved.parts) <= 2:
        reason = "a top-level directory"
    if reason:
        raise UserError(f"{what} {run_dir} is {reason} ({resolved}); give the run a directory of its own, "
                        f"e.g. {Path(run_dir) / 'my_run'}")


def check_output_dir(run_dir: Path, restart: bool, allow_existing: bool,
                     entries: Iterable[str] = ALWAYS_WRITTEN) -> None:
    """Every refusal that needs no write, before any long work: the directory is then safe to open. `entries`:
    the top-level names the run will write (`run_entries(recipe)`)."""
    run_dir = Path(run_dir).expanduser()
    refuse_wrong_root(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output_dir {run_dir} exists and is not a directory")
    if not run_dir.is_dir():
        _check_creatable(run_dir)
        return
    if is_run_dir(run_dir):
        owned = owned_entries(run_dir)
        if not restart:
            refuse_links(run_dir, owned)
        _refuse_foreign(run_dir, entries, set() if restart else owned, owned)
        return
    try:
        present = [p.name for p in run_dir.iterdir() if not (p.name == LOCK_NAME and _plain_lock_file(p))]
    except OSError as exc:
        raise UserError(f"output_dir {run_dir} cannot be read: {exc.strerror or exc}") from None
    if not present:
        return
    if restart:
        raise UserError(f"--restart: {run_dir} is not a frugal_spin run directory (no {IDENTITY}); "
                        f"not deleting anything in it")
    if not allow_existing:
        raise UserError(f"output_dir {run_dir} is not empty and is not a frugal_spin run directory (it holds "
                        f"{_name(present)}); use a new or empty directory, or pass --allow-existing-dir to write "
                        f"the run into it (the run writes only names that are not there yet)")
    _refuse_foreign(run_dir, entries, set(), set())


def _refuse_foreign(run_dir: Path, entries: Iterable[str], kept: set[str], owned: set[str]) -> None:
    """A name the run would write that exists and is not the tool's (`kept`: what stays after a restart)."""
    for name in entries:
        if name not in kept and name not in owned and os.path.lexists(run_dir / name):
            raise UserError(f"output_dir {run_dir} already holds {name}, which the run writes but frugal_spin "
                            f"did not write there; not touching it: move it away or use another output_dir")


def refuse_links(run_dir: Path, owned: Iterable[str]) -> None:
    """An owned entry, or anything under one, that is a symbolic link: the tool never makes one, and writing or
    deleting through it would reach outside the run directory."""
    for name in sorted(owned):
        top = Path(run_dir) / name
        if top.is_symlink():
            raise UserError(f"output_dir {run_dir}: {name} is a symbolic link (to {os.readlink(top)}), which "
                            f"frugal_spin never makes; not following it: replace it with the real {name} or pass "
                            f"--restart to start over")
        if not top.is_dir():
            continue
        for parent, dirs, files in os.walk(top):  # followlinks=False: a linked directory is listed, not entered
            for child in (*dirs, *files):
                if os.path.islink(os.path.join(parent, child)):
                    rel = os.path.relpath(os.path.join(parent, child), run_dir)
                    raise UserError(f"output_dir {run_dir}: {rel} is a symbolic link, which frugal_spin never "
                                    f"makes; not following it: replace it with the real {rel} or pass --restart "
                                    f"to start over")


def _check_creatable(run_dir: Path) -> None:
    """A directory that does not exist yet must be creatable: its nearest existing ancestor is a writable directory."""
    ancestor = run_dir.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"output_dir {run_dir} is not writable: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"output_dir {run_dir} is not writable: no permission to create it in {ancestor}")


def _name(entries: list[str]) -> str:
    shown = ", ".join(sorted(entries)[:3])[:120]
    return shown + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")


def _remove(entry: Path) -> None:
    if entry.is_symlink() or not entry.is_dir():
        entry.unlink()
    else:
        shutil.rmtree(entry)


def dead_temporaries(run_dir: Path, owned: set[str]) -> list[Path]:
    """The hidden temporaries of owned names at the top of `run_dir` (module docstring)."""
    out = []
    for name in os.listdir(run_dir):
        match = _TEMPORARY.match(name)
        if match and match.group("name") in owned:
            out.append(Path(run_dir) / name)
    return sorted(out)


def delete_run_outputs(run_dir: Path) -> list[str]:
    """--restart: remove the owned entries and their temporaries (module docstring); return the names."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):  # pragma: no cover - callers check first; this guards against a future caller
        raise UserError(f"--restart: {run_dir} is not a frugal_spin run directory; not deleting anything in it")
    owned = owned_entries(run_dir)
    removed = []
    for entry in [*dead_temporaries(run_dir, owned), *(run_dir / name for name in sorted(owned))]:
        if os.path.lexists(entry):
            _remove(entry)
            removed.append(entry.name)
    return sorted(removed)


def write_identity(run_dir: Path, owned: Iterable[str] = (), prune: bool = False) -> None:
    """Write (or rewrite) the identity file: the owned names plus `owned` (about to be written); `prune` drops the
    owned names that do not exist (a run's claims it did not use, once it ends)."""
    from frugal_spin.io import write_json

    run_dir = Path(run_dir)
    previous = _read_identity(run_dir) or {}
    names = {n for n in owned_entries(run_dir) if not prune or os.path.lexists(run_dir / n)} | set(owned) | {"stages"}
    write_json(run_dir / IDENTITY, {
        "tool": "frugal_spin", "format": IDENTITY_FORMAT,
        "created": previous.get("created") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "note": "marks this directory as a frugal_spin run directory; `owned` lists the top-level entries the tool "
                "wrote: --restart deletes only those (and their temporaries), never anything else",
        "owned": sorted(n for n in names if is_tool_name(n))})


def claim(run_dir: Path, names: Iterable[str]) -> None:
    """Record `names` as the tool's before writing them (call under the lock); a name that exists and is not the
    tool's is refused (one line), never written into."""
    run_dir = Path(run_dir)
    names = list(names)
    _refuse_foreign(run_dir, names, set(), owned_entries(run_dir))
    write_identity(run_dir, names)


def require_run_dir(path: Path, what: str) -> Path:
    """A command that writes into an existing run directory (`report`) refuses any other directory."""
    path = Path(path).expanduser()
    if path.is_dir() and not is_run_dir(path):  # a missing path or a file: the command's own reader says so
        raise UserError(f"{what}: {path} is not a frugal_spin run directory (no {IDENTITY}); not writing into it")
    return path


def own_directory(directory: Path, kind: str, legacy=lambda d: False) -> Path:
    """A directory the tool writes fixed names into (compare's `compare/`): created with `OWNER_FILE`, or already
    carrying it; an empty one is taken; `legacy(d)` recognises one written before owner files existed. Any other
    non-empty directory is refused with one line."""
    from frugal_spin.io import write_json

    directory = Path(directory).expanduser()
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise UserError(f"{directory} exists and is not a directory of its own (a file or a symbolic link); "
                        f"not writing into it")
    try:
        owner = json.loads((directory / OWNER_FILE).read_text(encoding="utf-8"))
        if isinstance(owner, dict) and owner.get("tool") == "frugal_spin" and owner.get("kind") == kind:
            return directory
    except (OSError, ValueError):
        pass
    present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    if present and not legacy(directory):
        raise UserError(f"{directory} exists and was not written by frugal_spin {kind} (it holds {_name(present)}); "
                        f"not writing into it: move it away or choose another output_dir")
    write_json(directory / OWNER_FILE, {"tool": "frugal_spin", "kind": kind,
                                        "note": f"written by frugal_spin {kind}, which replaces its own files here"})
    return directory


# ---------------------------------------------------------------------------------------------------- the lock


def _plain_lock_file(path: Path) -> bool:
    """A lock file the tool may have left: a regular file (not a link), one link, this user's."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.geteuid()


class RunDirLock:
    """An exclusive lock on a run directory, held until `release()` (or the process's exit)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None
        self.uses_flock = True

    def _open(self) -> int:
        """The lock file, never through a link: O_NOFOLLOW refuses a symlink, fstat a hard link, FIFO, device or
        another user's file (each would make the pid written below land in someone else's file)."""
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            fd = os.open(self.path, flags, 0o666)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UserError(f"output_dir {self.run_dir}: {LOCK_NAME} is a symbolic link, which frugal_spin never "
                                f"makes; not writing through it: remove it") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.geteuid():
            os.close(fd)
            what = ("not a regular file" if not stat.S_ISREG(st.st_mode) else
                    f"a file with {st.st_nlink} hard links" if st.st_nlink != 1 else "another user's file")
            raise UserError(f"output_dir {self.run_dir}: {LOCK_NAME} is {what}, not a lock frugal_spin made; not "
                            f"writing into it: remove it")
        return fd

    def acquire(self) -> "RunDirLock":
        import fcntl

        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise UserError(f"output_dir {self.run_dir} is in use by another frugal_spin run "
                            f"({_describe(holder)}); wait for it to finish or use another output_dir") from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            self.uses_flock = False  # e.g. some network and FUSE filesystems: fall back to the recorded pid
            holder = _read_holder(fd)
            if holder and holder_alive(holder) and holder.get("pid") != os.getpid():
                os.close(fd)
                raise UserError(f"output_dir {self.run_dir} is in use by another frugal_spin run "
                                f"({_describe(holder)}); wait for it to finish or use another output_dir") from None
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # an empty lock file names no holder
        except OSError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None


def lock_run_dir(run_dir: Path) -> RunDirLock:
    """Take the run directory's lock (the directory must exist) or raise UserError naming the holder's pid."""
    return RunDirLock(run_dir).acquire()


@contextmanager
def locked(run_dir: Path) -> Iterator[RunDirLock]:
    lock = lock_run_dir(run_dir)
    try:
        yield lock
    finally:
        lock.release()


def _read_holder(fd: int) -> dict | None:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        holder = json.loads(text)
        return holder if isinstance(holder, dict) else None
    except (OSError, ValueError):
        return None


def holder_alive(holder: dict) -> bool:
    """Whether the process a lock or mark names ({"pid", "host"}) may still run (another host's: assumed not)."""
    if holder.get("host") not in (None, socket.gethostname()):
        return False  # another machine's pid cannot be checked from here; its lock would be a flock one
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict | None) -> str:
    if not holder or not isinstance(holder.get("pid"), int):
        return "pid unknown"
    where = f" on {str(holder['host'])[:64]}" if holder.get("host") not in (None, socket.gethostname()) else ""
    since = f", since {str(holder['since'])[:32]}" if holder.get("since") else ""
    return f"pid {holder['pid']}{where}{since}"


# ---------------------------------------------------------------------------------------------------- opening


@contextmanager
def open_run_dir(run_dir: Path, restart: bool = False, allow_existing: bool = False,
                 entries: Iterable[str] = ALWAYS_WRITTEN) -> Iterator[Path]:
    """Create (or reuse) the run directory, locked for the duration of the block; `restart` removes the earlier
    run's outputs first; `entries` (the names the run writes) are claimed, and those it did not create are
    released again at the end. Call `check_output_dir` before any long work: this repeats it under the lock."""
    run_dir = Path(run_dir).expanduser()
    entries = list(entries)
    check_output_dir(run_dir, restart, allow_existing, entries)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = lock_run_dir(run_dir)
    except OSError as exc:
        raise UserError(f"output_dir {run_dir} is not writable: {exc.strerror or exc}") from None
    claimed = False
    try:
        # Another process may have written into the directory between the first check and the lock.
        check_output_dir(run_dir, restart, allow_existing, entries)
        if restart and is_run_dir(run_dir):
            delete_run_outputs(run_dir)
        else:  # under the lock no live run writes here: temporaries of owned names are a dead run's
            for leftover in dead_temporaries(run_dir, owned_entries(run_dir)):
                _remove(leftover)
        write_identity(run_dir, entries, prune=True)  # a killed run's unused claims go, this run's are added
        claimed = True
        yield run_dir
    finally:
        try:
            if claimed:
                write_identity(run_dir, prune=True)  # drops the claimed names the run did not create
        except (OSError, UserError):
            pass  # e.g. the disk filled up: the claims stay, which only keeps more names the tool's
        lock.release()
