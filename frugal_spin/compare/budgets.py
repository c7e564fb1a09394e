"""The budgets of `compare`, read from the stage records: how many optimizer steps, and how much wall time, each
SPIN iteration took, and so what each continued-SFT block may take; and the arms' names.

Every number comes from the records' `kind` and `iteration` (plan.py), never from stage names, so records written
before those fields existed are read the same way (report.read_records fills them in).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from frugal_spin.config import Recipe
from frugal_spin.errors import UserError
from frugal_spin.plan import OPPONENT_KINDS
from frugal_spin.report import read_records

# The continued-SFT arms' directory names under each seed's run directory (compare/arms.py runs them).
EQUAL_STEPS, EQUAL_TIME = "sft_equal_steps", "sft_equal_time"


def loss_arms(recipe: Recipe) -> dict[str, str]:
    """The SPIN arms of a comparison, {arm name: loss}: "spin" (the seed run, with spin.loss) first, then
    "spin_<loss>" for every other loss in compare.spin_losses, in the order given."""
    arms = {"spin": recipe.spin.loss}
    arms.update({f"spin_{loss}": loss for loss in recipe.compare.spin_losses if loss != recipe.spin.loss})
    return arms


def seeds_of(recipe: Recipe) -> list[int]:
    return [recipe.seed + i for i in range(recipe.compare.seeds)]


# ---------------------------------------------------------------------------------------------------- budgets

def _of_kind(run_dir: Path, kinds: tuple[str, ...], iterations: int) -> list[list[dict[str, Any]]]:
    """Per iteration t < iterations, the records of `run_dir` of these kinds at t (from their kind and iteration)."""
    records = read_records(run_dir)
    return [[r for r in records if r["kind"] in kinds and r["iteration"] == t] for t in range(iterations)]


def _the_one(records: list[dict[str, Any]], what: str, run_dir: Path) -> dict[str, Any]:
    if len(records) != 1:
        raise UserError(f"compare: {run_dir} has {len(records)} {what} records where one is expected: rerun the "
                        "compare command")
    return records[0]


def spin_steps_per_iteration(seed_dir: Path, iterations: int) -> list[int]:
    """Optimizer steps each SPIN iteration of a seed's run took (from its training markers)."""
    return [_the_one(rs, f"SPIN training (iteration {t})", seed_dir)["metrics"]["optimizer_steps"]
            for t, rs in enumerate(_of_kind(seed_dir, ("spin",), iterations))]


def spin_iteration_seconds(seed_dir: Path, iterations: int) -> list[float]:
    """Wall time of each SPIN iteration's work: generating, scoring (previous pairs too) and training."""
    return [sum(r["wall_time_s"] for r in rs) for rs in _of_kind(seed_dir, (*OPPONENT_KINDS, "spin"), iterations)]


def equal_time_budget(seed_dir: Path, iterations: int, threshold: float) -> dict[str, Any]:
    """Whether the equal-time SFT arm is needed, and its steps per block, from one seed's recorded wall times.

    relative_difference = (SPIN time - equal-steps SFT time) / SPIN time over all iterations/blocks; the arm runs
    when its absolute value exceeds `threshold`. One SFT step's time is the equal-steps arm's training time divided
    by its steps (evaluation excluded on both sides: it is the same work for every arm)."""
    spin_s = spin_iteration_seconds(seed_dir, iterations)
    blocks = [_the_one(rs, f"continued-SFT block {t}", seed_dir / EQUAL_STEPS)
              for t, rs in enumerate(_of_kind(seed_dir / EQUAL_STEPS, ("sft",), iterations))]
    sft_s = sum(b["wall_time_s"] for b in blocks)
    sft_steps = sum(b["metrics"]["optimizer_steps"] for b in blocks)
    step_s = sft_s / sft_steps
    relative = (sum(spin_s) - sft_s) / sum(spin_s)
    needed = abs(relative) > threshold
    return {"spin_iteration_s": spin_s, "sft_equal_steps_s": sft_s, "sft_step_s": step_s,
            "relative_difference": relative, "threshold": threshold, "equal_time_arm": needed,
            "equal_time_steps": [max(1, round(s / step_s)) for s in spin_s] if needed else None}
