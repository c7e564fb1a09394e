"""The cache of built and downloaded models (`$FRUGAL_SPIN_CACHE`, else ~/.cache/frugal_spin): where it is, and a
clear line when it cannot be written.

The cache is only written when something is missing from it (the tiny base built for a spec the package does not
ship, a pinned wheel downloaded, a GGUF file converted), so a read-only cache that already holds what a run needs
works. `writable_dir` is called just before such a write: a cache path that is a file, or a directory that cannot
be created or written, is one `UserError` naming FRUGAL_SPIN_CACHE (when it came from there) instead of
FileExistsError, NotADirectoryError or PermissionError from deep inside the build.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from frugal_spin.errors import UserError

ENV = "FRUGAL_SPIN_CACHE"


def default_cache_root() -> Path:
    return Path(os.environ.get(ENV) or Path.home() / ".cache" / "frugal_spin")


def _named(root: Path) -> str:
    return f"{ENV}={root}" if os.environ.get(ENV) and Path(os.environ[ENV]) == Path(root) else f"the cache {root}"


def writable_dir(directory: Path, root: Path, what: str, missing: str) -> Path:
    """Create `directory` (inside the cache `root`) if needed and check that it can be written, to add `missing`
    (an entry's name); `what` names the recipe value that needs it. Returns `directory`."""
    directory = Path(directory)
    fix = (f"set {ENV} to a writable directory (it holds built, converted and downloaded models), or unset it to "
           f"use ~/.cache/frugal_spin")
    blocker = next((p for p in (directory, *directory.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"{what}: {_named(root)} cannot hold the cache: {blocker} is a file, not a directory; {fix}")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{what}: {_named(root)}: cannot create {directory} ({exc.strerror or exc}); {fix}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        reason = "a read-only filesystem" if _read_only_fs(directory) else "no permission to write there"
        raise UserError(f"{what}: {_named(root)} is not writable ({reason}) and does not hold {missing} yet; "
                        f"{fix}")
    return directory


def _read_only_fs(directory: Path) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def is_unwritable(exc: OSError) -> bool:
    return exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
