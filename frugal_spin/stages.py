"""Stage bookkeeping for a run directory: completion markers with fingerprints, and `metrics.jsonl`.

A stage is complete when its marker `stages/<name>.json` exists and carries the fingerprint of everything that
produced the stage's outputs (the recipe fields it depends on and the fingerprints of its inputs). The marker is
written last, atomically, after the stage's outputs; so an interrupted stage has no marker and is redone, and a
changed recipe field changes the fingerprints of exactly the stages downstream of it.

`metrics.jsonl` is rebuilt from the markers after every stage, in pipeline order, so a resumed run never holds
duplicate or stale lines.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from frugal_spin.io import write_json, write_jsonl


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (dataclasses as dicts, fingerprints of inputs as strings)."""
    text = json.dumps(parts, sort_keys=True, default=lambda o: getattr(o, "__dict__", str(o)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
        """The stage's record if it finished with this fingerprint, else None."""
        self.expected[name] = fp
        path = self._marker(name)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        if record.get("fingerprint") != fp:
            return None
        self.write_metrics()  # a resumed run lists the stages it skipped too
        return record

    def complete(self, name: str, fp: str, kind: str, metrics: dict[str, Any], wall_time_s: float) -> dict[str, Any]:
        self.expected[name] = fp
        record = {"stage": name, "kind": kind, "metrics": metrics, "wall_time_s": round(wall_time_s, 3),
                  "fingerprint": fp}
        write_json(self._marker(name), record)
        self.write_metrics()
        return record

    def records(self) -> list[dict[str, Any]]:
        out = []
        for name, fp in self.expected.items():
            path = self._marker(name)
            if path.is_file():
                record = json.loads(path.read_text(encoding="utf-8"))
                if record.get("fingerprint") == fp:
                    out.append(record)
        return out

    def write_metrics(self) -> None:
        write_jsonl(self.run_dir / "metrics.jsonl",
                    ({k: v for k, v in r.items() if k != "fingerprint"} for r in self.records()))
