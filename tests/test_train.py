"""The explicit training loop: step counting, accumulation, fractional epochs, non-finite losses, traces."""

import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from frugal_spin import train as train_mod
from frugal_spin.config import LoraSection, SFTConfig, SpinConfig
from frugal_spin.data import Encoded
from frugal_spin.model import Runtime, attach_lora
from frugal_spin.scoring import score_responses
from frugal_spin.train import (NonFiniteStreak, StepOutput, TrainingStep, plan_micro_batches, plan_windows,
                               sft_step_fn, spin_step_fn, total_optimizer_steps, train_adapter)

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
    windows = plan_windows([1] * 44, cfg, seed=0)
    # 44 items in windows of 8: 5 full windows and one of 4 per epoch; half an epoch: round(6 / 2) windows.
    assert sorted(len(w) for w in windows[:6]) == [1] + [2] * 5 and all(len(w) <= 2 for w in windows[6:])
    assert len(windows) == 6 + 3 and total_optimizer_steps(44, cfg) == 9
    plan = plan_micro_batches([1] * 44, cfg, seed=0)
    assert sorted(i for w in windows[:6] for b in w for i in b) == list(range(44))
    assert plan == [b for w in windows for b in w]


@pytest.mark.parametrize("n, micro, accum, epochs", [(44, 4, 2, 1.5), (44, 4, 2, 2.0), (5, 8, 1, 0.1), (37, 4, 3, 2.7),
                                                   (100, 16, 1, 0.5), (0, 4, 1, 3.0), (7, 1, 1, 0.01)])
def test_the_step_count_is_the_plan_s_length_without_planning(n, micro, accum, epochs):
    cfg = SFTConfig(epochs=epochs, micro_batch_size=micro, grad_accum_steps=accum)
    assert train_mod.count_optimizer_steps(n, cfg) == len(plan_windows([1] * n, cfg, seed=0))


def test_an_absurd_epoch_count_is_refused_before_anything_is_planned():
    """Issue 20 item 11: sft.epochs=1e12 hung, building the whole plan in memory (~45 MB/s)."""
    import time

    from frugal_spin.errors import UserError

    started = time.perf_counter()
    with pytest.raises(UserError, match="epochs=1e[+]12 plans 250,000,000,000,000 optimizer steps"):
        plan_windows([1] * 1000, SFTConfig(epochs=1e12, micro_batch_size=4), seed=0)
    assert time.perf_counter() - started < 1


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


# ---------------------------------------------------------------- gradient accumulation weighs tokens and pairs


class _RecordingOptimizer(torch.optim.SGD):
    """Records each step's gradients and changes nothing, so every window's gradient is taken at the same weights."""

    def __init__(self, params):
        super().__init__(params, lr=1.0)
        self.grads: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.grads.append([p.grad.detach().clone() for p in self.param_groups[0]["params"]])


def _randomise_lora_b(model):
    with torch.no_grad():  # B = 0 (peft's init) would leave A without gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)


def _one_batch_gradient(model, step, items):
    model.zero_grad(set_to_none=True)
    step(items).loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return grads


def _varied(n=6):
    g = torch.Generator().manual_seed(3)
    # answers of 1 to 11 tokens: micro-batches of different token counts, as length grouping makes them
    return [Encoded(torch.randint(3, 64, (4,), generator=g).tolist(),
                    torch.randint(3, 64, (1 + 2 * i,), generator=g).tolist()) for i in range(n)]


def _spin_step(model, examples):
    prompts = [e.prompt_ids for e in examples]
    real = [e.answer_ids for e in examples]
    generated = [e.answer_ids[::-1] + [5] * (i % 3) for i, e in enumerate(examples)]
    opponent = torch.linspace(-30.0, -10.0, len(examples))  # any cache: the gradient is what is compared
    return spin_step_fn(model, prompts, real, generated, opponent, opponent - 3.0, 0.5, 0, 16, "cpu")


