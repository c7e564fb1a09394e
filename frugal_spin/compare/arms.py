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
  held-out prompts, anchor pairs, beta, exact match: the seed's own `Run.evaluate`);
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
adapter they start from, the `sft` settings, their step count and seed. Results: `comparison.py`.

With `compare.lm_eval_tasks`, lm-evaluation-harness also scores the SFT adapter (`sft.lm_eval`, in the seed's
directory) and the last adapter of every arm (`iter_<T-1>.lm_eval`, `block_<T-1>.lm_eval`); see lm_eval_hook.py.
"""

from __future__ import annotations

import copy
import gc
from contextlib import ExitStack
from dataclasses import asdict, replace
from pathlib import Path

from frugal_spin import ui
from frugal_spin.config import Recipe, SFTConfig
from frugal_spin.data import check_dataset_reference
from frugal_spin.errors import UserError
from frugal_spin.live_log import check_log_backends
from frugal_spin.lm_eval_hook import check_lm_eval_available, run_lm_eval
from frugal_spin.model import load_adapter_weights, resolve_runtime, save_adapter
from frugal_spin.model_source import check_model_reference
from frugal_spin.checkpoint import remove_checkpoint
# The arms' names, the seeds and the budgets are read from records by comparison.py too: they live there, so the
# two modules import one way only (compare -> comparison).
from frugal_spin.comparison import (EQUAL_STEPS, EQUAL_TIME, equal_time_budget, loss_arms, render_comparison,
                                    seeds_of, spin_steps_per_iteration)
from frugal_spin.distributed import current as current_world
from frugal_spin.plan import describe
from frugal_spin.pipeline import Run, absolute_progress, prepared_run_dir
from frugal_spin.preflight import preflight
from frugal_spin.rundir import check_output_dir, claim, own_directory, refuse_wrong_root
from frugal_spin.profiler import StageMeter
from frugal_spin.fingerprints import fingerprint
from frugal_spin.stages import StageStore
from frugal_spin.threads import apply_threads
from frugal_spin.train import plan_windows, sft_step_fn, total_optimizer_steps, train_adapter



def compare_dir_of(recipe: Recipe) -> Path:
    return Path(recipe.output_dir).expanduser() / "compare"


def run_compare(recipe: Recipe, command: str | None = None) -> Path:
    """Run (or resume) every seed's arms, then write comparison.json/.md and the charts; return the directory."""
    if recipe.spin.iterations < 1:
        raise UserError("compare needs spin.iterations >= 1: with none there is no SPIN arm to compare")
    check_dataset_reference(recipe.data)
    check_model_reference(recipe.model)
    resolve_runtime(recipe.model)
    check_lm_eval_available(recipe.compare.lm_eval_tasks)
    check_log_backends(recipe.log)
    apply_threads(recipe.model.threads)
    compare_dir = compare_dir_of(recipe)
    refuse_wrong_root(compare_dir)
    seeds = seeds_of(recipe)
    seed_recipes = [replace(recipe, seed=seed, output_dir=str(compare_dir / f"seed_{seed}")) for seed in seeds]
    for seed_recipe in seed_recipes:  # every seed directory is usable before the first one starts
        check_output_dir(Path(seed_recipe.output_dir), restart=False, allow_existing=False)
    # compare/ holds comparison.md/json and the seed runs: the tool's own, or refused (rundir.own_directory).
    own_directory(compare_dir, "compare", legacy=lambda d: any(d.glob("seed_*/stages/run_directory.json")))
    equal_time_steps: list[int] | None = None
    for i, (seed, seed_recipe) in enumerate(zip(seeds, seed_recipes)):
        ui.note(f"[bold]compare: seed {seed} ({i + 1}/{len(seeds)})[/bold]")
        world = current_world()
        checked = world.first(preflight, seed_recipe)  # the data sample depends on the seed
        with ExitStack() as stack:
            # Rank 0 (the only process outside torchrun) opens the seed's directory and holds its lock.
            run_dir = world.write(stack.enter_context, prepared_run_dir(seed_recipe))
            claim(run_dir, [*(arm for arm in loss_arms(recipe) if arm != "spin"), EQUAL_STEPS, EQUAL_TIME])
            run = Run(seed_recipe, run_dir, checked)
            run.execute()  # the SPIN arm; finished stages are skipped
            last = recipe.spin.iterations - 1
            lm_eval_stage(run, run.store, "sft.lm_eval", run.run_dir / "sft" / "adapter", run.store.expected["sft"])
            lm_eval_stage(run, run.store, f"iter_{last}.lm_eval", run.run_dir / f"iter_{last}" / "adapter",
                          run.store.expected[f"iter_{last}.train"])
            for arm, loss in loss_arms(recipe).items():
                if arm != "spin":
                    SpinLossArm(run, arm, loss).execute()
            ContinuedSFT(run, EQUAL_STEPS, spin_steps_per_iteration(run.run_dir, recipe.spin.iterations)).execute()
            if i == 0:
                budget = equal_time_budget(run.run_dir, recipe.spin.iterations, recipe.compare.equal_time_threshold)
                equal_time_steps = budget["equal_time_steps"]
            if equal_time_steps is not None:
                ContinuedSFT(run, EQUAL_TIME, equal_time_steps).execute()
        del run, checked  # one model in memory at a time: free this seed's before the next seed loads its own
        gc.collect()
    render_comparison(compare_dir, recipe, command)
    ui.note(f"comparison: {ui.escape(str(compare_dir / 'comparison.md'))}")
    return compare_dir


