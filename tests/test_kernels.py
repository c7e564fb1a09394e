"""Parity of the Triton kernels with their torch references, on the CPU under Triton's interpreter.

TRITON_INTERPRET is set here, at import, before any kernel is used: triton reads it when a kernel is decorated,
and ours are decorated lazily on first use (see frugal_spin/kernels/dispatch.py). Triton's own library functions
are decorated when triton is imported, and the interpreter cannot run them if that happened with it off, so
tests/conftest.py sets it first of all too. The Triton path is forced per test with FRUGAL_SPIN_TRITON=force (a fixture),
so the other test modules keep the default dispatch. `import triton` is deliberately not guarded: without
triton (a dev-extra dependency on Linux x86_64) this module fails instead of skipping the parity checks.
The interpreter computes bf16 wrongly, so parity runs in fp32 and fp16 only.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import re  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402,F401  (must import: see the module docstring)

from frugal_spin.kernels import dispatch  # noqa: E402
from frugal_spin.kernels.nf4_lora import (  # noqa: E402
    NF4Weight,
    dequantize_nf4_reference,
    fused_lora_linear,
    lora_linear_reference,
)
from frugal_spin.logprobs import chunked_token_logprobs, reference_token_logprobs  # noqa: E402
from conftest import CallCounter as _Calls  # noqa: E402

bnb_functional = pytest.importorskip("bitsandbytes.functional")  # a core dependency: present wherever CI runs


@pytest.fixture
def force_triton(monkeypatch):
    monkeypatch.setenv(dispatch.MODE_ENV, "force")


# ---------------------------------------------------------------- dispatch


def test_triton_itself_was_imported_with_the_interpreter_on():
    """The interpreter fails on triton's own @jit functions (tl.max, tl.sum, tl.zeros: every kernel here uses
    them) when triton was imported before TRITON_INTERPRET was set, as it is by any test module collected earlier
    that imports bitsandbytes (`pytest tests/test_resume.py tests/test_kernels.py` failed); conftest sets it first,
    so they are interpreter functions in this process."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    assert all(isinstance(fn, InterpretedFunction) for fn in (tl.max, tl.sum, tl.zeros))


def test_dispatch_rules(monkeypatch):
    cpu = torch.zeros(2)
    monkeypatch.delenv(dispatch.MODE_ENV, raising=False)
    assert not dispatch.use_triton(cpu)  # auto: CPU tensors take the torch reference
    monkeypatch.setenv(dispatch.MODE_ENV, "off")
    assert not dispatch.use_triton(cpu)
    monkeypatch.setenv(dispatch.MODE_ENV, "force")
    assert dispatch.use_triton(cpu)  # interpreter on (set above)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        dispatch.use_triton(cpu)
    monkeypatch.setenv(dispatch.MODE_ENV, "sometimes")
    with pytest.raises(ValueError, match="auto, force or off"):
        dispatch.use_triton(cpu)


# ---------------------------------------------------------------- NF4 format: the ground truth


# bitsandbytes 0.50's native CPU dequantiser is wrong when a row's length (in_features) is a multiple of 16 but
# not of the block size 64 (rows of 96: error 0.08 against the original weight where quantising costs 0.02);
# its own generic torch fallback and the CUDA kernel are right. So the check has three parts:
# F.dequantize_4bit where the native kernel is right, bitsandbytes' generic implementation everywhere, and a
# round trip (re-quantising our dequantised weight gives back the same packed bytes), which no dequantiser bug
# can pass by accident.
@pytest.mark.parametrize("shape", [(37, 128), (5, 64), (128, 64), (37, 70), (3, 1000), (64, 96), (5, 7)])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_dequantisation_matches_bitsandbytes(shape, nested, dtype):
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(shape, generator=gen) * 0.05).to(dtype)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
    got = dequantize_nf4_reference(NF4Weight.from_bnb(packed, state))
    assert got.shape == shape
    # Exact in fp32; bitsandbytes rounds its output to the weight's dtype.
    if shape[1] % 64 == 0:
        torch.testing.assert_close(got.to(dtype), bnb_functional.dequantize_4bit(packed, state), atol=0, rtol=0)
    absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset if nested else state.absmax
    generic = _dequantize_4bit_compute(packed.reshape(-1), absmax.float(), state.code, 64, shape, torch.float32)
    torch.testing.assert_close(got, generic, atol=0, rtol=0)
    repacked, _ = bnb_functional.quantize_4bit(got, blocksize=64, compress_statistics=False, quant_type="nf4")
    assert torch.equal(repacked, packed)
    assert (got - w.float()).abs().max() < 0.3 * w.float().abs().max()  # and it is a quantisation of w


