"""profiling/paired_seed_level.py: seed-level paired statistics read from a comparison.json, checked by hand; old
and new comparison.json layouts; a recorded difference that does not match; the CLI's one-line error; and the
committed results/*/paired.json|md are what the script renders from the committed comparison.json today."""

import copy
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from frugal_spin.errors import UserError

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "profiling" / "paired_seed_level.py"
T_975_2 = 4.302652729749464  # t(0.975, 2 degrees of freedom)


def _script():
    spec = importlib.util.spec_from_file_location("paired_seed_level", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _metric(values):
    return {"mean": sum(values) / len(values), "std": None, "values": values}


def _comparison(with_losses=True):
    """3 seeds, points sft and iter_0; SPIN's held-out NLL is 1.0, 1.1, 0.9 below the SFT stage (d = -1, -1.1, -0.9);
    the SFT arm's is 1, 2, 3 below SPIN's values."""
    sft = {"heldout_nll": _metric([5.0, 6.0, 7.0]), "spin_loss": _metric([0.6931] * 3)}
    spin = {"heldout_nll": _metric([4.0, 4.9, 6.1]), "spin_loss": _metric([0.6, 0.65, 0.7])}
    control = {"heldout_nll": _metric([3.0, 2.9, 3.1]), "spin_loss": _metric([0.5, 0.5, 0.5])}
    arms = {"spin": {"label": "LoRA-SPIN (sigmoid)", "metrics": {"sft": sft, "iter_0": spin}},
            "sft_equal_steps": {"label": "LoRA-SFT, equal steps", "metrics": {"sft": sft, "iter_0": control}}}
    if with_losses:
        arms["spin"]["loss"], arms["sft_equal_steps"]["loss"] = "sigmoid", None
    rows = [{"metric": "heldout_nll", "paired_differences": [1.0, 2.0, 3.0]},
            {"metric": "spin_loss", "paired_differences": [0.1, 0.15, 0.2]}]
    out = {"seeds": [0, 1, 2], "points": ["sft", "iter_0"], "command": "python -m frugal_spin compare r.yaml",
           "arms": arms,
           "hypothesis": [{"arm": "spin", "loss": "heldout_nll", "paired_differences": [-1.0, -1.1, -0.9]}]}
    if with_losses:
        out["spin_arms_vs_sft"] = {"spin": {"sft_equal_steps": rows}}
    else:
        out["spin_vs_sft"] = {"sft_equal_steps": rows}
    return out


def _row(analysis, arm, against, metric, point="iter_0"):
    return next(r for r in analysis["comparisons"]
                if (r["arm"], r["against"], r["metric"], r["point"]) == (arm, against, metric, point))


@pytest.mark.parametrize("with_losses", [True, False], ids=["with spin_losses", "before spin_losses"])
def test_seed_level_numbers_by_hand(tmp_path, with_losses):
    (tmp_path / "comparison.json").write_text(json.dumps(_comparison(with_losses)))
    analysis = _script().analyse(tmp_path)
    # d = -1, -1.1, -0.9: mean -1, sd 0.1, half width t(0.975, 2) * 0.1 / sqrt(3) = 0.248414
    h1 = _row(analysis, "spin", "sft", "heldout_nll")
    assert list(h1["per_seed"].values()) == pytest.approx([-1.0, -1.1, -0.9])
    assert h1["mean"] == pytest.approx(-1.0) and h1["sd"] == pytest.approx(0.1)
    half = T_975_2 * 0.1 / math.sqrt(3)
    assert h1["t_interval"] == pytest.approx([-1.0 - half, -1.0 + half])
    assert (h1["t_verdict"], h1["better"]) == ("lower", "first")
    assert h1["bootstrap_over_seeds"] == pytest.approx([-1.1, -0.9])  # 3 seeds: the range
    assert (h1["seeds_lower"], h1["seeds_higher"], h1["sign_test_p"]) == (3, 0, 0.25)
    assert h1["matches_recorded"] is True
    # SPIN against the SFT arm: d = 1, 2, 3 -> mean 2, sd 1, interval 2 -/+ 2.484: holds 0
    vs = _row(analysis, "spin", "sft_equal_steps", "heldout_nll")
    assert vs["t_interval"] == pytest.approx([2.0 - T_975_2 / math.sqrt(3), 2.0 + T_975_2 / math.sqrt(3)])
    assert (vs["t_verdict"], vs["better"], vs["matches_recorded"]) == ("not established", "not established", True)
    # the SFT arm against the SFT stage is there too, for the hypothesis metrics only
    assert _row(analysis, "sft_equal_steps", "sft", "heldout_nll")["per_seed"] == \
        pytest.approx({"0": -2.0, "1": -3.1, "2": -3.9})
    kinds = {(r["kind"], r["arm"], r["against"]) for r in analysis["comparisons"]}
    assert kinds == {("against the SFT stage", "spin", "sft"), ("against the SFT stage", "sft_equal_steps", "sft"),
                     ("SPIN against continued SFT", "spin", "sft_equal_steps")}


def test_a_recorded_difference_that_does_not_match_is_an_error(tmp_path):
    comparison = _comparison()
    bad = copy.deepcopy(comparison)
    bad["hypothesis"][0]["paired_differences"] = [-1.0, -1.1, -0.8]
    (tmp_path / "comparison.json").write_text(json.dumps(bad))
    with pytest.raises(UserError, match="recomputed paired differences of spin vs sft \\(heldout_nll\\) differ"):
        _script().analyse(tmp_path)


def test_missing_values_name_the_arm_point_and_metric(tmp_path):
    comparison = _comparison()
    comparison["arms"]["sft_equal_steps"]["metrics"]["iter_0"]["heldout_nll"]["values"] = [1.0, 2.0]
    (tmp_path / "comparison.json").write_text(json.dumps(comparison))
    with pytest.raises(UserError, match="arm sft_equal_steps, point iter_0, metric heldout_nll has 2 values for 3"):
        _script().analyse(tmp_path)


def test_writes_both_files_and_the_cli_fails_in_one_line(tmp_path):
    (tmp_path / "comparison.json").write_text(json.dumps(_comparison()))
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "paired.json").read_text())["comparisons"]
    assert "seed level only" in (tmp_path / "paired.md").read_text()
    empty = tmp_path / "empty"
    empty.mkdir()
    done = subprocess.run([sys.executable, str(SCRIPT), str(empty)], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {empty / 'comparison.json'}: not found (run `compare` "
                                                "first, or name a results directory)"]
    assert list(empty.iterdir()) == []  # nothing half-written


@pytest.mark.parametrize("name", sorted(p.parent.name for p in (REPO / "results").glob("*/paired.json")))
def test_committed_paired_files_are_what_the_script_renders(name):
    script = _script()
    directory = REPO / "results" / name
    analysis = script.analyse(directory)
    assert analysis["source"] == f"results/{name}/comparison.json"  # relative to the checkout, wherever it is
    assert json.loads(json.dumps(script._jsonable(analysis))) == json.loads((directory / "paired.json").read_text())
    assert script.render(analysis, name) == (directory / "paired.md").read_text()


def test_the_committed_smollm2_reading_of_issue_23():
    # issue 23: "held-out NLL after SPIN is below the SFT stage in every seed (-0.046 +/- 0.006 nats/token, 3/3)"
    committed = json.loads((REPO / "results" / "compare_smollm2_small" / "paired.json").read_text())
    h1 = _row(committed, "spin", "sft", "heldout_nll")
    assert (round(h1["mean"], 3), round(h1["sd"], 3), h1["seeds_lower"]) == (-0.046, 0.006, 3)
    assert h1["t_verdict"] == "lower" and h1["sign_test_p"] == 0.25