# ---------------------------------------------------------------------------------------------------- budgets

def sft_config_for_steps(sft: SFTConfig, n_items: int, steps: int) -> SFTConfig:
    """The recipe's SFT settings with `epochs` chosen so training takes exactly `steps` optimizer steps.

    train_adapter plans whole epochs plus a rounded share of the last one's accumulation windows (one window per
    optimizer step), so epochs = steps / windows per epoch reproduces the count; checked, since a silent off-by-one
    would unequal the budgets."""
    per_epoch = len(plan_windows([0] * n_items, replace(sft, epochs=1.0), 0))
    cfg = replace(sft, epochs=steps / per_epoch)
    actual = total_optimizer_steps(n_items, cfg)
    if actual != steps:  # pragma: no cover - guards the arithmetic above against changes in plan_windows
        raise RuntimeError(f"continued SFT planned {actual} optimizer steps instead of {steps}")
    return cfg


# ---------------------------------------------------------------------------------------------------- the arms

class SpinLossArm:
    """The seed's SPIN iterations again with another `spin.loss`, from the seed's SFT adapter, in
    `<seed run>/<name>/` (`iter_<t>/`, `stages/`, `metrics.jsonl`, like the seed run's own iterations).

    Runs the seed's loaded `Run` through a shallow copy whose recipe has the other loss and whose iterations and
    store live in the arm's directory; SFT, anchor pairs and held-out data stay the seed's. Stages the seed run
    already finished with the same fingerprint are copied from it (`Run._reuse_shared`)."""

    def __init__(self, run: Run, name: str, loss: str):
        self.run = run
        self.arm = copy.copy(run)
        self.arm.recipe = replace(run.recipe, spin=replace(run.recipe.spin, loss=loss))
        self.arm.iter_root = run.run_dir / name
        self.arm.store = StageStore(self.arm.iter_root)
        self.arm.shared = run.store

    def execute(self) -> None:
        run, arm = self.run, self.arm
        ui.note(f"[bold]compare: SPIN with loss {arm.recipe.spin.loss}[/bold]")
        last_fp = arm.spin_iterations(run.store.expected["sft"], run.store.expected["anchor"])
        last = arm.recipe.spin.iterations - 1
        lm_eval_stage(arm, arm.store, f"iter_{last}.lm_eval", arm.iter_root / f"iter_{last}" / "adapter", last_fp)


