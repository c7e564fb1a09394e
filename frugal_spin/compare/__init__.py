"""`python -m frugal_spin compare RECIPE`: LoRA-SPIN against continued LoRA-SFT with equal budgets, over seeds.

What it runs, for every seed s in recipe.seed, recipe.seed + 1, ... (`compare.seeds` of them):

- the *SPIN arm*: the recipe's whole pipeline with `seed = s` in `<output_dir>/compare/seed_<s>/`, an ordinary run
  directory (data sample, SFT adapter, anchor pairs, SPIN iterations with `spin.loss`, its own report);
- one more *SPIN arm per other loss* of `compare.spin_losses`, in `seed_<s>/spin_<loss>/`: the same SPIN iterations
  from the same SFT adapter with `spin.loss = <loss>`, evaluated on the same held-out prompts and anchor pairs.
  A stage whose fingerprint equals the seed run's is copied from it, not recomputed: iteration 0's generation and
  scoring (the opponent is the SFT adapter either way). Later iterations differ, since their opponent is the
  loss's own previous adapter; training differs in every iteration (the loss is part of its fingerprint only);
- the *equal-steps SFT arm* in `seed_<s>/sft_equal_steps/`: from that seed's SFT adapter, LoRA SFT on the same real
  answers with the recipe's `sft` settings (batch, schedule, and learning rate unless
  `compare.sft_arm_learning_rate` sets one), in one block per SPIN iteration, block t
  taking exactly as many optimizer steps as SPIN iteration t took, each evaluated like the SPIN iteration (same
  held-out prompts, anchor pairs, beta, exact match: the same evaluation stage);
- the *equal-time SFT arm* in `seed_<s>/sft_equal_time/`, only when the two budgets differ: if the SPIN arm's
  iterations (generate + score + train) and the equal-steps SFT blocks of the *first* seed differ in wall time by
  more than `compare.equal_time_threshold` of the SPIN time, block t gets round(time of SPIN iteration t / time
  of one SFT step) steps, both measured on the first seed. Sizing from the first seed alone (not a mean) means
  adding seeds later never resizes, and so never redoes, the arm.

Why one SFT run per seed rather than one shared SFT adapter: the seed then varies everything the recipe's seed
varies (the data sample, SFT batch order, the opponent's sampling, SPIN and SFT batch order), so the spread over
seeds is the spread a user rerunning the recipe would see, and the two arms of one seed still start from the same
SFT adapter and are scored on the same held-out prompts, which makes per-seed differences paired. It needs no
second seed in the pipeline and costs one SFT stage per seed.

Every arm and seed lives in its own directory with its own stage markers, so a rerun skips every finished stage
(setup, which only loads the model and data, always runs). The SFT arms' training blocks are fingerprinted by the
adapter they start from, the `sft` settings, their step count and seed, and train with every guarantee SFT and SPIN
have (train_stage.py: OOM halving, the NaN streak's last good adapter, checkpoints, live curves). Each arm is a plan
(plan.py: `spin_arm_plan`, `sft_arm_plan`) run by the pipeline's own runner over the seed run's context, rerooted
into the arm's directory (compare/arms.py). Budgets: compare/budgets.py; results: compare/results.py.

With `compare.lm_eval_tasks`, lm-evaluation-harness also scores the SFT adapter (`sft.lm_eval`, in the seed's
directory) and the last adapter of every arm (`iter_<T-1>.lm_eval`, `block_<T-1>.lm_eval`); see lm_eval_hook.py.
"""

from __future__ import annotations

import gc
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

from frugal_spin import ui
from frugal_spin.compare.arms import run_seed
from frugal_spin.compare.budgets import EQUAL_STEPS, EQUAL_TIME, loss_arms, seeds_of
from frugal_spin.compare.results import render_comparison
from frugal_spin.config import Recipe
from frugal_spin.distributed import current as current_world
from frugal_spin.errors import UserError
from frugal_spin.lm_eval_hook import check_lm_eval_available
from frugal_spin.model import resolve_runtime
from frugal_spin.pipeline import check_before_loading, disk_full_as_one_line, prepared_run_dir, start_run
from frugal_spin.preflight import preflight
from frugal_spin.rundir import claim, own_directory, refuse_wrong_root
from frugal_spin.threads import apply_threads


def compare_dir_of(recipe: Recipe) -> Path:
    return Path(recipe.output_dir).expanduser() / "compare"


def run_compare(recipe: Recipe, command: str | None = None) -> Path:
    """Run (or resume) every seed's arms, then write comparison.json/.md and the charts; return the directory."""
    if recipe.spin.iterations < 1:
        raise UserError("compare needs spin.iterations >= 1: with none there is no SPIN arm to compare")
    resolve_runtime(recipe.model)
    check_lm_eval_available(recipe.compare.lm_eval_tasks)
    compare_dir = compare_dir_of(recipe)
    refuse_wrong_root(compare_dir)
    seeds = seeds_of(recipe)
    seed_recipes = [replace(recipe, seed=seed, output_dir=str(compare_dir / f"seed_{seed}")) for seed in seeds]
    for seed_recipe in seed_recipes:  # every seed directory is usable before the first one starts
        check_before_loading(seed_recipe)
    # compare/ holds comparison.md/json and the seed runs: the tool's own, or refused (rundir.own_directory).
    own_directory(compare_dir, "compare", legacy=lambda d: any(d.glob("seed_*/stages/run_directory.json")))
    apply_threads(recipe.model.threads)
    equal_time_steps: list[int] | None = None
    for i, (seed, seed_recipe) in enumerate(zip(seeds, seed_recipes)):
        ui.note(f"[bold]compare: seed {seed} ({i + 1}/{len(seeds)})[/bold]")
        world = current_world()
        checked = world.first(preflight, seed_recipe)  # the data sample depends on the seed
        with ExitStack() as stack:
            # Rank 0 (the only process outside torchrun) opens the seed's directory and holds its lock.
            run_dir = world.write(stack.enter_context, prepared_run_dir(seed_recipe))
            claim(run_dir, [*(arm for arm in loss_arms(recipe) if arm != "spin"), EQUAL_STEPS, EQUAL_TIME])
            with disk_full_as_one_line(run_dir):
                ctx, store, done = start_run(seed_recipe, run_dir, checked)
                try:
                    equal_time_steps = run_seed(ctx, store, done, equal_time_steps, first_seed=i == 0)
                finally:
                    ctx.live.close()
        del ctx, store, done, checked  # one model in memory at a time: free this seed's before the next one loads
        gc.collect()
    render_comparison(compare_dir, recipe, command)
    ui.note(f"comparison: {ui.escape(str(compare_dir / 'comparison.md'))}")
    return compare_dir
