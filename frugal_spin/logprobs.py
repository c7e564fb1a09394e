"""Sequence log-probabilities of response tokens without materialising the full [tokens x vocab] logits.

SFT, SPIN training and opponent scoring all need, per sequence b,

    logp[b] = sum_{t : response_mask[b, t]} log softmax(W h[b, t-1] + bias)[input_ids[b, t]]

where h is the decoder's last hidden state and (W, bias) the LM head. The plain way (`model(...).logits`) builds
a [B, T, V] tensor; for Qwen2.5-1.5B (V = 151,936) that is 1.16 GiB in fp32 per 1,024 tokens, more than the 4-bit
weights. Here only the hidden rows that predict response tokens reach the head, and the head + log-softmax run
in chunks of rows inside one autograd Function that never keeps logits: with a frozen head (the LoRA case) it
takes d out / d hidden per chunk while the chunk's logits exist (the upstream gradient only scales rows); with a
trainable head it keeps a per-row logsumexp and recomputes each chunk's logits in backward.

Public functions:

- `reference_token_logprobs(hidden, weight, targets, bias=None) -> [N]`: plain torch (full fp32 logits); the
  reference for parity tests and benchmarks (defined beside the kernel in `kernels/logprob.py`).
- `chunked_token_logprobs(hidden, weight, targets, bias=None, chunk_size=1024) -> [N]` (fp32): same values,
  peak extra memory O(chunk_size x V) in forward and backward whatever N is.
- `response_logprobs_from_hidden(hidden[B,T,H], weight, bias, input_ids, response_mask, chunk_size)
  -> (sum_logps[B], n_tokens[B])`: shift, gather, chunked head, per-sequence sum.
- `sequence_logprobs(model, input_ids, attention_mask, response_mask, chunk_size=1024) -> [B]` (fp32) and
  `sequence_logprobs_and_counts(...) -> (sum_logps[B] fp32, n_tokens[B] int64)`: the same from a transformers
  causal LM or a peft LoRA wrapper of one (4-bit bitsandbytes bases included).
- `response_mask_from_lengths(prompt_lengths[B], total_lengths[B], seq_len) -> BoolTensor[B, seq_len]`.
- `decoder_and_head(model) -> (decoder, head)`: the modules used above, with checks for unsupported heads.

Batch contract (checked, `ValueError` otherwise, since breaking it is a bug in the caller's collate):
- RIGHT padding only: each row of `attention_mask` is 1...1 0...0 with a 1 at position 0. The decoder then uses
  its default positions 0..T-1, which are the true positions of every real token; no `position_ids` are passed.
- `response_mask` marks the response tokens themselves, lies inside `attention_mask`, and is False at position 0
  (the token at t is predicted by the hidden state at t-1, so position 0 has no prediction).

Precision: logits, logsumexp, softmax and the per-sequence sums are fp32. With an fp32 head the logits are exact
fp32 products. With an fp16/bf16 head the row chunk is multiplied in the head's dtype (fp32 accumulation inside
the BLAS call) and the chunk of logits is upcast right away: the same rounding the model's own `.logits` have,
and it avoids a V x H fp32 copy of the head (0.87 GiB for Qwen2.5-1.5B).

Unsupported heads raise `UserError`: logit soft-capping (Gemma 2/3, `final_logit_softcapping`), logit scaling
(Cohere `logit_scale`, Granite `logits_scaling`, Falcon-H1 `lm_head_multiplier`), quantized or LoRA-wrapped
`lm_head`s, and peft prompt-learning adapters (their virtual tokens are added outside the decoder).

On CUDA with triton installed and a frozen head, `chunked_token_logprobs` runs the softmax part of each chunk in
a Triton kernel (`frugal_spin.kernels.logprob`); the torch chunked path here stays the reference and the CPU path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from frugal_spin.errors import UserError
from frugal_spin.kernels import logprob as logprob_kernel
from frugal_spin.kernels.dispatch import use_triton
# The full-logits reference and the two head products live beside the kernel that shares them (kernels/logprob.py);
# re-exported here, where callers have always found them.
from frugal_spin.kernels.logprob import chunk_logits, reference_token_logprobs, times_weight

__all__ = [
    "chunked_token_logprobs",
    "decoder_and_head",
    "reference_token_logprobs",
    "response_logprobs_from_hidden",
    "response_mask_from_lengths",
    "sequence_logprobs",
    "sequence_logprobs_and_counts",
]


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """Forward: per chunk z = h W^T + b (fp32), lse = logsumexp(z), out = z[target] - lse. Never keeps z.

    Gradient, with g = d loss / d out and p = softmax(z) = exp(z - lse):
        d loss / d z = g[:, None] * (onehot(target) - p)
        d h = (d z) W,   d W = (d z)^T h,   d b = sum_rows(d z)
    Two ways to get it, chosen by `eager` (see `chunked_token_logprobs`):
    - eager (frozen head, grad wanted): since g only scales rows, forward stores u = (onehot - p) W, [N, H] fp32,
      while z is at hand, and backward returns d h = g[:, None] * u. Two head matmuls in all, like plain autograd.
    - recompute (trainable head, or no grad wanted): forward stores lse [N]; backward recomputes each chunk's z
      (a third head matmul) and forms d h, and d W / d b only for those that require grad.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, chunk_size, eager):
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        unit_grad = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if eager else None
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            logits = chunk_logits(hidden[start:end], weight, bias)
            target_logit = logits.gather(1, targets[start:end, None]).squeeze(1)
            # In place on the one [C, V] buffer: torch.logsumexp would allocate a second one.
            row_max = logits.amax(dim=1, keepdim=True)
            row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
            row_sum = logits.sub_(row_max).exp_().sum(dim=1, keepdim=True)
            chunk_lse = row_sum.log().squeeze(1) + row_max.squeeze(1)
            lse[start:end] = chunk_lse
            out[start:end] = target_logit - chunk_lse
            if eager:
                # The buffer holds exp(z - max); turn it into onehot - p, still in place.
                minus_p = logits.div_(row_sum).neg_()
                minus_p.scatter_add_(1, targets[start:end, None], torch.ones_like(minus_p[:, :1]))
                unit_grad[start:end] = times_weight(minus_p, weight)
                del minus_p  # an alias of the chunk buffer: it too must go, or two buffers coexist
            del logits  # free the chunk before the next one is allocated
        if eager:
            ctx.save_for_backward(unit_grad)
        else:
            ctx.save_for_backward(hidden, weight, targets, bias, lse)
        ctx.eager = eager
        ctx.chunk_size = chunk_size
        ctx.hidden_dtype = hidden.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grad_out = grad_out.float()
        if ctx.eager:
            (unit_grad,) = ctx.saved_tensors
            return (grad_out[:, None] * unit_grad).to(ctx.hidden_dtype), None, None, None, None, None

        hidden, weight, targets, bias, lse = ctx.saved_tensors
        need_hidden, need_weight, _, need_bias, _, _ = ctx.needs_input_grad
        need_bias = need_bias and bias is not None
        chunk_size = ctx.chunk_size
        n = hidden.shape[0]

        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # fp32 accumulators: summing many chunk products in half precision would lose the small terms.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None

        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h = hidden[start:end]
            g = grad_out[start:end]
            # One [C, V] buffer, turned in place into softmax, then into d loss / d z.
            grad_logits = chunk_logits(h, weight, bias)
            grad_logits.sub_(lse[start:end, None]).exp_()
            grad_logits.mul_(-g[:, None])
            grad_logits.scatter_add_(1, targets[start:end, None], g[:, None])
            if need_hidden:
                grad_hidden[start:end] = times_weight(grad_logits, weight).to(hidden.dtype)
            if need_weight:
                grad_weight.addmm_(grad_logits.T, h.float())
            if need_bias:
                grad_bias += grad_logits.sum(dim=0)
            del grad_logits

        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, None, grad_bias, None, None


