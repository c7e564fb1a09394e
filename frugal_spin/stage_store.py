"""Stage bookkeeping for a run directory (or a compare arm's): completion markers with fingerprints, and
`metrics.jsonl`.

A stage is complete when its marker `stages/<name>.json` exists and carries the fingerprint of everything that
produced the stage's outputs (the recipe fields it depends on and the fingerprints of its inputs). The marker is
written last, atomically, after the stage's outputs; so an interrupted stage has no marker and is redone, and a
changed recipe field changes the fingerprints of exactly the stages downstream of it.

The marker also records the SHA-256 and size of every output file of the stage (`outputs`). A rerun trusts a
finished stage only if each output still matches: a truncated, corrupted or replaced file makes the stage (and,
through the fingerprints, everything downstream) run again, with a warning; it is never used silently.

`metrics.jsonl` is rebuilt from the markers after every stage, in pipeline order, so a resumed run never holds
duplicate or stale lines.

Every marker and record carries the stage's `kind` and `iteration` (plan.py); markers written before records had
`iteration` are read with both as this version names them (`plan.with_kind_and_iteration`), without being rewritten.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from frugal_spin.distributed import current as current_world
from frugal_spin.fingerprints import file_digest
from frugal_spin.io import write_json, write_jsonl
from frugal_spin.plan import with_kind_and_iteration


def read_marker(path: Path) -> dict[str, Any] | None:
    """A stage marker's record, or None when the file is not one this tool wrote: unreadable, not UTF-8, not JSON,
    nested too deeply, or without the fields a finished stage has (`fingerprint`, `outputs` of {sha256, bytes})."""
    try:
        record = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):  # ValueError: JSONDecodeError and UnicodeDecodeError
        return None
    if not isinstance(record, dict) or not isinstance(record.get("fingerprint"), str):
        return None
    outputs = record.get("outputs") or {}
    if not isinstance(outputs, dict) or not all(isinstance(v, dict) for v in outputs.values()):
        return None
    return record


class StageStore:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.marker_dir = self.run_dir / "stages"
        # Every stage this run has asked about, in pipeline order, with the fingerprint it expects: only matching
        # markers count, so a stale marker from an earlier recipe never reaches metrics.jsonl.
        self.expected: dict[str, str] = {}

    def _marker(self, name: str) -> Path:
        return self.marker_dir / f"{name}.json"

    def completed(self, name: str, fp: str) -> dict[str, Any] | None:
        """The stage's record if it finished with this fingerprint and its outputs are intact, else None."""
        self.expected[name] = fp
        record = self.peek(name, fp)
        if record is not None:
            self.write_metrics()  # a resumed run lists the stages it skipped too
        return record

    def peek(self, name: str, fp: str) -> dict[str, Any] | None:
        """Like `completed`, but without registering the stage as one this store's run expects: for reading another
        run directory's finished stages (a loss arm reusing the seed run's generation) without touching its
        metrics.jsonl."""
        path = self._marker(name)
        if not path.is_file():
            return None
        record = read_marker(path)
        if record is None:
            from frugal_spin.ui import warn

            warn(f"{name}: {path.relative_to(self.run_dir)} is not a stage marker this tool wrote (unreadable or "
                 f"malformed); recomputing the stage")
            return None
        if record.get("fingerprint") != fp:
            return None
        for rel, expected in (record.get("outputs") or {}).items():
            problem = self._output_problem(self.run_dir / rel, expected)
            if problem:
                from frugal_spin.ui import warn

                warn(f"{name}: {rel} is {problem}; recomputing the stage")
                return None
        return with_kind_and_iteration(record)

    @staticmethod
    def _output_problem(path: Path, expected: dict[str, Any]) -> str | None:
        if not path.exists():
            return "missing"
        actual = file_digest(path)
        if actual["bytes"] != expected.get("bytes"):
            return f"truncated or changed ({actual['bytes']} bytes, {expected.get('bytes')} recorded)"
        if actual["sha256"] != expected.get("sha256"):
            return "corrupt (its SHA-256 differs from the one recorded when it was written)"
        return None

    def complete(self, name: str, fp: str, kind: str, metrics: dict[str, Any], wall_time_s: float,
                 outputs: Iterable[Path] = (), iteration: int | None = None) -> dict[str, Any]:
        """Write the stage's marker, last: its outputs must already be in place (they are hashed here)."""
        self.expected[name] = fp
        record = {"stage": name, "kind": kind, "iteration": iteration, "metrics": metrics,
                  "wall_time_s": round(wall_time_s, 3),
                  "fingerprint": fp,
                  "outputs": {str(Path(p).relative_to(self.run_dir)): file_digest(p) for p in outputs}}
        write_json(self._marker(name), record)
        self.write_metrics()
        return record

    def output_digest(self, name: str, rel: str) -> str:
        """The recorded SHA-256 of a finished stage's output: what downstream fingerprints build on."""
        record = json.loads(self._marker(name).read_text(encoding="utf-8"))
        return record["outputs"][rel]["sha256"]

    def records(self) -> list[dict[str, Any]]:
        out = []
        for name, fp in self.expected.items():
            path = self._marker(name)
            record = read_marker(path) if path.is_file() else None
            if record is not None and record.get("fingerprint") == fp:
                out.append(with_kind_and_iteration(record))
        return out

    def write_metrics(self) -> None:
        if not current_world().writes_here:  # with several ranks, rank 0 keeps the run directory's files
            return
        write_jsonl(self.run_dir / "metrics.jsonl",
                    ({k: v for k, v in r.items() if k not in ("fingerprint", "outputs")} for r in self.records()))
