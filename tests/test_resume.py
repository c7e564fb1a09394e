"""Faults inside a stage, in-process: training checkpoints (exact continuation, corrupt ones ignored), the NaN
streak stop, CUDA out-of-memory halving, resumable generation, and stage outputs checked by hash.
The whole pipeline killed with SIGKILL at every stage is tests/test_crash_resume.py."""

import json
from pathlib import Path

import pytest
import torch

from frugal_spin.checkpoint import TENSORS, find_checkpoint, remove_checkpoint
from frugal_spin.config import SFTConfig
from frugal_spin.errors import UserError
from frugal_spin.generate import AnswerLog, generate_answers
from frugal_spin.stage_store import StageStore
from frugal_spin.train import NonFiniteStreak, StepOutput, sft_step_fn, train_adapter, train_with_oom_retry
from test_train import CPU, _examples, _model

REPO = Path(__file__).resolve().parents[1]
CFG = SFTConfig(epochs=2, learning_rate=1e-2, micro_batch_size=4, grad_accum_steps=2, warmup_ratio=0.2,
                checkpoint_every_steps=2, lr_scheduler="cosine")


def _adapter(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class Interrupt(Exception):
    pass


def _train(model, examples, tmp_path, stop_at_micro_batch=None):
    step = sft_step_fn(model, examples, pad_id=0, chunk_size=16, device="cpu")
    calls = [0]

    def interrupted_step(batch):
        calls[0] += 1
        if stop_at_micro_batch is not None and calls[0] == stop_at_micro_batch:
            raise Interrupt
        return step(batch)

    return train_adapter(model, CPU, CFG, [8] * len(examples), interrupted_step, seed=3,
                         checkpoint_dir=tmp_path / "checkpoint", fingerprint="fp", stage="sft")


def test_interrupted_training_continues_exactly_from_its_checkpoint(tmp_path):
    examples = _examples()
    reference = _model()
    expected = _train(reference, examples, tmp_path / "ref")
    # the last checkpoint is from step 4 of 6: none after the final step (the stage's adapter and marker follow it)
    assert json.loads((tmp_path / "ref" / "checkpoint" / "state.json").read_text())["progress"]["optimizer_steps"] == 4

    first = _model()
    with pytest.raises(Interrupt):  # micro-batch 11 of 12 = inside optimizer step 6; checkpoints at steps 2 and 4
        _train(first, examples, tmp_path, stop_at_micro_batch=11)
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["next_micro_batch"] == 8 and state["progress"]["optimizer_steps"] == 4

    resumed_model = _model()  # a new process: fresh weights, optimizer and RNG
    torch.manual_seed(12345)
    resumed = _train(resumed_model, examples, tmp_path)
    assert resumed.optimizer_steps == expected.optimizer_steps == 6
    assert resumed.losses == pytest.approx(expected.losses, abs=1e-6)
    for name, value in _adapter(reference).items():
        torch.testing.assert_close(_adapter(resumed_model)[name], value, atol=1e-6, rtol=0)


def test_a_corrupt_or_foreign_checkpoint_is_ignored_with_a_warning(tmp_path, capsys):
    examples = _examples()
    with pytest.raises(Interrupt):
        _train(_model(), examples, tmp_path, stop_at_micro_batch=7)
    ckpt = tmp_path / "checkpoint"
    assert find_checkpoint(ckpt, fingerprint="other", plan="x") is None
    assert "another recipe" in capsys.readouterr().err
    data = bytearray((ckpt / TENSORS).read_bytes())
    data[-5] ^= 0xFF
    (ckpt / TENSORS).write_bytes(bytes(data))
    model = _model()
    result = _train(model, examples, tmp_path)  # starts over instead of loading the damaged state
    assert "truncated or corrupt" in capsys.readouterr().err
    reference = _model()
    assert result.losses == pytest.approx(_train(reference, examples, tmp_path / "ref").losses, abs=1e-6)
    remove_checkpoint(ckpt)
    assert not ckpt.exists()


@pytest.mark.parametrize("edit", [
    lambda state: state.update(next_micro_batch=state["next_micro_batch"] + 2),  # skips data
    lambda state: state["progress"].update(optimizer_steps=0),
    lambda state: state["optimizer"]["param_groups"][0].update(lr=1.0),
    lambda state: state.pop("state_sha256"),  # as a checkpoint written before the seal
], ids=["position", "progress", "learning_rate", "no_seal"])
def test_an_edited_but_valid_checkpoint_state_is_ignored_with_a_warning(tmp_path, capsys, edit):
    """state.json is JSON a hand (or another tool) can change and keep valid: its seal must match, else the stage
    starts from its beginning, exactly as with no checkpoint."""
    examples = _examples()
    with pytest.raises(Interrupt):
        _train(_model(), examples, tmp_path, stop_at_micro_batch=7)
    ckpt = tmp_path / "checkpoint"
    state = json.loads((ckpt / "state.json").read_text())
    assert find_checkpoint(ckpt, fingerprint="fp", plan=state["plan"]) is not None  # intact: used
    edit(state)
    (ckpt / "state.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert find_checkpoint(ckpt, fingerprint="fp", plan=state["plan"]) is None
    assert "checkpoint state.json was changed after it was written" in capsys.readouterr().err
    result = _train(_model(), examples, tmp_path)
    assert result.losses == pytest.approx(_train(_model(), examples, tmp_path / "ref").losses, abs=1e-6)


class _InfiniteGradient(torch.autograd.Function):
    """Identity forward; infinite gradient backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_nan_streak_stops_with_the_last_good_weights():
    model, examples = _model(), _examples()
    step = sft_step_fn(model, examples, pad_id=0, chunk_size=16, device="cpu")
    calls, after_good_steps = [0], {}

    def failing_step(batch):
        calls[0] += 1
        out = step(batch)
        if calls[0] <= 4:
            return out
        if calls[0] == 5:
            after_good_steps.update(_adapter(model))
        if calls[0] % 2:  # a non-finite loss ...
            return StepOutput(out.loss * float("nan"), out.tokens)
        return StepOutput(_InfiniteGradient.apply(out.loss), out.tokens)  # ... or finite, with infinite gradients

    cfg = SFTConfig(epochs=5, micro_batch_size=4, max_nonfinite_in_a_row=3, learning_rate=1e-2)
    with pytest.raises(NonFiniteStreak, match="3 non-finite losses or gradients in a row at optimizer step 7/30"):
        train_adapter(model, CPU, cfg, [8] * len(examples), failing_step, seed=0, stage="sft")
    assert calls[0] == 7
    for name, value in _adapter(model).items():  # the bad steps changed nothing
        assert torch.equal(value, after_good_steps[name]), name


def test_isolated_non_finite_steps_are_skipped_and_counted_not_fatal():
    model, examples = _model(), _examples()
    step = sft_step_fn(model, examples, pad_id=0, chunk_size=16, device="cpu")
    calls = [0]

    def sometimes_bad(batch):
        calls[0] += 1
        out = step(batch)
        return StepOutput(out.loss * float("inf"), out.tokens) if calls[0] % 3 == 0 else out

    result = train_adapter(model, CPU, SFTConfig(epochs=2, micro_batch_size=4, max_nonfinite_in_a_row=2),
                           [8] * len(examples), sometimes_bad, seed=0)
    assert result.skipped_micro_batches == 4 and result.optimizer_steps == 12 and len(result.losses) == 8
    assert all(torch.isfinite(v).all() for v in _adapter(model).values())


def _oom_when_larger_than(limit, step):
    def step_fn(batch):
        if len(batch) > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return step(batch)

    return step_fn


def test_oom_halves_the_micro_batch_keeping_the_effective_batch(capsys):
    examples = _examples(32)
    model = _model()
    initial = _adapter(model)
    step = _oom_when_larger_than(2, sft_step_fn(model, examples, pad_id=0, chunk_size=16, device="cpu"))
    cfg = SFTConfig(epochs=1, micro_batch_size=8, grad_accum_steps=1, learning_rate=1e-2)
    retries = []
    result, used = train_with_oom_retry(
        lambda c: train_adapter(model, CPU, c, [8] * len(examples), step, seed=0), model, cfg,
        allow_halving=True, stage="sft", advice=lambda: "", on_retry=lambda c: retries.append(c.micro_batch_size))
    assert (used.micro_batch_size, used.grad_accum_steps) == (2, 4) and retries == [4, 2]
    assert result.optimizer_steps == 4  # as many as the recipe's 8 x 1 would have made
    assert capsys.readouterr().err.count("CUDA out of memory") == 2

    # the retry started from the initial weights, not from a half-trained attempt
    direct = _model()
    for name, value in initial.items():
        assert torch.equal(dict(direct.named_parameters())[name], value)
    direct_step = sft_step_fn(direct, examples, pad_id=0, chunk_size=16, device="cpu")
    train_adapter(direct, CPU, used, [8] * len(examples), direct_step, seed=0)
    for name, value in _adapter(direct).items():
        torch.testing.assert_close(_adapter(model)[name], value, atol=1e-6, rtol=0)


def test_the_oom_retry_starts_from_the_initial_gradients_too():
    """Issue 20 item 2: the retry restored the adapter's weights but not their gradients, so a micro-batch
    backpropagated before the out-of-memory error was counted again in the retry's first step (first-step gradient
    0.49 relative error). Here the first attempt runs out of memory in the second micro-batch of its first window,
    after the first one's backward."""
    examples = _examples(32)
    model = _model()
    step = sft_step_fn(model, examples, pad_id=0, chunk_size=16, device="cpu")
    calls = [0]

    def oom_after_a_backward(batch):
        calls[0] += 1
        if calls[0] == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return step(batch)

    cfg = SFTConfig(epochs=1, micro_batch_size=4, grad_accum_steps=2, learning_rate=1e-2)
    result, used = train_with_oom_retry(
        lambda c: train_adapter(model, CPU, c, [8] * len(examples), oom_after_a_backward, seed=0), model, cfg,
        allow_halving=True, stage="sft", advice=lambda: "", on_retry=lambda c: None)
    assert (used.micro_batch_size, used.grad_accum_steps) == (2, 4) and result.optimizer_steps == 4
    direct = _model()
    train_adapter(direct, CPU, used, [8] * len(examples), sft_step_fn(direct, examples, pad_id=0, chunk_size=16,
                                                                      device="cpu"), seed=0)
    for name, value in _adapter(direct).items():
        torch.testing.assert_close(_adapter(model)[name], value, atol=1e-6, rtol=0)


def test_oom_without_halving_is_one_clear_error():
    model, examples = _model(), _examples()
    step = _oom_when_larger_than(2, sft_step_fn(model, examples, pad_id=0, chunk_size=16, device="cpu"))
    cfg = SFTConfig(micro_batch_size=4, oom_halving=False)
    with pytest.raises(UserError, match="sft: CUDA out of memory at micro_batch_size 4. lower it") as info:
        train_with_oom_retry(lambda c: train_adapter(model, CPU, c, [8] * len(examples), step, seed=0), model,
                             cfg, allow_halving=False, stage="sft", advice=lambda: "lower it",
                             on_retry=lambda c: None)
    assert "\n" not in str(info.value)


def test_generation_resumes_at_the_first_unanswered_batch_with_the_same_answers(tmp_path):
    from frugal_spin.tiny_base import TinyBaseSpec, build_model, build_tokenizer

    spec = TinyBaseSpec()
    tokenizer = build_tokenizer(spec)
    torch.manual_seed(0)
    model = build_model(spec, tokenizer).eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"{i} + {i * 7}"}],
                                             add_generation_prompt=True, return_dict=False) for i in range(10)]
    kwargs = dict(max_new_tokens=6, batch_size=3, temperature=1.0, seed=4)
    expected = generate_answers(model, tokenizer, prompts, **kwargs)

    log = AnswerLog(tmp_path / "answers.partial.jsonl", "fp")
    assert log.load() == {}
    seen = []

    def save_then_die(indices, answers):
        log.append(indices, answers)
        seen.append(indices)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_answers(model, tokenizer, prompts, answered=log.load(), on_answers=save_then_die, **kwargs)
    with open(log.path, "a") as f:
        f.write('{"i": 9, "ids": [1, 2')  # a line the kill cut short

    log = AnswerLog(log.path, "fp")
    answered = log.load()
    assert sorted(answered) == sorted(seen[0] + seen[1])
    regenerated = []
    resumed = generate_answers(model, tokenizer, prompts, answered=answered,
                               on_answers=lambda i, a: regenerated.append(i), **kwargs)
    assert resumed == expected
    assert len(regenerated) == 2 and not set(sum(regenerated, [])) & set(answered)  # 4 batches, 2 were done
    assert AnswerLog(log.path, "another recipe").load() == {}  # a stale log is discarded


