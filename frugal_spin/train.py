"""The explicit training loop shared by SFT and SPIN, and the two per-batch loss computations.

Inputs: the model with its single trainable LoRA adapter, a `TrainConfig`, the lengths of the training items
(for length-grouped batching) and a step function that turns a list of item indices into a loss.
Output: the adapter trained in place, and a `TrainResult` (per-step losses and metrics, tokens, skipped steps).

Optimizer: bitsandbytes' paged 8-bit AdamW on CUDA (optimizer state ~2 bytes/param and pages out under memory
pressure), torch AdamW on the CPU. Scheduler: `transformers.get_scheduler`. fp16 (a T4) uses a GradScaler; LoRA
weights stay fp32 (peft's default), so the scaler can unscale their gradients.

Gradient accumulation. An optimizer step's gradient is that of the mean loss over its whole *window* (the
`grad_accum_steps` micro-batches it accumulates), each micro-batch weighted by what its loss averages over: its
response tokens for SFT (so every token of the window weighs the same, as if the window were one batch; the fix
transformers made in 2024), its pairs for SPIN (the SPIN loss is a mean over pairs: every pair weighs the same,
whatever the lengths of its answers). So any split of a window into micro-batches gives the same gradient, also
for the last, partial window, for a window with skipped (non-finite) micro-batches, whose remaining ones are
renormalised to their own total, and after an OOM retry, which splits the same windows into twice as many
micro-batches (`plan_windows`).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from frugal_spin.config import TrainConfig
from frugal_spin.data import Encoded, collate_sequences, length_grouped_batches
from frugal_spin.distributed import current as current_world
from frugal_spin.errors import UserError
from frugal_spin.faults import crash_point
from frugal_spin.logprobs import sequence_logprobs
from frugal_spin.losses import sft_loss, spin_loss
from frugal_spin.model import Runtime, trainable_parameters
from frugal_spin.shared_prompt import packs_pairs, pair_logprobs, pair_tokens


@dataclass
class StepOutput:
    loss: torch.Tensor  # the micro-batch's mean loss
    tokens: int  # tokens forwarded (for tokens/s)
    metrics: dict[str, float] = field(default_factory=dict)
    # What `loss` is a mean over (response tokens for SFT, pairs for SPIN): the micro-batch's weight in its window.
    # None: `weight_of(batch)` of the step function (see `train_adapter`).
    weight: float | None = None


StepFn = Callable[[list[int]], StepOutput]


@dataclass
class TrainResult:
    optimizer_steps: int = 0
    skipped_micro_batches: int = 0  # non-finite losses, not applied
    skipped_optimizer_steps: int = 0  # non-finite gradient norms, not applied
    scaler_overflow_steps: int = 0  # of those, fp16 GradScaler overflows while it searched its scale (routine)
    tokens: int = 0  # non-padding tokens forwarded (prompt and response)
    losses: list[float] = field(default_factory=list)  # mean loss per optimizer step
    metrics: dict[str, list[float]] = field(default_factory=dict)  # mean of each step metric per optimizer step

    def summary(self, last: int = 20) -> dict[str, float]:
        """Means over the last `last` optimizer steps: what the adapter ended the stage at."""
        tail = lambda xs: sum(xs[-last:]) / max(1, len(xs[-last:]))  # noqa: E731
        out = {"train_loss": tail(self.losses), "optimizer_steps": self.optimizer_steps,
               "skipped_micro_batches": self.skipped_micro_batches,
               "skipped_optimizer_steps": self.skipped_optimizer_steps,
               "scaler_overflow_steps": self.scaler_overflow_steps, "tokens": self.tokens}
        out.update({f"train_{k}": tail(v) for k, v in self.metrics.items()})
        return out


# A training stage plans at most this many optimizer steps: the plan (every micro-batch's items) is built in memory,
# and a recipe asking for more is a typo (sft.epochs=1e12 took forever to plan, then would have taken forever to
# train). train_stage.py checks it first with the recipe key in its message.
MAX_OPTIMIZER_STEPS = 1_000_000


def count_optimizer_steps(n_items: int, cfg: TrainConfig) -> int:
    """len(plan_windows(...)) for `n_items` items, by arithmetic (nothing is planned): with G = ceil(n_items /
    (micro_batch_size x grad_accum_steps)) windows per epoch and E = cfg.epochs,

        steps = (ceil(E) - 1) * G + min(G, max(1, round((E - (ceil(E) - 1)) * G)))     (0 when G = 0)"""
    per_epoch = math.ceil(n_items / (cfg.micro_batch_size * cfg.grad_accum_steps))
    if per_epoch == 0:
        return 0
    last = math.ceil(cfg.epochs) - 1
    return last * per_epoch + min(per_epoch, max(1, round(min(1.0, cfg.epochs - last) * per_epoch)))


def plan_windows(lengths: Sequence[int], cfg: TrainConfig, seed: int) -> list[list[list[int]]]:
    """One accumulation window (a list of micro-batches of item indices) per optimizer step, for `cfg.epochs`
    epochs (a fractional last epoch takes a prefix of its windows).

    Windows of micro_batch_size x grad_accum_steps items are grouped by length, then cut into micro-batches in
    length order; the last window of an epoch may be short. The windows depend on the product only, so halving the
    micro-batch and doubling the accumulation (the OOM retry) splits the very same windows finer. With
    grad_accum_steps 1 this is the length-grouped batching itself."""
    steps = count_optimizer_steps(len(lengths), cfg)
    if steps > MAX_OPTIMIZER_STEPS:
        raise UserError(f"epochs={cfg.epochs:g} plans {steps:,} optimizer steps over {len(lengths):,} items, more than "
                        f"the {MAX_OPTIMIZER_STEPS:,} one training stage may plan; lower epochs")
    micro = cfg.micro_batch_size
    windows: list[list[list[int]]] = []
    for epoch in range(math.ceil(cfg.epochs)):
        groups = length_grouped_batches(lengths, micro * cfg.grad_accum_steps, seed=seed + epoch)
        fraction = min(1.0, cfg.epochs - epoch)
        for group in groups[: max(1, round(fraction * len(groups)))]:
            windows.append([group[i: i + micro] for i in range(0, len(group), micro)])
    return windows


def plan_micro_batches(lengths: Sequence[int], cfg: TrainConfig, seed: int) -> list[list[int]]:
    """The micro-batches of `plan_windows`, in order."""
    return [batch for window in plan_windows(lengths, cfg, seed) for batch in window]


def make_grad_scaler(runtime: Runtime) -> torch.amp.GradScaler | None:
    """A GradScaler exactly when the loop trains under fp16 autocast (`Runtime.needs_grad_scaler`)."""
    return torch.amp.GradScaler(runtime.device.type) if runtime.needs_grad_scaler else None


@contextlib.contextmanager
def dropout_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Every dropout of the model off (LoRA's and the base's: `nn.Dropout` modules and float `attention_dropout`
    / `attn_dropout` / `dropout` attributes that attention implementations read in training mode), restored
    afterwards. SPIN training needs it: the opponent's cached log-probs were scored without dropout, so with it
    the player's step-0 log-probs would differ from the cache and the step-0 loss from log 2 (TRL's DPO trainer
    calls `disable_dropout` for the same reason)."""
    saved: list[tuple[object, str, float]] = []
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            saved.append((module, "p", module.p))
            module.p = 0.0
        for name in ("attention_dropout", "attn_dropout", "dropout"):
            value = getattr(module, name, None)
            if isinstance(value, float) and not isinstance(value, bool) and value > 0:
                saved.append((module, name, value))
                setattr(module, name, 0.0)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, runtime: Runtime) -> torch.optim.Optimizer:
    if runtime.device.type == "cuda":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