class ContinuedSFT:
    """Continued LoRA SFT from a seed's SFT adapter, in blocks of given optimizer steps, each block evaluated.

    Uses the seed's loaded `Run` (model, tokenizer, training and held-out data) and writes into
    `<seed run>/<name>/`: `block_<t>/adapter/`, `stages/block_<t>.{train,eval}.json` and `metrics.jsonl`."""

    def __init__(self, run: Run, name: str, block_steps: list[int]):
        self.run = run
        self.arm_dir = run.run_dir / name
        self.store = StageStore(self.arm_dir)
        self.block_steps = block_steps

    def execute(self) -> None:
        run = self.run
        # Evaluation through the seed's own Run.evaluate (same held-out set, anchor pairs, batching, beta), with
        # the records going to this arm's store: a shallow copy shares the model and data, not the store.
        evaluator = copy.copy(run)
        evaluator.store = self.store
        anchor_fp = run.store.expected["anchor"]
        adapter_dir, adapter_fp = run.run_dir / "sft" / "adapter", run.store.expected["sft"]
        for t, steps in enumerate(self.block_steps):
            adapter_dir, adapter_fp = self._train_block(t, steps, adapter_dir, adapter_fp)
            evaluator.evaluate(f"block_{t}.eval", adapter_dir, adapter_fp, anchor_fp, iteration=t)
        lm_eval_stage(run, self.store, f"block_{len(self.block_steps) - 1}.lm_eval", adapter_dir, adapter_fp)

    def _train_block(self, t: int, steps: int, start_dir: Path, start_fp: str) -> tuple[Path, str]:
        run, r = self.run, self.run.recipe
        sft = replace(r.sft, learning_rate=r.compare.sft_arm_learning_rate or r.sft.learning_rate)
        cfg = sft_config_for_steps(sft, len(run.train), steps)
        seed = r.seed + 1000 * (t + 1)  # batch order differs from the SFT stage's (seed r.seed) and per block
        fp = fingerprint("continued-sft", start_fp, asdict(cfg), steps, seed)
        name, adapter_dir = f"block_{t}.train", self.arm_dir / f"block_{t}" / "adapter"
        if self.store.completed(name, fp):
            return adapter_dir, fp
        load_adapter_weights(run.model, start_dir)
        step = sft_step_fn(run.model, run.train, run.pad_id, run.chunk, run.runtime.device)
        lengths = [len(e.prompt_ids) + len(e.answer_ids) for e in run.train]
        label = f"{self.arm_dir.name} block_{t}"
        checkpoint_dir = self.arm_dir / f"block_{t}" / "checkpoint"
        with StageMeter(run.runtime.device) as meter, ui.stage_bar(label, steps, "steps") as advance:
            result = train_adapter(run.model, run.runtime, cfg, lengths, step, seed=seed,
                                   on_step=absolute_progress(advance), checkpoint_dir=checkpoint_dir,
                                   fingerprint=fp, stage=f"{self.arm_dir.name}.block_{t}")
        save_adapter(run.model, adapter_dir)
        self.store.complete(name, fp, "sft", {
            **result.summary(), "learning_rate": cfg.learning_rate,
            "tokens_per_s": result.tokens / max(meter.wall_s, 1e-9), **meter.memory,
            "loss_curve": result.losses}, meter.wall_s, outputs=[adapter_dir], iteration=t)
        remove_checkpoint(checkpoint_dir)
        return adapter_dir, fp


def lm_eval_stage(run: Run, store: StageStore, name: str, adapter_dir: Path, adapter_fp: str) -> None:
    """Score one adapter with lm-evaluation-harness as a stage of `store`; nothing when no tasks are asked for."""
    c = run.recipe.compare
    if not c.lm_eval_tasks:
        return
    # The task files' contents, not just their directory's name, decide whether an earlier score still holds.
    include = Path(c.lm_eval_include_path).expanduser() if c.lm_eval_include_path else None
    task_files = {str(p.relative_to(include)): p.read_text(encoding="utf-8")
                  for p in sorted(include.rglob("*.yaml"))} if include else {}
    fp = fingerprint("lm-eval", adapter_fp, c.lm_eval_tasks, c.lm_eval_limit, task_files, run.recipe.eval.batch_size)
    if store.completed(name, fp):
        return
    load_adapter_weights(run.model, adapter_dir)
    with StageMeter(run.runtime.device) as meter:
        ui.note(f"{name}: lm-evaluation-harness on {ui.escape(', '.join(c.lm_eval_tasks))}")
        results = run_lm_eval(run.model, run.tokenizer, c.lm_eval_tasks, limit=c.lm_eval_limit,
                              include_path=str(include or ""), batch_size=run.recipe.eval.batch_size,
                              seed=run.recipe.seed)
    store.complete(name, fp, "lm_eval", {**results, **meter.memory}, meter.wall_s, iteration=describe(name)[1])
