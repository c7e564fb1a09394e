"""Temporary directories for outputs that are built and then renamed into place (a GGUF conversion, a wheel
download), and the removal of those a dead process left behind.

`partial_dir(target)` yields a fresh sibling `.<target name>.partial-XXXXXXXX/` and records its owner beside it in
`.<target name>.partial-XXXXXXXX.owner` (tool, pid, host, boot id, the process's start time). The caller fills the
directory and renames it to `target` inside the block; whatever is left when the block ends (an error, Ctrl-C, a
SIGTERM: while the block runs, SIGTERM raises SystemExit instead of killing the process outright, so the cleanup
runs) is removed with its owner record.

A SIGKILL, a power cut or a second SIGTERM during the cleanup still leave the directory. The next
`partial_dir` in the same parent (`remove_dead_partials`) removes every partial directory whose owner record
proves it was this tool's and its process is gone: same host, and another boot, or no process with that pid, or
one that started at another time (the pid was reused). A directory without such a record (someone else's, or
one written by an older version) is never touched.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

OWNER_SUFFIX = ".owner"
TOOL = "frugal_spin"


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """When the process started (clock ticks since boot, /proc/<pid>/stat field 22), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the command name in (...) may hold spaces
    return fields[19] if len(fields) > 19 else None


def owner_record() -> dict:
    return {"tool": TOOL, "pid": os.getpid(), "host": socket.gethostname(), "boot_id": _boot_id(),
            "started": _start_time(os.getpid())}


def is_dead(owner: dict) -> bool:
    """True only when `owner` names a process of this tool on this host that no longer runs."""
    if not isinstance(owner, dict) or owner.get("tool") != TOOL or owner.get("host") != socket.gethostname():
        return False
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if owner.get("boot_id") and _boot_id() and owner["boot_id"] != _boot_id():
        return True  # the machine rebooted since: every process of then is gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    started = owner.get("started")
    return started is not None and _start_time(pid) not in (None, started)  # the pid now belongs to another


def remove_dead_partials(parent: Path) -> list[str]:
    """Remove the partial directories in `parent` that a dead process of this tool left (see the module
    docstring); return their names."""
    removed = []
    try:
        records = [p for p in Path(parent).iterdir() if p.name.startswith(".") and p.name.endswith(OWNER_SUFFIX)
                   and ".partial-" in p.name]
    except OSError:
        return removed
    for record in records:
        try:
            owner = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            continue
        if not is_dead(owner):
            continue
        partial = record.with_name(record.name[: -len(OWNER_SUFFIX)])
        if partial.is_dir() and not partial.is_symlink():
            shutil.rmtree(partial, ignore_errors=True)
        if not partial.exists():
            record.unlink(missing_ok=True)
            removed.append(partial.name)
    return removed


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While the block runs, SIGTERM raises SystemExit(143) in the main thread (so `finally` blocks clean up)
    instead of ending the process at once; only where SIGTERM had its default action, which is restored after."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _new_partial(target: Path) -> tuple[Path, Path]:
    """A fresh `.<name>.partial-XXXXXXXX` directory whose owner record exists before it does (a kill between
    the two never leaves a directory that cannot be proven this tool's)."""
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.partial-{secrets.token_hex(4)}")
        record = tmp.with_name(tmp.name + OWNER_SUFFIX)
        try:
            with open(record, "x", encoding="utf-8") as f:
                f.write(json.dumps(owner_record()) + "\n")
        except FileExistsError:
            continue
        try:
            tmp.mkdir()
        except FileExistsError:
            record.unlink()
            continue
        except BaseException:
            record.unlink(missing_ok=True)
            raise
        return tmp, record
    raise FileExistsError(f"no free temporary name beside {target}")  # pragma: no cover


@contextmanager
def partial_dir(target: Path) -> Iterator[Path]:
    """A temporary sibling of `target` with an owner record; rename it to `target` inside the block. Removed
    (with the record) however the block ends; dead processes' leftovers in the same parent are removed first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_partials(target.parent)
    with sigterm_raises():
        tmp, record = _new_partial(target)
        try:
            yield tmp
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            record.unlink(missing_ok=True)