@pytest.mark.parametrize("kind", ["sft", "spin"])
@pytest.mark.parametrize("micro,accum,skip", [(1, 6, None), (4, 2, None), (5, 2, None), (2, 2, None), (1, 6, 0),
                                              (2, 3, 4)])
def test_any_split_of_a_window_gives_the_one_batch_gradient(monkeypatch, kind, micro, accum, skip):
    """Regression: each micro-batch's mean loss was divided by grad_accum_steps, so a token (SFT) or a pair (SPIN,
    a mean over pairs) in a small micro-batch weighed more. Now every window's gradient is that of its items as
    one batch (token mean for SFT, pair mean for SPIN), for uneven splits (4 + 2, 5 + 1), the last partial window
    (2 x 2 of 6 items: windows of 4 and 2) and windows with a skipped (non-finite) micro-batch."""
    model, examples = _model(), _varied()
    _randomise_lora_b(model)
    step = sft_step_fn(model, examples, pad_id=0, chunk_size=16, device="cpu") if kind == "sft" else \
        _spin_step(model, examples)
    recorder = _RecordingOptimizer([p for p in model.parameters() if p.requires_grad])
    monkeypatch.setattr(train_mod, "make_optimizer", lambda params, cfg, runtime: recorder)

    def maybe_bad(batch):
        out = step(batch)
        return StepOutput(out.loss * float("nan"), out.tokens) if skip in batch else out

    cfg = SFTConfig(epochs=1, micro_batch_size=micro, grad_accum_steps=accum, max_grad_norm=0.0,
                    lr_scheduler="constant", warmup_ratio=0.0)
    lengths = [len(e.prompt_ids) + len(e.answer_ids) for e in examples]
    result = train_adapter(model, CPU, cfg, lengths, TrainingStep(maybe_bad, step.weight_of), seed=0)
    windows = plan_windows(lengths, cfg, seed=0)
    assert len(recorder.grads) == len(windows) == result.optimizer_steps
    for window, grads in zip(windows, recorder.grads):
        items = [i for batch in window if skip not in batch for i in batch]
        expected = _one_batch_gradient(model, step, items)
        for got, ref in zip(grads, expected):
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    if skip is not None:
        assert result.skipped_micro_batches == 1


def test_the_recorded_loss_is_the_window_token_mean():
    model, examples = _model(), _varied()
    step = sft_step_fn(model, examples, pad_id=0, chunk_size=16, device="cpu")
    cfg = SFTConfig(epochs=1, micro_batch_size=2, grad_accum_steps=3, learning_rate=1e-9, warmup_ratio=0.0)
    result = train_adapter(model, CPU, cfg, [len(e.answer_ids) for e in examples], step, seed=0)
    with torch.no_grad():
        assert result.losses[0] == pytest.approx(step(list(range(6))).loss.item(), rel=1e-6)


# ---------------------------------------------------------------- fp16 with a GradScaler (simulated on the CPU)


class _Fp16Runtime(Runtime):
    """A CPU runtime that trains like a T4: fp16 autocast and a GradScaler. Simulated: CPU autocast in fp16, and
    torch's GradScaler built for the CPU (`_cpu_scaler`); a CUDA GradScaler is disabled where there is no GPU."""

    @property
    def autocast_dtype(self):
        return torch.float16


def _cpu_scaler(monkeypatch, **kwargs):
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *args, **kw: real("cpu", **{**kw, **kwargs}))


FP16 = _Fp16Runtime(torch.device("cpu"), torch.float16, gradient_checkpointing=False)


def test_fp16_survives_a_window_of_only_non_finite_losses(monkeypatch):
    """Regression: with every micro-batch of a window non-finite, `scaler.unscale_` ran without step/update, and
    the next window raised "unscale_() has already been called on this optimizer since the last update()"."""
    _cpu_scaler(monkeypatch)
    model, examples = _model(), _examples(4)
    step = sft_step_fn(model, examples, pad_id=0, chunk_size=16, device="cpu")
    calls = []

    def first_window_bad(batch):
        calls.append(batch)
        out = step(batch)
        return StepOutput(out.loss * float("nan"), out.tokens) if len(calls) <= 2 else out

    cfg = SFTConfig(epochs=1, micro_batch_size=1, grad_accum_steps=2, warmup_ratio=0.0)
    result = train_adapter(model, FP16, cfg, [8] * 4, first_window_bad, seed=0)
    assert result.optimizer_steps == 2 and result.skipped_micro_batches == 2 and len(result.losses) == 1


