"""Wall time of the CPU default with 1 and 2 torch threads, without and with one competing CPU-bound process.

    python profiling/bench_threads.py [--threads 1 2 auto] [--repeats 1] [key=value overrides for the recipe ...]

Each run is the user's command, `python -m frugal_spin recipes/cpu_tiny.yaml output_dir=... model.threads=N`,
in a fresh process, into a fresh directory (the shipped tiny base makes that the whole cost). "busy" starts one
extra process that spins on one core for the whole run, the situation of a laptop compiling something or of a
shared machine. The load average before each run is recorded, because on a shared machine "idle" is only as idle
as the other users let it be. Writes the table to stdout and appends the rows to profiling/bench_threads.log.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPINNER = "while True: pass"
# Set these to run torch/MKL/oneDNN with AVX2 kernels only on an AVX-512 machine (results across CPU kinds).
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def one_run(threads: str, busy: bool, overrides: list[str], root: Path, timeout_s: float | None = None) -> dict:
    out = root / f"threads_{threads}_{'busy' if busy else 'quiet'}_{time.time_ns()}"
    load_before = os.getloadavg()[0]
    competitor = subprocess.Popen([sys.executable, "-c", SPINNER]) if busy else None
    try:
        started = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        try:
            subprocess.run([sys.executable, "-m", "frugal_spin", str(REPO / "recipes" / "cpu_tiny.yaml"),
                            f"output_dir={out}", f"model.threads={threads}", *overrides],
                           check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=timeout_s)
        except subprocess.TimeoutExpired:
            # Stopped: what it finished is still in metrics.jsonl; the wall time is a lower bound.
            return {"threads": threads, "load": "busy" if busy else "quiet", "wall_s": f"> {timeout_s:.0f}",
                    "stopped": True, "load_avg_before": round(load_before, 2), "exact_match": None,
                    "heldout_nll": None, "torch_threads": None, "stages_s": _stage_seconds(out)}
        wall = time.perf_counter() - started
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    records = {r["stage"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    stages_s = _stage_seconds(out)
    evals = {name: r["metrics"] for name, r in records.items() if name.endswith(".eval")}
    last_eval = list(evals.values())[-1]
    return {"threads": threads, "load": "busy" if busy else "quiet", "wall_s": round(wall, 1),
            "torch_threads": records["setup"]["metrics"].get("torch_threads"),
            "load_avg_before": round(load_before, 2), "exact_match": last_eval.get("exact_match"), "stages_s": stages_s,
            "heldout_nll": round(last_eval["heldout_nll"], 4), "env": {k: os.environ[k] for k in KERNEL_ENV
                                                                        if k in os.environ},
            "evals": {name: {k: round(m[k], 4) for k in ("heldout_nll", "spin_loss", "reward_accuracy",
                                                         "exact_match") if k in m} for name, m in evals.items()}}


def _stage_seconds(out: Path) -> dict[str, float]:
    """Wall seconds of every finished stage, from the run's metrics.jsonl (empty if none finished)."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return {}
    return {r["stage"]: round(r.get("wall_time_s", 0.0), 1) for r in map(json.loads, path.read_text().splitlines())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", nargs="+", default=["1", "2", "auto"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--loads", nargs="+", default=["quiet", "busy"], choices=["quiet", "busy"])
    parser.add_argument("--timeout", type=float, default=None, help="stop a run after this many seconds")
    parser.add_argument("overrides", nargs="*", help="recipe overrides passed to every run")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_threads_") as tmp:
        for _ in range(args.repeats):
            for load in args.loads:
                for threads in args.threads:
                    row = one_run(threads, load == "busy", args.overrides, Path(tmp), args.timeout)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    header = "| threads | load | wall s | torch threads | load avg before | exact match | held-out NLL |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['threads']} | {r['load']} | {r['wall_s']} | {r['torch_threads']} | {r['load_avg_before']} | "
              f"{r['exact_match']} | {r['heldout_nll']} |" for r in rows]
    print("\n".join(lines))
    with open(REPO / "profiling" / "bench_threads.log.jsonl", "a", encoding="utf-8") as f:
        f.writelines(json.dumps({**r, "overrides": args.overrides, "cpu": _cpu()}) + "\n" for r in rows)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
