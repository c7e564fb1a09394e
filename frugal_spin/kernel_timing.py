"""How fast each Triton kernel variant runs on a GPU against the path that runs without it: the timers that
`kernels.dispatch` calls after a variant matched its reference, to keep the faster one on that device.

Each timer takes (device, variant) and returns (kernel seconds, reference seconds) for one forward + backward on a
representative shape, median of `REPEATS` after `WARMUP` runs, timed with CUDA events on a GPU (host clock
elsewhere, which only the tests use). The reference is what runs on that device when the kernel is not used:
- `nf4_lora`: peft's `lora.bnb.Linear4bit` computation, `bnb.matmul_4bit(x, W^T)` plus the two thin adapter
  matmuls, under the autocast the training loop runs in for half dtypes (NF4_SHAPE: 1,024 tokens of a
  2,048 -> 2,048 linear, about a Qwen2.5-1.5B projection and micro-batch);
- `logprob`: the torch chunked path of `frugal_spin.logprobs.chunked_token_logprobs` (LOGPROB_SHAPE: 512 response
  rows, hidden 1,024, vocabulary 65,536, chunks of 256: a few ms of work, 0.1 GiB).
Both paths go through their public entry points under `dispatch.mode("force")` / `dispatch.mode("off")`.

A timing takes milliseconds on a GPU (plus the kernel's compilation, which the self-check already paid); it runs
once per process, variant and device. `register()` hands them to the dispatch; `model.use_kernels` calls it
before the self-checks run.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from frugal_spin.kernels import dispatch
from frugal_spin.kernels.logprob import Variant as LogprobVariant
from frugal_spin.kernels.logprob import triton_token_logprobs
from frugal_spin.kernels.nf4_lora import NF4Weight, fused_lora_linear
from frugal_spin.kernels.nf4_lora import Variant as NF4Variant
from frugal_spin.logprobs import chunked_token_logprobs

NF4_SHAPE = (1024, 2048, 2048)  # tokens M, in_features K, out_features N
LOGPROB_SHAPE = (512, 1024, 65_536, 256)  # rows, hidden, vocabulary, chunk size
WARMUP, REPEATS = 2, 5


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int = REPEATS,
                   warmup: int = WARMUP) -> float:
    """Median wall time of fn() over `repeats` runs after `warmup`: CUDA events around each run on a GPU (device
    work is asynchronous), the host clock elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _autocast(device: torch.device, dtype: torch.dtype):
    """The training loop's autocast for half dtypes (the adapter stays fp32 and is cast by it); none for fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def time_nf4_lora(device: torch.device, variant: NF4Variant, shape: tuple[int, int, int] = NF4_SHAPE
                  ) -> tuple[float, float]:
    """(fused kernel s, peft-style reference s) of y = x dequant(W)^T + s (x A^T) B^T (+ bias), forward and
    backward to x, A and B, in the variant's dtype, rank, bias and quantisation."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional

    tokens, fan_in, fan_out = shape
    dtype = variant.dtype
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(fan_out, fan_in, generator=gen) / fan_in**0.5).to(device=device, dtype=dtype)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=variant.nested,
                                                 quant_type="nf4")
    del w
    weight = NF4Weight.from_bnb(packed, state)
    x = torch.randn(tokens, fan_in, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    lora_a = (torch.randn(variant.rank, fan_in, generator=gen) / fan_in**0.5).to(device).requires_grad_()
    lora_b = (torch.randn(fan_out, variant.rank, generator=gen) * 0.1).to(device).requires_grad_()
    bias = (torch.randn(fan_out, generator=gen) * 0.1).to(device=device, dtype=dtype) if variant.bias else None
    upstream = torch.randn(tokens, fan_out, generator=gen).to(device=device, dtype=dtype)
    scale = 2.0

    def kernel():
        with dispatch.mode("force"), _autocast(device, dtype):
            y = fused_lora_linear(x, weight, lora_a, lora_b, scale, bias)
        torch.autograd.grad(y, (x, lora_a, lora_b), upstream)

    def reference():  # peft's Linear4bit: the base layer's bnb.matmul_4bit, then the adapter's two matmuls
        with dispatch.mode("off"), _autocast(device, dtype):
            y = bnb.matmul_4bit(x, packed.t(), bias=bias, quant_state=state)
            y = y + (x @ lora_a.to(x.dtype).T) @ lora_b.to(x.dtype).T * scale
        torch.autograd.grad(y, (x, lora_a, lora_b), upstream)

    return median_seconds(kernel, device), median_seconds(reference, device)


def time_logprob(device: torch.device, variant: LogprobVariant,
                 shape: tuple[int, int, int, int] = LOGPROB_SHAPE) -> tuple[float, float]:
    """(Triton s, torch chunked s) of token log-probs through a frozen head of the variant's dtype, forward and
    backward to the hidden states."""
    rows, hidden_size, vocab, chunk = shape
    dtype = variant.head_dtype
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, hidden_size, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5).to(device=device, dtype=dtype)
    targets = torch.randint(0, vocab, (rows,), generator=gen).to(device)
    upstream = torch.randn(rows, generator=gen).to(device)

    def kernel():
        out = triton_token_logprobs(hidden, weight, targets, None, chunk)
        torch.autograd.grad(out, (hidden,), upstream)

    def reference():
        with dispatch.mode("off"):
            out = chunked_token_logprobs(hidden, weight, targets, None, chunk)
        torch.autograd.grad(out, (hidden,), upstream)

    return median_seconds(kernel, device), median_seconds(reference, device)


def register() -> None:
    """Give the dispatch these timers (idempotent): `model.use_kernels` calls it before the self-checks run."""
    dispatch.register_timer("nf4_lora", time_nf4_lora)
    dispatch.register_timer("logprob", time_logprob)
