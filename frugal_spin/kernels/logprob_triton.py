"""Triton kernel of `logprob`: per row of a [C, V] fp32 logits buffer, logsumexp over vocabulary tiles, the
target's log-prob, and (optionally) the row rewritten in place as onehot(target) - softmax.

Imported only when the Triton path is taken (see `dispatch`).

V_INTERPRETED: the vocabulary size again as a constexpr in interpreted calls, 0 in compiled ones, for Triton 3.6's
interpreter, whose runtime ints cannot bound a `range` under numpy >= 2.4 (`nf4_lora_triton`'s docstring says why).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

# 4,096 fp32 lanes per tile with 8 warps: 16 values per thread, and V = 151,936 takes 38 tiles per pass.
BLOCK_V = 4096
LAUNCH_OPTIONS = dict(num_warps=8)


@triton.jit
def _row_logprob_kernel(logits_ptr, targets_ptr, out_ptr, V, stride_row,
                        WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr, V_INTERPRETED: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    # Online logsumexp: running max m and sum s of exp(z - m), rescaled whenever m grows.
    m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), axis=0)
    s = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
    for start in range(0, V_INTERPRETED if V_INTERPRETED > 0 else V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(targets_ptr + row)
    target_logit = tl.load(base + target).to(tl.float32)
    tl.store(out_ptr + row, target_logit - lse)
    if WRITE_GRAD:
        for start in range(0, V_INTERPRETED if V_INTERPRETED > 0 else V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            ok = cols < V
            z = tl.load(base + cols, mask=ok, other=0.0).to(tl.float32)
            grad = tl.where(cols == target, 1.0, 0.0) - tl.exp(z - lse)
            tl.store(base + cols, grad, mask=ok)


# True when TRITON_INTERPRET was on as the kernel was decorated: the kernel then runs as Python on CPU tensors.
INTERPRETED = isinstance(_row_logprob_kernel, InterpretedFunction)


def logprobs_and_grad_in_place(logits: Tensor, targets: Tensor, write_grad: bool) -> Tensor:
    """logits [C, V] fp32 contiguous rows, targets [C] int64 -> log p(target) [C] fp32.

    With `write_grad`, `logits` is overwritten with onehot(targets) - softmax(logits) (d out / d logits)."""
    if logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError("logits must be fp32 with contiguous rows")
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _row_logprob_kernel[(rows,)](logits, targets, out, vocab, logits.stride(0),
                                     WRITE_GRAD=write_grad, BLOCK_V=BLOCK_V,
                                     V_INTERPRETED=vocab if INTERPRETED else 0, **LAUNCH_OPTIONS)
    return out
