"""Shared-prompt pairs: a SPIN pair's real and generated answers in one sequence, over one copy of the prompt.

A pair (x, y, y') is normally two sequences, x+y and x+y', so the prompt x goes through the model twice. Here it is
one sequence x+y+y' with a custom attention mask: y attends causally to x and itself, y' to x and itself but never
to y, and y' takes the positions y would have had (position ids len(x) .. len(x)+len(y')-1). Every token then sees
exactly the context it sees in its own sequence, so

    log p(y | x) = Σ_t log p(y_t | x, y_<t)  and  log p(y' | x) = Σ_t log p(y'_t | x, y'_<t)

are the unshared values up to float summation order (~1e-6 in fp32, tests/test_shared_prompt.py), while the
forward (and backward) runs over |x| + |y| + |y'| tokens instead of 2|x| + |y| + |y'| plus the padding of the
longer answer. The first token of y' is predicted from the hidden state of x's last token, not of y's.

It needs an attention implementation that takes a 4D mask from the caller: transformers' `sdpa` (boolean mask)
and `eager` (additive float mask). It is used on the CPU only, where it is tested; on CUDA the Triton/unsloth
and flash-attention paths do not take such masks, and the GPU check has not validated the sdpa one, so pairs are
scored as two sequences there (`shares_prompt`). A model with a sliding attention window shorter than a packed
sequence would lose its window rule, so such batches are not packed either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from frugal_spin.data import collate_sequences
from frugal_spin.logprobs import _text_config, chunked_token_logprobs, decoder_and_head, sequence_logprobs

Triple = tuple[Sequence[int], Sequence[int], Sequence[int]]  # (prompt ids, real answer ids, generated answer ids)
MASK_KINDS = {"sdpa": "bool", "eager": "additive"}
# The packed layout pays only when it cuts the batch's padded tokens to at most this share of the two-sequence
# layout's: its custom mask takes SDPA off the causal fast path that unpadded two-sequence batches get. Measured on 2
# CPU cores: chitchat pairs (ratio ~0.6-0.7) trained 1.6x faster packed; bench_vs_trl's pairs at 1,024 tokens
# (prompt 256, answers 768 each, no padding: ratio 0.875) 1.3x slower packed.
MAX_TOKEN_RATIO = 0.8


@dataclass
class SharedPromptBatch:
    input_ids: Tensor  # [B, L] prompt + real + generated, right-padded
    position_ids: Tensor  # [B, L] the generated answer restarts at len(prompt)
    allowed: Tensor  # [B, L, L] bool: query t may attend to key s
    rows: Tensor  # [N] batch row of each scored token
    predictors: Tensor  # [N] position whose hidden state predicts it
    targets: Tensor  # [N] its position
    outputs: Tensor  # [N] which sum it adds to: b for real answers, B + b for generated ones


def attention_implementation(model) -> str:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return str(getattr(_text_config(base.config), "_attn_implementation", None) or "")


def shares_prompt(model, longest: int | None = None) -> bool:
    """Whether pairs are packed for this model: CPU, an attention implementation that takes a 4D mask, and no
    sliding window shorter than the packed sequence (`longest` tokens, when known)."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return False
    if device.type != "cpu" or attention_implementation(model) not in MASK_KINDS:
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    window = getattr(_text_config(base.config), "sliding_window", None)
    return not window or (longest is not None and longest <= window)


def collate_shared_prompt(triples: Sequence[Triple], pad_id: int) -> SharedPromptBatch:
    width = max(len(x) + len(y) + len(g) for x, y, g in triples)
    batch = len(triples)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    allowed = torch.zeros((batch, width, width), dtype=torch.bool)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    rows, predictors, targets, outputs = [], [], [], []
    for b, (prompt, real, generated) in enumerate(triples):
        p, r, g = len(prompt), len(real), len(generated)
        if p == 0:
            raise ValueError(f"pair {b}: an empty prompt cannot predict its answers' first tokens")
        n = p + r + g
        input_ids[b, :n] = torch.tensor(list(prompt) + list(real) + list(generated), dtype=torch.long)
        position_ids[b, :p + r] = torch.arange(p + r)
        position_ids[b, p + r:n] = torch.arange(p, p + g)
        allowed[b, :n, :n] = causal[:n, :n]
        allowed[b, p + r:n, p:p + r] = False  # the generated answer never sees the real one
        allowed[b, range(n, width), range(n, width)] = True  # padding attends to itself: no empty softmax rows
        for j in range(r):
            rows.append(b), predictors.append(p + j - 1), targets.append(p + j), outputs.append(b)
        for j in range(g):
            rows.append(b), predictors.append(p - 1 if j == 0 else p + r + j - 1), targets.append(p + r + j)
            outputs.append(batch + b)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return SharedPromptBatch(input_ids, position_ids, allowed, as_long(rows), as_long(predictors), as_long(targets),
                             as_long(outputs))