def test_unsupported_formats_are_refused():
    packed, state = bnb_functional.quantize_4bit(torch.randn(8, 64), quant_type="fp4")
    with pytest.raises(ValueError, match="NF4"):
        NF4Weight.from_bnb(packed, state)


# ---------------------------------------------------------------- fused NF4 LoRA linear


def _lora_inputs(m, k, n, rank, dtype, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) / k**0.5
    packed, state = bnb_functional.quantize_4bit(w.to(dtype), blocksize=64, compress_statistics=True,
                                                 quant_type="nf4")
    weight = NF4Weight.from_bnb(packed, state)
    x = torch.randn(m, k, generator=gen).to(dtype).requires_grad_()
    lora_a = (torch.randn(rank, k, generator=gen) / k**0.5).requires_grad_()  # adapters stay fp32 (peft)
    lora_b = (torch.randn(n, rank, generator=gen) * 0.1).requires_grad_()
    b = (torch.randn(n, generator=gen) * 0.1).to(dtype) if bias else None
    upstream = torch.randn(m, n, generator=gen).to(dtype)
    return x, weight, lora_a, lora_b, b, upstream


def _assert_close_scaled(got, ref, tol, name):
    scale = max(1.0, ref.abs().max().item())
    err = (got.float() - ref.float()).abs().max().item()
    assert err <= tol * scale, f"{name}: max abs diff {err:.3g} > {tol} x {scale:.3g}"