def chunked_token_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None, chunk_size: int = 1024
) -> Tensor:
    """log softmax(hidden @ weight.T + bias)[i, targets[i]] computed `chunk_size` rows at a time.

    hidden [N, H] (any float dtype), weight [V, H], targets [N] int64 in [0, V), bias [V] or None -> [N] fp32.
    Gradients flow to hidden, and to weight / bias only if they require grad; they come back in the input dtypes.
    Never saves logits. Frozen head under grad mode: forward also takes d out / d hidden ([N, H] fp32, saved), so
    backward is one multiply (2 head matmuls in all; wasted if backward never runs). Otherwise it saves
    hidden, weight, targets, bias and an [N] fp32 logsumexp, and backward recomputes the logits (3 matmuls).
    Extra memory is one [chunk_size, V] fp32 buffer at a time (plus a half copy of it for half-precision heads).
    Targets are not range-checked here: an out-of-range id fails in `gather` on CPU, as a device assert on CUDA.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != (hidden.shape[0],) or targets.dtype != torch.long:
        raise ValueError(
            f"targets must be int64 of shape ({hidden.shape[0]},), got {targets.dtype} {tuple(targets.shape)}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    frozen_head = not weight.requires_grad and not (bias is not None and bias.requires_grad)
    if frozen_head and use_triton(hidden, weight) and logprob_kernel.verified(hidden.device, weight.dtype):
        # CUDA: the softmax part runs in one Triton kernel per chunk (kernels/logprob.py); same values, same memory.
        return logprob_kernel.triton_token_logprobs(hidden, weight, targets, bias, chunk_size)
    # Eager gradient only when backward will surely want d hidden and nothing from the head: under no_grad
    # (opponent scoring) the extra matmul would be wasted, and a trainable head needs the recompute path anyway.
    eager = (
        torch.is_grad_enabled()
        and hidden.requires_grad
        and not weight.requires_grad
        and not (bias is not None and bias.requires_grad)
    )
    return _ChunkedTokenLogprobs.apply(hidden, weight, targets, bias, chunk_size, eager)


def response_mask_from_lengths(prompt_lengths: Tensor, total_lengths: Tensor, seq_len: int) -> Tensor:
    """BoolTensor [B, seq_len], True at prompt_lengths[b] <= t < total_lengths[b] (the response tokens).

    For right-padded rows laid out as prompt, response, padding. Requires 1 <= prompt_len <= total_len <= seq_len
    (a response can never start at position 0: nothing predicts that token).
    """
    prompt_lengths = torch.as_tensor(prompt_lengths)
    total_lengths = torch.as_tensor(total_lengths, device=prompt_lengths.device)
    if prompt_lengths.shape != total_lengths.shape or prompt_lengths.dim() != 1:
        raise ValueError("prompt_lengths and total_lengths must be 1-D tensors of the same length")
    if len(prompt_lengths) and not (
        (prompt_lengths >= 1).all() and (prompt_lengths <= total_lengths).all() and (total_lengths <= seq_len).all()
    ):
        raise ValueError(f"need 1 <= prompt_len <= total_len <= {seq_len}, got {prompt_lengths} and {total_lengths}")
    positions = torch.arange(seq_len, device=prompt_lengths.device)
    return (positions >= prompt_lengths[:, None]) & (positions < total_lengths[:, None])


def _check_batch(input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor) -> Tensor:
    """Enforce the batch contract of the module docstring; return response_mask as bool."""
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape or response_mask.shape != input_ids.shape:
        raise ValueError(
            "input_ids, attention_mask and response_mask must all be [B, T]; got "
            f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, {tuple(response_mask.shape)}"
        )
    response_mask = response_mask.bool()
    if input_ids.shape[1] == 0:
        return response_mask
    attended = attention_mask.bool()
    # One host sync for all checks; the messages are worked out only on failure.
    bad = (
        (~attended[:, 0]).any()
        | (attended[:, 1:] & ~attended[:, :-1]).any()
        | (response_mask & ~attended).any()
        | response_mask[:, 0].any()
    )
    if bad.item():
        if (~attended[:, 0]).any() or (attended[:, 1:] & ~attended[:, :-1]).any():
            raise ValueError("attention_mask must be right-padded (each row 1...1 0...0, starting with 1)")
        if response_mask[:, 0].any():
            raise ValueError("response_mask is True at position 0: no hidden state predicts the first token")
        raise ValueError("response_mask marks padding: it must lie inside attention_mask")
    return response_mask


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def decoder_and_head(model) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """(decoder, lm_head) of a transformers causal LM or a peft wrapper of one; `UserError` if unsupported.

    The decoder is what produces `last_hidden_state` (embeddings, layers, final norm); peft LoRA layers sit inside
    it, so calling it applies the adapter. The head must be a plain `nn.Linear` whose output is used as-is.
    """
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        raise UserError("prompt-learning peft adapters (prefix/prompt tuning) are not supported; use LoRA")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "get_decoder"):
        decoder = base.get_decoder()
    elif hasattr(base, "model"):
        decoder = base.model
    else:
        raise UserError(f"cannot find the decoder of {type(base).__name__}: expected a transformers causal LM")
    if decoder is base:
        raise UserError(f"{type(base).__name__} has no separate decoder module: expected a *ForCausalLM model")
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None

    config = _text_config(getattr(base, "config", None))
    name = type(base).__name__
    if getattr(config, "final_logit_softcapping", None) is not None:
        raise UserError(f"{name} soft-caps its logits (final_logit_softcapping): not supported by frugal_spin.logprobs")
    if getattr(config, "logit_scale", None) is not None:
        raise UserError(f"{name} scales its logits (logit_scale): not supported by frugal_spin.logprobs")
    for key in ("logits_scaling", "lm_head_multiplier"):
        value = getattr(config, key, None)
        if value is not None and float(value) != 1.0:
            raise UserError(f"{name} scales its logits ({key}={value}): not supported by frugal_spin.logprobs")
    # Exact type: a bitsandbytes Linear4bit/8bit or a peft LoRA layer subclasses or wraps nn.Linear, and using its
    # `.weight` directly would give wrong numbers (packed bytes, or the base weight without the adapter).
    if type(head) is not torch.nn.Linear:
        raise UserError(
            f"{name}'s output head is {type(head).__name__}, not a plain torch.nn.Linear: keep lm_head unquantized "
            "and out of LoRA target_modules / modules_to_save"
        )
    return decoder, head


def response_logprobs_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    input_ids: Tensor,
    response_mask: Tensor,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """(sum_logps[B] fp32, n_tokens[B] int64) from last hidden states [B, T, H] and the head (weight, bias).

    sum_logps[b] = sum_{t >= 1, response_mask[b, t]} log p(input_ids[b, t] | hidden[b, t-1]).
    Only the rows predicting response tokens go through the head. Rows with no response token get 0.
    """
    batch = input_ids.shape[0]
    predicts = response_mask[:, 1:].bool()  # predicts[b, t-1]: hidden at t-1 predicts a response token at t
    # .to(device) everywhere: with a device_map the last hidden state and the head can sit on different GPUs.
    rows = hidden[:, :-1][predicts.to(hidden.device)].to(weight.device)
    targets = input_ids[:, 1:][predicts.to(input_ids.device)].to(weight.device)
    seq_index = predicts.nonzero(as_tuple=True)[0].to(weight.device)  # row-major, the order of boolean indexing
    token_logps = chunked_token_logprobs(rows, weight, targets, bias, chunk_size)
    sums = torch.zeros(batch, dtype=torch.float32, device=weight.device).index_add(0, seq_index, token_logps)
    counts = predicts.sum(dim=1).to(device=weight.device, dtype=torch.long)
    return sums, counts


def sequence_logprobs_and_counts(
    model, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor, chunk_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """(sum_logps[B] fp32, n_tokens[B] int64): summed log p(response tokens | preceding tokens) and their count.

    model: transformers causal LM (possibly bitsandbytes 4-bit) or a peft LoRA wrapper of one. Runs in whatever
    mode (train/eval) and grad mode the caller set; gradients reach LoRA parameters (and the head if trainable).
    Batch contract (right padding, response_mask inside attention_mask and never at position 0): module docstring.
    Per-token NLL = -sum_logps / n_tokens.
    """
    response_mask = _check_batch(input_ids, attention_mask, response_mask)
    decoder, head = decoder_and_head(model)
    outputs = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    return response_logprobs_from_hidden(hidden, head.weight, head.bias, input_ids, response_mask, chunk_size)


def sequence_logprobs(
    model, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor, chunk_size: int = 1024
) -> Tensor:
    """Summed log p(response tokens | preceding tokens) per sequence, [B] fp32. See `sequence_logprobs_and_counts`."""
    return sequence_logprobs_and_counts(model, input_ids, attention_mask, response_mask, chunk_size)[0]