def _overflowing(step, overflow_calls):
    """Finite losses whose scaled gradients overflow in the first `overflow_calls` calls (all when None), as fp16
    backward passes do while the GradScaler's scale is too high."""
    calls = []

    def fn(batch):
        calls.append(batch)
        out = step(batch)
        if overflow_calls is None or len(calls) <= overflow_calls:
            return StepOutput(out.loss * 1e34, out.tokens)  # finite; times the scale, it is inf
        return out

    return fn


def test_grad_scaler_overflow_skips_do_not_count_as_a_diverging_run(monkeypatch):
    """Regression: the scaler's routine overflow skips of the first fp16 steps counted towards
    max_nonfinite_in_a_row, so a healthy run could stop before its scale settled."""
    _cpu_scaler(monkeypatch)
    model, examples = _model(), _examples(8)
    step = _overflowing(sft_step_fn(model, examples, pad_id=0, chunk_size=16, device="cpu"), 3)
    cfg = SFTConfig(epochs=1, micro_batch_size=1, max_nonfinite_in_a_row=2, warmup_ratio=0.0)
    result = train_adapter(model, FP16, cfg, [8] * 8, step, seed=0)
    assert result.optimizer_steps == 8 and result.skipped_optimizer_steps == 3
    assert result.scaler_overflow_steps == 3 and result.summary()["scaler_overflow_steps"] == 3


def test_overflow_at_scale_one_is_a_diverging_run(monkeypatch):
    """Once the scale is down to 1 the gradients overflow unscaled: those skips do count."""
    _cpu_scaler(monkeypatch, init_scale=4.0)
    model, examples = _model(), _examples(8)
    step = _overflowing(sft_step_fn(model, examples, pad_id=0, chunk_size=16, device="cpu"), None)
    cfg = SFTConfig(epochs=1, micro_batch_size=1, max_nonfinite_in_a_row=2, warmup_ratio=0.0)
    with pytest.raises(NonFiniteStreak, match="2 non-finite losses or gradients in a row at optimizer step 4/8"):
        train_adapter(model, FP16, cfg, [8] * 8, step, seed=0)


@pytest.mark.parametrize("runtime", ["fp32 nan loss", "fp16 scaler overflow"])
def test_a_skipped_step_leaves_the_schedule_where_it_was(monkeypatch, runtime):
    """Issue 20 item 13: the scheduler stepped on optimizer steps that were skipped, so a run whose first step was
    skipped (a NaN loss; the fp16 scaler finding its scale) called scheduler.step() before any optimizer.step():
    torch warned, and the schedule ran ahead of the steps applied. It now moves with the applied steps only."""
    import warnings

    model, examples = _model(), _examples(8)
    step = sft_step_fn(model, examples, pad_id=0, chunk_size=16, device="cpu")
    if runtime == "fp16 scaler overflow":
        _cpu_scaler(monkeypatch)
        run, skipped = FP16, _overflowing(step, 3)
    else:
        calls = []

        def skipped(batch):
            calls.append(batch)
            out = step(batch)
            return StepOutput(out.loss * float("nan"), out.tokens) if len(calls) <= 3 else out

        run = CPU
    cfg = SFTConfig(epochs=1, micro_batch_size=1, learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler="linear",
                    max_nonfinite_in_a_row=5)
    lrs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train_adapter(model, run, cfg, [8] * 8, skipped, seed=0, on_log=lambda n, v: lrs.append(v["lr"]))
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    assert result.optimizer_steps == 8
    applied = 8 - 3
    assert lrs[-applied:] == pytest.approx([1e-2 * (1 - k / 8) for k in range(applied)])


# ---------------------------------------------------------------- SPIN step 0 equals the opponent's cache


