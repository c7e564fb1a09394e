"""Scoring: summed log-probs of responses under the current model, in length-sorted batches, no gradients.

`score_responses`: (prompt_ids, response_ids) pairs -> a float32 tensor, row i = Σ_t log p(response_i,t | prompt_i,
response_i,<t) by teacher forcing (evaluation's held-out NLL). `score_pairs`: SPIN pairs (prompt, real, generated)
-> both answers' sums, with the prompt shared where `shared_prompt.packs_pairs` says it pays; it builds the opponent
cache once per SPIN iteration (the player then trains against these numbers with no opponent forward pass) and
scores the evaluation anchor, with the same pair layout as the player's training step.

Precision: `autocast` is the training loop's precision context (`Runtime.autocast`); scoring under it makes the
cache hold exactly what the player computes at step 0 (under bf16 autocast the two would otherwise differ by
more than the SPIN loss moves in its first steps).
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Sequence

import torch

from frugal_spin.data import collate_sequences, length_grouped_batches
from frugal_spin.distributed import current as current_world
from frugal_spin.logprobs import sequence_logprobs
from frugal_spin.shared_prompt import Triple, pair_logprobs


@torch.no_grad()
def score_responses(
    model,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    pad_id: int,
    batch_size: int,
    chunk_size: int,
    on_batch: Callable[[int], None] | None = None,
    autocast: Callable[[], ContextManager] | None = None,
) -> torch.Tensor:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    world = current_world()  # with several ranks, each scores its own batches (NaN elsewhere) and `merge` gathers
    out = torch.full((len(pairs),), float("nan"), dtype=torch.float32)
    batches = length_grouped_batches([len(p) + len(r) for p, r in pairs], batch_size, seed=None)
    for index, batch in enumerate(batches):
        if not world.owns(index):
            if on_batch is not None:
                on_batch(len(batch))
            continue
        seqs = collate_sequences([pairs[i] for i in batch], pad_id).to(device)
        with autocast() if autocast is not None else contextlib.nullcontext():
            logps = sequence_logprobs(model, seqs.input_ids, seqs.attention_mask, seqs.response_mask,
                                      chunk_size=chunk_size)
        out[batch] = logps.float().cpu()
        if on_batch is not None:
            on_batch(len(batch))
    model.train(was_training)
    return world.merge(out)


@torch.no_grad()
def score_pairs(
    model,
    triples: Sequence[Triple],
    *,
    pad_id: int,
    batch_size: int,
    chunk_size: int,
    on_batch: Callable[[int], None] | None = None,
    autocast: Callable[[], ContextManager] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(real [N], generated [N]) summed log-probs of each (prompt, real, generated) triple's two answers, in
    batches of `batch_size` pairs sorted by length; `on_batch` counts sequences (2 per pair)."""
    was_training = model.training
    model.eval()
    world = current_world()
    real = torch.full((len(triples),), float("nan"), dtype=torch.float32)
    generated = real.clone()
    batches = length_grouped_batches([len(x) + len(y) + len(g) for x, y, g in triples], batch_size, seed=None)
    for index, batch in enumerate(batches):
        if world.owns(index):
            with autocast() if autocast is not None else contextlib.nullcontext():
                r, g = pair_logprobs(model, [triples[i] for i in batch], pad_id, chunk_size)
            real[batch], generated[batch] = r.float().cpu(), g.float().cpu()
        if on_batch is not None:
            on_batch(2 * len(batch))
    model.train(was_training)
    return world.merge(real), world.merge(generated)
