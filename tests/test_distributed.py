"""Data parallelism on the CPU: `torchrun --standalone --nproc_per_node 2` (gloo) runs a small cpu_tiny variant and
must give the run directory of one process: the same pairs (token ids), log-probs within 1e-5, adapters within
1e-5 and metrics within 1e-5 (relative). Measured here: all bit-identical, since every batch and micro-batch is the
same one as in one process; the tolerance leaves room for the order of the gradient sum over ranks.

The 2-rank run is first killed (SIGKILL on rank 1 inside generation): torchrun stops rank 0 too, and the rerun
resumes from both ranks' answer logs; so the equality also covers resuming. A rank that raises stops every rank
with one `error:` line. Every process runs one thread (`model.threads=1`), so that no number depends on how a matmul
splits over threads."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import SMALL_BASE_PATCH
from frugal_spin.distributed import World
from frugal_spin.io import read_jsonl, read_safetensors

REPO = Path(__file__).resolve().parents[1]
# 20 training prompts in 5 generation batches (ranks take 3 and 2), accumulation windows of 2 micro-batches (one
# per rank), 8 held-out prompts in 2 batches.
OVERRIDES = ["data.fraction=0.01", "data.eval_size=8", "spin.iterations=1", "sft.epochs=1",
             "sft.micro_batch_size=4", "sft.grad_accum_steps=2", "spin.micro_batch_size=4", "spin.grad_accum_steps=2",
             "generation.max_new_tokens=8", "generation.batch_size=4", "eval.max_new_tokens=8", "eval.batch_size=4",
             "distributed.timeout_s=60", "model.threads=1"]
# Faults for one rank only: RANK is set by torchrun for each worker.
LAUNCHER = SMALL_BASE_PATCH + textwrap.dedent("""
    import os, sys
    if os.environ.get("RANK") == "1" and os.environ.get("TEST_RANK1_CRASH_AT"):
        os.environ["FRUGAL_SPIN_CRASH_AT"] = os.environ["TEST_RANK1_CRASH_AT"]
    if os.environ.get("RANK") == "1" and os.environ.get("TEST_RANK1_RAISE_AT"):
        import frugal_spin.train
        from frugal_spin.errors import UserError

        def crash_point(point, count=None):
            if point == os.environ["TEST_RANK1_RAISE_AT"]:
                raise UserError("injected failure on rank 1")

        frugal_spin.train.crash_point = crash_point
    from frugal_spin.__main__ import main
    sys.exit(main(sys.argv[1:]))
