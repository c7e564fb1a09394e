"""The Triton kernels compile, ahead of time and without a GPU, to CUDA binaries for a T4 (sm_75), consumer
Ampere/Ada (sm_86, sm_89) and Hopper (sm_90), and fit the shared memory of each.

The interpreter (tests/test_kernels.py) checks the numbers but not what only the compiler sees: types of
loop-carried values, tl.dot's shape and dtype rules, shared memory per block. Compiling needs no driver:
triton ships ptxas. Runs in a fresh process because tests/test_kernels.py turns the interpreter on for the whole
pytest process, and interpreted kernels cannot be compiled.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Largest shared memory one block may use: 64 KiB on sm_75, 99 KiB on sm_86/89, 227 KiB on sm_90.
SHARED_LIMIT_KIB = {75: 64, 86: 99, 89: 99, 90: 227}

SCRIPT = r'''
import json, sys, warnings
warnings.filterwarnings("ignore")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from frugal_spin.kernels import logprob_triton, nf4_lora_triton

def compile_kernel(fn, pointer_types, constexprs, capability, options):
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_types[name]
        else:
            signature[name] = "i32"
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", capability, 32), options=options)
    assert "cubin" in kernel.asm
    return kernel.metadata.shared

results = []
nf4 = nf4_lora_triton
for capability, dtype in [(75, "fp16"), (86, "bf16"), (86, "fp32"), (89, "fp16"), (90, "bf16")]:
    for transpose, bias, rank_block in [(True, True, 16), (False, False, 64)]:
        pointers = {n: "*" + dtype for n in ("a_ptr", "left_ptr", "right_ptr", "bias_ptr", "out_ptr")}
        pointers.update(packed_ptr="*u8", absmax_ptr="*u8", code_ptr="*fp32", nested_code_ptr="*fp32",
                        nested_absmax_ptr="*fp32", offset_ptr="*fp32")
        constexprs = dict(TRANSPOSE_W=transpose, NESTED=True, HAS_LOW_RANK=True, HAS_BIAS=bias, BLOCKSIZE=64,
                          NESTED_BLOCKSIZE=256, FP32_DOT=dtype == "fp32", BLOCK_M=nf4.BLOCK_M, BLOCK_N=nf4.BLOCK_N,
                          BLOCK_K=nf4.BLOCK_K, BLOCK_R=rank_block, K_INTERPRETED=0)  # 0: compiled, runtime K
        shared = compile_kernel(nf4._nf4_lora_matmul_kernel, pointers, constexprs, capability, nf4.LAUNCH_OPTIONS)
        results.append(["nf4_lora", capability, dtype, shared])
lp = logprob_triton
for capability in (75, 86, 90):
    for write_grad in (False, True):
        shared = compile_kernel(lp._row_logprob_kernel,
                                dict(logits_ptr="*fp32", targets_ptr="*i64", out_ptr="*fp32"),
                                dict(WRITE_GRAD=write_grad, BLOCK_V=lp.BLOCK_V, V_INTERPRETED=0), capability,
                                lp.LAUNCH_OPTIONS)
        results.append(["logprob", capability, "fp32", shared])
print("RESULTS " + json.dumps(results))
'''


def test_kernels_compile_for_t4_consumer_and_hopper_gpus():
    import triton  # noqa: F401  (no skip: triton is in the dev extra; without it this test fails)

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULTS "))
    results = json.loads(line[len("RESULTS "):])
    assert len(results) == 16
    for kernel, capability, dtype, shared in results:
        assert shared <= SHARED_LIMIT_KIB[capability] * 1024, (kernel, capability, dtype, shared)
