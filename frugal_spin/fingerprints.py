"""What identifies a stage's inputs and outputs: the project's one file hash and the fingerprint of settings.

- `file_digest(path)`: SHA-256 and size of a file (the same hash as `sha256sum`), or of a directory's files (an
  adapter): what stage markers record for each output, and what a downstream fingerprint builds on.
- `fingerprint(*parts)`: a short stable hash of JSON-serialisable parts (recipe sections as dicts, fingerprints of
  inputs as strings). A stage's fingerprint names everything that produced its outputs, so a changed recipe field
  changes exactly the stages downstream of it.

Both are formats on disk: every marker of every existing run directory holds their values, so changing how either
is computed makes every run directory recompute everything. tests/test_old_run_dirs.py holds them to it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def file_digest(path: Path) -> dict[str, Any]:
    """SHA-256 and size of a file (the same hash as `sha256sum`), or of every file under a directory (an adapter:
    relative names and contents, in a stable order)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest, size = hashlib.sha256(), 0
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
                size += len(block)
    return {"sha256": digest.hexdigest(), "bytes": size}


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (dataclasses as dicts, fingerprints of inputs as strings)."""
    text = json.dumps(parts, sort_keys=True, default=lambda o: getattr(o, "__dict__", str(o)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