def _spin_pairs(n=8):
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 64, (3 + i % 3,), generator=g).tolist() for i in range(n)]
    real = [torch.randint(3, 64, (2 + i % 4,), generator=g).tolist() for i in range(n)]
    generated = [torch.randint(3, 64, (1 + i % 5,), generator=g).tolist() for i in range(n)]
    return prompts, real, generated


def _step0_spin(model, runtime, *, disable_dropout, autocast):
    prompts, real, generated = _spin_pairs()
    kwargs = dict(pad_id=0, batch_size=3, chunk_size=16, autocast=autocast)
    opponent_real = score_responses(model, list(zip(prompts, real)), **kwargs)
    opponent_generated = score_responses(model, list(zip(prompts, generated)), **kwargs)
    step = spin_step_fn(model, prompts, real, generated, opponent_real, opponent_generated, 0.1, 0, 16, "cpu")
    cfg = SpinConfig(epochs=1, micro_batch_size=8, learning_rate=1e-3, warmup_ratio=0.0)
    lengths = [len(p) + max(len(r), len(y)) for p, r, y in zip(prompts, real, generated)]
    return train_adapter(model, runtime, cfg, lengths, step, seed=0, disable_dropout=disable_dropout)


def _phi_with_dropout(lora_dropout):
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    config = PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, max_position_embeddings=64, resid_pdrop=0.2, embd_pdrop=0.2,
                       attention_dropout=0.2)
    base = PhiForCausalLM(config)
    for p in base.parameters():
        p.requires_grad_(False)
    model = attach_lora(base, LoraSection(r=4, alpha=8, dropout=lora_dropout))
    _randomise_lora_b(model)  # the SFT adapter SPIN starts from is not B = 0, so LoRA dropout matters
    return model


def test_spin_trains_without_dropout_so_step_zero_is_log_2():
    """Regression: model.train() turned on LoRA dropout and the base's (Phi's resid/embd/attention dropout) while
    the opponent cache was scored without it, so step 0 was off log 2. SPIN training now switches every dropout
    off (and back on after: SFT keeps its dropout)."""
    model = _phi_with_dropout(0.1)
    result = _step0_spin(model, CPU, disable_dropout=True, autocast=None)
    assert abs(result.losses[0] - math.log(2)) < 1e-6
    assert result.metrics["reward_margin"][0] == pytest.approx(0.0, abs=1e-6)
    ps = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert ps and all(p > 0 for p in ps)  # restored after training
    assert model.base_model.model.model.layers[0].self_attn.attention_dropout == 0.2
    with_dropout = _step0_spin(_phi_with_dropout(0.1), CPU, disable_dropout=False, autocast=None)
    assert abs(with_dropout.losses[0] - math.log(2)) > 1e-4  # the check above can fail


class _CpuBf16Runtime(Runtime):
    """Training under bf16 autocast, as on an Ampere or newer GPU; simulated with the CPU's bf16 autocast."""

    @property
    def autocast_dtype(self):
        return torch.bfloat16


def test_opponent_cache_scored_under_the_training_autocast_matches_step_zero():
    """Regression: the cache was scored without autocast while the player trains under it; under bf16 the step-0
    player log-probs then differed from the cache (|loss - log 2| ~ 5e-5, reward accuracy anywhere). Scored under
    the training loop's autocast (`Runtime.autocast`, as the pipeline now does), step 0 is log 2."""
    runtime = _CpuBf16Runtime(torch.device("cpu"), torch.bfloat16, gradient_checkpointing=False)
    model = _model()
    _randomise_lora_b(model)
    result = _step0_spin(model, runtime, disable_dropout=True, autocast=runtime.autocast)
    assert abs(result.losses[0] - math.log(2)) < 1e-6
    mismatched = _step0_spin(_randomised(), runtime, disable_dropout=True, autocast=None)
    assert abs(mismatched.losses[0] - math.log(2)) > abs(result.losses[0] - math.log(2))


def _randomised():
    model = _model()
    _randomise_lora_b(model)
    return model
