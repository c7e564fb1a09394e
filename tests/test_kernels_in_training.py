"""SFT and SPIN steps through the Triton kernels as a GPU run takes them, simulated on the CPU.

A GPU run uses the kernels in `auto` mode: each kernel variant passes a self-check against its torch reference
before first use. Here the CPU plays the GPU: `TRITON_INTERPRET=1` (set at import, before any kernel is decorated;
see kernels/dispatch.py) runs the same kernel source, and `dispatch.TRITON_DEVICE_TYPES` gains "cpu", so the
dispatch takes the Triton path for CPU tensors exactly as it does for CUDA ones, self-checks included (unlike
FRUGAL_SPIN_TRITON=force, which skips them). The model is a 4-bit (bitsandbytes NF4) base with LoRA loaded by
`model.load_model`, the GPU recipes' path. What a real GPU adds (the compiled kernels, CUDA's checkpointing
and memory) is checked by profiling/gpu_check.sh.
"""

from __future__ import annotations

import math
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402,F401  (must import: a missing triton fails this module instead of skipping it)

from frugal_spin.config import LoraSection, ModelConfig, SFTConfig, SpinConfig  # noqa: E402
from frugal_spin.data import Encoded  # noqa: E402
from frugal_spin.kernels import dispatch, logprob_triton, nf4_lora_triton  # noqa: E402
from frugal_spin.model import Runtime, load_model  # noqa: E402
from frugal_spin.scoring import score_responses  # noqa: E402
from frugal_spin.train import sft_step_fn, spin_step_fn, train_adapter  # noqa: E402
from conftest import CallCounter as _Calls  # noqa: E402


@pytest.fixture
def gpu_like_dispatch(monkeypatch):
    """auto mode, with CPU tensors treated like CUDA ones; self-check results from other tests forgotten."""
    monkeypatch.delenv(dispatch.MODE_ENV, raising=False)
    monkeypatch.setattr(dispatch, "TRITON_DEVICE_TYPES", ("cuda", "cpu"))
    dispatch.forget_verifications()
    yield
    dispatch.forget_verifications()


def _four_bit_model(tmp_path, checkpointing: bool, dropout: float = 0.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # Sizes are multiples of 64 (bitsandbytes' CPU NF4 needs that); vocab 320 spans one kernel tile, the
    # self-check covers several.
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    runtime = Runtime(torch.device("cpu"), torch.float32, gradient_checkpointing=checkpointing)
    # cpu_4bit_weights=packed: keep bitsandbytes' NF4 layers on the CPU, as they are on a GPU (the CPU default may
    # dequantise them once, and then there is no 4-bit layer for the fused kernel).
    model = load_model(str(tmp_path / "base"), ModelConfig(name=str(tmp_path / "base"), cpu_4bit_weights="packed"),
                       LoraSection(r=8, alpha=16, dropout=dropout), runtime, max_seq_length=64, seed=0)
    with torch.no_grad():  # a trained-looking adapter: B = 0 would hide a wrong low-rank term
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model, runtime


def _examples(n=4):
    g = torch.Generator().manual_seed(1)
    return [Encoded(torch.randint(3, 320, (5,), generator=g).tolist(),
                    torch.randint(3, 320, (3 + i,), generator=g).tolist()) for i in range(n)]


@pytest.mark.parametrize("checkpointing", [True, False])
def test_sft_and_spin_steps_through_the_kernels(tmp_path, gpu_like_dispatch, monkeypatch, capsys, checkpointing):
    """Regression: with checkpointing on, the fused LoRA kernel's first-use self-check ran inside layer 0's
    checkpointed forward; the checkpoint's hooks captured its graph, the check "failed" (disabling the kernel with
    a misleading warning) and backward raised CheckpointError. The checks now run when the adapter is attached."""
    model, runtime = _four_bit_model(tmp_path, checkpointing)
    checked = dispatch.verified_variants()
    assert checked and all(checked.values()), checked  # verified at load time, every variant, before any step
    assert {key[0] for key in checked} == {"nf4_lora", "logprob"}
    lora_calls = _Calls(monkeypatch, nf4_lora_triton, "nf4_matmul")
    head_calls = _Calls(monkeypatch, logprob_triton, "logprobs_and_grad_in_place")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    examples = _examples()
    cfg = SFTConfig(epochs=1, micro_batch_size=4, learning_rate=1e-3, warmup_ratio=0.0)
    sft = train_adapter(model, runtime, cfg, [8] * 4, sft_step_fn(model, examples, 0, 64, "cpu"), seed=0)
    assert sft.optimizer_steps == 1 and sft.skipped_micro_batches == 0 and sft.skipped_optimizer_steps == 0
    assert lora_calls.count > 0 and head_calls.count > 0  # the kernels ran, the references did not replace them
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)

    prompts = [e.prompt_ids for e in examples]
    real = [e.answer_ids for e in examples]
    generated = [list(reversed(e.answer_ids)) for e in examples]
    opponent_real = score_responses(model, list(zip(prompts, real)), pad_id=0, batch_size=4, chunk_size=64)
    opponent_generated = score_responses(model, list(zip(prompts, generated)), pad_id=0, batch_size=4,
                                         chunk_size=64)
    step = spin_step_fn(model, prompts, real, generated, opponent_real, opponent_generated, 0.1, 0, 64, "cpu")
    spin = train_adapter(model, runtime, SpinConfig(epochs=1, micro_batch_size=4, learning_rate=1e-3,
                                                    warmup_ratio=0.0), [8] * 4, step, seed=0)
    assert spin.optimizer_steps == 1 and spin.skipped_micro_batches == 0
    assert abs(spin.losses[0] - math.log(2)) < 1e-5  # the player starts as the opponent
    assert "self-check" not in capsys.readouterr().err
    assert all(dispatch.verified_variants().values())

    if checkpointing:
        # A variant the load-time check did not know (here: every result forgotten) is still checked on first use,
        # inside the checkpointed forward: its graph must stay out of the checkpoint's hooks.
        dispatch.forget_verifications()
        again = train_adapter(model, runtime, cfg, [8] * 4, sft_step_fn(model, examples, 0, 64, "cpu"), seed=0)
        assert again.optimizer_steps == 1 and again.skipped_micro_batches == 0
        assert dispatch.verified_variants() and all(dispatch.verified_variants().values())
        assert "self-check" not in capsys.readouterr().err

