"""The arms of one seed of `compare`, each a plan run by the pipeline's runner (compare/__init__.py says what they
are): the seed run itself, one SPIN arm per other loss, the equal-steps SFT arm and, when the budgets differ, the
equal-time SFT arm. An arm runs over the seed run's context rerooted into its directory (`RunContext.rerooted`)
with its own stage store; its plan's inputs name the seed run's SFT adapter and anchor pairs, which it reads and
never runs. A SPIN arm also takes from the seed run's store every stage it finished with the same fingerprint
(iteration 0's generation and scoring: same opponent), copied with its cost.
"""

from __future__ import annotations

from dataclasses import replace

from frugal_spin import ui
from frugal_spin.compare.budgets import (EQUAL_STEPS, EQUAL_TIME, equal_time_budget, loss_arms,
                                         spin_steps_per_iteration)
from frugal_spin.context import RunContext
from frugal_spin.pipeline import Done, execute_plan, report_run
from frugal_spin.plan import StageSpec, lm_eval_specs, plan, sft_arm_plan, spin_arm_plan
from frugal_spin.stage_store import StageStore


def run_seed(ctx: RunContext, store: StageStore, done: Done, equal_time_steps: list[int] | None, *,
             first_seed: bool) -> list[int] | None:
    """Every arm of one seed (the seed run's setup done); returns the equal-time arm's block steps, sized on the
    first seed (None: no equal-time arm), for the seeds after it."""
    recipe = ctx.recipe
    seed_plan = plan(recipe)[1:]
    execute_plan(ctx, store, seed_plan, done)  # the SPIN arm with spin.loss; finished stages are skipped
    report_run(ctx, store)
    execute_plan(ctx, store, _lm_eval(recipe, [done["sft"].spec, _last_training(seed_plan)]), done)
    seed_done = dict(done)  # what every arm's plan reads from the seed run (its SFT adapter, anchor pairs)
    for arm, loss in loss_arms(recipe).items():
        if arm != "spin":
            ui.note(f"[bold]compare: SPIN with loss {loss}[/bold]")
            arm_recipe = replace(recipe, spin=replace(recipe.spin, loss=loss))
            _run_arm(ctx.rerooted(ctx.run_dir / arm, arm_recipe), spin_arm_plan(arm_recipe), seed_done, store)
    iterations = recipe.spin.iterations
    _run_arm(ctx.rerooted(ctx.run_dir / EQUAL_STEPS), sft_arm_plan(spin_steps_per_iteration(ctx.run_dir, iterations)),
             seed_done)
    if first_seed:
        budget = equal_time_budget(ctx.run_dir, iterations, recipe.compare.equal_time_threshold)
        equal_time_steps = budget["equal_time_steps"]
    if equal_time_steps is not None:
        _run_arm(ctx.rerooted(ctx.run_dir / EQUAL_TIME), sft_arm_plan(equal_time_steps), seed_done)
    return equal_time_steps


def _run_arm(ctx: RunContext, specs: list[StageSpec], seed_done: Done, shared: StageStore | None = None) -> None:
    """One arm: its plan, then lm-evaluation-harness on its last adapter when asked for, in its own store."""
    specs = specs + _lm_eval(ctx.recipe, [_last_training(specs)])
    execute_plan(ctx, StageStore(ctx.root), specs, dict(seed_done), shared)


def _last_training(specs: list[StageSpec]) -> StageSpec:
    return [s for s in specs if s.kind in ("sft", "spin")][-1]


def _lm_eval(recipe, adapter_stages: list[StageSpec]) -> list[StageSpec]:
    return lm_eval_specs(adapter_stages) if recipe.compare.lm_eval_tasks else []
