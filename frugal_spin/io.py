"""Atomic writers and plain readers for the run directory's files (jsonl, json, safetensors, text).

Every writer writes a temporary file in the target's directory and renames it over the target, so a crash leaves
either the old file or the new one, never a half-written file that a rerun would trust.

Permissions: `tempfile.mkstemp`/`mkdtemp` create 0600/0700 entries whatever the umask, and so does safetensors'
writer (0600); the outputs here are given the mode a plain `open`/`mkdir` would have (0666/0777 less the umask)
before they are renamed into place, so a user's umask 022 gives 0644/0755 outputs and 077 keeps them private
(`mkstemp`, `mkdtemp`, `apply_umask` below; directories filled by a library's `save_pretrained` get
`apply_umask` before they are renamed into place).

A full disk (ENOSPC, or a quota: EDQUOT) while writing is reported as one `UserError` line naming the file, the
space the write needed and the space free there; the temporary file is removed, so a rerun after freeing space
resumes from the last finished stage.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch

from frugal_spin.errors import UserError

_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# How libraries that do their own I/O (safetensors' Rust writer, shutil.copytree's collected errors) say it.
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "StorageFull", "code: 28,")


class DiskFullError(UserError):
    """No space left while writing: the message names the path and the space needed."""


def is_disk_full(exc: BaseException) -> bool:
    seen = 0
    while exc is not None and seen < 8:  # the OSError may be the cause of a library's own exception
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(exc) for text in _DISK_FULL_TEXT):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def free_bytes(path: Path) -> int | None:
    path = Path(path)
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def disk_full_message(path: Path, needed_bytes: int | None) -> str:
    free = free_bytes(path)
    needs = f"it needs about {gib(needed_bytes)}" if needed_bytes else "it needs more space"
    has = f", {gib(free)} free there" if free is not None else ""
    return (f"no space left on device writing {path} ({needs}{has}); free some space and rerun the same "
            f"command: finished stages are kept and the run resumes")


def raise_if_disk_full(exc: BaseException, path: Path, needed_bytes: int | None = None) -> None:
    """Turn a full-disk error into one clear line; any other error is left to the caller to re-raise."""
    if is_disk_full(exc):
        raise DiskFullError(disk_full_message(path, needed_bytes)) from None


def current_umask() -> int:
    """The process's umask, read without changing it (Linux: /proc/self/status); elsewhere set and restored at once
    (os.umask has no read-only form)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def mkstemp(prefix: str, suffix: str, dir: Path) -> tuple[int, str]:
    """`tempfile.mkstemp`, with the file's mode a plain `open` would give it (0666 & ~umask), not 0600."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=dir)
    os.fchmod(fd, 0o666 & ~current_umask())
    return fd, tmp


def mkdtemp(prefix: str, dir: Path) -> Path:
    """`tempfile.mkdtemp`, with the directory's mode a plain `mkdir` would give it (0777 & ~umask), not 0700."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def apply_umask(path: Path) -> None:
    """Give `path` (and, for a directory, everything under it; links are left alone) the mode a plain
    `open`/`mkdir` would have given it: libraries and tempfile create 0600/0700 whatever the umask."""
    mask = current_umask()
    path = Path(path)
    entries = [path, *path.rglob("*")] if path.is_dir() and not path.is_symlink() else [path]
    for entry in entries:
        if entry.is_symlink():
            continue
        os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~mask)


def _atomic(path: Path, write, needed_bytes: int | None = None) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise_if_disk_full(exc, path, needed_bytes)
        raise
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # a library's writer may have recreated it 0600 (safetensors)
        os.replace(tmp, path)
    except Exception as exc:
        raise_if_disk_full(exc, path, needed_bytes)
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: Path, text: str) -> None:
    data = text.encode("utf-8")

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    _atomic(path, write, len(data))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def copy_file(source: Path, target: Path) -> None:
    """Copy a file's bytes to `target`, atomically like the writers."""
    import shutil

    _atomic(target, lambda tmp: shutil.copyfile(source, tmp), Path(source).stat().st_size)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    needed = sum(v.numel() * v.element_size() for v in tensors.values())
    _atomic(path, lambda tmp: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                                        metadata=metadata), needed)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))
