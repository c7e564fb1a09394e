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

The argument above holds only where the mask and the position ids set everything a token sees: not for ALiBi,
local windows or recurrent layers (packing_rules.py). So only listed architectures pack (`packing_rules`), and
`probe_packing`, run once when a run sets up, scores one real pair both ways on the loaded model and keeps the two
sequences if they differ by more than float rounding; its verdict is kept on the model, so the opponent's scoring,
the player's steps and the anchor metrics all take the one layout it allows.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Sequence

import torch
from torch import Tensor

from frugal_spin.data import collate_sequences
from frugal_spin.logprobs import _text_config, chunked_token_logprobs, decoder_and_head, sequence_logprobs
from frugal_spin.packing_rules import packing_rule

Triple = tuple[Sequence[int], Sequence[int], Sequence[int]]  # (prompt ids, real answer ids, generated answer ids)
MASK_KINDS = {"sdpa": "bool", "eager": "additive"}
# The packed layout pays only when it cuts the batch's padded tokens to at most this share of the two-sequence
# layout's: its custom mask takes SDPA off the causal fast path that unpadded two-sequence batches get. Measured on 2
# CPU cores: chitchat pairs (ratio ~0.6-0.7) trained 1.6x faster packed; bench_vs_trl's pairs at 1,024 tokens
# (prompt 256, answers 768 each, no padding: ratio 0.875) 1.3x slower packed.
MAX_TOKEN_RATIO = 0.8
# The probe's tolerance on |packed - two sequences|, in nats per scored answer token, by compute dtype: ~10x the
# largest difference measured on exact architectures (SmolLM2-135M dequantised from its GGUF, and the shipped tiny
# base; 40-token prompt, two 60-token random answers, torch 2.13, 2 CPU cores): 1.0e-6 per token in fp32,
# 6.5e-3 in bf16. The leaks it must catch, fp32, tiny random configs: MPT 3.5e-3 per token, Zamba2 6.7e-3,
# RWKV 2.6e-2, Mamba2 3.6e-2 (LFM2 1e-5 and Jamba 2e-5 are too small to tell on random weights: the allowlist,
# not the probe, keeps those apart). In half precision the probe catches only gross failures (a mask or position
# ids ignored, several nats), so there too the allowlist is the guard.
PROBE_TOLERANCE_PER_TOKEN = {torch.float32: 1e-5, torch.float64: 1e-5}
HALF_PROBE_TOLERANCE_PER_TOKEN = 5e-2
_DECISION_ATTR = "_frugal_spin_pair_packing"  # where probe_packing leaves its verdict, on the base model


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


