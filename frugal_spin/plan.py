"""The stages of a run, as data: the only module that spells a stage's name.

`plan(recipe)` lists the stages of a run in the order they run; `sft_arm_plan` and `lm_eval_specs` list the extra
stages of `compare`. A stage (`StageSpec`) is

- `name`: its marker's name (`stages/<name>.json`) and its line in metrics.jsonl;
- `kind`: what sort of work it is, recorded in every marker and record: `setup`, `sft` (training on the real
  answers: SFT and every continued-SFT block), `anchor` (the SFT model's answers to the held-out prompts, scored by
  it), `generate` and `score` (the opponent's pairs and their log-probs), `spin` (SPIN training), `eval`, `lm_eval`;
- `iteration`: the SPIN iteration (or the continued-SFT block matched to it) it belongs to; None before the first;
- `inputs`: the stages whose outputs it reads, by role (`opponent`, `pairs`, `adapter`, ...);
- `outputs`: the files it writes, relative to the root its plan runs under (the run directory, or an arm's);
- `work`: which work function runs it (`frugal_spin/stages/`); `folder`: where it keeps its working files
  (checkpoints, answer logs, traces); `steps`: a continued-SFT block's budget of optimizer steps.

What follows from the plan: the dry run's stage list, the crash points the crash tests kill at (`crash_points`),
and, through the `kind` and `iteration` every record carries, the report's phases and compare's budgets. Markers
written before records carried `iteration` (and when every training stage was kind `train`) are read through
`describe`, which knows every name this module ever spelt.

Adding a stage: one entry here (a `StageSpec` in the right place of `plan`) plus one work function registered in
`frugal_spin/stages/__init__.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from frugal_spin.config import Recipe

KINDS = ("setup", "sft", "anchor", "generate", "score", "spin", "eval", "lm_eval")
TRAIN_KINDS = ("sft", "spin")  # kinds that train the adapter: their records carry optimizer steps and loss curves
OPPONENT_KINDS = ("generate", "score")  # the opponent preparing iteration t's data

SETUP, SFT, ANCHOR, SFT_EVAL = "setup", "sft", "anchor", "sft.eval"
ANCHOR_PAIRS, ANCHOR_LOGPS = "eval/anchor_pairs.jsonl", "eval/anchor_logps.safetensors"

# The places inside a stage where a crash test may kill the process (faults.py), by work function, besides
# `<name>.written` (the outputs written, the marker not yet) that the stage runner has for every stage.
# Training stages' `checkpoint` and `step` points are counted (`@n`: after the n-th optimizer step), as are the
# generation batches (`batch@n`); work functions name a point through `StageSpec.point`, which checks it is here.
_POINTS = {"setup": (), "sft": ("checkpoint", "step"), "continued_sft": ("checkpoint", "step"),
           "spin": ("checkpoint", "step"), "anchor": ("batch", "scored"), "generate": ("batch",),
           "score": ("scored",), "score_previous": ("scored",), "eval": ("nll",), "lm_eval": ()}
WRITTEN = "written"


@dataclass(frozen=True)
class StageSpec:
    name: str
    kind: str
    work: str
    iteration: int | None = None
    inputs: tuple[tuple[str, str], ...] = ()  # (role, stage name)
    outputs: tuple[str, ...] = ()
    folder: str | None = None
    steps: int | None = None

    def input(self, role: str) -> str:
        return dict(self.inputs)[role]

    def point(self, what: str) -> str:
        """The crash point `what` of this stage (faults.crash_point), one of those its work declares."""
        if what != WRITTEN and what not in _POINTS[self.work]:
            raise ValueError(f"{self.work} stages declare no crash point {what!r} (plan._POINTS)")
        return f"{self.name}.{what}"


# ---------------------------------------------------------------------------------------------------- names

def iteration_folder(t: int) -> str:
    return f"iter_{t}"


def block_folder(t: int) -> str:
    return f"block_{t}"


def spin_train_name(t: int) -> str:
    return f"iter_{t}.train"


def generate_name(t: int) -> str:
    return f"iter_{t}.generate"


def eval_name_of(adapter_stage: str) -> str:
    """The evaluation of the adapter a training stage wrote: `sft.eval`, `iter_<t>.eval`, `block_<t>.eval`."""
    return f"{adapter_stage.split('.')[0]}.eval"


def lm_eval_name_of(adapter_stage: str) -> str:
    return f"{adapter_stage.split('.')[0]}.lm_eval"


def adapter_output(adapter_stage: str) -> str:
    """Where a training stage's adapter is, relative to its root: `sft/adapter`, `iter_<t>/adapter`, ..."""
    return f"{adapter_stage.split('.')[0]}/adapter"


# ---------------------------------------------------------------------------------------------------- plans

def plan(recipe: Recipe) -> list[StageSpec]:
    """Every stage of a run of `recipe`, in the order they run (each after every stage it reads)."""
    specs = [StageSpec(SETUP, "setup", "setup"),
             StageSpec(SFT, "sft", "sft", inputs=(("data", SETUP),), outputs=(adapter_output(SFT),), folder="sft"),
             StageSpec(ANCHOR, "anchor", "anchor", inputs=(("adapter", SFT),), outputs=(ANCHOR_PAIRS, ANCHOR_LOGPS),
                       folder="eval"),
             _eval(SFT, None)]
    for t in range(recipe.spin.iterations):
        specs += spin_iteration_specs(recipe, t)
    return specs


