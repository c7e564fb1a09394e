"""Triton kernel of `nf4_lora`: out = a op(dequant(W)) + left right (+ bias), W in bitsandbytes' packed NF4.

Imported only when the Triton path is taken (see `dispatch`), so the kernel is decorated after the caller has
decided whether the interpreter is on.

op(W) = W^T (forward: a = x [M, K], W [N, K]) or W (d x: a = g [M, K], W [K, N]). Each program owns one
[BLOCK_M, BLOCK_N] output tile and walks K; per step it loads an a tile and the matching packed bytes, picks the
nibbles, looks them up in the 16-entry code table and scales them by their block's absmax (itself dequantised
from uint8 when double-quantised), then takes one dot. The rank-r term is one more dot in the epilogue, with
r padded to BLOCK_R >= 16 (tl.dot's minimum).

K_INTERPRETED: Triton 3.6's interpreter hands a runtime int to the kernel as a 1-element numpy array, and
`range(0, K, ...)` then fails under numpy >= 2.4 ("only 0-dimensional arrays can be converted to Python scalars";
Triton 3.7+ squeeze it). Interpreted calls therefore pass K once more as a constexpr (a plain Python int there);
compiled calls pass 0, a single constant, so the compiled kernel keeps its runtime K and compiles as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

if TYPE_CHECKING:  # only for the annotation: nf4_lora imports this module lazily, and the graph stays one-way
    from frugal_spin.kernels.nf4_lora import NF4Weight

# 64 x 64 tiles with a K step of 64 keep one dequantised W tile (4,096 values) in registers with 4 warps.
BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 64
# Two pipeline stages: 64 KiB of shared memory in bf16/fp16, 80 KiB in fp32 (compiled for sm_86/89/90 without a
# GPU, tests/test_kernels_compile.py). Triton's default of three needs 112 / 144 KiB, over the 99 KiB a block
# may use on consumer Ampere/Ada cards (RTX 30xx/40xx), where the launch would fail.
LAUNCH_OPTIONS = dict(num_warps=4, num_stages=2)


@triton.jit
def _nf4_lora_matmul_kernel(
    a_ptr, packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
    left_ptr, right_ptr, bias_ptr, out_ptr,
    M, N, K, R, W_COLS,
    stride_am, stride_ak, stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on,
    TRANSPOSE_W: tl.constexpr, NESTED: tl.constexpr, HAS_LOW_RANK: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    K_INTERPRETED: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    dot_dtype = a_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_INTERPRETED if K_INTERPRETED > 0 else K, BLOCK_K):  # see the module docstring
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # Flat index into row-major W of the [BLOCK_K, BLOCK_N] tile of op(W); int64: N*K can pass 2^31.
        if TRANSPOSE_W:
            flat = cols[None, :].to(tl.int64) * W_COLS + ks[:, None]
        else:
            flat = ks[:, None].to(tl.int64) * W_COLS + cols[None, :]
        w_ok = k_ok[:, None] & col_ok[None, :]
        byte = tl.load(packed_ptr + flat // 2, mask=w_ok, other=0)
        nibble = tl.where(flat % 2 == 0, byte >> 4, byte & 0x0F).to(tl.int32)
        value = tl.load(code_ptr + nibble, mask=w_ok, other=0.0)
        block = flat // BLOCKSIZE
        if NESTED:
            q = tl.load(absmax_ptr + block, mask=w_ok, other=0).to(tl.int32)
            scale = (tl.load(nested_code_ptr + q, mask=w_ok, other=0.0)
                     * tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=w_ok, other=0.0)
                     + tl.load(offset_ptr))
        else:
            scale = tl.load(absmax_ptr + block, mask=w_ok, other=0.0)
        w = tl.where(w_ok, value * scale, 0.0)
        if FP32_DOT:
            acc += tl.dot(a.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(a.to(dot_dtype), w.to(dot_dtype))
    if HAS_LOW_RANK:
        rs = tl.arange(0, BLOCK_R)
        r_ok = rs < R
        left = tl.load(left_ptr + rows[:, None] * stride_lm + rs[None, :] * stride_lr,
                       mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        right = tl.load(right_ptr + rs[:, None] * stride_rr + cols[None, :] * stride_rn,
                        mask=r_ok[:, None] & col_ok[None, :], other=0.0)
        if FP32_DOT:
            acc += tl.dot(left.to(tl.float32), right.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(left.to(dot_dtype), right.to(dot_dtype))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# True when TRITON_INTERPRET was on as the kernel was decorated: the kernel then runs as Python on CPU tensors.
INTERPRETED = isinstance(_nf4_lora_matmul_kernel, InterpretedFunction)


def nf4_matmul(a: Tensor, weight: NF4Weight, *, transpose_weight: bool, low_rank_left: Tensor | None = None,
               low_rank_right: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """a [M, K] op(dequant(W)) + low_rank_left [M, r] low_rank_right [r, N] + bias [N] -> [M, N] in a's dtype.

    op(W) = W^T with W [N, K] when `transpose_weight`, else W with W [K, N]."""
    m, k = a.shape
    rows_w, cols_w = weight.out_features, weight.in_features
    n = rows_w if transpose_weight else cols_w
    if k != (cols_w if transpose_weight else rows_w):
        raise ValueError(f"a has {k} columns; op(W) has {cols_w if transpose_weight else rows_w} rows")
    out = torch.empty(m, n, dtype=a.dtype, device=a.device)
    has_low_rank = low_rank_left is not None
    rank = low_rank_left.shape[1] if has_low_rank else 0
    left = low_rank_left if has_low_rank else a
    right = low_rank_right if has_low_rank else a
    dummy = weight.absmax  # any tensor: pointers of switched-off branches are never read
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
    _nf4_lora_matmul_kernel[grid](
        a, weight.packed, weight.absmax, weight.code,
        weight.nested_code if weight.nested else dummy, weight.nested_absmax if weight.nested else dummy,
        weight.offset if weight.nested else dummy,
        left, right, bias if bias is not None else dummy, out,
        m, n, k, rank, cols_w,
        a.stride(0), a.stride(1), left.stride(0), left.stride(1), right.stride(0), right.stride(1),
        out.stride(0), out.stride(1),
        TRANSPOSE_W=transpose_weight, NESTED=weight.nested, HAS_LOW_RANK=has_low_rank, HAS_BIAS=bias is not None,
        BLOCKSIZE=weight.blocksize, NESTED_BLOCKSIZE=weight.nested_blocksize, FP32_DOT=a.dtype == torch.float32,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_R=max(16, triton.next_power_of_2(max(rank, 1))),
        K_INTERPRETED=k if INTERPRETED else 0,
        **LAUNCH_OPTIONS,
    )
    return out
