"""Token log-probs through the lm_head with a Triton kernel for the softmax part: dispatch and autograd.

    out[i] = z[i, t_i] - logsumexp_v z[i, v],   z = h W^T + b
    d out[i] / d h[i] = W[t_i] - sum_v p[i, v] W[v] = (onehot(t_i) - p[i]) W,   p = softmax(z[i])

The plain torch reference is `reference_token_logprobs` here (full fp32 logits); `chunk_logits` and
`times_weight` are the two head products both chunked paths share (this Triton one and the torch chunked path
`frugal_spin.logprobs.chunked_token_logprobs`, which dispatches here on CUDA and runs everywhere else). They live
here, beside the kernel, so that this module needs nothing from `logprobs.py` (the import graph is one-way:
logprobs -> kernels.logprob -> kernels.dispatch).

What runs where on the Triton path, per chunk of C rows: the head matmul z = h W^T stays in cuBLAS (tensor
cores; fusing it into the kernel would make the backward recompute z once per block of hidden units); the
kernel (`logprob_triton.py`) then walks each row's V logits in vocabulary tiles with an online max / sum in fp32
(one read), gathers the target logit, and rewrites the tile in place as onehot - p (one more read and write), so
d h = g (onehot - p) W is one more cuBLAS matmul. Against the torch chunked path this replaces about six
elementwise passes over the [C, V] buffer (max, subtract, exp, sum, divide, scatter) by two, with the same
peak memory: one [C, V] fp32 buffer whatever N is.

Supported on the Triton path: a frozen head (weight and bias without grad: the LoRA case), with or without
grad for hidden. A trainable head takes the torch chunked path (it needs d W = (d z)^T h per chunk as well,
which the chunked path already does by recomputation); this is a deliberate limit, not an oversight.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from frugal_spin.kernels.dispatch import kernel_verified


def reference_token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None) -> Tensor:
    """log softmax(hidden @ weight.T + bias)[i, targets[i]] with the full [N, V] logits in fp32.

    hidden [N, H], weight [V, H], targets [N] int64, bias [V] or None -> [N] fp32. Differentiable by plain autograd.
    """
    logits = hidden.float() @ weight.float().T
    if bias is not None:
        logits = logits + bias.float()
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


def chunk_logits(hidden_chunk: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """fp32 logits [C, V] of one row chunk. A half-precision head multiplies in its own dtype (fp32 accumulation
    inside the BLAS call) and the chunk is upcast right away: the rounding the model's own `.logits` have, and no
    V x H fp32 copy of the head (0.87 GiB for Qwen2.5-1.5B)."""
    if weight.dtype == torch.float32:
        logits = hidden_chunk.float() @ weight.T
    else:
        logits = (hidden_chunk.to(weight.dtype) @ weight.T).float()
    if bias is not None:
        logits += bias.float()
    return logits


def times_weight(grad_logits: Tensor, weight: Tensor) -> Tensor:
    """grad_logits [C, V] fp32 @ weight [V, H]; a half head takes the product in its own dtype, as autograd would."""
    if weight.dtype == torch.float32:
        return grad_logits @ weight
    return (grad_logits.to(weight.dtype) @ weight).float()


class _TritonTokenLogprobs(torch.autograd.Function):
    """Frozen head only. Forward stores u = (onehot - p) W [N, H] fp32 when grad is wanted; backward is g u."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, chunk_size, want_grad):
        from frugal_spin.kernels.logprob_triton import logprobs_and_grad_in_place

        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        unit_grad = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if want_grad else None
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            logits = chunk_logits(hidden[start:end], weight, bias).contiguous()
            out[start:end] = logprobs_and_grad_in_place(logits, targets[start:end], write_grad=want_grad)
            if want_grad:
                unit_grad[start:end] = times_weight(logits, weight)  # logits now holds onehot - p
            del logits  # free the chunk before the next one is allocated
        ctx.save_for_backward(unit_grad)
        ctx.hidden_dtype = hidden.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (unit_grad,) = ctx.saved_tensors
        return (grad_out.float()[:, None] * unit_grad).to(ctx.hidden_dtype), None, None, None, None, None


def triton_supports(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """The Triton path handles a frozen head only (see the module docstring)."""
    return not weight.requires_grad and not (bias is not None and bias.requires_grad)


def triton_token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None,
                          chunk_size: int = 1024) -> Tensor:
    """Same contract as `frugal_spin.logprobs.chunked_token_logprobs` for a frozen head; [N] fp32."""
    if not triton_supports(hidden, weight, bias):
        raise ValueError("the Triton log-prob path supports a frozen head only")
    want_grad = torch.is_grad_enabled() and hidden.requires_grad
    return _TritonTokenLogprobs.apply(hidden, weight, targets, bias, chunk_size, want_grad)


class Variant(NamedTuple):
    """What a run's use of the kernel depends on: the head's dtype (the two matmuls around the kernel and the
    rounding of the logits). Both compiled forms (with and without the in-place gradient) are always checked."""

    head_dtype: torch.dtype

    def __str__(self) -> str:
        return f"(head {str(self.head_dtype).replace('torch.', '')})"


def verified(device: torch.device, head_dtype: torch.dtype) -> bool:
    """Whether the kernel passed its self-check on `device` for a head of `head_dtype` (checked once)."""
    variant = Variant(head_dtype)
    return kernel_verified("logprob", device, variant, lambda target: self_check(target, variant))


# Error allowed against the reference, relative to the largest reference value: a wrong tile loop or gather is
# off by O(1); the half-precision head matmuls round to 11 (fp16) or 8 (bf16) bits on both sides.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def self_check(device: torch.device, variant: Variant = Variant(torch.float32)) -> tuple[float, float]:
    """Max difference (relative to the largest reference value) of log-probs and d hidden against the same head
    products followed by a plain fp32 log-softmax, and the tolerance; `verified` runs it once per device and
    variant before the kernel is used there.

    In the run's dtype, over a vocabulary of more than two kernel tiles (`BLOCK_V`) with a ragged last one, the
    online logsumexp's tile loop is exercised as at vocab 151,936; both compiled forms run: with grad (the kernel
    writes onehot - p in place) and under no_grad (scoring: log-probs only)."""
    from frugal_spin.kernels.logprob_triton import BLOCK_V

    dtype = variant.head_dtype
    vocab = 2 * BLOCK_V + 123
    gen = torch.Generator().manual_seed(0)
    rows = 13  # odd, and more than one chunk of 8
    hidden = torch.randn(rows, 72, generator=gen).to(device=device, dtype=dtype)
    weight = (torch.randn(vocab, 72, generator=gen) * 0.2).to(device=device, dtype=dtype)
    targets = torch.randint(0, vocab, (rows,), generator=gen).to(device)
    upstream = torch.randn(rows, generator=gen).to(device)

    def reference(h):  # the same rounding of the head product as the kernel's path, then fp32 autograd
        return torch.log_softmax(chunk_logits(h, weight, None), dim=-1).gather(1, targets[:, None]).squeeze(1)

    results = []
    for fn in (lambda h: triton_token_logprobs(h, weight, targets, None, chunk_size=8), reference):
        h = hidden.clone().requires_grad_()
        out = fn(h)
        (out * upstream).sum().backward()
        with torch.no_grad():
            scored = fn(hidden)
        results.append((out.detach(), h.grad, scored))
    return max(((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()
               for got, ref in zip(*results)), TOLERANCE[dtype]
