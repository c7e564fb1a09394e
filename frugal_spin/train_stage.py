"""What every training stage guarantees, SFT, SPIN and each continued-SFT block of `compare` alike.

`train_stage(job, cfg, section, lengths, step, seed=...)` trains the loaded adapter in place (train.py) with:

- checkpoints in `<folder>/checkpoint` every `checkpoint_every_steps`, and a killed stage resumed from its last one;
- CUDA out of memory: with `<section>.oom_halving`, the stage again from its starting weights at half the
  micro-batch and twice the accumulation (same effective batch, same steps), remembered in
  `<folder>/oom_batching.json` with the stage's fingerprint so a resumed stage starts at the size that fit; without
  it, one line with what the planner suggests;
- a streak of non-finite losses or gradients: stopped with one line, the last good adapter saved in
  `<folder>/last_good_adapter` (skipped steps never touch the weights);
- a bound on the steps one stage may plan (`MAX_OPTIMIZER_STEPS`), checked by arithmetic before anything is planned;
- live curves (live_log.py) at the run's cumulative step, a progress bar, and with `profile.trace` set to this
  stage's kind a torch.profiler trace in `<root>/traces/<folder>`.

`training_outcome` then hands the runner the record and the adapter to save before the marker, and the checkpoint
and remembered batching to remove after it.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

from frugal_spin import ui
from frugal_spin.checkpoint import remove_checkpoint
from frugal_spin.config import Recipe, TrainConfig
from frugal_spin.errors import UserError
from frugal_spin.io import write_json
from frugal_spin.model import save_adapter
from frugal_spin.runner import Job, Outcome
from frugal_spin.train import (MAX_OPTIMIZER_STEPS, NonFiniteStreak, TrainingStep, TrainResult, count_optimizer_steps,
                               total_optimizer_steps, train_adapter, train_with_oom_retry)


def train_stage(job: Job, cfg: TrainConfig, section: str, lengths: Sequence[int], step: TrainingStep, *, seed: int,
                disable_dropout: bool = False) -> tuple[TrainResult, TrainConfig]:
    """Train the loaded adapter for this stage (module docstring); return the result and the batching it used.
    `section` is the recipe section the settings come from (`sft` or `spin`), for messages."""
    ctx, spec = job.ctx, job.spec
    _check_planned_steps(cfg, section, len(lengths))
    checkpoint_dir, batching_file = job.folder / "checkpoint", job.folder / "oom_batching.json"
    remembered = _read_json(batching_file)
    if remembered.get("fingerprint") == job.fp:
        cfg = replace(cfg, micro_batch_size=remembered["micro_batch_size"],
                      grad_accum_steps=remembered["grad_accum_steps"])

    def on_retry(smaller: TrainConfig) -> None:
        remove_checkpoint(checkpoint_dir)
        ctx.world.write(write_json, batching_file, {"fingerprint": job.fp, **batching(smaller)})

    offset = job.steps_done()

    def on_log(steps: int, values: dict[str, float]) -> None:
        ctx.live.train_step(spec.kind, offset + steps, values)

    trace = ({"trace_dir": ctx.root / "traces" / spec.folder, "trace_steps": ctx.recipe.profile.trace_steps}
             if ctx.recipe.profile.trace == spec.kind else {})

    def attempt(c: TrainConfig) -> TrainResult:
        with ui.stage_bar(job.label, total_optimizer_steps(len(lengths), c), "steps") as advance:
            return train_adapter(ctx.model, ctx.runtime, c, lengths, step, seed=seed,
                                 on_step=absolute_progress(advance), checkpoint_dir=checkpoint_dir,
                                 fingerprint=job.fp, stage=spec.name, on_log=on_log if ctx.live.enabled else None,
                                 disable_dropout=disable_dropout, **trace)

    try:
        return train_with_oom_retry(attempt, ctx.model, cfg, allow_halving=cfg.oom_halving, stage=spec.name,
                                    advice=lambda: oom_advice(ctx.recipe, section), on_retry=on_retry)
    except NonFiniteStreak as exc:
        if all(torch.isfinite(p).all() for p in ctx.model.parameters() if p.requires_grad):
            last_good = job.folder / "last_good_adapter"
            ctx.world.write(save_adapter, ctx.model, last_good)  # skipped steps never touched these weights
            raise UserError(f"{exc}; the last good adapter is in {last_good}") from None
        raise UserError(f"{exc}; the weights are not finite, the last checkpoint is in {checkpoint_dir}") from None


def training_outcome(job: Job, result: TrainResult, used: TrainConfig, metrics: dict[str, Any]) -> Outcome:
    """A training stage's record (the weights, the loss summary, the batching used, `metrics`, the loss curve),
    its adapter saved as its output, and its checkpoint and remembered batching removed once it is marked."""
    ctx = job.ctx

    def cleanup() -> None:
        remove_checkpoint(job.folder / "checkpoint")
        (job.folder / "oom_batching.json").unlink(missing_ok=True)

    return Outcome({**ctx.weights(), **result.summary(), **batching(used), **metrics, "loss_curve": result.losses},
                   write=lambda: save_adapter(ctx.model, job.output()), cleanup=cleanup)


def _check_planned_steps(cfg: TrainConfig, section: str, n_items: int) -> None:
    steps = count_optimizer_steps(n_items, cfg)
    if steps > MAX_OPTIMIZER_STEPS:
        raise UserError(f"{section}.epochs={cfg.epochs:g} plans {steps:,} optimizer steps over {n_items:,} training "
                        f"items, more than the {MAX_OPTIMIZER_STEPS:,} one stage may plan; lower {section}.epochs")


def oom_advice(recipe: Recipe, section: str) -> str:
    """What the planner says fits this GPU, or how to ask it."""
    how = (f"Lower {section}.micro_batch_size (raising {section}.grad_accum_steps keeps the effective batch), "
           f"or set {section}.oom_halving=true; `python -m frugal_spin plan RECIPE --gpu ...` estimates what fits")
    try:
        from frugal_spin.planner import GPUS, estimate, resolve_model_shape

        total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
        gpu = min(GPUS, key=lambda g: abs(GPUS[g] - total_gib))
        shape = resolve_model_shape(recipe.model.name, allow_network=False, gguf_file=recipe.model.gguf_file)
        largest = estimate(recipe, shape, gpu).max_micro_batch[f"{section}_train"]
    except Exception:  # the advice is best effort; the error itself must still be shown
        return how + "."
    return f"{how}; for a {gpu.upper()}-sized GPU it suggests {section}.micro_batch_size <= {largest}."


def absolute_progress(advance):
    """train_adapter reports optimizer steps done so far (a resumed stage starts past 0); the bar advances by deltas."""
    done = [0]

    def on_step(steps: int, loss: float) -> None:
        advance(steps - done[0], loss=loss)
        done[0] = steps

    return on_step


def batching(cfg: TrainConfig) -> dict[str, int]:
    """The micro-batching a stage really used (an OOM retry halves the recipe's)."""
    return {"micro_batch_size": cfg.micro_batch_size, "grad_accum_steps": cfg.grad_accum_steps}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
