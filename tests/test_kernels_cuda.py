"""The compiled Triton kernels on a real GPU (skipped without CUDA): bf16 and fp16 parity with the references.

Run in a fresh process without TRITON_INTERPRET: tests/test_kernels.py sets it for the whole pytest process, and
a kernel decorated under it stays interpreted for the life of the process.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

# The kernels are forced: in auto mode the dispatch may keep the torch reference where it is faster
# (kernels/dispatch.py), and this script must check the compiled kernels themselves. It prints each error (the GPU
# check keeps the lines).
SCRIPT = r'''
import os
os.environ["FRUGAL_SPIN_TRITON"] = "force"
import torch, bitsandbytes.functional as F
from frugal_spin.kernels.nf4_lora import NF4Weight, fused_lora_linear, lora_linear_reference
from frugal_spin.kernels import nf4_lora_triton, logprob_triton  # noqa: F401  (must compile, not interpret)
from frugal_spin.logprobs import chunked_token_logprobs, reference_token_logprobs

def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()

failures = []  # every dtype runs: one failure must not hide the others

def check(name, err, tol):
    print(f"rel err {name}: {err:.3e} (tolerance {tol:.0e})", flush=True)
    if not err < tol:  # NaN fails too
        failures.append(name)

for dtype in (torch.bfloat16, torch.float16, torch.float32):
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # fp32: sums over 151,936 terms in another order
    try:
        w = torch.randn(1000, 1536, device="cuda") / 40
        packed, state = F.quantize_4bit(w.to(dtype), blocksize=64, compress_statistics=True, quant_type="nf4")
        weight = NF4Weight.from_bnb(packed, state)
        x = torch.randn(333, 1536, device="cuda", dtype=dtype, requires_grad=True)
        a = (torch.randn(16, 1536, device="cuda") / 40).requires_grad_()
        b = (torch.randn(1000, 16, device="cuda") / 10).requires_grad_()
        g = torch.randn(333, 1000, device="cuda", dtype=dtype)
        got = fused_lora_linear(x, weight, a, b, 2.0)
        ref = lora_linear_reference(x, weight, a, b, 2.0)
        for what, t1, t2 in zip(["y", "dx", "dA", "dB"], [got, *torch.autograd.grad(got, [x, a, b], g)],
                                [ref, *torch.autograd.grad(ref, [x, a, b], g)]):
            check(f"nf4_lora {dtype} {what}", rel(t1, t2), tol)
        h = torch.randn(77, 256, device="cuda", dtype=dtype, requires_grad=True)
        head = (torch.randn(151936, 256, device="cuda") / 16).to(dtype)
        tgt = torch.randint(0, 151936, (77,), device="cuda")
        up = torch.randn(77, device="cuda")
        got = chunked_token_logprobs(h, head, tgt, None, chunk_size=32)
        ref = reference_token_logprobs(h, head, tgt)
        check(f"logprob {dtype} logp", rel(got, ref), tol)
        check(f"logprob {dtype} d hidden",
              rel(torch.autograd.grad(got, [h], up)[0], torch.autograd.grad(ref, [h], up)[0]), tol)
    except Exception as exc:
        print(f"rel err {dtype}: raised {type(exc).__name__}: {exc}", flush=True)
        failures.append(f"{dtype} raised")
assert not failures, failures
print("CUDA OK")
'''


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_kernels_match_references_on_cuda():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FRUGAL_SPIN_TRITON")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "CUDA OK" in proc.stdout, proc.stderr[-3000:]
