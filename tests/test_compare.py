"""`compare`: comparison.json against the sub-runs' own records, reuse on rerun, the verdict logic on synthetic
numbers, the budget arithmetic, and the three SPIN-literature switches (each shown by its effect)."""

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from conftest import SMALL_BASE
from frugal_spin import tiny_base
from frugal_spin.__main__ import main
from frugal_spin.compare.budgets import equal_time_budget
from frugal_spin.compare.results import arm_difference, hypothesis_verdict, mean_std
from frugal_spin.config import SFTConfig
from frugal_spin.io import read_jsonl, read_safetensors, write_jsonl
from frugal_spin.errors import UserError
from frugal_spin.lm_eval_hook import check_lm_eval_available, flatten_results
from frugal_spin.stages.sft import sft_config_for_steps
from frugal_spin.train import total_optimizer_steps
from frugal_spin.turns import scored_pair

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "cpu_tiny.yaml")
TINY = ["data.fraction=0.05", "data.eval_size=24", "sft.epochs=1", "generation.max_new_tokens=16",
        "generation.batch_size=32", "eval.max_new_tokens=16", "eval.batch_size=32"]
# Two SPIN losses as arms: the recipe's spin.loss (sigmoid, in seed_<s>/) and space (in seed_<s>/spin_space/).
COMPARE = TINY + ["spin.iterations=2", "compare.seeds=2", "compare.spin_losses=[sigmoid, space]"]


def _main(cache: Path, args: list[str]) -> int:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FRUGAL_SPIN_CACHE", str(cache))
        mp.setattr(tiny_base, "_resolve_spec", lambda seed, spec: SMALL_BASE)  # seconds instead of minutes
        return main(args)


@pytest.fixture(scope="module")
def root(tmp_path_factory, small_base_cache):
    root = tmp_path_factory.mktemp("compare")
    (root / "cache").symlink_to(small_base_cache)  # the session's small base (conftest.py), built once
    return root


@pytest.fixture(scope="module")
def compare_dir(root):
    assert _main(root / "cache", ["compare", RECIPE, f"output_dir={root / 'out'}", *COMPARE]) == 0
    return root / "out" / "compare"


def _records(run_dir: Path) -> dict[str, dict]:
    return {r["stage"]: r for r in read_jsonl(run_dir / "metrics.jsonl")}


def _markers(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): p.read_text() for p in sorted(directory.rglob("stages/*.json"))
            if p.name != "setup.json"}  # setup (loading base and data) runs on every invocation by design


# ---------------------------------------------------------------------------------------------- end to end

