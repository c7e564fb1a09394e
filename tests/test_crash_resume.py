"""A run killed with SIGKILL inside every stage, resumed each time by rerunning the same command, ends with the same
pairs, log-prob caches, adapters and metrics as an uninterrupted run with the same seed. Plus: a corrupted cache
file is detected and recomputed, an injected NaN stops the run keeping the last good adapter, and a table of user
mistakes each give one line, exit 2 and leave an earlier run untouched.

The processes are real subprocesses (`python -c` around `frugal_spin.__main__.main`), killed by the crash points
of `frugal_spin.faults` at exact places; the built-in base is shrunk as in tests/test_pipeline.py and shared."""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SMALL_BASE_PATCH
from frugal_spin.io import read_safetensors

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "cpu_tiny.yaml"
OVERRIDES = ["data.fraction=0.04", "data.eval_size=20", "spin.iterations=1", "sft.epochs=1",
             "sft.micro_batch_size=8", "sft.checkpoint_every_steps=2", "spin.micro_batch_size=8",
             "spin.checkpoint_every_steps=2", "generation.max_new_tokens=10", "generation.batch_size=16",
             "eval.max_new_tokens=10", "eval.batch_size=16"]
RUNNER = f"import sys; {SMALL_BASE_PATCH}; from frugal_spin.__main__ import main; sys.exit(main(sys.argv[1:]))"

# Every crash point of every stage of the plan (plan.crash_points): mid-training after and between checkpoints,
# mid-generation, after scoring, after an output is written but before its marker. The counted ones at: the 2nd
# checkpoint, the 3rd optimizer step, the 2nd generation batch (the anchor has 2 of 16 prompts, iteration 0 has 5).
COUNTS = {"checkpoint": 2, "step": 3, "batch": 2}


def _crash_points() -> list[str]:
    from frugal_spin.config import load_recipe
    from frugal_spin.plan import crash_points, plan

    points = crash_points(plan(load_recipe(RECIPE, OVERRIDES)))
    return [f"{p}@{COUNTS[p.rsplit('.', 1)[1]]}" if p.rsplit(".", 1)[1] in COUNTS else p for p in points]


CRASH_POINTS = _crash_points()


def _run(run_dir: Path, cache: Path, *extra: str, crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "FRUGAL_SPIN_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    env.pop("FRUGAL_SPIN_CRASH_AT", None)
    if crash_at:
        env["FRUGAL_SPIN_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-c", RUNNER, str(RECIPE), f"output_dir={run_dir}", *OVERRIDES, *extra],
                          env=env, capture_output=True, text=True, timeout=600)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _eval_metrics(run_dir: Path) -> dict[str, dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keep = ("heldout_nll", "spin_loss", "reward_margin", "reward_accuracy", "exact_match", "train_loss",
            "optimizer_steps", "opponent_real_logp_mean", "opponent_generated_logp_mean")
    return {r["stage"]: {k: v for k, v in r["metrics"].items() if k in keep} for r in records}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_base_cache):
    root = tmp_path_factory.mktemp("crash")
    cache = small_base_cache
    reference = _run(root / "reference", cache)
    assert reference.returncode == 0, reference.stderr[-3000:]
    return root, cache


def test_sigkill_in_every_stage_then_resume_gives_the_uninterrupted_result(runs):
    root, cache = runs
    assert len(CRASH_POINTS) == 18 and {p.split(".")[0] for p in CRASH_POINTS} == {"setup", "sft", "anchor", "iter_0"}
    run_dir = root / "killed"
    for point in CRASH_POINTS:
        result = _run(run_dir, cache, crash_at=point)
        assert result.returncode == -signal.SIGKILL, f"{point} was never reached:\n{result.stderr[-2000:]}"
    final = _run(run_dir, cache)
    assert final.returncode == 0, final.stderr[-3000:]

    reference = root / "reference"
    for rel in ("iter_0/pairs.jsonl", "eval/anchor_pairs.jsonl"):
        assert (run_dir / rel).read_text() == (reference / rel).read_text(), rel
    for rel in ("iter_0/opponent_logps.safetensors", "eval/anchor_logps.safetensors",
                "sft/adapter/adapter_model.safetensors", "iter_0/adapter/adapter_model.safetensors"):
        got, want = read_safetensors(run_dir / rel), read_safetensors(reference / rel)
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0, msg=f"{rel} {key}")
    got, want = _eval_metrics(run_dir), _eval_metrics(reference)
    assert list(got) == list(want)
    for stage in want:
        assert got[stage] == pytest.approx(want[stage], abs=1e-5), stage
    # nothing left over from the interruptions
    assert not list(run_dir.rglob("checkpoint*")) and not list(run_dir.rglob("*.partial.jsonl"))
    assert not list(run_dir.rglob(".*.tmp"))


def test_corrupted_or_truncated_cache_is_detected_and_recomputed_with_a_warning(runs, tmp_path):
    root, cache = runs
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(root / "reference", run_dir)
    logps, pairs = run_dir / "iter_0" / "opponent_logps.safetensors", run_dir / "iter_0" / "pairs.jsonl"
    want_pairs = _digest(pairs)

    def assert_logps_recomputed():
        # tensors, not bytes: safetensors writes its metadata keys in a per-process order
        got, want = read_safetensors(logps), read_safetensors(root / "reference" / logps.relative_to(run_dir))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    data = bytearray(logps.read_bytes())
    data[-3] ^= 0x55  # same size, one flipped byte
    logps.write_bytes(bytes(data))
    result = _run(run_dir, cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "iter_0.score: iter_0/opponent_logps.safetensors is corrupt" in result.stderr
    assert_logps_recomputed()

    pairs.write_text("".join(pairs.read_text().splitlines(keepends=True)[:-1]))  # cut short by a crash
    result = _run(run_dir, cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "iter_0.generate: iter_0/pairs.jsonl is truncated" in result.stderr
    assert _digest(pairs) == want_pairs
    assert_logps_recomputed()


def test_the_cache_files_carry_what_produced_them(runs):
    root, _ = runs
    from safetensors import safe_open

    reference = root / "reference"
    with safe_open(str(reference / "iter_0" / "opponent_logps.safetensors"), "pt") as f:
        metadata = f.metadata()
    score_marker = json.loads((reference / "stages" / "iter_0.score.json").read_text())
    assert metadata["fingerprint"] == score_marker["fingerprint"]
    assert metadata["pairs_sha256"] == _digest(reference / "iter_0" / "pairs.jsonl")
    generate_marker = json.loads((reference / "stages" / "iter_0.generate.json").read_text())
    assert generate_marker["outputs"]["iter_0/pairs.jsonl"]["sha256"] == _digest(reference / "iter_0" / "pairs.jsonl")


def test_injected_nan_stops_the_run_keeping_the_last_good_adapter(runs, tmp_path):
    _, cache = runs
    runner = RUNNER.replace(
        "from frugal_spin.__main__",
        "import frugal_spin.train as t; real = t.sft_loss; "
        "t.sft_loss = lambda logps, n: real(logps, n) * float('nan'); "
        "from frugal_spin.__main__")
    env = {**os.environ, "FRUGAL_SPIN_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", runner, str(RECIPE), f"output_dir={run_dir}", *OVERRIDES,
                             "sft.max_nonfinite_in_a_row=2"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: sft: 2 non-finite losses or gradients in a row"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert (run_dir / "sft" / "last_good_adapter" / "adapter_model.safetensors").is_file()
    assert not (run_dir / "stages" / "sft.json").exists() and not (run_dir / "sft" / "adapter").exists()
