"""Smoke test of profiling/bench_vs_trl.py: the frugal_spin worker trains a tiny model in a fresh process and
reports sane numbers. TRL is not a dependency of the package, so its worker is not run here."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "profiling" / "bench_vs_trl.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_vs_trl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pairs_have_the_benchmark_shape():
    bench = _bench()
    pairs = bench.make_pairs(3, 32, vocab=100)
    _, eos = bench.special_ids(100)
    assert pairs == bench.make_pairs(3, 32, vocab=100)  # fixed seed: both tools see the same ids
    for prompt, real, generated in pairs:
        assert len(prompt) == 8 and len(real) == 24 and len(generated) == 24
        assert real[-1] == eos and generated[-1] == eos
        assert max(prompt + real[:-1] + generated[:-1]) < 98  # never a special id inside the text


def test_tokenizer_round_trips_the_ids():
    pytest.importorskip("tokenizers")
    bench = _bench()
    tok = bench.build_tokenizer(200)
    _, eos = bench.special_ids(200)
    ids = [5, 0, 197, 42]
    text = " ".join(f"t{i}" for i in ids) + tok.eos_token  # how TRL appends eos to an answer
    assert tok(text)["input_ids"] == ids + [eos]
    assert tok.pad_token_id == eos


def test_frugal_worker_runs_two_steps(tmp_path):
    pytest.importorskip("bitsandbytes")
    bench = _bench()
    model_dir = bench.build_model_dir(tmp_path / "model", vocab=512, hidden=64, layers=2)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--worker", "frugal_spin", "--seq-len", "32", "--model-dir", str(model_dir),
         "--vocab", "512", "--steps", "2", "--warmup", "1"],
        capture_output=True, text=True, env=env, cwd=str(REPO), timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["tool"] == "frugal_spin"
    assert len(result["step_times"]) == 2 and all(t > 0 for t in result["step_times"])
    assert result["s_per_step"] > 0 and result["precompute_s_per_pair"] > 0
    assert result["peak_rss"] >= result["train_peak_rss"] >= result["rss_before"] > 0
    # Player == opponent at the first step, so the SPIN loss starts at log 2.
    assert abs(result["first_loss"] - 0.6931) < 1e-3


def test_results_csv_gets_one_header_and_every_row(tmp_path, monkeypatch):
    import csv

    bench = _bench()
    monkeypatch.setattr(bench, "RESULTS_CSV", tmp_path / "results.csv")
    row = {column: f"{column}-value" for column in bench.CSV_COLUMNS}
    bench.append_results([row])
    bench.append_results([row, {**row, "T": "2"}])
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["T"] for r in rows] == ["T-value", "T-value", "2"] and rows[0] == row
