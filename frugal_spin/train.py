"""The explicit training loop shared by SFT and SPIN, and the two per-batch loss computations.

Inputs: the model with its single trainable LoRA adapter, a `TrainConfig`, the lengths of the training items
(for length-grouped batching) and a step function that turns a list of item indices into a loss.
Output: the adapter trained in place, and a `TrainResult` (per-step losses and metrics, tokens, skipped steps).

Optimizer: bitsandbytes' paged 8-bit AdamW on CUDA (optimizer state ~2 bytes/param and pages out under memory
pressure), torch AdamW on the CPU. Scheduler: `transformers.get_scheduler`. fp16 (a T4) uses a GradScaler; LoRA
weights stay fp32 (peft's default), so the scaler can unscale their gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from frugal_spin.config import TrainConfig
from frugal_spin.data import Encoded, collate_sequences, length_grouped_batches
from frugal_spin.logprobs import sequence_logprobs
from frugal_spin.losses import sft_loss, spin_loss
from frugal_spin.model import Runtime, trainable_parameters


@dataclass
class StepOutput:
    loss: torch.Tensor
    tokens: int
    metrics: dict[str, float] = field(default_factory=dict)


StepFn = Callable[[list[int]], StepOutput]


@dataclass
class TrainResult:
    optimizer_steps: int = 0
    skipped_micro_batches: int = 0  # non-finite losses, not applied
    tokens: int = 0  # non-padding tokens forwarded (prompt and response)
    losses: list[float] = field(default_factory=list)  # mean loss per optimizer step
    metrics: dict[str, list[float]] = field(default_factory=dict)  # mean of each step metric per optimizer step

    def summary(self, last: int = 20) -> dict[str, float]:
        """Means over the last `last` optimizer steps: what the adapter ended the stage at."""
        tail = lambda xs: sum(xs[-last:]) / max(1, len(xs[-last:]))  # noqa: E731
        out = {"train_loss": tail(self.losses), "optimizer_steps": self.optimizer_steps,
               "skipped_micro_batches": self.skipped_micro_batches, "tokens": self.tokens}
        out.update({f"train_{k}": tail(v) for k, v in self.metrics.items()})
        return out


def plan_micro_batches(lengths: Sequence[int], cfg: TrainConfig, seed: int) -> list[list[int]]:
    """Length-grouped micro-batches for `cfg.epochs` epochs (a fractional last epoch takes a prefix)."""
    plan: list[list[int]] = []
    for epoch in range(math.ceil(cfg.epochs)):
        batches = length_grouped_batches(lengths, cfg.micro_batch_size, seed=seed + epoch)
        fraction = min(1.0, cfg.epochs - epoch)
        plan += batches[: max(1, round(fraction * len(batches)))]
    return plan


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, runtime: Runtime) -> torch.optim.Optimizer:
    if runtime.device.type == "cuda":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def train_adapter(
    model,
    runtime: Runtime,
    cfg: TrainConfig,
    lengths: Sequence[int],
    step_fn: StepFn,
    *,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
    trace_dir: Path | None = None,
    trace_steps: int = 3,
) -> TrainResult:
    """Run the optimizer over `cfg.epochs` of the items; `on_step(optimizer_step, loss)` reports progress.

    With `trace_dir`, a torch.profiler trace of `trace_steps` optimizer steps (after one skipped and one warm-up
    step) is written there in the TensorBoard plugin's format, a Chrome-trace JSON that Perfetto also opens."""
    from transformers import get_scheduler

    micro_batches = plan_micro_batches(lengths, cfg, seed)
    total_steps = math.ceil(len(micro_batches) / cfg.grad_accum_steps)
    params = trainable_parameters(model)
    optimizer = make_optimizer(params, cfg, runtime)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=round(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    scaler = torch.amp.GradScaler("cuda") if runtime.autocast_dtype == torch.float16 else None
    result = TrainResult()
    model.train()
    torch.manual_seed(seed)
    window_losses: list[float] = []
    window_metrics: dict[str, list[float]] = {}
    tracer = _tracer(trace_dir, trace_steps, runtime)
    for index, batch in enumerate(micro_batches):
        with torch.autocast(runtime.device.type, dtype=runtime.autocast_dtype or torch.float32,
                            enabled=runtime.autocast_dtype is not None), runtime.activation_offload():
            out = step_fn(batch)
        if not torch.isfinite(out.loss):
            result.skipped_micro_batches += 1
        else:
            loss = out.loss / cfg.grad_accum_steps
            (scaler.scale(loss) if scaler else loss).backward()
            window_losses.append(out.loss.item())
            for k, v in out.metrics.items():
                window_metrics.setdefault(k, []).append(v)
            result.tokens += out.tokens
        if (index + 1) % cfg.grad_accum_steps == 0 or index + 1 == len(micro_batches):
            if scaler:
                scaler.unscale_(optimizer)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            elif window_losses:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.optimizer_steps += 1
            if window_losses:
                result.losses.append(sum(window_losses) / len(window_losses))
                for k, v in window_metrics.items():
                    result.metrics.setdefault(k, []).append(sum(v) / len(v))
            if on_step is not None:
                on_step(result.optimizer_steps, result.losses[-1] if result.losses else float("nan"))
            window_losses, window_metrics = [], {}
            if tracer is not None:
                tracer.step()
    if tracer is not None:
        tracer.stop()
    model.eval()
    return result


def _tracer(trace_dir: Path | None, steps: int, runtime: Runtime):
    if trace_dir is None:
        return None
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runtime.device.type == "cuda" else [])
    tracer = profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=steps, repeat=1),
                     on_trace_ready=tensorboard_trace_handler(str(trace_dir)), record_shapes=True,
                     profile_memory=True, with_stack=False)
    tracer.start()
    return tracer