class NonFiniteStreak(UserError):
    """Too many non-finite losses or gradients in a row: training cannot recover by skipping steps."""


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
    checkpoint_dir: Path | None = None,
    fingerprint: str = "",
    stage: str = "training",
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    disable_dropout: bool = False,
) -> TrainResult:
    """Run the optimizer over `cfg.epochs` of the items; `on_step(optimizer_steps_done, loss)` reports progress,
    and `on_log(optimizer_steps_done, values)` receives each applied step's loss, learning rate, tokens/s and step
    metrics (for live curves, `live_log.py`).

    Accumulation (module docstring): micro-batch i of a window contributes loss_i * w_i / W to the gradient, w_i its
    `StepOutput.weight` and W the window's planned total, `step_fn.weight_of(batch)` summed over the window's
    micro-batches (default: the number of items); should the finite micro-batches weigh less than W (skips), the
    gradient is rescaled to their own total before the step. The per-step loss recorded is the same weighted mean.

    Faults: a micro-batch with a non-finite loss is not backpropagated, and an optimizer step with a non-finite
    gradient norm is not applied; both are counted. `cfg.max_nonfinite_in_a_row` such events without a good step
    in between raise `NonFiniteStreak` (the adapter then holds the last good weights: no bad step was applied).
    Under fp16 the GradScaler's own overflow skips while its scale is above 1 are the scaler finding its scale, not
    a diverging run: they are counted (`scaler_overflow_steps`) but not towards the streak.

    `disable_dropout` (SPIN training): every dropout of the model is off while training (`dropout_disabled`).

    Resume: with `checkpoint_dir`, the full training state is saved every `cfg.checkpoint_every_steps` optimizer
    steps, and a matching checkpoint found there at the start is restored, so a killed stage continues from its
    last checkpoint with the same data order, optimizer, scheduler, scaler and RNG state (`checkpoint.py`).

    Ranks (`distributed.py`): each optimizer step's window of `cfg.grad_accum_steps` micro-batches is dealt round
    robin over the ranks and the gradients are summed over them before clipping, so N ranks take the same steps as
    one process (same global batch, same micro-batches, same order of the logged numbers); each micro-batch is
    seeded by its index in the plan.

    With `trace_dir`, a torch.profiler trace of `trace_steps` optimizer steps (after one skipped and one warm-up
    step) is written there in the TensorBoard plugin's format, a Chrome-trace JSON that Perfetto also opens."""
    from transformers import get_scheduler

    from frugal_spin.checkpoint import find_checkpoint, plan_digest, restore_checkpoint, save_checkpoint

    windows = plan_windows(lengths, cfg, seed)
    micro_batches = [batch for window in windows for batch in window]
    window_of: list[int] = [w for w, window in enumerate(windows) for _ in window]
    total_steps = len(windows)
    weight_of: Callable[[list[int]], float] = getattr(step_fn, "weight_of", len)
    params = trainable_parameters(model)
    optimizer = make_optimizer(params, cfg, runtime)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=round(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    scaler = make_grad_scaler(runtime)
    result = TrainResult()
    model.train()
    torch.manual_seed(seed)
    start = 0
    plan = plan_digest(micro_batches)
    found = find_checkpoint(checkpoint_dir, fingerprint=fingerprint, plan=plan) if checkpoint_dir else None
    if found is not None:
        restore_checkpoint(*found, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        start = found[1]["next_micro_batch"]
        result = TrainResult(**found[1]["progress"])
        if on_step is not None and result.optimizer_steps:
            on_step(result.optimizer_steps, result.losses[-1] if result.losses else float("nan"))
    planned = 0.0  # the current window's planned total weight W
    window_weight, window_loss = 0.0, 0.0  # its finite micro-batches' total weight and weighted loss sum
    window_metrics: dict[str, list[float]] = {}
    bad_in_a_row = 0
    tracer = _tracer(trace_dir, trace_steps, runtime)
    logged_at, logged_tokens = time.perf_counter(), result.tokens
    world = current_world()  # with N ranks, window position j of every optimizer step runs on rank j % N
    world.broadcast_params(params)
    position = [i for window in windows for i in range(len(window))]  # a micro-batch's place in its window
    # (index, loss or None if not finite, metrics, tokens, weight) of this rank's micro-batches of the window
    mine: list[tuple[int, float | None, dict[str, float], int, float]] = []
    dropout = dropout_disabled(model) if disable_dropout else contextlib.nullcontext()
    with dropout:
        for index in range(start, len(micro_batches)):
            window = windows[window_of[index]]
            if index == 0 or window_of[index - 1] != window_of[index] or index == start:
                planned = max(1e-12, float(sum(weight_of(batch) for batch in window)))
            if world.owns(position[index]):
                # Seeded by the micro-batch's global index (LoRA dropout): the same draws on any rank and after a
                # resume.
                torch.manual_seed(seed * 1_000_003 + index)
                with runtime.autocast(), runtime.activation_offload():
                    out = step_fn(micro_batches[index])
                if not torch.isfinite(out.loss):
                    mine.append((index, None, {}, 0, 0.0))
                else:
                    weight = float(out.weight if out.weight is not None else weight_of(micro_batches[index]))
                    loss = out.loss * (weight / planned)
                    (scaler.scale(loss) if scaler else loss).backward()
                    mine.append((index, out.loss.item(), out.metrics, out.tokens, weight))
            if index + 1 < len(micro_batches) and window_of[index + 1] == window_of[index]:
                continue
            world.all_reduce_grads(params)  # the window's gradient summed over ranks: the one-process gradient
            # Every rank's micro-batches of the window in the one-process order, so the step's numbers are too.
            for _, micro_loss, micro_metrics, micro_tokens, weight in sorted(sum(world.gather(mine), []),
                                                                             key=lambda m: m[0]):
                if micro_loss is None:
                    result.skipped_micro_batches += 1
                    bad_in_a_row += 1
                    continue
                window_weight += weight
                window_loss += micro_loss * weight
                for k, v in micro_metrics.items():
                    window_metrics.setdefault(k, []).append(v * weight)
                result.tokens += micro_tokens
            mine = []
            # End of the window: one optimizer step (or a counted skip).
            if window_weight > 0:  # else nothing was backpropagated: nothing to unscale, clip or step
                if scaler:
                    scaler.unscale_(optimizer)
                if window_weight != planned:  # skipped micro-batches: renormalise to the ones that count
                    with torch.no_grad():
                        for param in params:
                            if param.grad is not None:
                                param.grad.mul_(planned / window_weight)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0
                                                           else float("inf"))
                if not torch.isfinite(grad_norm):
                    result.skipped_optimizer_steps += 1
                    if scaler is not None and scaler.get_scale() > 1.0:
                        result.scaler_overflow_steps += 1  # the scaler searching its scale: routine
                    else:
                        bad_in_a_row += 1
                    if scaler:  # the scaler skips the step itself and lowers its scale
                        scaler.step(optimizer)
                        scaler.update()
                else:
                    if scaler:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    bad_in_a_row = 0
                result.losses.append(window_loss / window_weight)
                for k, v in window_metrics.items():
                    result.metrics.setdefault(k, []).append(sum(v) / window_weight)
            lr = optimizer.param_groups[0]["lr"]  # the rate this step used, before the scheduler moves it
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.optimizer_steps += 1
            if window_weight > 0 and on_log is not None:
                now = time.perf_counter()
                on_log(result.optimizer_steps, {
                    "loss": result.losses[-1], "lr": lr,
                    "tokens_per_s": (result.tokens - logged_tokens) / max(now - logged_at, 1e-9),
                    **{k: v[-1] for k, v in result.metrics.items()}})
                logged_at, logged_tokens = now, result.tokens
            if bad_in_a_row >= cfg.max_nonfinite_in_a_row:
                raise NonFiniteStreak(
                    f"{stage}: {bad_in_a_row} non-finite losses or gradients in a row at optimizer step "
                    f"{result.optimizer_steps}/{total_steps}; stopped (lower the learning rate, or raise "
                    f"max_nonfinite_in_a_row)")
            if on_step is not None:
                on_step(result.optimizer_steps, result.losses[-1] if result.losses else float("nan"))
            window_weight, window_loss, window_metrics = 0.0, 0.0, {}
            if tracer is not None:
                tracer.step()
            if (checkpoint_dir is not None and cfg.checkpoint_every_steps > 0 and index + 1 < len(micro_batches)
                    and result.optimizer_steps % cfg.checkpoint_every_steps == 0):
                world.write(save_checkpoint, checkpoint_dir, model=model, optimizer=optimizer,
                            scheduler=scheduler, scaler=scaler, fingerprint=fingerprint, plan=plan,
                            next_micro_batch=index + 1, progress=asdict(result))
                crash_point(f"{stage}.checkpoint", result.optimizer_steps)
            crash_point(f"{stage}.step", result.optimizer_steps)
    if tracer is not None:
        tracer.stop()
    model.eval()
    return result


def train_with_oom_retry(train: Callable[[TrainConfig], TrainResult], model, cfg: TrainConfig, *,
                         allow_halving: bool, stage: str, advice: Callable[[], str],
                         on_retry: Callable[[TrainConfig], None]) -> tuple[TrainResult, TrainConfig]:
    """`train(cfg)`, and on CUDA out-of-memory either a clear error with what the planner suggests or, when the
    recipe allows it, the same stage again from its starting weights with half the micro-batch and twice the
    gradient accumulation (the same effective batch and number of optimizer steps); `on_retry(smaller_cfg)` runs
    before each retry (to drop the failed attempt's checkpoint and remember the smaller batching)."""
    initial = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
    while True:
        try:
            return train(cfg), cfg
        except torch.cuda.OutOfMemoryError:
            pass
        # Out of the except block, so the exception's frames (and the activations they hold) are released.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        ranks = current_world().size  # one rank cannot change the batching alone: halving is for one process
        if not allow_halving or cfg.micro_batch_size == 1 or ranks > 1:
            raise UserError(f"{stage}: CUDA out of memory at micro_batch_size {cfg.micro_batch_size}"
                            f"{f' on one of {ranks} ranks' if ranks > 1 else ''}. {advice()}")
        smaller = replace(cfg, micro_batch_size=cfg.micro_batch_size // 2,
                          grad_accum_steps=cfg.grad_accum_steps * 2)
        from frugal_spin.ui import warn

        warn(f"{stage}: CUDA out of memory at micro_batch_size {cfg.micro_batch_size}; retrying the stage with "
             f"{smaller.micro_batch_size} x {smaller.grad_accum_steps} accumulation steps (same effective batch)")
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in initial:
                    param.copy_(initial[name])
        on_retry(smaller)
        cfg = smaller


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
    return count_optimizer_steps(n_items, cfg)


# ---------------------------------------------------------------- the two losses, per micro-batch


def sft_step_fn(model, examples: Sequence[Encoded], pad_id: int, chunk_size: int, device) -> StepFn:
    """Loss on response tokens only: the prompt is context, never a target."""

    def step(batch: list[int]) -> StepOutput:
        seqs = collate_sequences([(examples[i].prompt_ids, examples[i].answer_ids) for i in batch], pad_id).to(device)
        logps = sequence_logprobs(model, seqs.input_ids, seqs.attention_mask, seqs.response_mask,
                                  chunk_size=chunk_size)
        n_tokens = seqs.response_mask.sum(dim=1)
        return StepOutput(sft_loss(logps, n_tokens), int(seqs.attention_mask.sum()), weight=float(n_tokens.sum()))

    # The loss is a mean over response tokens: a micro-batch weighs its response tokens in the window.
    step.weight_of = lambda batch: sum(len(examples[i].answer_ids) for i in batch)
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
    loss: str = "sigmoid",
) -> StepFn:
    """Player log-probs of the real and generated answers in one forward, against the cached
    opponent log-probs: no opponent forward pass, no reference model in memory. `loss` names the member of the
    SPIN loss family (`losses.SPIN_LOSSES`, the recipe's `spin.loss`).

    On the CPU the two answers share one copy of the prompt where that pays (`shared_prompt.packs_pairs`: x+y+y'
    with a mask that keeps y' from seeing y), as the opponent's scoring does; elsewhere they are 2B sequences.
    """

    def step(batch: list[int]) -> StepOutput:
        triples = [(prompts[i], real[i], generated[i]) for i in batch]
        player_real, player_generated = pair_logprobs(model, triples, pad_id, chunk_size)
        shared = packs_pairs(model, triples)
        out = spin_loss(player_real, player_generated, opponent_real[batch].to(device),
                        opponent_generated[batch].to(device), beta, loss)
        metrics = {"reward_margin": out.margins.mean().item(), "reward_accuracy": out.accuracy.item(),
                   "real_reward": out.real_rewards.mean().item(),
                   "generated_reward": out.generated_rewards.mean().item()}
        return StepOutput(out.loss, pair_tokens(triples, shared), metrics, weight=float(len(batch)))

    # The SPIN loss is a mean over pairs: a micro-batch weighs its pairs in the window, whatever their lengths.
    step.weight_of = len
    return step
