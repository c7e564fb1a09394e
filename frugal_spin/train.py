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
    # None: the step's `weight_of(batch)` (TrainingStep).
    weight: float | None = None


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


@dataclass(frozen=True)
class TrainingStep:
    """A step function with the weight each micro-batch has in its window (module docstring): what its loss is a
    mean over, known before the forward so the window's planned total W is too. `sft_step_fn` weighs response
    tokens, `spin_step_fn` pairs. `train_adapter` also takes a plain function of a micro-batch, whose planned
    weight is then its number of items."""
    run: Callable[[list[int]], StepOutput]
    weight_of: Callable[[list[int]], float] = len

    def __call__(self, batch: list[int]) -> StepOutput:
        return self.run(batch)


@dataclass
class MicroBatchResult:
    index: int  # in the plan: the one-process order of the numbers
    loss: float | None  # the micro-batch's mean loss; None when it was not finite (not backpropagated)
    metrics: dict[str, float]
    tokens: int
    weight: float


class AccumulationWindow:
    """The micro-batches of one optimizer step, and what they add up to.

    Micro-batch i contributes loss_i * w_i / W to the gradient, w_i its weight (`StepOutput.weight`, else the
    step's `weight_of`) and W the window's planned total; should the finite micro-batches weigh less than W
    (skips), the gradient is rescaled to their own total before the step. The step's recorded loss (and each step
    metric) is the same weighted mean. With several ranks, each runs its own micro-batches of the window and
    `gather` takes every rank's results in the one-process order."""

    def __init__(self, batches: list[list[int]], weight_of: Callable[[list[int]], float]):
        self.planned = max(1e-12, float(sum(weight_of(batch) for batch in batches)))
        self.weight_of = weight_of
        self.mine: list[MicroBatchResult] = []  # this rank's micro-batches
        self.weight, self.loss = 0.0, 0.0  # the finite micro-batches' total weight and weighted loss sum
        self.metrics: dict[str, list[float]] = {}

    def backward(self, index: int, batch: list[int], step: Callable[[list[int]], StepOutput], runtime: Runtime,
                 scaler: torch.amp.GradScaler | None, seed: int) -> None:
        """Micro-batch `index` of the plan: forward, and backward of its weighted loss unless it is not finite.
        Seeded by its index in the plan (LoRA dropout): the same draws on any rank and after a resume."""
        torch.manual_seed(seed * 1_000_003 + index)
        with runtime.autocast(), runtime.activation_offload():
            out = step(batch)
        if not torch.isfinite(out.loss):
            self.mine.append(MicroBatchResult(index, None, {}, 0, 0.0))
            return
        weight = float(out.weight if out.weight is not None else self.weight_of(batch))
        loss = out.loss * (weight / self.planned)
        (scaler.scale(loss) if scaler else loss).backward()
        self.mine.append(MicroBatchResult(index, out.loss.item(), out.metrics, out.tokens, weight))

    def gather(self, world, result: TrainResult) -> int:
        """Every rank's micro-batches of the window, in the one-process order, into the window's totals and
        `result`; returns how many had a non-finite loss."""
        bad = 0
        for micro in sorted(sum(world.gather(self.mine), []), key=lambda m: m.index):
            if micro.loss is None:
                result.skipped_micro_batches += 1
                bad += 1
                continue
            self.weight += micro.weight
            self.loss += micro.loss * micro.weight
            for k, v in micro.metrics.items():
                self.metrics.setdefault(k, []).append(v * micro.weight)
            result.tokens += micro.tokens
        return bad

    def step(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler | None, max_grad_norm: float, result: TrainResult) -> tuple[bool, bool]:
        """The optimizer step of the accumulated gradient, or a counted skip when the gradient norm is not finite.
        Returns (applied, whether a skip counts towards the non-finite streak: the fp16 GradScaler's own overflow
        skips while its scale is above 1 are it finding its scale, not a diverging run)."""
        if self.weight == 0:  # nothing was backpropagated: nothing to unscale, clip or step
            return False, False
        if scaler:
            scaler.unscale_(optimizer)
        if self.weight != self.planned:  # skipped micro-batches: renormalise to the ones that count
            with torch.no_grad():
                for param in params:
                    if param.grad is not None:
                        param.grad.mul_(self.planned / self.weight)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
        applied = bool(torch.isfinite(grad_norm))
        counts = False
        if not applied:
            result.skipped_optimizer_steps += 1
            if scaler is not None and scaler.get_scale() > 1.0:
                result.scaler_overflow_steps += 1  # the scaler searching its scale: routine
            else:
                counts = True
        if scaler:  # on a non-finite gradient the scaler skips the step itself and lowers its scale
            scaler.step(optimizer)
            scaler.update()
        elif applied:
            optimizer.step()
        result.losses.append(self.loss / self.weight)
        for k, v in self.metrics.items():
            result.metrics.setdefault(k, []).append(sum(v) / self.weight)
        return applied, counts