@dataclass(frozen=True)
class PackingDecision:
    """Whether this model packs pairs, and why: "on", or the reason it does not (allowlist miss, probe
    difference, probe error, device or attention implementation). The probe's largest difference and its
    tolerance are in nats per answer token."""

    packed: bool
    reason: str
    probe_difference_per_token: float | None = None
    tolerance_per_token: float | None = None

    def record(self) -> dict[str, Any]:
        return {"packed": self.packed, "reason": self.reason,
                "probe_difference_per_token": self.probe_difference_per_token,
                "tolerance_per_token": self.tolerance_per_token}


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def packing_refusal(model, longest: int | None = None) -> str | None:
    """Why pairs are not packed for this model (for a batch whose packed sequences reach `longest` tokens, when
    known), or None: not on the CPU, an attention implementation that takes no 4D mask, the architecture's rule
    (`packing_rules.packing_rule`: allowlist, sliding window), or the probe's verdict (`probe_packing`)."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return "model without parameters"
    if device.type != "cpu":
        return f"not on the CPU ({device.type}: pairs are packed only where it is tested)"
    implementation = attention_implementation(model)
    if implementation not in MASK_KINDS:
        return f"attention implementation {implementation or '(none)'!r} takes no 4D mask"
    refusal = packing_rule(_text_config(_base(model).config)).refuses(longest)
    if refusal is not None:
        return refusal
    decision = getattr(_base(model), _DECISION_ATTR, None)
    return None if decision is None or decision.packed else decision.reason


def shares_prompt(model, longest: int | None = None) -> bool:
    """Whether pairs are packed for this model (`packing_refusal` says no reason not to)."""
    return packing_refusal(model, longest) is None


def packing_decision(model) -> PackingDecision:
    """The verdict `probe_packing` left on this model, else what the rules alone say."""
    decision = getattr(_base(model), _DECISION_ATTR, None)
    if decision is not None:
        return decision
    refusal = packing_refusal(model)
    return PackingDecision(refusal is None, refusal or "on")


def probe_triple(pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> Triple:
    """The probe's pair, from real (prompt, answer) rows: the longest row's prompt and answer, and as the second
    answer the longest answer of another row (its own when it is the only one). Long answers show a leak best: it
    grows with the tokens it runs through."""
    if not pairs:
        raise ValueError("no (prompt, answer) rows to build the packing probe from")
    longest = max(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    others = [i for i in range(len(pairs)) if i != longest] or [longest]
    other = max(others, key=lambda i: len(pairs[i][1]))
    return list(pairs[longest][0]), list(pairs[longest][1]), list(pairs[other][1])


def _compute_dtype(model, device: torch.device) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)


def probe_packing(model, triple: Triple, pad_id: int, chunk_size: int,
                  autocast: Callable[[], ContextManager] | None = None) -> PackingDecision:
    """Score one real pair packed and as two sequences on the loaded model (no gradients, eval mode, under the
    training loop's `autocast`) and decide: packing stays on only if each answer's summed log-probs agree within
    PROBE_TOLERANCE_PER_TOKEN x its tokens. The decision is kept on the model, where `packs_pairs` reads it, so
    every later scoring and training step of this model follows it; a model the rules already refuse is not
    probed. A packed forward that raises (an architecture that rejects the 4D mask) also means two sequences."""
    if hasattr(_base(model), _DECISION_ATTR):  # a new probe replaces an earlier verdict, never reads it
        delattr(_base(model), _DECISION_ATTR)
    refusal = packing_refusal(model, longest=len(triple[0]) + len(triple[1]) + len(triple[2]))
    if refusal is not None:
        decision = PackingDecision(False, refusal)
    else:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), autocast() if autocast is not None else contextlib.nullcontext():
                decision = _compare_layouts(model, triple, pad_id, chunk_size)
        finally:
            model.train(was_training)
    setattr(_base(model), _DECISION_ATTR, decision)
    return decision


def _compare_layouts(model, triple: Triple, pad_id: int, chunk_size: int) -> PackingDecision:
    """The probe's comparison: max over the two answers of |packed - two sequences| / tokens, against the
    tolerance of the compute dtype."""
    device = next(model.parameters()).device
    tolerance = PROBE_TOLERANCE_PER_TOKEN.get(_compute_dtype(model, device), HALF_PROBE_TOLERANCE_PER_TOKEN)
    apart = two_sequence_logprobs(model, [triple], pad_id, chunk_size)
    try:
        packed = shared_prompt_logprobs(model, [triple], pad_id, chunk_size)
    except Exception as exc:  # noqa: BLE001 - whatever breaks the packed forward means: do not pack
        message = " ".join(str(exc).split())
        return PackingDecision(False, f"probe error: the packed forward raised {type(exc).__name__}: {message}"[:300],
                               tolerance_per_token=tolerance)
    lengths = (len(triple[1]), len(triple[2]))
    per_token = max(abs(p.item() - a.item()) / max(1, n) for p, a, n in zip(packed, apart, lengths))
    if per_token <= tolerance:
        return PackingDecision(True, "on", per_token, tolerance)
    return PackingDecision(False, f"probe difference: {per_token:.3g} nats per token between packed and two "
                                  f"sequences (tolerance {tolerance:g})", per_token, tolerance)


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
    """Whether this batch of pairs runs packed: `shares_prompt` allows it (the rules and the probe's verdict on
    this model, so scoring and training always agree) and the padded tokens of x+y+y' are at
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
    return two_sequence_logprobs(model, triples, pad_id, chunk_size)


def two_sequence_logprobs(model, triples: Sequence[Triple], pad_id: int, chunk_size: int) -> tuple[Tensor, Tensor]:
    """(real [B], generated [B]) from the 2B sequences x+y and x+y' in one right-padded batch: exact for every
    causal LM."""
    device = next(model.parameters()).device
    seqs = collate_sequences([(x, y) for x, y, _ in triples] + [(x, g) for x, _, g in triples], pad_id).to(device)
    logps = sequence_logprobs(model, seqs.input_ids, seqs.attention_mask, seqs.response_mask, chunk_size=chunk_size)
    return logps[:len(triples)], logps[len(triples):]


def pair_tokens(triples: Sequence[Triple], shared: bool) -> int:
    """Tokens one forward over these pairs processes (unpadded), for the tokens/s figures."""
    return sum((1 if shared else 2) * len(x) + len(y) + len(g) for x, y, g in triples)
