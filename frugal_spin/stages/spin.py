"""SPIN training of iteration t: the player, initialised from the opponent's adapter, against the cached opponent.

Inputs (by role): `opponent` (its adapter: where the player starts), `pairs` and `logps` (iteration t's pairs and
the opponent's cache of them), and with spin.mix_previous_pairs (t >= 1) `previous_pairs` and `previous_logps`
(iteration t-1's pairs, scored by this opponent: opponent.py). Output: `iter_<t>/adapter`.

The player minimises spin.loss (losses.py) with beta = spin.beta_at(t), without dropout (the cache was scored
without it, so at step 0 the player's log-probs equal the cache and the sigmoid loss is log 2); each pair is scored
without the end token when only one side ends (turns.scored_pair), exactly as the cache was. The record carries the
player's log-prob change on the real and the generated answers (nats per answer, the rewards without beta): does
SPIN raise the real answers or only push the generated ones down?
"""

from __future__ import annotations

import math
from dataclasses import asdict

import torch

from frugal_spin.fingerprints import fingerprint
from frugal_spin.io import read_jsonl, read_safetensors
from frugal_spin.model import load_adapter_weights
from frugal_spin.runner import Job, Outcome, Work
from frugal_spin.train import spin_step_fn
from frugal_spin.train_stage import train_stage, training_outcome
from frugal_spin.turns import truncation_counts


def _fingerprint(job: Job) -> str:
    spin = job.ctx.recipe.spin
    # Only this iteration's beta and (when mixing) the previous pairs' scores count: changing the beta of a later
    # iteration, or mixing (which starts at iteration 1), leaves iteration 0 alone.
    settings = {k: v for k, v in asdict(spin).items() if k not in ("iterations", "beta", "mix_previous_pairs")}
    previous = job.inputs["previous_logps"].fp if "previous_logps" in job.inputs else None
    return fingerprint("spin-train", job.inputs["logps"].fp, previous, settings, spin.beta_at(job.spec.iteration))


def _train(job: Job) -> Outcome:
    ctx, r, t = job.ctx, job.ctx.recipe, job.spec.iteration
    # The player starts from the opponent's adapter, read back from disk (never the bare base).
    load_adapter_weights(ctx.model, job.inputs["opponent"].path())
    rows = read_jsonl(job.inputs["pairs"].path())
    cache = read_safetensors(job.inputs["logps"].path())
    if "previous_pairs" in job.inputs:
        rows += read_jsonl(job.inputs["previous_pairs"].path())
        previous = read_safetensors(job.inputs["previous_logps"].path())
        cache = {key: torch.cat([cache[key], previous[key]]) for key in ("real", "generated")}
    real, generated = ctx.scored(rows)  # exactly the responses the cache was scored on
    beta = r.spin.beta_at(t)
    step = spin_step_fn(ctx.model, [x["prompt_ids"] for x in rows], real, generated, cache["real"],
                        cache["generated"], beta, ctx.pad_id, ctx.chunk, ctx.runtime.device, loss=r.spin.loss)
    lengths = [len(x["prompt_ids"]) + len(a) + len(b) for x, a, b in zip(rows, real, generated)]
    result, used = train_stage(job, r.spin, "spin", lengths, step, seed=r.seed + 1000 * (t + 1), disable_dropout=True)
    summary = result.summary()
    return training_outcome(job, result, used, {
        "pairs": len(rows), "beta": beta, "loss": r.spin.loss, **truncation_counts(rows, ctx.stop_ids),
        "real_logp_change": summary.get("train_real_reward", math.nan) / beta,
        "generated_logp_change": summary.get("train_generated_reward", math.nan) / beta,
        "margin_curve": result.metrics.get("reward_margin", [])})


SPIN = Work(_fingerprint, _train)