@dataclass(frozen=True)
class TrainingPlan:
    """The windows of `plan_windows` flattened into the micro-batches the loop runs, with each one's window and
    place in it (window position j of every optimizer step runs on rank j % N)."""
    windows: list[list[list[int]]]

    @property
    def micro_batches(self) -> list[list[int]]:
        return [batch for window in self.windows for batch in window]

    def locate(self) -> list[tuple[int, int]]:
        """(window, position in it) of every micro-batch."""
        return [(w, i) for w, window in enumerate(self.windows) for i in range(len(window))]


def train_adapter(model, runtime: Runtime, cfg: TrainConfig, lengths: Sequence[int],
                  step_fn: TrainingStep | Callable[[list[int]], StepOutput], *, seed: int,
                  on_step: Callable[[int, float], None] | None = None, trace_dir: Path | None = None,
                  trace_steps: int = 3, checkpoint_dir: Path | None = None, fingerprint: str = "",
                  stage: str = "training", on_log: Callable[[int, dict[str, float]], None] | None = None,
                  disable_dropout: bool = False) -> TrainResult:
    """Run the optimizer over `cfg.epochs` of the items, one `AccumulationWindow` per optimizer step;
    `on_step(optimizer_steps_done, loss)` reports progress, and `on_log(optimizer_steps_done, values)` receives
    each applied step's loss, learning rate, tokens/s and step metrics (for live curves, `live_log.py`).

    Faults: a micro-batch with a non-finite loss is not backpropagated, and an optimizer step with a non-finite
    gradient norm is not applied; both are counted, and the learning-rate schedule moves with the applied steps
    only. `cfg.max_nonfinite_in_a_row` such events without a good step in between raise `NonFiniteStreak` (the
    adapter then holds the last good weights: no bad step was applied); fp16 scaler overflows while its scale is
    above 1 do not count.

    Resume: with `checkpoint_dir`, the full training state is saved every `cfg.checkpoint_every_steps` optimizer
    steps, and a matching checkpoint found there at the start is restored, so a killed stage continues from its
    last checkpoint with the same data order, optimizer, scheduler, scaler and RNG state (`checkpoint.py`).

    Ranks (`distributed.py`): each optimizer step's window of `cfg.grad_accum_steps` micro-batches is dealt round
    robin over the ranks and the gradients are summed over them before clipping, so N ranks take the same steps as
    one process (same global batch, same micro-batches, same order of the logged numbers).

    `disable_dropout` (SPIN training): every dropout is off (`dropout_disabled`); `trace_dir`: see `_tracer`."""
    from transformers import get_scheduler

    from frugal_spin.checkpoint import plan_digest, save_checkpoint

    plan = TrainingPlan(plan_windows(lengths, cfg, seed))
    micro_batches, located, total = plan.micro_batches, plan.locate(), len(plan.windows)
    weight_of = step_fn.weight_of if isinstance(step_fn, TrainingStep) else len
    params = trainable_parameters(model)
    optimizer, scaler = make_optimizer(params, cfg, runtime), make_grad_scaler(runtime)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=round(cfg.warmup_ratio * total),
                              num_training_steps=total)
    model.train()
    torch.manual_seed(seed)
    digest = plan_digest(micro_batches)
    start, result = _resumed(checkpoint_dir, fingerprint, digest, model, optimizer, scheduler, scaler, on_step)
    bad_in_a_row, window, log = 0, None, _StepLog(on_log, result.tokens)
    tracer = _tracer(trace_dir, trace_steps, runtime)
    world = current_world()
    world.broadcast_params(params)
    with dropout_disabled(model) if disable_dropout else contextlib.nullcontext():
        for index in range(start, len(micro_batches)):
            w, position = located[index]
            window = window or AccumulationWindow(plan.windows[w], weight_of)
            if world.owns(position):
                window.backward(index, micro_batches[index], step_fn, runtime, scaler, seed)
            if position + 1 < len(plan.windows[w]):
                continue
            world.all_reduce_grads(params)  # the window's gradient summed over ranks: the one-process gradient
            bad_in_a_row += window.gather(world, result)
            applied, counts = window.step(params, optimizer, scaler, cfg.max_grad_norm, result)
            bad_in_a_row = 0 if applied else bad_in_a_row + counts
            lr = optimizer.param_groups[0]["lr"]  # the rate this step used, before the scheduler moves it
            if applied:  # a skipped step leaves the schedule where it is (and torch warns of it otherwise)
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.optimizer_steps += 1
            if window.weight > 0:
                log(result, lr)
            if bad_in_a_row >= cfg.max_nonfinite_in_a_row:
                raise NonFiniteStreak(f"{stage}: {bad_in_a_row} non-finite losses or gradients in a row at optimizer "
                                      f"step {result.optimizer_steps}/{total}; stopped (lower the learning rate, or "
                                      f"raise max_nonfinite_in_a_row)")
            if on_step is not None:
                on_step(result.optimizer_steps, result.losses[-1] if result.losses else float("nan"))
            window = None
            if tracer is not None:
                tracer.step()
            if (checkpoint_dir is not None and cfg.checkpoint_every_steps > 0 and index + 1 < len(micro_batches)
                    and result.optimizer_steps % cfg.checkpoint_every_steps == 0):
                world.write(save_checkpoint, checkpoint_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                            scaler=scaler, fingerprint=fingerprint, plan=digest, next_micro_batch=index + 1,
                            progress=asdict(result))
                crash_point(f"{stage}.checkpoint", result.optimizer_steps)
            crash_point(f"{stage}.step", result.optimizer_steps)
    if tracer is not None:
        tracer.stop()
    model.eval()
    return result


