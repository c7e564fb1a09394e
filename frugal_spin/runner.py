"""The stage runner: the marker protocol, written once for every stage of every plan.

`run_stage(ctx, store, spec, work, inputs)` does, for one `StageSpec` (plan.py):

1. the stage's fingerprint, from its inputs' fingerprints and its settings (`work.fingerprint`);
2. completed? A marker with this fingerprint and intact outputs (stage_store.py) means the stage is skipped;
3. reuse? Given a `shared` store (a compare arm reading its seed run), a stage finished there with the same
   fingerprint is copied, with its record (its cost is the arm's cost too) and where it came from;
4. the work (`work.run`, on every rank), measured (wall time, peak memory: profiler.py);
5. on rank 0 (`world.write`, then a barrier): the outputs written (`Outcome.write`), the crash point
   `<name>.written`, the marker (kind, iteration, metrics, outputs' hashes; tokens/s added where tokens are
   counted), then the working files removed (`Outcome.cleanup`: checkpoints, answer logs).

So an interrupted stage has no marker and is redone; a finished one is never redone, whatever it is. A stage's
work is a `Work`: its fingerprint function and its work function, given a `Job` (the context, the store, the spec,
its inputs by role as `Finished` stages, and once known its fingerprint).

CUDA running out of memory outside training (which halves its own batch: train_stage.py) is one line naming what
ran out and its batch size: the work wraps each part in `out_of_memory_in(what)`.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from frugal_spin import ui
from frugal_spin.context import RunContext
from frugal_spin.errors import UserError
from frugal_spin.faults import crash_point
from frugal_spin.io import copy_file
from frugal_spin.plan import TRAIN_KINDS, WRITTEN, StageSpec
from frugal_spin.profiler import StageMeter
from frugal_spin.stage_store import StageStore


@dataclass(frozen=True)
class Finished:
    """A stage that has finished (now or in an earlier run) under `root`, with the fingerprint it finished with."""
    spec: StageSpec
    fp: str
    root: Path

    def path(self, i: int = 0) -> Path:
        """Its i-th output."""
        return self.root / self.spec.outputs[i]


@dataclass(frozen=True)
class Job:
    """One stage to run: what its fingerprint and work functions are given."""
    ctx: RunContext
    store: StageStore
    spec: StageSpec
    inputs: Mapping[str, Finished]  # by role (StageSpec.inputs)
    fp: str = ""  # known once `Work.fingerprint` has run

    def output(self, i: int = 0) -> Path:
        return self.ctx.root / self.spec.outputs[i]

    @property
    def folder(self) -> Path:
        """The stage's own folder for working files (checkpoints, answer logs), under this plan's root."""
        return self.ctx.root / self.spec.folder

    @property
    def label(self) -> str:
        """The stage's name on progress bars: with the arm's directory when it runs in one."""
        name = self.spec.name.replace(".", " ")
        return name if self.ctx.root == self.ctx.run_dir else f"{self.ctx.root.name} {name}"

    def steps_done(self) -> int:
        """Optimizer steps of this store's finished training stages: the live curves' step offset (from the
        markers, so a resumed run logs at the same steps as an uninterrupted one)."""
        return sum(int(r["metrics"].get("optimizer_steps", 0)) for r in self.store.records()
                   if r["kind"] in TRAIN_KINDS)


def _nothing() -> None:
    pass


@dataclass
class Outcome:
    """What a stage's work hands the runner: the record's metrics, and what rank 0 writes before the marker
    (the outputs) and removes after it (the working files)."""
    metrics: dict[str, Any]
    write: Callable[[], None] = field(default=_nothing)
    cleanup: Callable[[], None] = field(default=_nothing)


@dataclass(frozen=True)
class Work:
    fingerprint: Callable[[Job], str]
    run: Callable[[Job], Outcome]


def run_stage(ctx: RunContext, store: StageStore, spec: StageSpec, work: Work, inputs: Mapping[str, Finished],
              shared: StageStore | None = None) -> Finished:
    """Run one stage unless it finished already (module docstring); return it as finished."""
    job = Job(ctx, store, spec, inputs)
    job = replace(job, fp=work.fingerprint(job))
    done = Finished(spec, job.fp, ctx.root)
    if store.completed(spec.name, job.fp):
        ui.note(f"[dim]{ui.escape(job.label)}: complete, skipped[/dim]")
        return done
    if shared is not None and _reuse(job, shared):
        return done
    with StageMeter(ctx.runtime.device) as meter:
        outcome = work.run(job)
    metrics = dict(outcome.metrics)
    if "tokens" in metrics and "tokens_per_s" not in metrics:
        metrics["tokens_per_s"] = metrics["tokens"] / max(meter.wall_s, 1e-9)

    def finish() -> None:
        outcome.write()
        crash_point(spec.point(WRITTEN))
        store.complete(spec.name, job.fp, spec.kind, {**metrics, **meter.memory}, meter.wall_s,
                       outputs=[job.output(i) for i in range(len(spec.outputs))], iteration=spec.iteration)
        outcome.cleanup()

    ctx.world.write(finish)
    return done


def _reuse(job: Job, shared: StageStore) -> bool:
    """Take a finished stage with this fingerprint from the shared store (the seed run of a loss arm): copy its
    outputs to the same places under this store and record it with the original metrics and wall time (the cost
    of producing it, which every arm's budget includes), plus where it came from. False when there is nothing to
    take."""
    spec, store = job.spec, job.store
    record = shared.peek(spec.name, job.fp)
    if record is None:
        return False
    source = os.path.relpath(shared.run_dir / spec.folder, store.run_dir)  # "../iter_0"

    def finish() -> None:
        for rel in spec.outputs:
            copy_file(shared.run_dir / rel, store.run_dir / rel)
        store.complete(spec.name, job.fp, record["kind"], {**record["metrics"], "reused_from": source},
                       record["wall_time_s"], outputs=[store.run_dir / rel for rel in spec.outputs],
                       iteration=record["iteration"])

    job.ctx.world.write(finish)
    ui.note(f"[dim]{ui.escape(job.label)}: same as the seed run's (fingerprint {job.fp}), copied[/dim]")
    return True


@contextmanager
def out_of_memory_in(what: str) -> Iterator[None]:
    """CUDA out of memory in the block becomes one line naming `what` ran out (with its batch size) and what to
    lower. The error is raised outside the `except`, so the failed block's frames (and activations) are freed."""
    failed = False
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        failed = True
    if failed:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise UserError(f"CUDA out of memory in {what}: lower generation.batch_size (generation and scoring) or "
                        f"eval.batch_size; `python -m frugal_spin plan RECIPE --gpu ...` estimates what fits")
