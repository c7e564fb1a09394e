"""The explicit training loop: step counting, accumulation, fractional epochs, non-finite losses, traces."""

import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from frugal_spin.config import LoraSection, SFTConfig
from frugal_spin.data import Encoded
from frugal_spin.model import Runtime, attach_lora
from frugal_spin.train import StepOutput, plan_micro_batches, sft_step_fn, total_optimizer_steps, train_adapter

CPU = Runtime(torch.device("cpu"), torch.float32, gradient_checkpointing=False)


def _model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         initializer_range=0.3)  # a frozen head at the default 0.02 caps logits near 0.6
    base = LlamaForCausalLM(config)
    for p in base.parameters():
        p.requires_grad_(False)
    return attach_lora(base, LoraSection(r=4, alpha=8))


def _examples(n=24):
    g = torch.Generator().manual_seed(1)
    # Random prompts, one fixed answer: easy for a small adapter, so a working loop must lower the loss a lot.
    return [Encoded(torch.randint(3, 64, (5,), generator=g).tolist(), [7, 8, 9]) for _ in range(n)]


def test_plan_counts_epochs_and_accumulation():
    cfg = SFTConfig(epochs=1.5, micro_batch_size=4, grad_accum_steps=2)
    plan = plan_micro_batches([1] * 40, cfg, seed=0)
    assert len(plan) == 10 + 5
    assert sorted(i for b in plan[:10] for i in b) == list(range(40))
    assert total_optimizer_steps(40, cfg) == 8  # ceil(15 / 2)


def test_sft_training_lowers_the_loss():
    model, examples = _model(), _examples()
    cfg = SFTConfig(epochs=8, learning_rate=1e-2, micro_batch_size=8, warmup_ratio=0.0)
    step = sft_step_fn(model, examples, pad_id=0, chunk_size=16, device="cpu")
    result = train_adapter(model, CPU, cfg, [8] * len(examples), step, seed=0)
    assert result.optimizer_steps == 24 and result.skipped_micro_batches == 0
    assert result.losses[-1] < 0.7 * result.losses[0]
    assert result.tokens == 8 * 8 * len(examples)


def test_non_finite_loss_skips_the_micro_batch_and_leaves_weights_untouched():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def bad_step(batch):
        return StepOutput(sum(p.sum() for p in model.parameters() if p.requires_grad) * float("nan"), 1)

    result = train_adapter(model, CPU, SFTConfig(epochs=1, micro_batch_size=4), [1] * 8, bad_step, seed=0)
    assert result.skipped_micro_batches == 2 and result.losses == []
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[n]), n


def test_trace_is_written_as_chrome_trace_json(tmp_path):
    model, examples = _model(), _examples()
    step = sft_step_fn(model, examples, pad_id=0, chunk_size=16, device="cpu")
    train_adapter(model, CPU, SFTConfig(epochs=1, micro_batch_size=4), [8] * len(examples), step, seed=0,
                  trace_dir=tmp_path / "trace", trace_steps=2)
    files = list((tmp_path / "trace").glob("*.json"))
    assert len(files) == 1
    events = json.loads(files[0].read_text())["traceEvents"]
    assert any("ProfilerStep" in e.get("name", "") for e in events)
