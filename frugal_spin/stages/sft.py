"""SFT on the real answers: the SFT stage, and `compare`'s continued-SFT blocks.

`sft`: from the freshly initialised adapter (seeded by the recipe), LoRA SFT with the recipe's `sft` settings over
the training examples (loss on response tokens only) -> `sft/adapter`.

`continued_sft` (block t of a compare SFT arm): from the previous block's adapter (the seed's SFT adapter for block
0), SFT with the recipe's `sft` settings (and `compare.sft_arm_learning_rate` when set) for exactly the optimizer
steps of its budget (`StageSpec.steps`: SPIN iteration t's steps, or its wall time's worth) -> `block_<t>/adapter`.
Both train through train_stage.py, so a block has every guarantee the SFT stage has.
"""

from __future__ import annotations

from dataclasses import asdict, replace

from frugal_spin.config import SFTConfig
from frugal_spin.fingerprints import fingerprint
from frugal_spin.model import load_adapter_weights
from frugal_spin.runner import Job, Outcome, Work
from frugal_spin.train import count_optimizer_steps, sft_step_fn, total_optimizer_steps
from frugal_spin.train_stage import train_stage, training_outcome


def _sft_fingerprint(job: Job) -> str:
    r = job.ctx.recipe
    return fingerprint("sft", job.inputs["data"].fp, asdict(r.sft), r.seed)


def _sft(job: Job) -> Outcome:
    r = job.ctx.recipe
    result, used = train_stage(job, r.sft, "sft", _lengths(job), _step(job), seed=r.seed)
    return training_outcome(job, result, used, {})


def _block_config(job: Job) -> SFTConfig:
    r = job.ctx.recipe
    sft = replace(r.sft, learning_rate=r.compare.sft_arm_learning_rate or r.sft.learning_rate)
    return sft_config_for_steps(sft, len(job.ctx.train), job.spec.steps)


def _block_seed(job: Job) -> int:
    return job.ctx.recipe.seed + 1000 * (job.spec.iteration + 1)  # batch order differs from SFT's and per block


def _block_fingerprint(job: Job) -> str:
    return fingerprint("continued-sft", job.inputs["start"].fp, asdict(_block_config(job)), job.spec.steps,
                       _block_seed(job))


def _block(job: Job) -> Outcome:
    cfg = _block_config(job)
    load_adapter_weights(job.ctx.model, job.inputs["start"].path())
    result, used = train_stage(job, cfg, "sft", _lengths(job), _step(job), seed=_block_seed(job))
    return training_outcome(job, result, used, {"learning_rate": cfg.learning_rate})


def _step(job: Job):
    ctx = job.ctx
    return sft_step_fn(ctx.model, ctx.train, ctx.pad_id, ctx.chunk, ctx.runtime.device)


def _lengths(job: Job) -> list[int]:
    return [len(e.prompt_ids) + len(e.answer_ids) for e in job.ctx.train]


def sft_config_for_steps(sft: SFTConfig, n_items: int, steps: int) -> SFTConfig:
    """The recipe's SFT settings with `epochs` chosen so training takes exactly `steps` optimizer steps.

    Training plans whole epochs plus a rounded share of the last one's accumulation windows (one window per
    optimizer step: train.count_optimizer_steps), so epochs = steps / windows per epoch reproduces the count;
    checked, since a silent off-by-one would unequal the budgets."""
    per_epoch = count_optimizer_steps(n_items, replace(sft, epochs=1.0))
    cfg = replace(sft, epochs=steps / per_epoch)
    actual = total_optimizer_steps(n_items, cfg)
    if actual != steps:  # pragma: no cover - guards the arithmetic above against changes in the planning
        raise RuntimeError(f"continued SFT planned {actual} optimizer steps instead of {steps}")
    return cfg


SFT = Work(_sft_fingerprint, _sft)
CONTINUED_SFT = Work(_block_fingerprint, _block)