""")


def _launch(tmp: Path, ranks: int, out: Path, cache: Path, **env: str) -> subprocess.CompletedProcess:
    script = tmp / "launch.py"
    script.write_text(LAUNCHER)
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "FRUGAL_SPIN_CACHE": str(cache), **env}
    full_env.pop("FRUGAL_SPIN_CRASH_AT", None)
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={ranks}"]
    return subprocess.run([*launcher, str(script), str(REPO / "recipes" / "cpu_tiny.yaml"), f"output_dir={out}",
                           *OVERRIDES], env=full_env, capture_output=True, text=True, timeout=600, cwd=tmp)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_base_cache):
    tmp = tmp_path_factory.mktemp("ranks")
    one = _launch(tmp, 1, tmp / "one", small_base_cache)
    assert one.returncode == 0, one.stderr[-3000:]
    killed = _launch(tmp, 2, tmp / "two", small_base_cache, TEST_RANK1_CRASH_AT="iter_0.generate.batch@1")
    logs = {p.name: len(p.read_text().splitlines()) for p in (tmp / "two" / "iter_0").glob("answers.partial*")}
    resumed = _launch(tmp, 2, tmp / "two", small_base_cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"one": tmp / "one", "two": tmp / "two", "killed": killed, "logs": logs}


def test_a_killed_rank_stops_the_run_and_each_rank_kept_its_own_answer_log(runs):
    assert runs["killed"].returncode != 0
    # Rank 1 died right after saving its first batch (header + 4 answers); rank 0 kept its own file.
    assert runs["logs"].get("answers.partial.rank1.jsonl") == 5, runs["logs"]
    assert "answers.partial.jsonl" in runs["logs"]
    assert not list((runs["two"] / "iter_0").glob("answers.partial*"))  # removed once the stage finished


def test_two_ranks_give_the_pairs_of_one_process(runs):
    for rel in ["eval/anchor_pairs.jsonl", "iter_0/pairs.jsonl"]:
        one, two = read_jsonl(runs["one"] / rel), read_jsonl(runs["two"] / rel)
        assert len(one) == len(two) > 0
        assert [r["generated_ids"] for r in one] == [r["generated_ids"] for r in two], rel
        assert one == two


@pytest.mark.parametrize("rel", ["eval/anchor_logps.safetensors", "iter_0/opponent_logps.safetensors"])
def test_two_ranks_give_the_log_probs_of_one_process(runs, rel):
    one, two = read_safetensors(runs["one"] / rel), read_safetensors(runs["two"] / rel)
    for key in ("real", "generated"):
        assert not torch.isnan(two[key]).any()  # every row was filled by some rank
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=0)


@pytest.mark.parametrize("stage", ["sft", "iter_0"])
def test_two_ranks_train_the_adapter_of_one_process(runs, stage):
    one = read_safetensors(runs["one"] / stage / "adapter" / "adapter_model.safetensors")
    two = read_safetensors(runs["two"] / stage / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    start = read_safetensors(runs["one"] / "sft" / "adapter" / "adapter_model.safetensors")
    if stage == "iter_0":  # the check can fail: SPIN training moved the weights
        assert any((one[k] - start[k]).abs().max() > 0 for k in one)
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=0)


def test_two_ranks_give_the_metrics_of_one_process(runs):
    one = [json.loads(x) for x in (runs["one"] / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (runs["two"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in one] == [r["stage"] for r in two]
    compared = 0
    for a, b in zip(one, two):
        for key in ("train_loss", "heldout_nll", "spin_loss", "reward_margin", "reward_accuracy", "exact_match",
                    "optimizer_steps", "tokens", "pairs", "answers", "opponent_real_logp_mean",
                    "opponent_generated_logp_mean"):
            if key in a["metrics"]:
                assert b["metrics"][key] == pytest.approx(a["metrics"][key], rel=1e-5, abs=1e-7), (a["stage"], key)
                compared += 1
        # Stages without a loss curve (eval, generate) have none on either side; pytest 9 refuses approx(None).
        if "loss_curve" in a["metrics"]:
            assert b["metrics"]["loss_curve"] == pytest.approx(a["metrics"]["loss_curve"], rel=1e-5), a["stage"]
        else:
            assert "loss_curve" not in b["metrics"], a["stage"]
    assert compared >= 15


def test_the_setup_record_says_how_the_run_ran(runs):
    """Issue 20 item 6: a 2-rank run's records said nothing of the ranks or the process group."""
    setup = lambda d: json.loads((d / "stages" / "setup.json").read_text())["metrics"]  # noqa: E731
    assert (setup(runs["one"])["world_size"], setup(runs["one"])["process_group_backend"]) == (1, None)
    assert (setup(runs["two"])["world_size"], setup(runs["two"])["process_group_backend"]) == (2, "gloo")


def test_a_rank_that_raises_stops_every_rank_with_one_line(tmp_path, small_base_cache):
    done = _launch(tmp_path, 2, tmp_path / "run", small_base_cache, TEST_RANK1_RAISE_AT="sft.step")
    assert done.returncode != 0
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error:")]
    assert errors == ["error: injected failure on rank 1"], done.stderr[-3000:]
    assert not (tmp_path / "run" / "stages" / "sft.json").exists()


def test_batches_are_dealt_round_robin_and_per_rank_files_are_named_apart(tmp_path):
    one, second = World(), World(rank=1, size=2)
    assert all(one.owns(i) for i in range(5))
    assert [i for i in range(5) if second.owns(i)] == [1, 3]
    assert one.rank_file(tmp_path / "a.jsonl") == tmp_path / "a.jsonl"
    assert second.rank_file(tmp_path / "a.jsonl") == tmp_path / "a.rank1.jsonl"
    for name in ("a.jsonl", "a.rank1.jsonl", "a.rank3.jsonl", "b.jsonl"):
        (tmp_path / name).write_text("")
    assert World.rank_files(tmp_path / "a.jsonl") == [tmp_path / n for n in ("a.jsonl", "a.rank1.jsonl",
                                                                             "a.rank3.jsonl")]
    values = torch.tensor([1.0, float("nan")])
    assert one.merge(values) is values and one.write(lambda x: x + 1, 1) == 2  # one process: no collective
