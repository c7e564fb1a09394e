"""Token log-probs through the lm_head with a Triton kernel for the softmax part: dispatch and autograd.

    out[i] = z[i, t_i] - logsumexp_v z[i, v],   z = h W^T + b
    d out[i] / d h[i] = W[t_i] - sum_v p[i, v] W[v] = (onehot(t_i) - p[i]) W,   p = softmax(z[i])

The plain torch references are `frugal_spin.logprobs.reference_token_logprobs` (full logits) and the chunked
torch path `frugal_spin.logprobs.chunked_token_logprobs` falls back to everywhere else (CPU, trainable head).

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

import torch
from torch import Tensor


class _TritonTokenLogprobs(torch.autograd.Function):
    """Frozen head only. Forward stores u = (onehot - p) W [N, H] fp32 when grad is wanted; backward is g u."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, chunk_size, want_grad):
        from frugal_spin.kernels.logprob_triton import logprobs_and_grad_in_place
        from frugal_spin.logprobs import _chunk_logits, _times_weight

        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        unit_grad = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if want_grad else None
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            logits = _chunk_logits(hidden[start:end], weight, bias).contiguous()
            out[start:end] = logprobs_and_grad_in_place(logits, targets[start:end], write_grad=want_grad)
            if want_grad:
                unit_grad[start:end] = _times_weight(logits, weight)  # logits now holds onehot - p
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


def self_check(device: torch.device) -> tuple[float, float]:
    """Max abs difference of log-probs and d hidden against full fp32 logits on odd small shapes (fp32), and the
    tolerance; `dispatch.kernel_verified` runs it once per device before the kernel is used there."""
    from frugal_spin.logprobs import reference_token_logprobs

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 72, generator=gen).to(device)
    weight = (torch.randn(1003, 72, generator=gen) * 0.2).to(device)
    targets = torch.randint(0, 1003, (37,), generator=gen).to(device)
    upstream = torch.randn(37, generator=gen).to(device)
    results = []
    for fn in (lambda h: triton_token_logprobs(h, weight, targets, None, chunk_size=16),
               lambda h: reference_token_logprobs(h, weight, targets)):
        h = hidden.clone().requires_grad_()
        out = fn(h)
        (out * upstream).sum().backward()
        results.append((out.detach(), h.grad))
    (out, grad), (ref_out, ref_grad) = results
    return max((out - ref_out).abs().max().item(), (grad - ref_grad).abs().max().item()), 1e-3