def total_optimizer_steps(n_items: int, cfg: TrainConfig) -> int:
    return math.ceil(len(plan_micro_batches([0] * n_items, cfg, 0)) / cfg.grad_accum_steps)


# ---------------------------------------------------------------- the two losses, per micro-batch


def sft_step_fn(model, examples: Sequence[Encoded], pad_id: int, chunk_size: int, device) -> StepFn:
    """Loss on response tokens only: the prompt is context, never a target."""

    def step(batch: list[int]) -> StepOutput:
        seqs = collate_sequences([(examples[i].prompt_ids, examples[i].answer_ids) for i in batch], pad_id).to(device)
        logps = sequence_logprobs(model, seqs.input_ids, seqs.attention_mask, seqs.response_mask,
                                  chunk_size=chunk_size)
        n_tokens = seqs.response_mask.sum(dim=1)
        return StepOutput(sft_loss(logps, n_tokens), int(seqs.attention_mask.sum()))

    return step


def spin_step_fn(
    model,
    prompts: Sequence[Sequence[int]],
    real: Sequence[Sequence[int]],
    generated: Sequence[Sequence[int]],
    opponent_real: torch.Tensor,
    opponent_generated: torch.Tensor,
    beta: float,
    pad_id: int,
    chunk_size: int,
    device,
) -> StepFn:
    """Player log-probs of the real and generated answers in one forward (2B sequences), against the cached
    opponent log-probs: no opponent forward pass, no reference model in memory.

    The prompt is not shared between the two answers: sharing it would need a custom attention mask (two answer
    branches over one prompt prefix) that SDPA/FlashAttention paths do not take from transformers models, and the
    prompts of SPIN data are short next to the answers, so the saving would be small.
    """

    def step(batch: list[int]) -> StepOutput:
        sequences = [(prompts[i], real[i]) for i in batch] + [(prompts[i], generated[i]) for i in batch]
        seqs = collate_sequences(sequences, pad_id).to(device)
        logps = sequence_logprobs(model, seqs.input_ids, seqs.attention_mask, seqs.response_mask,
                                  chunk_size=chunk_size)
        n = len(batch)
        out = spin_loss(logps[:n], logps[n:], opponent_real[batch].to(device), opponent_generated[batch].to(device),
                        beta)
        metrics = {"reward_margin": out.margins.mean().item(), "reward_accuracy": out.accuracy.item(),
                   "real_reward": out.real_rewards.mean().item(),
                   "generated_reward": out.generated_rewards.mean().item()}
        return StepOutput(out.loss, int(seqs.attention_mask.sum()), metrics)

    return step