class _StepLog:
    """`on_log(optimizer_steps, values)` after a step that trained on something: its loss, learning rate, step
    metrics and the tokens/s since the previous such step."""

    def __init__(self, on_log: Callable[[int, dict[str, float]], None] | None, tokens: int):
        self.on_log, self.at, self.tokens = on_log, time.perf_counter(), tokens

    def __call__(self, result: TrainResult, lr: float) -> None:
        if self.on_log is None:
            return
        now = time.perf_counter()
        tokens_per_s = (result.tokens - self.tokens) / max(now - self.at, 1e-9)
        self.on_log(result.optimizer_steps, {"loss": result.losses[-1], "lr": lr, "tokens_per_s": tokens_per_s,
                                             **{k: v[-1] for k, v in result.metrics.items()}})
        self.at, self.tokens = now, result.tokens


def _resumed(checkpoint_dir: Path | None, fingerprint: str, digest: str, model, optimizer, scheduler, scaler,
             on_step) -> tuple[int, TrainResult]:
    """Where training starts: the first micro-batch and the progress so far (a matching checkpoint's, restored
    into the model, optimizer, scheduler and scaler), else 0 and nothing."""
    from frugal_spin.checkpoint import find_checkpoint, restore_checkpoint

    found = find_checkpoint(checkpoint_dir, fingerprint=fingerprint, plan=digest) if checkpoint_dir else None
    if found is None:
        return 0, TrainResult()
    restore_checkpoint(*found, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    result = TrainResult(**found[1]["progress"])
    if on_step is not None and result.optimizer_steps:
        on_step(result.optimizer_steps, result.losses[-1] if result.losses else float("nan"))
    return found[1]["next_micro_batch"], result


def train_with_oom_retry(train: Callable[[TrainConfig], TrainResult], model, cfg: TrainConfig, *,
                         allow_halving: bool, stage: str, advice: Callable[[], str],
                         on_retry: Callable[[TrainConfig], None]) -> tuple[TrainResult, TrainConfig]:
    """`train(cfg)`, and on CUDA out-of-memory either a clear error with what the planner suggests or, when the
    recipe allows it, the same stage again from its starting weights and gradients with half the micro-batch and
    twice the gradient accumulation (the same effective batch and number of optimizer steps); `on_retry(smaller)`
    runs before each retry (to drop the failed attempt's checkpoint and remember the smaller batching).

    The starting gradients are restored too (to none, as a stage starts): a micro-batch the failed attempt had
    already backpropagated would otherwise be counted again in the retry's first step."""
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
                    param.grad = None
        on_retry(smaller)
        cfg = smaller


def _tracer(trace_dir: Path | None, steps: int, runtime: Runtime):
    """With `trace_dir`, a torch.profiler trace of `steps` optimizer steps (after one skipped and one warm-up step),
    written there in the TensorBoard plugin's format, a Chrome-trace JSON that Perfetto also opens."""
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


def sft_step_fn(model, examples: Sequence[Encoded], pad_id: int, chunk_size: int, device) -> TrainingStep:
    """Loss on response tokens only: the prompt is context, never a target."""

    def step(batch: list[int]) -> StepOutput:
        seqs = collate_sequences([(examples[i].prompt_ids, examples[i].answer_ids) for i in batch], pad_id).to(device)
        logps = sequence_logprobs(model, seqs.input_ids, seqs.attention_mask, seqs.response_mask,
                                  chunk_size=chunk_size)
        n_tokens = seqs.response_mask.sum(dim=1)
        return StepOutput(sft_loss(logps, n_tokens), int(seqs.attention_mask.sum()), weight=float(n_tokens.sum()))

    # The loss is a mean over response tokens: a micro-batch weighs its response tokens in the window.
    return TrainingStep(step, weight_of=lambda batch: sum(len(examples[i].answer_ids) for i in batch))


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
) -> TrainingStep:
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
    return TrainingStep(step, weight_of=len)