def attention_mask_4d(allowed: Tensor, kind: str, dtype: torch.dtype) -> Tensor:
    """[B, 1, L, L] in the form the attention implementation adds or applies: sdpa takes booleans (True =
    attend), eager adds a float mask (0 or the dtype's most negative value)."""
    if kind == "bool":
        return allowed[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def shared_prompt_logprobs(model, triples: Sequence[Triple], pad_id: int, chunk_size: int) -> tuple[Tensor, Tensor]:
    """(real [B], generated [B]) summed log-probs, fp32, with one forward over x+y+y' per pair."""
    decoder, head = decoder_and_head(model)
    device = head.weight.device
    batch = collate_shared_prompt(triples, pad_id)
    kind = MASK_KINDS[attention_implementation(model)]
    compute_dtype = next((p.dtype for p in decoder.parameters() if p.dtype.is_floating_point), torch.float32)
    mask = attention_mask_4d(batch.allowed.to(device), kind, compute_dtype)
    outputs = decoder(input_ids=batch.input_ids.to(device), attention_mask=mask,
                      position_ids=batch.position_ids.to(device), use_cache=False)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    rows, predictors = batch.rows.to(hidden.device), batch.predictors.to(hidden.device)
    scored = hidden[rows, predictors].to(device)
    targets = batch.input_ids.to(device)[batch.rows.to(device), batch.targets.to(device)]
    token_logps = chunked_token_logprobs(scored, head.weight, targets, head.bias, chunk_size)
    n = len(triples)
    sums = torch.zeros(2 * n, dtype=torch.float32, device=device).index_add(0, batch.outputs.to(device), token_logps)
    return sums[:n], sums[n:]


def packs_pairs(model, triples: Sequence[Triple]) -> bool:
    """Whether this batch of pairs runs packed: `shares_prompt` allows it and the padded tokens of x+y+y' are at
    most MAX_TOKEN_RATIO of those of the 2B sequences x+y and x+y'."""
    longest = max(len(x) + len(y) + len(g) for x, y, g in triples)
    if not shares_prompt(model, longest):
        return False
    two_sequences = 2 * len(triples) * max(max(len(x) + len(y), len(x) + len(g)) for x, y, g in triples)
    return len(triples) * longest <= MAX_TOKEN_RATIO * two_sequences


def pair_logprobs(model, triples: Sequence[Triple], pad_id: int, chunk_size: int) -> tuple[Tensor, Tensor]:
    """(real [B], generated [B]) summed log-probs of each pair's two answers: shared-prompt packing where
    `packs_pairs` says it pays, else the 2B sequences x+y and x+y' in one batch."""
    if packs_pairs(model, triples):
        return shared_prompt_logprobs(model, triples, pad_id, chunk_size)
    device = next(model.parameters()).device
    seqs = collate_sequences([(x, y) for x, y, _ in triples] + [(x, g) for x, _, g in triples], pad_id).to(device)
    logps = sequence_logprobs(model, seqs.input_ids, seqs.attention_mask, seqs.response_mask, chunk_size=chunk_size)
    return logps[:len(triples)], logps[len(triples):]


def pair_tokens(triples: Sequence[Triple], shared: bool) -> int:
    """Tokens one forward over these pairs processes (unpadded), for the tokens/s figures."""
    return sum((1 if shared else 2) * len(x) + len(y) + len(g) for x, y, g in triples)