def spin_iteration_specs(recipe: Recipe, t: int) -> list[StageSpec]:
    """Iteration t: the opponent (base + the previous adapter) generates and scores, the player trains from the
    opponent's adapter, then it is evaluated. With `spin.mix_previous_pairs`, iteration t >= 1 also trains on
    iteration t-1's pairs, scored again by this iteration's opponent (`score_previous`)."""
    folder, opponent = iteration_folder(t), SFT if t == 0 else spin_train_name(t - 1)
    pairs = (("opponent", opponent), ("pairs", generate_name(t)))
    specs = [StageSpec(generate_name(t), "generate", "generate", t, (("opponent", opponent),),
                       (f"{folder}/pairs.jsonl",), folder),
             StageSpec(f"{folder}.score", "score", "score", t, pairs, (f"{folder}/opponent_logps.safetensors",),
                       folder)]
    train_inputs = (*pairs, ("logps", f"{folder}.score"))
    if recipe.spin.mix_previous_pairs and t > 0:
        specs.append(StageSpec(f"{folder}.score_previous", "score", "score_previous", t,
                               (("opponent", opponent), ("pairs", generate_name(t - 1))),
                               (f"{folder}/previous_pairs_logps.safetensors",), folder))
        train_inputs += (("previous_pairs", generate_name(t - 1)), ("previous_logps", f"{folder}.score_previous"))
    specs += [StageSpec(spin_train_name(t), "spin", "spin", t, train_inputs, (adapter_output(spin_train_name(t)),),
                        folder),
              _eval(spin_train_name(t), t)]
    return specs


def spin_arm_plan(recipe: Recipe) -> list[StageSpec]:
    """A SPIN arm of `compare` under its own root: the recipe's iterations from the seed run's SFT adapter and
    anchor pairs (which its plan's inputs name but do not run)."""
    return [spec for spec in plan(recipe) if spec.iteration is not None]


def sft_arm_plan(block_steps: list[int]) -> list[StageSpec]:
    """A continued-SFT arm of `compare`: from the seed run's SFT adapter, block t trains `block_steps[t]` optimizer
    steps on the real answers (the budget of SPIN iteration t, whose place it takes), then is evaluated."""
    specs, start = [], SFT
    for t, steps in enumerate(block_steps):
        name = f"{block_folder(t)}.train"
        specs += [StageSpec(name, "sft", "continued_sft", t, (("start", start),), (adapter_output(name),),
                            block_folder(t), steps),
                  _eval(name, t)]
        start = name
    return specs


def lm_eval_specs(adapter_stages: Iterable[StageSpec]) -> list[StageSpec]:
    """lm-evaluation-harness scores of these training stages' adapters (compare.lm_eval_tasks)."""
    return [StageSpec(lm_eval_name_of(s.name), "lm_eval", "lm_eval", s.iteration, (("adapter", s.name),))
            for s in adapter_stages]


def _eval(adapter_stage: str, t: int | None) -> StageSpec:
    return StageSpec(eval_name_of(adapter_stage), "eval", "eval", t, (("adapter", adapter_stage), ("anchor", ANCHOR)))


def crash_points(specs: Iterable[StageSpec]) -> list[str]:
    """Every place of these stages where a crash test may kill the run (without the `@n` counts), in order."""
    return [spec.point(what) for spec in specs for what in (*_POINTS[spec.work], WRITTEN)]


# ---------------------------------------------------------------------------------------------------- reading

_NAMED = re.compile(r"^(?:(?P<iter>iter)_(?P<t>\d+)\.(?P<step>generate|score|score_previous|train|eval|lm_eval)"
                    r"|(?P<block>block)_(?P<b>\d+)\.(?P<bstep>train|eval|lm_eval))$")
_FIXED = {SETUP: ("setup", None), SFT: ("sft", None), ANCHOR: ("anchor", None), SFT_EVAL: ("eval", None),
          "sft.lm_eval": ("lm_eval", None)}
_STEP_KIND = {"generate": "generate", "score": "score", "score_previous": "score", "train": "spin", "eval": "eval",
              "lm_eval": "lm_eval"}


def describe(name: str) -> tuple[str, int | None] | None:
    """(kind, iteration) of a stage name this module spells, None for a name it never spelt. For records written
    before they carried `iteration` (their `kind` then said `train` for every training stage)."""
    if name in _FIXED:
        return _FIXED[name]
    m = _NAMED.match(name)
    if m is None:
        return None
    if m["iter"]:
        return _STEP_KIND[m["step"]], int(m["t"])
    return ("sft" if m["bstep"] == "train" else m["bstep"]), int(m["b"])


def with_kind_and_iteration(record: dict) -> dict:
    """A stage record with `kind` and `iteration` as this version writes them (an older record gets them from its
    name; a name this module does not know keeps its own kind, with no iteration)."""
    if "iteration" in record:
        return record
    described = describe(record.get("stage", ""))
    kind, iteration = described if described else (record.get("kind"), None)
    return {**record, "kind": kind, "iteration": iteration}


def adapter_stage_names(names: Iterable[str]) -> list[tuple[str, str]]:
    """(user's name, training stage) of the SFT and SPIN adapters among these stage names, in pipeline order:
    ("sft", "sft"), ("iter_0", "iter_0.train"), ... (what `export` and `sample` call a stage)."""
    names = set(names)
    iterations = sorted(d[1] for name in names if (d := describe(name)) and d[0] == "spin")
    return ([(SFT, SFT)] if SFT in names else []) + [(iteration_folder(t), spin_train_name(t)) for t in iterations]


def adapter_stage_of(user_name: str) -> str | None:
    """The training stage a user's name of an adapter means (`sft`, `iter_<t>`), None for any other name."""
    if user_name == SFT:
        return SFT
    described = describe(f"{user_name}.train")
    return f"{user_name}.train" if described and described[0] == "spin" else None
