"""Run directories written by earlier versions still resume: nothing that finished is done again.

The fixtures in tests/fixtures/pre_plan_run_dirs/ were written by the code before stages became a plan (commit
a02a087; tests/fixtures/make_pre_plan_run_dirs.sh says how) on the shipped tiny base: a run with two SPIN
iterations mixing the previous pairs (every stage family, score_previous included) and a one-seed comparison with a
second SPIN loss and both continued-SFT arms. Their markers have no `iteration` field and call every training stage
`train`. Every fingerprint is made of what a run reads (the shipped base's files, the seeded built-in data, the
recipe, the outputs' hashes), so they hold on any CPU: the current code must find every stage finished, rewrite
no marker (a rerun stage would write a new one, with its own wall time) and list the migrated kinds in
metrics.jsonl."""

import json
import shutil
from pathlib import Path

import pytest

from frugal_spin.__main__ import main

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "pre_plan_run_dirs"
RECIPE = str(REPO / "recipes" / "cpu_tiny.yaml")
COMMON = ["data.fraction=0.01", "data.eval_size=8", "sft.epochs=1", "lora.r=2", "lora.alpha=4",
          "generation.max_new_tokens=8", "generation.batch_size=16", "eval.max_new_tokens=8", "eval.batch_size=16",
          "eval.samples=2", "model.device=cpu"]
RUN = ["spin.iterations=2", "spin.mix_previous_pairs=true"]
COMPARE = ["spin.iterations=1", "compare.seeds=1", "compare.spin_losses=[sigmoid, hinge]",
           "compare.equal_time_threshold=0.0"]


def _markers(directory: Path) -> dict[str, str]:
    """Every stage marker under `directory` but setup's (setup loads the base and data on every run by design);
    the other files of stages/ (the directory's identity, the base's recorded files) are not stages."""
    from frugal_spin.plan import describe

    return {str(p.relative_to(directory)): p.read_text() for p in sorted(directory.rglob("stages/*.json"))
            if describe(p.stem) is not None and p.stem != "setup"}


@pytest.fixture
def shipped_base(tmp_path, monkeypatch):
    """The shipped tiny base, as the fixtures were made with (no conftest SMALL_BASE): taken, not built."""
    monkeypatch.setenv("FRUGAL_SPIN_CACHE", str(tmp_path / "cache"))


def test_a_run_directory_of_the_earlier_version_resumes_without_redoing_a_stage(tmp_path, shipped_base):
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURES / "run", run_dir)
    before = _markers(run_dir)
    assert len(before) == 12  # sft, anchor, sft.eval, 2 x (generate, score, train, eval), iter_1.score_previous
    assert main([RECIPE, f"output_dir={run_dir}", *COMMON, *RUN]) == 0
    assert _markers(run_dir) == before
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == [
        "setup", "sft", "anchor", "sft.eval", "iter_0.generate", "iter_0.score", "iter_0.train", "iter_0.eval",
        "iter_1.generate", "iter_1.score", "iter_1.score_previous", "iter_1.train", "iter_1.eval"]


def test_a_compare_directory_of_the_earlier_version_resumes_without_redoing_a_stage(tmp_path, shipped_base):
    out = tmp_path / "cmp"
    shutil.copytree(FIXTURES / "cmp", out)
    before = _markers(out)
    assert len(before) == 4 + 3 + 4 + 2 + 2  # the seed run, its lm-eval-free arms: spin_hinge and two SFT arms
    assert main(["compare", RECIPE, f"output_dir={out}", *COMMON, *COMPARE]) == 0
    assert _markers(out) == before
    summary = json.loads((out / "compare" / "comparison.json").read_text())
    assert set(summary["arms"]) == {"spin", "spin_hinge", "sft_equal_steps", "sft_equal_time"}
