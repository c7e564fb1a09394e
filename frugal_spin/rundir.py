"""The run directory: how the tool recognises its own, the one-run-at-a-time lock, and what `--restart` deletes.

- **Identity.** A run directory holds `stages/run_directory.json`, written by the tool when it first uses the
  directory (`{"tool": "frugal_spin", ...}`). Only a directory with that file counts as a run directory; a user's
  directory that happens to hold a `recipe.yaml` does not. (A run directory of an earlier version, which had no
  identity file, is recognised by its stage marker `stages/setup.json` with a fingerprint, next to `recipe.yaml`,
  and gets the file on its next run.)
- **Refusals** (before anything is written): `/`, the home directory, any ancestor of the current directory or of
  the home directory, and top-level directories such as `/tmp` are never used as `output_dir` (an unset shell
  variable makes `output_dir=$OUT/` read `/`); a non-empty directory that is not a run directory is refused unless
  the user passes `--allow-existing-dir`; `--restart` deletes only inside a run directory.
- **What `--restart` deletes**: exactly the entries a run writes at the top of the directory (`TOOL_ENTRIES`,
  `iter_<t>/`, and the hidden temporary files of those names), each with everything in it; a symlink among them
  is unlinked, never followed. Every other file or directory is kept.
- **Lock.** `lock_run_dir` takes an exclusive `flock` on `<run_dir>/.frugal_spin.lock` and writes the holder's
  pid into it. The kernel drops the lock when the holder exits, however it exits (SIGKILL included), so a lock
  left by a dead process never blocks a rerun; a second live run gets one line naming the holder's pid. On a
  filesystem without `flock` the pid in the file is checked instead (a dead or foreign-host holder is stale).
  In a distributed run only rank 0 holds it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from frugal_spin.errors import UserError

IDENTITY = Path("stages") / "run_directory.json"
LOCK_NAME = ".frugal_spin.lock"
# Everything a run writes at the top of its directory (see README, "What a run directory holds"). A module that
# adds a new top-level output adds its name here, so --restart removes it and nothing else.
TOOL_ENTRIES = ("recipe.yaml", "metrics.jsonl", "report.md", "report.json", "timeline.png", "metrics.png",
                "base", "sft", "eval", "stages", "traces", "tb", "wandb", "sft_equal_steps", "sft_equal_time")
_ITERATION = re.compile(r"^(iter_\d+|spin_[a-z0-9_]+)$")  # iterations; compare's other-loss arms (spin_<loss>/)


def _is_tool_entry(name: str) -> bool:
    if name in TOOL_ENTRIES or _ITERATION.match(name):
        return True
    # Temporary siblings the atomic writers leave after a SIGKILL: ".metrics.jsonl.x1y2.tmp", ".base.partial-ab".
    if name.startswith(".") and name != LOCK_NAME:
        stem = name[1:]
        return any(stem.startswith(entry + ".") for entry in TOOL_ENTRIES) or bool(_ITERATION.match(stem.split(".")[0]))
    return False


def is_run_dir(path: Path) -> bool:
    """True if `path` carries the tool's identity file (or is an earlier version's run directory)."""
    path = Path(path)
    try:
        identity = json.loads((path / IDENTITY).read_text(encoding="utf-8"))
        return isinstance(identity, dict) and identity.get("tool") == "frugal_spin"
    except (OSError, ValueError):
        pass
    return _is_legacy_run_dir(path)


def _is_legacy_run_dir(path: Path) -> bool:
    """A run directory written before identity files existed: recipe.yaml plus a setup marker with a fingerprint."""
    try:
        setup = json.loads((path / "stages" / "setup.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (path / "recipe.yaml").is_file() and isinstance(setup, dict) and setup.get("stage") == "setup" \
        and isinstance(setup.get("fingerprint"), str)


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


def check_output_dir(run_dir: Path, restart: bool, allow_existing: bool) -> None:
    """Every refusal that needs no write, before any long work: the directory is then safe to open."""
    run_dir = Path(run_dir).expanduser()
    refuse_wrong_root(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output_dir {run_dir} exists and is not a directory")
    if not run_dir.is_dir():
        _check_creatable(run_dir)
        return
    if is_run_dir(run_dir):
        return
    try:
        entries = [p.name for p in run_dir.iterdir() if p.name != LOCK_NAME]
    except OSError as exc:
        raise UserError(f"output_dir {run_dir} cannot be read: {exc.strerror or exc}") from None
    if not entries:
        return
    if restart:
        raise UserError(f"--restart: {run_dir} is not a frugal_spin run directory (no {IDENTITY}); "
                        f"not deleting anything in it")
    if not allow_existing:
        raise UserError(f"output_dir {run_dir} is not empty and is not a frugal_spin run directory (it holds "
                        f"{_name(entries)}); use a new or empty directory, or pass --allow-existing-dir to write "
                        f"the run into it (files with the names a run writes, e.g. report.md, are replaced)")


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


def delete_run_outputs(run_dir: Path) -> list[str]:
    """--restart: remove what a run wrote at the top of `run_dir` (see module docstring); return the names."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):  # pragma: no cover - callers check first; this guards against a future caller
        raise UserError(f"--restart: {run_dir} is not a frugal_spin run directory; not deleting anything in it")
    removed = []
    for entry in sorted(run_dir.iterdir()):
        if not _is_tool_entry(entry.name):
            continue
        if entry.is_symlink() or not entry.is_dir():
            entry.unlink()
        else:
            shutil.rmtree(entry)
        removed.append(entry.name)
    return removed


def write_identity(run_dir: Path) -> None:
    from frugal_spin.io import write_json

    if not (Path(run_dir) / IDENTITY).is_file():
        write_json(Path(run_dir) / IDENTITY, {
            "tool": "frugal_spin", "format": 1,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "note": "marks this directory as a frugal_spin run directory: --restart deletes only in such a "
                    "directory, and only the entries a run writes"})


# ---------------------------------------------------------------------------------------------------- the lock


class RunDirLock:
    """An exclusive lock on a run directory, held until `release()` (or the process's exit)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None
        self.uses_flock = True

    def acquire(self) -> "RunDirLock":
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
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
            if holder and _alive(holder) and holder.get("pid") != os.getpid():
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


def _alive(holder: dict) -> bool:
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
def open_run_dir(run_dir: Path, restart: bool = False, allow_existing: bool = False) -> Iterator[Path]:
    """Create (or reuse) the run directory, locked for the duration of the block; `restart` removes the earlier
    run's outputs first. Call `check_output_dir` before any long work: this repeats it under the lock."""
    run_dir = Path(run_dir).expanduser()
    check_output_dir(run_dir, restart, allow_existing)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = lock_run_dir(run_dir)
    except OSError as exc:
        raise UserError(f"output_dir {run_dir} is not writable: {exc.strerror or exc}") from None
    try:
        # Another process may have written into the directory between the first check and the lock.
        check_output_dir(run_dir, restart, allow_existing)
        if restart and is_run_dir(run_dir):
            delete_run_outputs(run_dir)
        write_identity(run_dir)
        yield run_dir
    finally:
        lock.release()