def test_a_truncated_or_corrupt_output_makes_its_stage_run_again(tmp_path, capsys):
    store = StageStore(tmp_path)
    out = tmp_path / "iter_0" / "pairs.jsonl"
    out.parent.mkdir()
    out.write_text('{"a": 1}\n{"a": 2}\n')
    store.complete("iter_0.generate", "fp", "generate", {}, 1.0, outputs=[out])
    assert StageStore(tmp_path).completed("iter_0.generate", "fp") is not None

    out.write_text('{"a": 1}\n')
    assert StageStore(tmp_path).completed("iter_0.generate", "fp") is None
    assert "iter_0/pairs.jsonl is truncated or changed" in capsys.readouterr().err
    out.write_text('{"a": 1}\n{"a": 3}\n')  # same size, different bytes
    assert StageStore(tmp_path).completed("iter_0.generate", "fp") is None
    assert "corrupt" in capsys.readouterr().err
    out.unlink()
    assert StageStore(tmp_path).completed("iter_0.generate", "fp") is None


def test_cuda_oom_outside_training_is_one_line_naming_the_batch_size(tmp_path, monkeypatch, small_base_cache, capsys):
    from frugal_spin import tiny_base
    from frugal_spin.__main__ import main
    from frugal_spin.stages import opponent
    from conftest import SMALL_BASE

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setenv("FRUGAL_SPIN_CACHE", str(small_base_cache))
    monkeypatch.setattr(tiny_base, "_resolve_spec", lambda seed, spec: SMALL_BASE)
    monkeypatch.setattr(opponent, "generate_answers", out_of_memory)
    args = ["data.fraction=0.02", "data.eval_size=8", "sft.epochs=1", "generation.batch_size=7"]
    assert main([str(REPO / "recipes" / "cpu_tiny.yaml"), f"output_dir={tmp_path / 'run'}", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: CUDA out of memory in generation for anchor (generation.batch_size 7): lower "
                       "generation.batch_size (generation and scoring) or eval.batch_size; `python -m frugal_spin "
                       "plan RECIPE --gpu ...` estimates what fits")
    assert (tmp_path / "run" / "stages" / "sft.json").is_file()  # the finished stage is kept


def test_a_halved_micro_batch_is_remembered_across_a_crash(tmp_path, monkeypatch, small_base_cache, capsys):
    """OOM halves SFT's micro-batch 16 -> 8 -> 4; the run is then interrupted; the rerun starts at 4 (no new OOM)
    from the halved attempt's checkpoint, and the stage records the batching it used."""
    from conftest import SMALL_BASE
    from frugal_spin import tiny_base
    from frugal_spin.__main__ import main
    from frugal_spin.stages import sft

    real_step_fn, calls = sft.sft_step_fn, {"n": 0, "interrupt_at": 6}

    def small_memory_step_fn(*args, **kwargs):
        step = real_step_fn(*args, **kwargs)

        def step_with_limits(batch):
            if len(batch) > 4:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
            calls["n"] += 1
            if calls["n"] == calls["interrupt_at"]:
                raise KeyboardInterrupt
            return step(batch)

        return step_with_limits

    monkeypatch.setenv("FRUGAL_SPIN_CACHE", str(small_base_cache))
    monkeypatch.setattr(tiny_base, "_resolve_spec", lambda seed, spec: SMALL_BASE)
    monkeypatch.setattr(sft, "sft_step_fn", small_memory_step_fn)
    run_dir = tmp_path / "run"
    args = [str(REPO / "recipes" / "cpu_tiny.yaml"), f"output_dir={run_dir}", "data.fraction=0.02", "data.eval_size=8",
            "sft.epochs=1", "sft.micro_batch_size=16", "sft.checkpoint_every_steps=1", "spin.iterations=0"]
    assert main(args) == 130  # interrupted in the 4 x 4 attempt, after its first checkpoints
    assert capsys.readouterr().err.count("CUDA out of memory") == 2
    remembered = json.loads((run_dir / "sft" / "oom_batching.json").read_text())
    assert (remembered["micro_batch_size"], remembered["grad_accum_steps"]) == (4, 4)
    assert (run_dir / "sft" / "checkpoint").is_dir()

    calls["interrupt_at"] = -1
    calls["n"] = 0
    assert main(args) == 0
    assert "CUDA out of memory" not in capsys.readouterr().err
    # 40 examples = 10 micro-batches of 4; the checkpoint after step 1 (4 micro-batches) leaves 6 to run
    assert calls["n"] == 6
    sft = json.loads((run_dir / "stages" / "sft.json").read_text())["metrics"]
    assert (sft["micro_batch_size"], sft["grad_accum_steps"], sft["optimizer_steps"]) == (4, 4, 3)
    assert not (run_dir / "sft" / "oom_batching.json").exists() and not (run_dir / "sft" / "checkpoint").exists()
