"""The SHA-256 of a model directory's weight files, hashed once and then remembered by size and mtime.

Input: a model directory and a memo file (the run's `stages/weights_digest.json`). Output: one hex digest over the
weight files' relative names and contents (`*.safetensors`, `*.safetensors.index.json`, `*.gguf`).
A file is hashed again only when its size or mtime (ns) differs from the memo's: hashing a 3 GB base takes
seconds, so it is done once per run directory, not on every rerun. (A change that keeps both size and mtime is
not seen; `touch` the file, or `--restart`, to force it.)

The base's files as a run used them (`base_files`: config, generation config, tokenizer and chat template, remote
code, build info and weights, each by SHA-256) are recorded at setup in `stages/base_files.json`
(`note_base_files`): a rerun says which of them changed (its stages are then recomputed), and `export`/`sample`
refuse a base that differs from the record (`check_base_unchanged`), since the adapters were trained on the
recorded files. `copy_differences` compares the run's copy of the built-in base with its source, file by file.
"""

from __future__ import annotations

import hashlib
import json
from fnmatch import fnmatch
from pathlib import Path

WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.gguf")
# What else decides the model a directory loads as: its shape and generation settings, the tokenizer and its chat
# template (the prompts' tokens), remote code, and the built-in base's build record.
IDENTITY_NAMES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                  "tokenizer.model", "vocab.json", "merges.txt", "build_info.json")
RECORD = Path("stages") / "base_files.json"
MEMO = Path("stages") / "weights_digest.json"


def weight_files(model_dir: Path) -> list[Path]:
    return sorted({p for pattern in WEIGHT_PATTERNS for p in Path(model_dir).glob(pattern) if p.is_file()})


def _sha256(path: Path) -> str:
    from frugal_spin.fingerprints import file_digest  # the project's one file hash (sha256sum's)

    return file_digest(path)["sha256"]


def weights_digest(model_dir: Path, memo_path: Path, write_memo: bool = True) -> str:
    total = hashlib.sha256()
    for name, sha256 in _weight_hashes(model_dir, memo_path, write_memo).items():
        total.update(name.encode() + b"\0" + sha256.encode())
    return total.hexdigest()


def _weight_hashes(model_dir: Path, memo_path: Path, write_memo: bool = True) -> dict[str, str]:
    """name -> SHA-256 of each weight file, through the memo (written back only with `write_memo`)."""
    from frugal_spin.io import write_json

    try:
        memo = json.loads(Path(memo_path).read_text(encoding="utf-8"))
        memo = memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        memo = {}
    out = {}
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
        out[file.name] = known["sha256"]
    if changed and write_memo:
        write_json(Path(memo_path), memo)
    return out


def _identity_name(name: str) -> bool:
    return name in IDENTITY_NAMES or name.endswith(".py") or any(fnmatch(name, p) for p in WEIGHT_PATTERNS)


def base_files(model_dir: Path, memo_path: Path, write_memo: bool = True) -> dict[str, str]:
    """name -> SHA-256 of every file that decides what `model_dir` loads as (module docstring)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():  # a hub id stands for the base: nothing local to hash (as weights_digest)
        return {}
    small = sorted(p for p in model_dir.iterdir() if p.is_file() and _identity_name(p.name)
                   and not any(p.match(pattern) for pattern in WEIGHT_PATTERNS))
    return {**{p.name: _sha256(p) for p in small}, **_weight_hashes(model_dir, memo_path, write_memo)}


def _differences(recorded: dict[str, str], actual: dict[str, str]) -> list[str]:
    return sorted(set(recorded) ^ set(actual) | {n for n in recorded if actual.get(n, recorded[n]) != recorded[n]})


def copy_differences(copy: Path, source: Path, memo_path: Path) -> list[str]:
    """The files in which the run's copy of a base differs from its source (added, missing or changed)."""
    return _differences(base_files(source, memo_path), base_files(copy, memo_path))


def note_base_files(model_dir: Path, run_dir: Path, shown_as: str) -> list[str]:
    """Record the base's files for this run directory; warn (one line) about those that changed since the last
    record, and return them."""
    from frugal_spin.io import write_json

    current = base_files(model_dir, Path(run_dir) / MEMO)
    recorded = _read_record(run_dir)
    changed = _differences(recorded, current) if recorded is not None else []
    if changed:
        from frugal_spin.ui import warn

        warn(f"{shown_as}: {_names(changed)} changed since this run directory last used it; the stages computed "
             f"from the old files are recomputed")
    if recorded != current:
        write_json(Path(run_dir) / RECORD, {"path": str(Path(model_dir).resolve()), "files": current})
    return changed


def check_base_unchanged(model_dir: Path, run_dir: Path, what: str) -> None:
    """`export`/`sample` (which never write into the run directory): refuse a base whose files differ from what
    the run recorded at setup. A run of an earlier version recorded nothing: its built-in base is checked against
    the hashes of its own build_info.json; any other base is named as unchecked (one warning line)."""
    from frugal_spin.errors import UserError
    from frugal_spin.ui import warn

    model_dir, run_dir = Path(model_dir), Path(run_dir)
    recorded = _read_record(run_dir)
    if recorded is not None:
        changed = _differences(recorded, base_files(model_dir, run_dir / MEMO, write_memo=False))
    else:
        try:
            build = json.loads((model_dir / "build_info.json").read_text(encoding="utf-8")).get("files")
        except (OSError, ValueError, AttributeError):
            build = None
        if not isinstance(build, dict) or not build:
            warn(f"{run_dir} recorded no identity of its base {model_dir} (a run of an earlier version): {what} "
                 f"cannot check that these are the files the adapters were trained on")
            return
        actual = {n: h for n, h in base_files(model_dir, run_dir / MEMO, write_memo=False).items()
                  if n != "build_info.json"}
        changed = _differences({n: h for n, h in build.items() if _identity_name(n)}, actual)
    if changed:
        raise UserError(f"the base {model_dir} is not the one the run used: {_names(changed)} changed since its "
                        f"setup, and the adapters were trained on the old files; {what} refuses it (restore the "
                        f"base, or train again on this one)")


def _read_record(run_dir: Path) -> dict[str, str] | None:
    try:
        files = json.loads((Path(run_dir) / RECORD).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    return files if isinstance(files, dict) else None


def _names(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
