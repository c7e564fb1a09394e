"""A LoRA linear layer over a frozen bitsandbytes NF4 weight: torch reference, fused Triton path, dispatch.

    y = x dequant(W)^T + s (x A^T) B^T + bias        x [M, K], W [N, K] (NF4), A [r, K], B [N, r], s = alpha / r

Backward (W and bias frozen, g = d loss / d y):

    d x = g dequant(W) + s (g B) A,    d A = s (g B)^T x,    d B = s g^T (x A^T)

The NF4 format is bitsandbytes' own (`Params4bit` data + `QuantState`), read as is, never repacked:
- `packed`: uint8, two 4-bit codes per byte over W flattened row-major; element 2j is the HIGH nibble of byte j,
  element 2j+1 the low one.
- value[i] = code[nibble[i]] * absmax[i // blocksize], `code` the 16-entry NF4 table (fp32), blocksize 64.
- double quantisation (`QuantState.nested`): absmax itself is uint8, and
  absmax[b] = nested_code[q[b]] * nested_absmax[b // nested_blocksize] + offset (nested blocksize 256,
  `nested_code` bitsandbytes' 256-entry dynamic map, `offset` the mean absmax subtracted before quantising).
`dequantize_nf4_reference` spells this out in torch; its parity with `bitsandbytes.functional.dequantize_4bit`
(tests/test_kernels.py) is the ground truth the Triton kernel is checked against.

Triton path (CUDA, `nf4_lora_triton.py`): one matmul kernel that dequantises W tiles in registers (the [N, K]
weight never exists in 16 or 32 bits) and adds the rank-r product in its epilogue; the same kernel, reading W
untransposed, gives d x. The thin rank-r products (x A^T, g B, d A, d B) stay in cuBLAS: they are [M, r] or
[r, K] and cost little next to the base matmul. Precision: fp32 inputs use exact fp32 dots (no TF32), fp16 and
bf16 inputs use half-precision dots with fp32 accumulation; the output has the input's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from frugal_spin.kernels.dispatch import kernel_verified, use_triton


@dataclass(frozen=True)
class NF4Weight:
    """A bitsandbytes NF4 weight as flat tensors (views of the originals, nothing copied)."""

    packed: Tensor  # uint8 [ceil(N*K/2)]
    absmax: Tensor  # fp32 [n_blocks], or uint8 [n_blocks] when nested
    code: Tensor  # fp32 [16]
    out_features: int
    in_features: int
    blocksize: int
    nested_code: Tensor | None = None  # fp32 [256]
    nested_absmax: Tensor | None = None  # fp32 [ceil(n_blocks / nested_blocksize)]
    offset: Tensor | None = None  # fp32 scalar tensor (kept on the device: no host sync per call)
    nested_blocksize: int = 256

    @property
    def nested(self) -> bool:
        return self.nested_code is not None

    @classmethod
    def from_bnb(cls, data: Tensor, quant_state) -> "NF4Weight":
        """From `Params4bit.data` (or `quantize_4bit`'s output) and its `QuantState`; ValueError if unsupported."""
        if quant_state.quant_type != "nf4":
            raise ValueError(f"only NF4 is supported, got quant_type={quant_state.quant_type!r}")
        if data.dtype != torch.uint8:
            raise ValueError(f"only uint8 quant_storage is supported, got {data.dtype}")
        shape = tuple(quant_state.shape)
        if len(shape) != 2:
            raise ValueError(f"a 2-D weight is expected, got shape {shape}")
        nested = dict()
        if quant_state.nested:
            state2 = quant_state.state2
            offset = quant_state.offset
            offset = offset if isinstance(offset, Tensor) else torch.tensor(float(offset))
            nested = dict(nested_code=state2.code.float(), nested_absmax=state2.absmax.float(),
                          offset=offset.float().reshape(1).to(data.device), nested_blocksize=state2.blocksize)
        return cls(packed=data.reshape(-1), absmax=quant_state.absmax, code=quant_state.code.float(),
                   out_features=shape[0], in_features=shape[1], blocksize=quant_state.blocksize, **nested)


def block_absmax_reference(weight: NF4Weight) -> Tensor:
    """fp32 absmax per block of `blocksize` weights, undoing the double quantisation if there is one."""
    if not weight.nested:
        return weight.absmax.float()
    n_blocks = weight.absmax.numel()
    scales = weight.nested_absmax.repeat_interleave(weight.nested_blocksize)[:n_blocks]
    return weight.nested_code[weight.absmax.long()] * scales + weight.offset


def dequantize_nf4_reference(weight: NF4Weight) -> Tensor:
    """fp32 [N, K] weight from the packed codes (see the module docstring for the format)."""
    numel = weight.out_features * weight.in_features
    high = weight.packed >> 4  # element 2j
    low = weight.packed & 0x0F  # element 2j + 1
    nibbles = torch.stack([high, low], dim=1).reshape(-1)[:numel].long()
    absmax = block_absmax_reference(weight).repeat_interleave(weight.blocksize)[:numel]
    return (weight.code[nibbles] * absmax).reshape(weight.out_features, weight.in_features)


def lora_linear_reference(x: Tensor, weight: NF4Weight, lora_a: Tensor, lora_b: Tensor, scale: float,
                          bias: Tensor | None = None) -> Tensor:
    """y = x dequant(W)^T + s (x A^T) B^T + bias, all in fp32 by plain autograd; returned in x's dtype."""
    xf = x.float()
    y = xf @ dequantize_nf4_reference(weight).T + scale * ((xf @ lora_a.float().T) @ lora_b.float().T)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


class _FusedNF4LoRA(torch.autograd.Function):
    """x [M, K] -> y [M, N] on the Triton kernel; gradients for x, A and B (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, bias, weight: NF4Weight, scale: float):
        from frugal_spin.kernels.nf4_lora_triton import nf4_matmul

        # x A^T in x's dtype (what autocast would do for peft's lora_A), kept for d B.
        xa = x @ lora_a.to(x.dtype).T
        y = nf4_matmul(x, weight, transpose_weight=True, low_rank_left=xa * scale,
                       low_rank_right=lora_b.to(x.dtype).T, bias=bias)
        ctx.save_for_backward(x, lora_a, lora_b, xa)
        ctx.weight = weight
        ctx.scale = scale
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        from frugal_spin.kernels.nf4_lora_triton import nf4_matmul

        x, lora_a, lora_b, xa = ctx.saved_tensors
        scale = ctx.scale
        grad_y = grad_y.contiguous()
        gb = grad_y @ lora_b.to(grad_y.dtype)  # [M, r]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = nf4_matmul(grad_y, ctx.weight, transpose_weight=False, low_rank_left=gb * scale,
                                low_rank_right=lora_a.to(grad_y.dtype)).to(x.dtype)
        grad_a = (scale * (gb.T @ x.to(gb.dtype))).to(lora_a.dtype) if ctx.needs_input_grad[1] else None
        grad_b = (scale * (grad_y.T @ xa.to(grad_y.dtype))).to(lora_b.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_a, grad_b, None, None, None


def fused_lora_linear(x: Tensor, weight: NF4Weight, lora_a: Tensor, lora_b: Tensor, scale: float,
                      bias: Tensor | None = None) -> Tensor:
    """y = x dequant(W)^T + s (x A^T) B^T + bias for x [..., K]: Triton on CUDA, `lora_linear_reference` elsewhere.

    The base weight and bias are frozen (no gradient reaches them on either path's Triton side; the reference
    path would give bias a gradient if it required one, but bias is frozen in LoRA)."""
    if x.shape[-1] != weight.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {weight.in_features}")
    if not (use_triton(x, weight.packed)
            and verified(x.device, Variant(x.dtype, lora_a.shape[0], bias is not None, weight.nested))):
        return lora_linear_reference(x, weight, lora_a, lora_b, scale, bias)
    lead = x.shape[:-1]
    y = _FusedNF4LoRA.apply(x.reshape(-1, x.shape[-1]).contiguous(), lora_a, lora_b, bias, weight, float(scale))
    return y.reshape(*lead, weight.out_features)


class Variant(NamedTuple):
    """What selects a compiled form of the kernel (or changes its numbers): the input dtype (fp32 dots or half dots),
    the LoRA rank (its padded tile BLOCK_R), a bias, double quantisation. Forward (W transposed) and d x (W as is)
    are both part of every check."""

    dtype: torch.dtype
    rank: int
    bias: bool
    nested: bool

    def __str__(self) -> str:
        return (f"({str(self.dtype).replace('torch.', '')}, rank {self.rank}, {'bias' if self.bias else 'no bias'}, "
                f"{'double quantisation' if self.nested else 'plain absmax'})")


def verified(device: torch.device, variant: Variant) -> bool:
    """Whether this variant of the kernel passed its self-check on `device` (checked once per process)."""
    return kernel_verified("nf4_lora", device, variant, lambda target: self_check(target, variant))


# Error allowed relative to the largest reference value: a wrong nibble, scale or tile is off by O(1); half dots
# round their inputs to 11 (fp16) or 8 (bf16) bits where the reference computes in fp32.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def self_check(device: torch.device, variant: Variant = Variant(torch.float32, 8, False, True)) -> tuple[float, float]:
    """Max difference (relative to the largest reference value) of y, d x, d A and d B against
    `lora_linear_reference` on an odd small shape, in the variant's dtype, rank, bias and quantisation, and the
    tolerance; `verified` runs it once per device and variant before the kernel is used there."""
    import bitsandbytes.functional as bnb_functional

    dtype = variant.dtype
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(80, 192, generator=gen) / 192**0.5
    packed, state = bnb_functional.quantize_4bit(w.to(device=device, dtype=dtype), blocksize=64,
                                                 compress_statistics=variant.nested, quant_type="nf4")
    weight = NF4Weight.from_bnb(packed, state)
    inputs = [torch.randn(5, 192, generator=gen).to(dtype), torch.randn(variant.rank, 192, generator=gen) / 192**0.5,
              torch.randn(80, variant.rank, generator=gen) * 0.1]  # the adapter stays fp32 (peft)
    bias = (torch.randn(80, generator=gen) * 0.1).to(device=device, dtype=dtype) if variant.bias else None
    upstream = torch.randn(5, 80, generator=gen).to(device=device, dtype=dtype)
    scale = 2.0 / variant.rank
    results = []
    for fn in (lambda x, a, b: _FusedNF4LoRA.apply(x, a, b, bias, weight, scale),
               lambda x, a, b: lora_linear_reference(x, weight, a, b, scale, bias)):
        x, a, b = (t.to(device).requires_grad_() for t in inputs)
        y = fn(x, a, b)
        (y * upstream).sum().backward()
        results.append([y.detach(), x.grad, a.grad, b.grad])
    return max(((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()
               for got, ref in zip(*results)), TOLERANCE[dtype]
