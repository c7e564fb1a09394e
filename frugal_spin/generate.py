"""Opponent sampling: one answer per prompt, batched by length, with the KV cache.

Inputs: a model (base + the opponent's adapter), its tokenizer, prompt token ids (from `data.encode_prompt`, so
generation starts from exactly the ids that scoring later conditions on), sampling settings.
Outputs: per prompt, the generated token ids after the prompt, cut after the first eos (inclusive); no padding.

Prompts are sorted by length and left-padded, so a batch wastes little compute on padding and every sequence's
new tokens start at the same column. Each batch seeds the sampler from (seed, batch index), so a rerun with the
same prompts, seed and batch size gives the same answers.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from frugal_spin.data import cut_after_eos, length_grouped_batches


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Sample (or, at temperature 0, greedily decode) one answer per prompt; `on_batch(n)` reports progress."""
    device = next(model.parameters()).device
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    answers: list[list[int] | None] = [None] * len(prompts)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if temperature > 0 \
        else dict(do_sample=False)
    for batch_index, batch in enumerate(length_grouped_batches([len(p) for p in prompts], batch_size, seed=None)):
        width = max(len(prompts[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids = list(prompts[i])
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids):] = 1
        torch.manual_seed(seed * 1_000_003 + batch_index)
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id, use_cache=True, **sampling)
        for row, i in enumerate(batch):
            answers[i] = strip_answer(output[row, width:].tolist(), eos_id, pad_id)
        if on_batch is not None:
            on_batch(len(batch))
    model.train(was_training)
    return answers  # type: ignore[return-value]


def strip_answer(ids: list[int], eos_id: int, pad_id: int) -> list[int]:
    """Keep tokens up to and including the first eos; drop the padding `generate` adds after finished rows."""
    ids = cut_after_eos(ids, eos_id)
    if ids and ids[-1] == eos_id:
        return ids
    while ids and ids[-1] == pad_id:
        ids.pop()
    return ids
