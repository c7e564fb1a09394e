"""The plan: every stage of a run as data (plan.py), in an order where each stage comes after what it reads."""

import pytest

from frugal_spin.config import Recipe, recipe_from_dict
from frugal_spin.plan import (crash_points, describe, lm_eval_specs, plan, sft_arm_plan, spin_arm_plan,
                              with_kind_and_iteration)


def _recipe(iterations: int, mix: bool = False) -> Recipe:
    return recipe_from_dict({"spin": {"iterations": iterations, "mix_previous_pairs": mix}})


def test_the_plan_lists_the_stages_in_running_order():
    assert [s.name for s in plan(_recipe(0))] == ["setup", "sft", "anchor", "sft.eval"]
    assert [s.name for s in plan(_recipe(2, mix=True))] == [
        "setup", "sft", "anchor", "sft.eval", "iter_0.generate", "iter_0.score", "iter_0.train", "iter_0.eval",
        "iter_1.generate", "iter_1.score", "iter_1.score_previous", "iter_1.train", "iter_1.eval"]
    assert [s.name for s in spin_arm_plan(_recipe(1))] == ["iter_0.generate", "iter_0.score", "iter_0.train",
                                                           "iter_0.eval"]
    assert [(s.name, s.steps) for s in sft_arm_plan([5, 7])] == [("block_0.train", 5), ("block_0.eval", None),
                                                                ("block_1.train", 7), ("block_1.eval", None)]


def test_the_opponent_of_iteration_t_is_the_previous_adapter_never_the_bare_base():
    specs = {s.name: s for s in plan(_recipe(3))}
    assert specs["iter_0.generate"].input("opponent") == "sft"
    for t in (1, 2):
        for step in ("generate", "score", "train"):
            assert specs[f"iter_{t}.{step}"].input("opponent") == f"iter_{t - 1}.train"


@pytest.mark.parametrize("iterations, mix", [(0, False), (1, False), (3, True)])
def test_every_input_is_a_stage_that_ran_before(iterations, mix):
    recipe = _recipe(iterations, mix)
    seed = plan(recipe)
    for specs, given in [(seed, set()), (spin_arm_plan(recipe), {"sft", "anchor"}),
                         (sft_arm_plan([1] * iterations), {"sft", "anchor"}),
                         (lm_eval_specs([s for s in seed if s.kind in ("sft", "spin")]), {s.name for s in seed})]:
        done = set(given)
        for spec in specs:
            assert {name for _, name in spec.inputs} <= done, spec.name
            done.add(spec.name)


@pytest.mark.parametrize("iterations, mix", [(0, False), (2, True)])
def test_a_record_written_before_kind_and_iteration_reads_as_the_plan_names_it(iterations, mix):
    """plan.describe reads the names of markers from before `iteration` existed: it must agree with the plan for
    every stage of every plan, or an old run directory's report and budgets would be wrong."""
    seed = plan(_recipe(iterations, mix))
    blocks = sft_arm_plan([3] * iterations)
    for spec in [*seed, *blocks, *lm_eval_specs([s for s in seed + blocks if s.kind in ("sft", "spin")])]:
        assert describe(spec.name) == (spec.kind, spec.iteration), spec.name
        old = {"stage": spec.name, "kind": "train" if spec.kind in ("sft", "spin") else spec.kind}
        assert with_kind_and_iteration(old)["kind"] == spec.kind
    assert describe("something_else") is None
    assert with_kind_and_iteration({"stage": "x", "kind": "y"}) == {"stage": "x", "kind": "y", "iteration": None}


def test_crash_points_follow_from_the_plan():
    assert crash_points(plan(_recipe(1))) == [
        "setup.written", "sft.checkpoint", "sft.step", "sft.written", "anchor.batch", "anchor.scored",
        "anchor.written", "sft.eval.nll", "sft.eval.written", "iter_0.generate.batch", "iter_0.generate.written",
        "iter_0.score.scored", "iter_0.score.written", "iter_0.train.checkpoint", "iter_0.train.step",
        "iter_0.train.written", "iter_0.eval.nll", "iter_0.eval.written"]
    with pytest.raises(ValueError, match="declare no crash point 'nll'"):
        plan(_recipe(1))[1].point("nll")


# Strings that look like stage names but are not spelt as one: the CLI's help for the names `export` and `sample`
# take, and --restart's pattern of the folders a run writes (rundir.py; a folder, not a stage).
ALLOWED = {("frugal_spin/finished_run.py", "sft, iter_<t> (e.g. iter_0) or last"),
           ("frugal_spin/rundir.py", r"^(iter_\d+|spin_[a-z0-9_]+)$")}


def _strings(tree):
    """Every string the module's code builds (f-strings with {} for their values), docstrings left out."""
    import ast

    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    inside_fstrings = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            yield node.lineno, "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
              and id(node) not in inside_fstrings):
            yield node.lineno, node.value


def test_stage_names_are_spelt_in_plan_py_only():
    """Issue 21: f"iter_{t}..." stage names were spelt 37 times over 6 modules. A string outside plan.py that builds
    or matches a stage's name (an iteration or block prefix, a stage suffix, the name of a fixed stage) fails here;
    prose (with spaces) does not count."""
    import ast
    import re
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "frugal_spin"
    looks_like_a_name = re.compile(r"(^|[^a-z])(iter|block)_(\d|\{|<|\*|\()|\.(train|eval|generate|score|"
                                   r"score_previous|lm_eval)(\b|$)|^(sft\.eval|sft\.lm_eval)$")
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = str(path.relative_to(package.parent))
        if rel == "frugal_spin/plan.py":
            continue
        for lineno, text in _strings(ast.parse(path.read_text(encoding="utf-8"))):
            if " " not in text.strip() and looks_like_a_name.search(text) and (rel, text) not in ALLOWED:
                found.append(f"{rel}:{lineno}: {text!r}")
    assert not found, "stage names spelt outside plan.py:\n" + "\n".join(found)
