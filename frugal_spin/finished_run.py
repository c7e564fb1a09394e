"""Read a finished (or partly finished) run directory: its recipe, its base, and the stages that have an adapter.

Used by the commands that work on a run after it trained (`export`, `sample`); they never write into it.
Stage names are the user's: `sft`, `iter_<t>` (the player after SPIN iteration t), `last` (the latest of those
that finished) and, for `sample` only, `base` (no adapter). A stage counts as finished when its completion
marker (`stages/sft.json`, `stages/iter_<t>.train.json`) exists and its adapter files still have the SHA-256 the
marker recorded: a half-written or altered adapter is never exported or sampled, and naming it (or `last`, when
it is the latest) is one error line naming the adapter, never a quiet fall back to an earlier stage.

What a run directory holds is data, never an instruction: `model.trust_remote_code: true` in its recipe.yaml is
honoured only when the command line says `--trust-remote-code` (else one error line), and the base is used only
if its files are the ones the run recorded at setup (base_weights.check_base_unchanged).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from frugal_spin.config import Recipe, load_recipe
from frugal_spin.errors import UserError
from frugal_spin.plan import adapter_output, adapter_stage_names, adapter_stage_of, eval_name_of

STAGE_HELP = "sft, iter_<t> (e.g. iter_0) or last"


@dataclass(frozen=True)
class FinishedStage:
    name: str  # "sft" or "iter_<t>"
    adapter_dir: Path
    train_record: dict[str, Any]  # the training stage's marker
    eval_record: dict[str, Any] | None  # the stage's evaluation marker, when the evaluation finished
    problem: str | None = None  # why the adapter cannot be used (missing, or not the one the stage recorded)

    def usable(self) -> "FinishedStage":
        if self.problem:
            raise UserError(f"stage {self.name}: its adapter {self.adapter_dir} {self.problem}; not using it, nor "
                            f"another stage in its place (export or sample an intact stage by name, or retrain)")
        return self


def open_run(run_dir: str | Path, trust_remote_code: bool = False, what: str = "export") -> tuple[Path, Recipe]:
    """The run directory and its resolved recipe (`recipe.yaml`, written by the run itself). The recipe's
    `model.trust_remote_code` is honoured only when the caller's own command line passed `trust_remote_code`."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    if not (run_dir / "recipe.yaml").is_file():
        raise UserError(f"{run_dir} is not a frugal_spin run directory (no recipe.yaml)")
    recipe = load_recipe(run_dir / "recipe.yaml")
    if recipe.model.trust_remote_code and not trust_remote_code:
        raise UserError(f"{run_dir / 'recipe.yaml'} sets model.trust_remote_code: true, so loading its model runs "
                        f"Python code shipped with the model; {what} does that only when you pass "
                        f"--trust-remote-code (a file being read never grants it)")
    return run_dir, recipe


def base_path(run_dir: Path, recipe: Recipe) -> str:
    """Where the run's base weights are: `run_dir/base` for the built-in tiny base (never rebuilt here), else where
    the run itself resolved `model.name` (hub id, local directory, the converted GGUF cache)."""
    from frugal_spin.model_source import base_location

    return base_location(recipe.model, run_dir, build=False)


def checked_base_path(run_dir: Path, recipe: Recipe, what: str) -> str:
    """`base_path`, refused (one line) when its files are not the ones the run recorded at setup."""
    from frugal_spin.base_weights import check_base_unchanged

    base = base_path(run_dir, recipe)
    if Path(base).is_dir():  # a hub id: the run pinned its commit (not re-checked here)
        check_base_unchanged(Path(base), run_dir, what)
    return base


def _marker(run_dir: Path, stage: str) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / "stages" / f"{stage}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def finished_stages(run_dir: Path) -> list[FinishedStage]:
    """Every stage whose training finished (its marker exists), in pipeline order (sft, iter_0, iter_1, ...); one
    whose adapter is missing or differs from the marker's SHA-256 carries `problem`."""
    from frugal_spin.fingerprints import file_digest

    out = []
    for name, training in adapter_stage_names(p.stem for p in (run_dir / "stages").glob("*.json")):
        record = _marker(run_dir, training)
        if record is None:
            continue
        adapter_dir = run_dir / adapter_output(training)
        recorded = (record.get("outputs") or {}).get(adapter_output(training), {})
        problem = None
        if not adapter_dir.is_dir():
            problem = "is missing"
        elif recorded.get("sha256") != file_digest(adapter_dir)["sha256"]:
            problem = "differs from the one its stage recorded (corrupted or changed after training)"
        out.append(FinishedStage(name, adapter_dir, record, _marker(run_dir, eval_name_of(training)), problem))
    return out


def resolve_stage(run_dir: Path, name: str, stages: list[FinishedStage] | None = None) -> FinishedStage:
    """One stage by the user's name; a bad name or a stage that has not finished is one clear line."""
    name = name.strip()
    if name != "last" and adapter_stage_of(name) is None:
        raise UserError(f"unknown stage {name!r}: use {STAGE_HELP}")
    stages = finished_stages(run_dir) if stages is None else stages
    if not stages:
        raise UserError(f"{run_dir} has no finished training stage yet (not even sft)")
    if name == "last":
        return stages[-1].usable()
    for stage in stages:
        if stage.name == name:
            return stage.usable()
    raise UserError(f"stage {name} has not finished in {run_dir} (finished: "
                    f"{', '.join(s.name for s in stages)})")
