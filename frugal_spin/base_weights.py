"""The SHA-256 of a model directory's weight files, hashed once and then remembered by size and mtime.

Input: a model directory and a memo file (the run's `stages/weights_digest.json`). Output: one hex digest over the
weight files' relative names and contents (`*.safetensors`, `*.safetensors.index.json`, `*.gguf`).
A file is hashed again only when its size or mtime (ns) differs from the memo's: hashing a 3 GB base takes
seconds, so it is done once per run directory, not on every rerun. (A change that keeps both size and mtime is
not seen; `touch` the file, or `--restart`, to force it.)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.gguf")


def weight_files(model_dir: Path) -> list[Path]:
    return sorted({p for pattern in WEIGHT_PATTERNS for p in Path(model_dir).glob(pattern) if p.is_file()})


def _sha256(path: Path) -> str:
    from frugal_spin.stages import file_digest  # the project's one file hash (sha256sum's)

    return file_digest(path)["sha256"]


def weights_digest(model_dir: Path, memo_path: Path) -> str:
    from frugal_spin.io import write_json

    try:
        memo = json.loads(Path(memo_path).read_text(encoding="utf-8"))
        memo = memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        memo = {}
    total = hashlib.sha256()
    changed = False
    for file in weight_files(model_dir):
        stat = file.stat()
        key = str(file.resolve())
        known = memo.get(key)
        if not (isinstance(known, dict) and known.get("bytes") == stat.st_size
                and known.get("mtime_ns") == stat.st_mtime_ns and isinstance(known.get("sha256"), str)):
            known = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": _sha256(file)}
            memo[key] = known
            changed = True
        total.update(file.name.encode() + b"\0" + known["sha256"].encode())
    if changed:
        write_json(Path(memo_path), memo)
    return total.hexdigest()