def test_comparison_json_matches_the_sub_runs(compare_dir):
    summary = json.loads((compare_dir / "comparison.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["points"] == ["sft", "iter_0", "iter_1"]
    assert (compare_dir / "comparison.md").is_file()
    for png in ("comparison_metrics.png", "comparison_timeline.png"):
        assert (compare_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    arms = summary["arms"]
    budget = summary["budget"]
    assert budget["equal_time_arm"] == (abs(budget["relative_difference"]) > budget["threshold"])
    assert set(arms) == {"spin", "spin_space", "sft_equal_steps"} | (
        {"sft_equal_time"} if budget["equal_time_arm"] else set())
    assert arms["spin"]["loss"] == "sigmoid" and arms["spin_space"]["label"] == "LoRA-SPIN (space)"
    for arm in arms:
        for i, seed in enumerate(summary["seeds"]):
            seed_records = _records(compare_dir / f"seed_{seed}")
            arm_records = seed_records if arm == "spin" else _records(compare_dir / f"seed_{seed}" / arm)
            stage = "iter" if arm.startswith("spin") else "block"
            # Every arm starts at the seed's own SFT evaluation.
            assert arms[arm]["metrics"]["sft"]["heldout_nll"]["values"][i] == \
                seed_records["sft.eval"]["metrics"]["heldout_nll"]
            for t in range(2):
                recorded = arm_records[f"{stage}_{t}.eval"]["metrics"]
                for key in ("heldout_nll", "spin_loss", "reward_margin", "reward_accuracy", "exact_match"):
                    assert arms[arm]["metrics"][f"iter_{t}"][key]["values"][i] == recorded[key], (arm, t, key)
                steps = arm_records[f"{stage}_{t}.train"]["metrics"]["optimizer_steps"]
                assert arms[arm]["optimizer_steps"][f"iter_{t}"][i] == steps
                spin_steps = seed_records[f"iter_{t}.train"]["metrics"]["optimizer_steps"]
                if arm == "sft_equal_steps":
                    assert steps == spin_steps  # the equal-steps budget, block by block
                if arm == "sft_equal_time":
                    assert steps == budget["equal_time_steps"][t]
    nll = arms["spin"]["metrics"]["iter_1"]["heldout_nll"]
    assert math.isclose(nll["mean"], statistics.fmean(nll["values"]))
    assert math.isclose(nll["std"], statistics.stdev(nll["values"]))
    # The hypothesis is stated for both losses and every arm, and agrees with the numbers it quotes.
    verdicts = {(h["arm"], h["loss"]): h for h in summary["hypothesis"]}
    assert set(verdicts) == {(a, loss) for a in arms for loss in ("heldout_nll", "spin_loss")}
    h = verdicts[("spin", "heldout_nll")]
    sft_nll = arms["spin"]["metrics"]["sft"]["heldout_nll"]["mean"]
    assert h["holds"] == (nll["mean"] < sft_nll) and math.isclose(h["difference"], nll["mean"] - sft_nll)
    # The phases the timeline draws: the brief's, without setup, SFT arms on the seed's shared SFT.
    assert list(arms["spin"]["phases"])[:4] == ["SFT", "SFT eval", "iter0 generate", "iter0"]
    assert list(arms["sft_equal_steps"]["phases"]) == ["SFT", "SFT eval", "SFT block0", "block0 eval",
                                                      "SFT block1", "block1 eval"]
    assert list(arms["spin_space"]["phases"]) == list(arms["spin"]["phases"])
    # A verdict per SPIN loss, each against every SFT arm.
    assert set(summary["spin_arms_vs_sft"]) == {"spin", "spin_space"}
    assert summary["spin_arms_vs_sft"]["spin"] == summary["spin_vs_sft"]
    markdown = (compare_dir / "comparison.md").read_text()
    assert "## Verdict per SPIN loss" in markdown and "**LoRA-SPIN (space)**: held-out NLL" in markdown
    assert "## LoRA-SPIN (space) against continued SFT" in markdown


def test_loss_arms_share_iteration_0s_generation_and_scoring_and_nothing_they_should_not(compare_dir):
    """The loss is part of training's fingerprint only: iteration 0 (opponent = the SFT adapter) generates and
    scores once per seed; training, and everything after it, differs per loss."""
    for seed in (0, 1):
        main, arm = compare_dir / f"seed_{seed}", compare_dir / f"seed_{seed}" / "spin_space"
        marker = lambda d, name: json.loads((d / "stages" / f"{name}.json").read_text())  # noqa: E731
        for stage, output in (("iter_0.generate", "iter_0/pairs.jsonl"),
                              ("iter_0.score", "iter_0/opponent_logps.safetensors")):
            assert marker(arm, stage)["fingerprint"] == marker(main, stage)["fingerprint"]
            assert marker(arm, stage)["metrics"]["reused_from"] == "../iter_0"
            assert marker(arm, stage)["wall_time_s"] == marker(main, stage)["wall_time_s"]  # its cost, charged
            assert (arm / output).read_bytes() == (main / output).read_bytes()
        for stage in ("iter_0.train", "iter_0.eval", "iter_1.generate", "iter_1.score", "iter_1.train"):
            assert marker(arm, stage)["fingerprint"] != marker(main, stage)["fingerprint"], stage
            assert "reused_from" not in marker(arm, stage)["metrics"]
        # The two arms trained differently from the same start: their adapters differ.
        assert (arm / "iter_0" / "adapter").is_dir()
        assert _records(arm)["iter_0.train"]["metrics"]["train_loss"] != \
            _records(main)["iter_0.train"]["metrics"]["train_loss"]
        # The seed run's own metrics.jsonl is untouched by the arm's reading of its markers.
        assert [r["stage"] for r in read_jsonl(main / "metrics.jsonl")][:3] == ["setup", "sft", "anchor"]
        assert not any(r["stage"].startswith("iter_") and "reused_from" in r["metrics"]
                       for r in read_jsonl(main / "metrics.jsonl"))


def test_rerun_with_nothing_changed_redoes_nothing(compare_dir, root):
    before = _markers(compare_dir)
    summary_before = (compare_dir / "comparison.json").read_text()
    assert len(before) >= 2 * (4 + 4 * 2 + 2 * 2)  # seeds x (sft, anchor, sft.eval + iterations + SFT blocks)
    assert _main(root / "cache", ["compare", RECIPE, f"output_dir={root / 'out'}", *COMPARE]) == 0
    assert _markers(compare_dir) == before  # same fingerprints and the recorded wall times of the first run
    assert (compare_dir / "comparison.json").read_text() == summary_before


def test_sft_arm_learning_rate_redoes_only_the_sft_arms(compare_dir, root):
    """Runs after the rerun test (module order): it changes the SFT arms of the shared compare directory."""
    before = _markers(compare_dir)
    args = ["compare", RECIPE, f"output_dir={root / 'out'}", *COMPARE, "compare.sft_arm_learning_rate=1e-4"]
    assert _main(root / "cache", args) == 0
    after = _markers(compare_dir)
    spin_arm = [name for name in before if name.count("/") == 2]  # seed_<s>/stages/<stage>.json
    assert spin_arm and all(after[name] == before[name] for name in spin_arm)
    blocks = [name for name in before if "/sft_equal_steps/stages/block_" in name and ".train." in name]
    assert blocks and all(after[name] != before[name] for name in blocks)
    for seed in (0, 1):
        records = _records(compare_dir / f"seed_{seed}" / "sft_equal_steps")
        assert records["block_0.train"]["metrics"]["learning_rate"] == 1e-4


def test_bad_compare_input_is_one_line_error(root, capsys):
    assert _main(root / "cache", ["compare", RECIPE, f"output_dir={root / 'bad'}", "compare.seeds=0"]) == 2
    assert capsys.readouterr().err.strip() == "error: compare.seeds must be >= 1, got 0"
    assert _main(root / "cache", ["compare", RECIPE, f"output_dir={root / 'bad'}", "spin.iterations=0"]) == 2
    assert "compare needs spin.iterations >= 1" in capsys.readouterr().err
    assert not (root / "bad").exists()


# ------------------------------------------------------------------- continued-SFT blocks are training stages

@pytest.fixture(scope="module")
def blocks(root):
    """A one-seed, one-iteration comparison whose SFT arms the tests below train again (compare.sft_arm_learning_rate
    changes only the blocks' fingerprints): the blocks then train alone, with the seed run's stages skipped."""
    args = ["compare", RECIPE, f"output_dir={root / 'blocks'}", *TINY, "spin.iterations=1", "compare.seeds=1",
            "compare.spin_losses=[]", "sft.micro_batch_size=8"]
    assert _main(root / "cache", args) == 0
    return args, root / "blocks" / "compare" / "seed_0"


def test_a_continued_sft_block_halves_its_micro_batch_on_out_of_memory(root, blocks, monkeypatch, capsys):
    """Issue 21: continued-SFT blocks called the bare training loop, without the guarantees SFT and SPIN have; an
    out-of-memory error in a block was a traceback. Now a block halves its micro-batch as SFT does."""
    from frugal_spin.stages import sft

    args, seed_dir = blocks
    real = sft.sft_step_fn

    def small_memory(*a, **k):
        step = real(*a, **k)

        def limited(batch):
            if len(batch) > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
            return step(batch)

        return limited

    monkeypatch.setattr(sft, "sft_step_fn", small_memory)
    capsys.readouterr()
    assert _main(root / "cache", [*args, "compare.sft_arm_learning_rate=1e-4"]) == 0
    assert "block_0.train: CUDA out of memory at micro_batch_size 8; retrying" in capsys.readouterr().err
    block = _records(seed_dir / "sft_equal_steps")["block_0.train"]["metrics"]
    assert (block["micro_batch_size"], block["grad_accum_steps"], block["learning_rate"]) == (2, 4, 1e-4)
    assert block["optimizer_steps"] == _records(seed_dir)["iter_0.train"]["metrics"]["optimizer_steps"]
    assert not (seed_dir / "sft_equal_steps" / "block_0" / "oom_batching.json").exists()


def test_a_continued_sft_block_stops_a_nan_streak_keeping_its_last_good_adapter(root, blocks, monkeypatch, capsys):
    import frugal_spin.train as train

    args, seed_dir = blocks
    real = train.sft_loss
    monkeypatch.setattr(train, "sft_loss", lambda logps, n: real(logps, n) * float("nan"))
    capsys.readouterr()
    assert _main(root / "cache", [*args, "compare.sft_arm_learning_rate=2e-4"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    last_good = seed_dir / "sft_equal_steps" / "block_0" / "last_good_adapter"
    assert line.startswith("error: block_0.train: 5 non-finite losses or gradients in a row at optimizer step 5/")
    assert line.endswith(f"; the last good adapter is in {last_good}")
    assert (last_good / "adapter_model.safetensors").is_file()
    marker = json.loads((seed_dir / "sft_equal_steps" / "stages" / "block_0.train.json").read_text())
    assert marker["metrics"]["learning_rate"] == 1e-4  # the earlier block's marker: no half-trained block replaced it


# ---------------------------------------------------------------------------------------- pure functions

def test_hypothesis_verdict_holds_beyond_the_spread():
    v = hypothesis_verdict("heldout_nll", [0.30, 0.31, 0.32], [0.25, 0.26, 0.27])
    assert v["holds"] and v["exceeds_spread"] and math.isclose(v["difference"], -0.05)
    assert math.isclose(v["spread"], 0.01) and v["seeds_lower"] == 3
    assert v["verdict"] == "holds and exceeds the spread"
    assert "lower by 0.0500" in v["statement"] and "exceeds the spread" in v["statement"]


def test_hypothesis_verdict_holds_within_the_spread_is_not_established():
    v = hypothesis_verdict("spin_loss", [0.693, 0.693, 0.693], [0.60, 0.70, 0.67])
    assert v["holds"] and v["exceeds_spread"] is False and v["seeds_lower"] == 2 and v["seeds_higher"] == 1
    assert v["verdict"] == "holds but within the spread" and "not established" in v["statement"]


def test_hypothesis_verdict_reports_a_negative_result():
    v = hypothesis_verdict("heldout_nll", [0.22, 0.22, 0.23], [0.30, 0.35, 0.32])
    assert not v["holds"] and v["verdict"] == "does not hold (negative result, beyond the spread)"
    assert "higher by" in v["statement"] and "higher in 3 of 3 seeds" in v["statement"]
    assert "Negative result" in v["statement"]
    small = hypothesis_verdict("heldout_nll", [0.22, 0.25, 0.23], [0.225, 0.252, 0.236])
    assert not small["holds"] and small["verdict"] == "does not hold (negative result, within the spread)"
    equal = hypothesis_verdict("heldout_nll", [0.2, 0.3], [0.3, 0.2])  # same mean: no improvement either
    assert not equal["holds"] and equal["verdict"] == "does not hold (negative result)"
    assert "unchanged" in equal["statement"]


def test_one_seed_has_no_spread():
    assert mean_std([0.5]) == {"mean": 0.5, "std": None, "values": [0.5]}
    v = hypothesis_verdict("heldout_nll", [0.3], [0.2])
    assert v["holds"] and v["exceeds_spread"] is None and "spread over seeds is unknown" in v["statement"]


def test_arm_difference_knows_which_direction_is_better():
    assert arm_difference("heldout_nll", [0.2, 0.21], [0.3, 0.31])["better"] == "spin"
    assert arm_difference("exact_match", [0.2, 0.21], [0.3, 0.31])["better"] == "sft"
    d = arm_difference("exact_match", [0.40, 0.50], [0.42, 0.44])
    assert d["better"] == "spin" and d["exceeds_spread"] is False and d["seeds_spin_better"] == 1
    assert arm_difference("heldout_nll", [0.2, 0.21, 0.3], [0.3, 0.31, 0.29])["seeds_spin_better"] == 2


@pytest.mark.parametrize("n_items, micro, accum, steps", [(100, 16, 1, 7), (100, 16, 1, 31), (2000, 16, 1, 125),
                                                          (2000, 16, 1, 379), (37, 4, 3, 11), (5, 8, 1, 4)])
def test_sft_config_for_steps_gives_exactly_that_many_steps(n_items, micro, accum, steps):
    cfg = sft_config_for_steps(SFTConfig(micro_batch_size=micro, grad_accum_steps=accum), n_items, steps)
    assert total_optimizer_steps(n_items, cfg) == steps


def _fake_records(directory: Path, records: list[tuple[str, float, int]]):
    write_jsonl(directory / "metrics.jsonl", [{"stage": s, "kind": "train", "wall_time_s": w,
                                               "metrics": {"optimizer_steps": n}} for s, w, n in records])


def test_equal_time_budget_sizes_the_arm_from_recorded_times(tmp_path):
    _fake_records(tmp_path, [("iter_0.generate", 4.0, 0), ("iter_0.score", 2.0, 0), ("iter_0.train", 6.0, 100),
                             ("iter_1.generate", 4.0, 0), ("iter_1.score", 2.0, 0), ("iter_1.score_previous", 2.0, 0),
                             ("iter_1.train", 12.0, 200)])
    _fake_records(tmp_path / "sft_equal_steps", [("block_0.train", 3.0, 100), ("block_1.train", 6.0, 200)])
    budget = equal_time_budget(tmp_path, 2, threshold=0.2)
    assert budget["spin_iteration_s"] == [12.0, 20.0] and math.isclose(budget["sft_step_s"], 0.03)
    assert math.isclose(budget["relative_difference"], (32 - 9) / 32)
    assert budget["equal_time_arm"] and budget["equal_time_steps"] == [400, 667]
    assert equal_time_budget(tmp_path, 2, threshold=0.8)["equal_time_steps"] is None


# -------------------------------------------------------------------------------------------- the switches

@pytest.fixture(scope="module")
def switch_run(root):
    """One small run directory that each switch test reruns with one switch more (module order matters)."""
    run_dir = root / "switches"
    assert _main(root / "cache", [RECIPE, f"output_dir={run_dir}", *TINY, "spin.iterations=2"]) == 0
    return run_dir


def _rerun(root, run_dir, *extra):
    before = {p.name: p.read_text() for p in (run_dir / "stages").glob("*.json")}
    assert _main(root / "cache", [RECIPE, f"output_dir={run_dir}", *TINY, "spin.iterations=2", *extra]) == 0
    after = {p.name: p.read_text() for p in (run_dir / "stages").glob("*.json")}
    return before, after


def test_mixing_previous_pairs_trains_on_both_iterations_scored_by_the_current_opponent(root, switch_run):
    before, after = _rerun(root, switch_run, "spin.mix_previous_pairs=true")
    for same in ("sft.json", "anchor.json", "iter_0.generate.json", "iter_0.score.json", "iter_0.train.json",
                 "iter_0.eval.json", "iter_1.generate.json", "iter_1.score.json"):
        assert after[same] == before[same], same  # mixing starts at iteration 1
    assert after["iter_1.train.json"] != before["iter_1.train.json"] and "iter_1.score_previous.json" in after
    records = _records(switch_run)
    n = len(read_jsonl(switch_run / "iter_0" / "pairs.jsonl"))
    assert records["iter_0.train"]["metrics"]["pairs"] == n
    assert records["iter_1.train"]["metrics"]["pairs"] == 2 * n
    # Iteration 1's opponent (base + iter_0 adapter) scored the previous pairs: their real answers are the same
    # (prompt, answer) sequences as iteration 1's own, so the log-probs agree with iteration 1's cache and differ
    # from iteration 0's (the SFT opponent's).
    previous = read_safetensors(switch_run / "iter_1" / "previous_pairs_logps.safetensors")
    current = read_safetensors(switch_run / "iter_1" / "opponent_logps.safetensors")
    stale = read_safetensors(switch_run / "iter_0" / "opponent_logps.safetensors")
    assert previous["real"].shape == (n,) and previous["generated"].shape == (n,)
    # A real answer is scored without its end token in a pair whose generated answer was cut (turns.scored_pair),
    # so it is the same scored sequence in both iterations only where both pairs treat its end alike.
    stop_ids = records["setup"]["metrics"]["stop_token_ids"]
    rows_0 = read_jsonl(switch_run / "iter_0" / "pairs.jsonl")
    rows_1 = read_jsonl(switch_run / "iter_1" / "pairs.jsonl")
    same = torch.tensor([scored_pair(a["real_ids"], a["generated_ids"], stop_ids)[0]
                         == scored_pair(b["real_ids"], b["generated_ids"], stop_ids)[0]
                         for a, b in zip(rows_0, rows_1)])
    assert same.sum() > n // 2
    assert (previous["real"] - current["real"])[same].abs().max() < 1e-4
    assert (previous["real"] - stale["real"]).abs().max() > 1e-3


def test_beta_per_iteration_is_used_and_recorded_per_iteration(root, switch_run):
    before, after = _rerun(root, switch_run, "spin.mix_previous_pairs=true", "spin.beta=[0.1, 0.3]")
    records = _records(switch_run)
    assert records["iter_0.train"]["metrics"]["beta"] == 0.1 and records["iter_1.train"]["metrics"]["beta"] == 0.3
    # beta[0] equals the earlier scalar 0.1: iteration 0 and every evaluation's fingerprint are unchanged.
    for same in ("iter_0.train.json", "sft.eval.json", "iter_0.eval.json", "iter_1.score_previous.json"):
        assert after[same] == before[same], same
    assert after["iter_1.train.json"] != before["iter_1.train.json"]


def test_answers_per_prompt_gives_k_pairs_per_prompt(root, switch_run):
    before, after = _rerun(root, switch_run, "generation.answers_per_prompt=2")
    assert after["anchor.json"] == before["anchor.json"] and after["sft.json"] == before["sft.json"]
    assert after["iter_0.generate.json"] != before["iter_0.generate.json"]
    rows = read_jsonl(switch_run / "iter_0" / "pairs.jsonl")
    n_prompts = _records(switch_run)["setup"]["metrics"]["train_examples"]
    assert len(rows) == 2 * n_prompts and _records(switch_run)["iter_0.train"]["metrics"]["pairs"] == 2 * n_prompts
    for first, second in zip(rows[0::2], rows[1::2]):
        assert first["prompt_ids"] == second["prompt_ids"] and first["real_ids"] == second["real_ids"]
    # Two samples at temperature 1 differ for most prompts (identical answers would mean one sample copied).
    assert sum(a["generated_ids"] != b["generated_ids"] for a, b in zip(rows[0::2], rows[1::2])) > n_prompts // 2
    assert len(read_safetensors(switch_run / "iter_0" / "opponent_logps.safetensors")["real"]) == 2 * n_prompts


# ------------------------------------------------------------------------------- lm-evaluation-harness hook

def test_lm_eval_tasks_without_the_harness_are_a_user_error(monkeypatch):
    import frugal_spin.lm_eval_hook as hook

    monkeypatch.setattr(hook.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install lm_eval"):
        check_lm_eval_available(["hellaswag"])
    check_lm_eval_available([])  # no tasks, no requirement


def test_flatten_results_keeps_numeric_metrics_only():
    results = {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": float("nan"), "sample_len": 8},
               "u": {"word_perplexity,none": 12.0, "flag": True}}
    assert flatten_results(results) == {"t/acc,none": 0.5, "u/word_perplexity,none": 12.0}


def _arithmetic_choice_task(directory: Path) -> Path:
    """A two-choice harness task on local held-out arithmetic rows: the real answer against a wrong last digit."""
    from frugal_spin.tasks import arithmetic

    directory.mkdir(parents=True, exist_ok=True)
    rows = arithmetic.build_splits(seed=99, n_train=0, n_heldout=8)["heldout"]
    docs = []
    for r in rows:
        question = next(m["content"] for m in r["messages"] if m["role"] == "user")
        answer = next(m["content"] for m in r["messages"] if m["role"] == "assistant")
        wrong = answer[:-1] + str((int(answer[-1]) + 1) % 10) if answer[-1].isdigit() else answer + "0"
        docs.append({"question": question, "choices": [" " + answer, " " + wrong], "label": 0})
    write_jsonl(directory / "arith.jsonl", docs)
    (directory / "arith_choice.yaml").write_text(
        "task: arith_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {directory / 'arith.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: choices\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n")
    return directory


def test_lm_eval_hook_scores_sft_and_every_arms_last_adapter(root):
    """Runs only where lm-evaluation-harness is installed (it is an optional extra, not a dependency)."""
    pytest.importorskip("lm_eval")
    tasks = _arithmetic_choice_task(root / "lm_tasks")
    args = ["compare", RECIPE, f"output_dir={root / 'lm'}", *TINY, "spin.iterations=1", "compare.seeds=1",
            "compare.lm_eval_tasks=[arith_choice]", f"compare.lm_eval_include_path={tasks}", "compare.spin_losses=[]"]
    assert _main(root / "cache", args) == 0
    compare = root / "lm" / "compare"
    summary = json.loads((compare / "comparison.json").read_text())
    key = "lm_eval:arith_choice/acc,none"
    for arm, directory, stage in [("spin", "", "iter_0"), ("sft_equal_steps", "sft_equal_steps", "block_0")]:
        recorded = _records(compare / "seed_0" / directory)[f"{stage}.lm_eval"]["metrics"]["arith_choice/acc,none"]
        assert 0.0 <= recorded <= 1.0
        assert summary["arms"][arm]["metrics"]["iter_0"][key]["values"] == [recorded]
    sft_acc = _records(compare / "seed_0")["sft.lm_eval"]["metrics"]["arith_choice/acc,none"]
    assert summary["arms"]["spin"]["metrics"]["sft"][key]["values"] == [sft_acc]
    assert any(d["metric"] == key for d in summary["spin_vs_sft"]["sft_equal_steps"])
    before = _markers(compare)
    assert _main(root / "cache", args) == 0 and _markers(compare) == before  # scored once, reused
