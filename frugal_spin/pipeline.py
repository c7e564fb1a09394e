"""A run: checks, the run directory, setup, then every stage of the plan in order, then the report.

Input: a validated `Recipe`. Output: the run directory (see README, "What a run directory holds").

    check_before_loading   the output directory, model and data references (what --dry-run applies too)
    preflight              the tokenizer, LoRA targets and every data row (preflight.py)
    prepared_run_dir       the directory locked and recipe.yaml written: writing starts here
    start_run              setup: the frozen context (context.py) and the setup record
    execute_plan           every other stage of plan(recipe) through the stage runner (runner.py): a finished stage
                           is skipped, its outputs read back from disk; every adapter a stage uses is loaded from
                           its saved files, so what is on disk is exactly what was used
    report_run             the summary table and report.md (report.py)

`compare` (compare/) runs the same pieces: the seed run, then its arms as plans under other roots.
"""

from __future__ import annotations

import random
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch

from frugal_spin import ui
from frugal_spin.config import Recipe, dump_recipe
from frugal_spin.context import RunContext, build_context
from frugal_spin.distributed import current as current_world
from frugal_spin.errors import UserError
from frugal_spin.faults import crash_point
from frugal_spin.io import DiskFullError, disk_full_message, is_disk_full, write_text
from frugal_spin.model import resolve_runtime
from frugal_spin.plan import WRITTEN, StageSpec, plan
from frugal_spin.preflight import Checked, preflight
from frugal_spin.profiler import StageMeter
from frugal_spin.report import render_report
from frugal_spin.rundir import check_output_dir, open_run_dir, run_entries
from frugal_spin.runner import Finished, run_stage
from frugal_spin.stage_store import StageStore
from frugal_spin.stages import WORK
from frugal_spin.threads import apply_threads

Done = dict[str, Finished]  # the stages finished so far, by name: what later stages' inputs are looked up in


@contextmanager
def prepared_run_dir(recipe: Recipe, restart: bool = False, allow_existing: bool = False):
    """The run directory, locked for the block (rundir.py): an earlier run's outputs removed with `restart`, and
    `recipe.yaml` written. Call it only once every check has passed (preflight.py): this is where writing starts."""
    with open_run_dir(Path(recipe.output_dir), restart, allow_existing, run_entries(recipe)) as run_dir:
        try:
            write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
        except OSError as exc:
            raise UserError(f"output_dir {run_dir} is not writable: {exc.strerror or exc}") from None
        yield run_dir


def check_before_loading(recipe: Recipe, restart: bool = False, allow_existing: bool = False) -> None:
    """The checks of a run that load no weights and no data, in the order the run applies them: the output directory
    (read-only: rundir.check_output_dir), then the references to the model, data and loggers, and a local model
    directory's files (headers and config only) or a hub id's form. `--dry-run` applies exactly these; the run then goes on to
    preflight.py (the tokenizer, LoRA targets and every data row). What this machine lacks (a GPU the recipe asks
    for) is the run's refusal alone: a recipe may be checked on another machine than it runs on."""
    from frugal_spin.data import check_dataset_reference
    from frugal_spin.live_log import check_log_backends
    from frugal_spin.model_source import check_model_reference, local_model_dir, model_source
    from frugal_spin.preflight import check_hub_id, check_model_dir

    check_output_dir(Path(recipe.output_dir), restart, allow_existing, run_entries(recipe))
    check_dataset_reference(recipe.data)
    check_model_reference(recipe.model)
    check_log_backends(recipe.log)
    local = local_model_dir(recipe.model)
    if local is not None:
        check_model_dir(local, recipe.model.trust_remote_code)
    elif model_source(recipe.model).kind == "hub":
        check_hub_id(recipe.model.name)  # the id's form only: whether the hub has it is preflight's to ask


def start_run(recipe: Recipe, run_dir: Path, checked: Checked) -> tuple[RunContext, StageStore, Done]:
    """Setup: the context built (context.py) and the `setup` stage recorded. Setup always runs (it loads what every
    stage shares); its fingerprint is the data's, the root of every other stage's."""
    random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    store, spec = StageStore(run_dir), plan(recipe)[0]  # every plan starts with setup
    with StageMeter(resolve_runtime(recipe.model).device) as meter:
        ctx, metrics = build_context(recipe, run_dir, checked)

    def record() -> None:
        crash_point(spec.point(WRITTEN))
        store.complete(spec.name, ctx.data_fp, spec.kind, {**metrics, **meter.memory}, meter.wall_s)

    ctx.world.write(record)
    return ctx, store, {spec.name: Finished(spec, ctx.data_fp, run_dir)}


def execute_plan(ctx: RunContext, store: StageStore, specs: Sequence[StageSpec], done: Done,
                 shared: StageStore | None = None) -> Done:
    """Every stage of `specs` in order, through the stage runner; `done` holds the finished stages their inputs
    name (grown as they finish). With `shared`, a stage finished there with the same fingerprint is copied."""
    for spec in specs:
        inputs = {role: done[name] for role, name in spec.inputs}
        done[spec.name] = run_stage(ctx, store, spec, WORK[spec.work], inputs, shared)
    return done


def report_run(ctx: RunContext, store: StageStore) -> list[dict]:
    """The run's summary table and report (rank 0); the records."""
    records = store.records()

    def finish() -> None:
        ui.console.print(ui.summary_table(records))
        render_report(ctx.run_dir)
        ui.note(f"run directory: {ui.escape(str(ctx.run_dir))}  (per-phase cost and charts: "
                f"{ui.escape(str(ctx.run_dir / 'report.md'))})")

    ctx.world.write(finish)
    return records


@contextmanager
def disk_full_as_one_line(run_dir: Path) -> Iterator[None]:
    """A full disk in a write that has no size to report (generation's answer log, a chart, a library's own file):
    still one line, naming the run directory."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        if is_disk_full(exc):
            raise DiskFullError(disk_full_message(run_dir, None)) from None
        raise


def run_recipe(recipe: Recipe, restart: bool = False, allow_existing: bool = False) -> Path:
    # Every check that can fail on a user mistake runs before the run directory is touched: first those that load
    # nothing (the dry run's), then the model, tokenizer, LoRA targets and data (preflight.py).
    world = current_world()
    check_before_loading(recipe, restart, allow_existing)
    checked = world.first(preflight, recipe)  # rank 0 fills the base's cache, the other ranks then read it
    with ExitStack() as stack:
        # Only rank 0 opens the directory and holds its lock for the whole run; a refusal there (another run
        # holds it) stops every rank with the same line.
        run_dir = world.write(stack.enter_context, prepared_run_dir(recipe, restart, allow_existing))
        apply_threads(recipe.model.threads)
        with disk_full_as_one_line(run_dir):
            ctx, store, done = start_run(recipe, run_dir, checked)
            try:
                execute_plan(ctx, store, plan(recipe)[1:], done)
                report_run(ctx, store)
            finally:
                ctx.live.close()
    return run_dir