@pytest.mark.parametrize("m,k,n", [(37, 150, 97), (1, 64, 16), (70, 200, 130)])  # mostly off the 64 tiles
@pytest.mark.parametrize("rank", [8, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_lora_linear_matches_reference(force_triton, monkeypatch, m, k, n, rank, dtype):
    from frugal_spin.kernels import nf4_lora_triton

    calls = _Calls(monkeypatch, nf4_lora_triton, "nf4_matmul")
    x, weight, lora_a, lora_b, bias, upstream = _lora_inputs(m, k, n, rank, dtype, bias=(rank != 16))
    scale = 2.0 / rank**0.5
    got = fused_lora_linear(x, weight, lora_a, lora_b, scale, bias)
    got_grads = torch.autograd.grad(got, [x, lora_a, lora_b], upstream)
    assert calls.count == 2  # forward and d x both ran the kernel
    ref = lora_linear_reference(x, weight, lora_a, lora_b, scale, bias)
    ref_grads = torch.autograd.grad(ref, [x, lora_a, lora_b], upstream)
    assert got.dtype == dtype and got_grads[0].dtype == dtype and got_grads[1].dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 5e-3  # fp16 dots round inputs to 11 bits
    _assert_close_scaled(got, ref, tol, "y")
    for name, g, r in zip(("d x", "d A", "d B"), got_grads, ref_grads):
        _assert_close_scaled(g, r, tol, name)


def test_fused_lora_linear_keeps_leading_dims(force_triton):
    x, weight, lora_a, lora_b, _, _ = _lora_inputs(6, 70, 33, 8, torch.float32, bias=False)
    x3 = x.detach().reshape(2, 3, 70)
    got = fused_lora_linear(x3, weight, lora_a, lora_b, 0.5)
    ref = lora_linear_reference(x3, weight, lora_a, lora_b, 0.5)
    assert got.shape == (2, 3, 33)
    _assert_close_scaled(got, ref, 1e-5, "y")


def test_cpu_without_force_takes_the_reference(monkeypatch):
    from frugal_spin.kernels import nf4_lora_triton

    monkeypatch.delenv(dispatch.MODE_ENV, raising=False)
    calls = _Calls(monkeypatch, nf4_lora_triton, "nf4_matmul")
    x, weight, lora_a, lora_b, _, _ = _lora_inputs(4, 64, 16, 8, torch.float32, bias=False)
    fused_lora_linear(x, weight, lora_a, lora_b, 1.0)
    assert calls.count == 0


# ---------------------------------------------------------------- log-prob kernel


@pytest.mark.parametrize("n,v,h,chunk", [(5, 151_936, 24, 2), (7, 5003, 40, 3), (3, 4096, 16, 8), (0, 301, 8, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_triton_logprobs_match_torch(force_triton, monkeypatch, n, v, h, chunk, dtype, bias):
    from frugal_spin.kernels import logprob_triton

    calls = _Calls(monkeypatch, logprob_triton, "logprobs_and_grad_in_place")
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) * 1.5 / h**0.5).to(dtype)  # frozen head, as in LoRA
    b = (torch.randn(v, generator=gen) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    upstream = torch.randn(n, generator=gen)

    got = chunked_token_logprobs(hidden, weight, targets, b, chunk_size=chunk)
    assert calls.count == (n + chunk - 1) // chunk
    ref = reference_token_logprobs(hidden, weight, targets, b)
    assert got.dtype == torch.float32
    if n == 0:
        assert got.shape == (0,)
        return
    (got_grad,) = torch.autograd.grad(got, [hidden], upstream)
    (ref_grad,) = torch.autograd.grad(ref, [hidden], upstream)
    assert got_grad.dtype == dtype
    # Against the full-logits reference: fp32 sums over 151,936 terms in another order differ by ~3e-5; fp16
    # heads round the logits to fp16 products on the chunked paths (as the model's own .logits), not there.
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    _assert_close_scaled(got, ref, tol, "logp")
    _assert_close_scaled(got_grad, ref_grad, tol, "d hidden")
    # Against the torch chunked path, which shares the two head matmuls: only the softmax part differs.
    monkeypatch.setenv(dispatch.MODE_ENV, "off")
    torch_path = chunked_token_logprobs(hidden, weight, targets, b, chunk_size=chunk)
    (torch_grad,) = torch.autograd.grad(torch_path, [hidden], upstream)
    monkeypatch.setenv(dispatch.MODE_ENV, "force")
    _assert_close_scaled(got, torch_path, 1e-5, "logp vs torch chunked")
    _assert_close_scaled(got_grad, torch_grad, 1e-5 if dtype == torch.float32 else 2e-3, "d hidden vs torch chunked")
    with torch.no_grad():  # opponent scoring: no gradient buffer written
        _assert_close_scaled(chunked_token_logprobs(hidden, weight, targets, b, chunk_size=chunk), ref, tol, "logp")


def test_trainable_head_falls_back_to_the_torch_path(force_triton, monkeypatch):
    from frugal_spin.kernels import logprob_triton

    calls = _Calls(monkeypatch, logprob_triton, "logprobs_and_grad_in_place")
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    targets = torch.randint(0, 50, (4,))
    out = chunked_token_logprobs(hidden, weight, targets, None, chunk_size=3)
    torch.testing.assert_close(out, reference_token_logprobs(hidden, weight, targets), atol=1e-5, rtol=1e-5)
    assert calls.count == 0


# ---------------------------------------------------------------- peft swap


def _four_bit_lora_model(tmp_path, dropout=0.0):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # Sizes are multiples of 64: bitsandbytes' CPU forward is wrong otherwise (see the dequantisation test).
    config = LlamaConfig(vocab_size=211, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    model = LlamaForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
    for module in model.modules():  # DESIGN.md: the CPU bf16 repack would drop gradients
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    torch.manual_seed(1)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear",
                      init_lora_weights=False)
    return get_peft_model(model, lora)


def _logits_and_grads(model, input_ids):
    params = [p for p in model.parameters() if p.requires_grad]
    logits = model(input_ids=input_ids).logits
    grads = torch.autograd.grad((logits * torch.linspace(-1, 1, logits.shape[-1])).sum(), params)
    return logits.detach(), grads


def test_swapped_peft_layers_match_peft(tmp_path, force_triton, monkeypatch):
    from frugal_spin.kernels import nf4_lora_triton
    from frugal_spin.kernels.peft_swap import use_fused_lora_layers

    model = _four_bit_lora_model(tmp_path)
    input_ids = torch.randint(0, 211, (2, 9), generator=torch.Generator().manual_seed(2))
    monkeypatch.setenv(dispatch.MODE_ENV, "off")  # peft's own forward, as it is
    ref_logits, ref_grads = _logits_and_grads(model, input_ids)

    assert use_fused_lora_layers(model) == 7  # q, k, v, o, gate, up, down
    monkeypatch.setenv(dispatch.MODE_ENV, "force")
    calls = _Calls(monkeypatch, nf4_lora_triton, "nf4_matmul")
    logits, grads = _logits_and_grads(model, input_ids)
    # 7 forwards + d x of o, gate, up, down; q, k, v read the frozen embeddings, so no d x is asked of them.
    assert calls.count == 7 + 4
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert len(grads) == len(ref_grads) == 14
    for g, r in zip(grads, ref_grads):
        _assert_close_scaled(g, r, 1e-4, "LoRA grad")


def test_swap_falls_back_to_peft_with_dropout(tmp_path, force_triton, monkeypatch):
    from frugal_spin.kernels import nf4_lora_triton
    from frugal_spin.kernels.peft_swap import use_fused_lora_layers

    model = _four_bit_lora_model(tmp_path, dropout=0.1)
    assert use_fused_lora_layers(model) == 7
    calls = _Calls(monkeypatch, nf4_lora_triton, "nf4_matmul")
    model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert calls.count == 0


def test_swap_is_skipped_when_unsloth_is_loaded(tmp_path, monkeypatch):
    from frugal_spin.kernels.peft_swap import use_fused_lora_layers

    model = _four_bit_lora_model(tmp_path)
    monkeypatch.setitem(sys.modules, "unsloth", types.ModuleType("unsloth"))
    assert use_fused_lora_layers(model) == 0


# ---------------------------------------------------------------- first-use self-check (auto mode)


@pytest.mark.parametrize("name", ["logprob", "nf4_lora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_self_check_passes_for_the_real_kernels(name, dtype, monkeypatch):
    """The check a GPU run does once per device and variant before using a kernel, here on CPU tensors in the
    interpreter, in the run's dtype (bf16 is left out: the interpreter computes it wrongly)."""
    from frugal_spin.kernels import logprob, nf4_lora

    monkeypatch.delenv(dispatch.MODE_ENV, raising=False)
    dispatch.forget_verifications()
    with torch.no_grad():  # the first use may come from no-grad scoring: the check must still run its backward
        if name == "logprob":
            assert logprob.verified(torch.device("cpu"), dtype)
        else:
            assert nf4_lora.verified(torch.device("cpu"), nf4_lora.Variant(dtype, 16, True, True))
            assert nf4_lora.verified(torch.device("cpu"), nf4_lora.Variant(dtype, 64, False, False))
    assert all(dispatch.verified_variants().values()) and len(dispatch.verified_variants()) == (
        1 if name == "logprob" else 2)
    dispatch.forget_verifications()


def test_logprob_self_check_covers_several_vocabulary_tiles_and_both_compiled_forms(monkeypatch):
    """Production runs 38 tiles of BLOCK_V at vocab 151,936, training writes the gradient in place and scoring
    does not: the check must reach all of that, not one tile in one form."""
    from frugal_spin.kernels import logprob, logprob_triton

    seen = []
    original = logprob_triton.logprobs_and_grad_in_place

    def spy(logits, targets, write_grad):
        seen.append((logits.shape[1], write_grad))
        return original(logits, targets, write_grad)

    monkeypatch.setattr(logprob_triton, "logprobs_and_grad_in_place", spy)
    error, tolerance = logprob.self_check(torch.device("cpu"), logprob.Variant(torch.float16))
    assert error <= tolerance
    assert {v for v, _ in seen} == {v for v, _ in seen if v > 2 * logprob_triton.BLOCK_V}
    assert {w for _, w in seen} == {True, False}


def test_a_kernel_that_disagrees_with_its_reference_is_not_used(monkeypatch, capsys):
    from frugal_spin.kernels import logprob, nf4_lora

    monkeypatch.delenv(dispatch.MODE_ENV, raising=False)
    dispatch.forget_verifications()
    real_logprob = logprob.triton_token_logprobs
    monkeypatch.setattr(logprob, "triton_token_logprobs", lambda *a, **k: real_logprob(*a, **k) + 0.1)

    def broken(*args):
        raise RuntimeError("out of resources: shared memory")

    monkeypatch.setattr(nf4_lora._FusedNF4LoRA, "apply", broken)
    cpu = torch.device("cpu")
    variant = nf4_lora.Variant(torch.float32, 8, False, True)
    assert not logprob.verified(cpu, torch.float32)
    assert not nf4_lora.verified(cpu, variant)
    err = capsys.readouterr().err
    assert re.search(r"Triton kernel logprob \(head float32\) differs from its torch reference on cpu \(error "
                     r"[0-9.]+e-0[23] > 1e-04\)", err)  # 0.1 against log-probs near -log(8,315): relative 1e-2
    assert ("Triton kernel nf4_lora (float32, rank 8, no bias, double quantisation) failed its self-check on cpu "
            "(RuntimeError: out of resources") in err
    assert not logprob.verified(cpu, torch.float32)  # checked once: no second warning
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(dispatch.MODE_ENV, "force")
    assert logprob.verified(cpu, torch.float32)  # force is for testing the kernel itself
    dispatch.forget_verifications()
