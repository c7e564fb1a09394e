"""Live curves: a run with `log.tensorboard: true` writes every optimizer step's and every evaluation's scalars
under <output_dir>/tb/ (read back with TensorBoard's own event reader and checked against metrics.jsonl); wandb
gets the same scalars (a recording stand-in module: wandb itself is not installed here); a missing package is
one line before anything is written."""

import importlib.machinery
import json
import sys
import types

import pytest

from frugal_spin.__main__ import main
from frugal_spin.config import LogConfig
from frugal_spin.live_log import LiveLog


def _events(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def _records(run_dir):
    return {r["stage"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_every_optimizer_step_and_evaluation_is_in_the_event_files(finished_run):
    events = _events(finished_run / "tb")
    records = _records(finished_run)
    sft, spin = records["sft"]["metrics"], records["iter_0.train"]["metrics"]
    n_sft, n_spin = sft["optimizer_steps"], spin["optimizer_steps"]
    assert [s for s, _ in events["sft/loss"]] == list(range(1, n_sft + 1))
    assert [v for _, v in events["sft/loss"]] == pytest.approx(sft["loss_curve"], rel=1e-6)
    # SPIN's steps continue the run's step count after SFT's
    assert [s for s, _ in events["spin/loss"]] == list(range(n_sft + 1, n_sft + n_spin + 1))
    assert [v for _, v in events["spin/loss"]] == pytest.approx(spin["loss_curve"], rel=1e-6)
    assert [v for _, v in events["spin/reward_margin"]] == pytest.approx(spin["margin_curve"], rel=1e-5, abs=1e-7)
    for tag in ("sft/lr", "sft/tokens_per_s", "spin/lr", "spin/tokens_per_s", "spin/reward_accuracy"):
        assert len(events[tag]) == (n_sft if tag.startswith("sft") else n_spin), tag
    assert all(v > 0 for _, v in events["sft/tokens_per_s"])
    assert max(v for _, v in events["sft/lr"]) == pytest.approx(1e-3)  # the recipe's peak learning rate
    for key in ("heldout_nll", "spin_loss", "reward_accuracy", "exact_match"):
        expected = [(n_sft, records["sft.eval"]["metrics"][key]),
                    (n_sft + n_spin, records["iter_0.eval"]["metrics"][key])]
        assert [s for s, _ in events[f"eval/{key}"]] == [s for s, _ in expected]
        assert [v for _, v in events[f"eval/{key}"]] == pytest.approx([v for _, v in expected], rel=1e-6, abs=1e-7)


def test_logging_is_off_by_default(tmp_path):
    log = LiveLog(LogConfig(), tmp_path)
    assert not log.enabled
    log.train_step("sft", 1, {"loss": 1.0})
    log.close()
    assert list(tmp_path.iterdir()) == []


def test_wandb_gets_the_same_scalars_through_a_stand_in(tmp_path, monkeypatch):
    calls = []

    class StandInRun:
        def log(self, values, step):
            calls.append(("log", dict(values), step))

        def finish(self):
            calls.append(("finish",))

    stand_in = types.ModuleType("wandb")
    stand_in.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    stand_in.init = lambda **kwargs: calls.append(("init", kwargs)) or StandInRun()
    monkeypatch.setitem(sys.modules, "wandb", stand_in)
    log = LiveLog(LogConfig(wandb=True, wandb_project="p"), tmp_path / "run", config={"seed": 3})
    log.train_step("spin", 7, {"loss": 0.5, "lr": 1e-4, "reward_margin": 0.25})
    log.evaluation({"heldout_nll": 0.2, "exact_match": 0.5, "samples": ["not a scalar"]}, 7)
    log.close()
    assert calls[0] == ("init", {"project": "p", "name": "run", "dir": str(tmp_path / "run"), "config": {"seed": 3}})
    assert calls[1:] == [("log", {"spin/loss": 0.5, "spin/lr": 1e-4, "spin/reward_margin": 0.25}, 7),
                         ("log", {"eval/heldout_nll": 0.2, "eval/exact_match": 0.5}, 7), ("finish",)]


@pytest.mark.parametrize("key, package", [("log.tensorboard", "tensorboard"), ("log.wandb", "wandb")])
def test_a_missing_package_is_one_line_before_the_run_starts(tmp_path, monkeypatch, capsys, key, package):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    out = tmp_path / "run"
    recipe = __import__("pathlib").Path(__file__).resolve().parents[1] / "recipes" / "cpu_tiny.yaml"
    assert main([str(recipe), f"output_dir={out}", f"{key}=true"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {key} is true but") and f'pip install "frugal_spin[{package}]"' in err
    assert err.count("\n") == 1 and not out.exists()
