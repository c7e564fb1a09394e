"""Everything about a run that can be checked cheaply, checked before the run directory is touched.

Input: a validated `Recipe`. Output: `Checked` (the base's source, its tokenizer, the data splits and their token
ids), or a `UserError` with one line naming the directory, file, key or row. Nothing is written into `output_dir`
here (the built-in base may be built into its cache), so a mistake found here leaves an earlier run exactly as
it was, and `--restart` deletes nothing before every check has passed.

What is checked:
- the model directory (local, or the cache copy of a built-in/converted one): `config.json` is valid JSON, weights
  exist as safetensors whose headers parse (a pickle `pytorch_model.bin` is refused with how to convert it: it is
  never unpickled), tokenizer files exist and need no remote code unless `model.trust_remote_code` is on;
- the tokenizer loads, has a chat template and an eos token (`model.load_tokenizer`);
- every `lora.target_modules` entry names a layer LoRA can adapt, against the module names of the model built from
  its config on the `meta` device (no weights read, no memory used);
- the data: loaded, split, and every row encoded with the chat template (rows that cannot be are skipped and
  counted; no usable row is an error).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from frugal_spin.config import LoraSection, ModelConfig, Recipe
from frugal_spin.data import DataSplits, Encoded, check_dataset_reference, encode_examples, load_splits
from frugal_spin.errors import UserError
from frugal_spin.hub import resolve_revision

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")


@dataclass
class Checked:
    base_source: str  # where the base is loaded from (the built-in base: its cache build, copied into base/)
    tokenizer: Any
    splits: DataSplits
    train: list[Encoded] = field(default_factory=list)
    heldout: list[Encoded] = field(default_factory=list)
    model_revision: str | None = None  # a hub model's commit, resolved once here: tokenizer and weights load it


def preflight(recipe: Recipe) -> Checked:
    from frugal_spin.model import load_tokenizer, resolve_runtime
    from frugal_spin.model_source import check_model_reference

    from frugal_spin.live_log import check_log_backends

    check_dataset_reference(recipe.data)
    check_model_reference(recipe.model)
    check_log_backends(recipe.log)
    if recipe.generation.engine == "vllm":
        from frugal_spin.vllm_engine import check_vllm

        check_vllm(resolve_runtime(recipe.model).device)
    if resolve_runtime(recipe.model).backend == "unsloth":
        from frugal_spin.unsloth_backend import import_unsloth

        import_unsloth()  # before anything else loads transformers' model code
    splits = load_splits(recipe.data, recipe.seed)  # an unreadable or empty dataset fails here, before the base
    source = base_source(recipe.model)
    if not Path(source).is_dir():
        check_hub_model(source)
    if Path(source).is_dir():
        check_model_dir(Path(source), recipe.model.trust_remote_code)
    # A hub id names a branch: pin the commit it points at now, so the tokenizer here and the weights later are
    # one snapshot, and the run is identified by it (None for local directories, or when it cannot be resolved).
    revision = None if Path(source).is_dir() else resolve_revision(source, "model")
    tokenizer = load_tokenizer(source, recipe.model.trust_remote_code, revision)
    check_target_modules(source, recipe.model, recipe.lora)
    train_errors: list[str] = []
    train_examples, train = encode_examples(tokenizer, splits.train, recipe.data, splits.counts, train_errors)
    if not train:
        raise UserError(f"data.dataset {recipe.data.dataset}: no training row can be written with the chat template "
                        f"of {source}: {train_errors[0] if train_errors else 'no rows'}")
    heldout_errors: list[str] = []
    heldout_examples, heldout = encode_examples(tokenizer, splits.heldout, recipe.data, splits.counts, heldout_errors)
    if not heldout:
        raise UserError(f"data.dataset {recipe.data.dataset}: no held-out row can be written with the chat "
                        f"template of {source}: {heldout_errors[0] if heldout_errors else 'no rows'}")
    splits = DataSplits(train_examples, heldout_examples, splits.counts, splits.revision)
    return Checked(source, tokenizer, splits, train, heldout, revision)


def base_source(cfg: ModelConfig) -> str:
    """The directory (or hub id) the base comes from, without touching a run directory (the built-in tiny base:
    its cache build, which the run then copies into its `base/`)."""
    from frugal_spin.model_source import base_location

    return base_location(cfg, None)


def check_hub_id(name: str) -> None:
    """A hub id that cannot be one (too long, characters the hub refuses) is one line, without asking the hub."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as exc:
        raise UserError(f"model.name: {name[:120]!r} is neither a local directory nor a valid hub id "
                        f"({' '.join(str(exc).split()).split(':')[0][:160]})") from None


def check_hub_model(name: str) -> None:
    """For a hub id: fail in about a second, in one line, when the hub is offline or has no such model, instead of
    transformers' retries with backoff (28 s and a dozen log lines). A model already in the local hub cache
    passes without asking the network."""
    from huggingface_hub import constants, model_info, try_to_load_from_cache

    check_hub_id(name)
    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"model.name: {name[:120]!r} is not in the local hub cache and the hub is off "
                        f"(HF_HUB_OFFLINE); use a local model directory")
    try:
        model_info(name, timeout=10)
    except Exception as exc:  # noqa: BLE001 - sorted by type below; every kind means "cannot use this id"
        kind = type(exc).__name__
        if kind in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
            raise UserError(f"model.name: {name[:120]!r} was not found on the hub (or is private or gated); "
                            f"check the id, or use a local model directory") from None
        if kind == "HFValidationError":
            raise UserError(f"model.name: {name[:120]!r} is neither a local directory nor a valid hub id") from None
        raise UserError(f"model.name: the hub cannot be reached to fetch {name[:120]!r} "
                        f"({' '.join(str(exc).split())[:120]}); offline? use a local model directory or set "
                        f"HF_HUB_OFFLINE=1 with the model in the hub cache") from None


def check_model_dir(path: Path, trust_remote_code: bool) -> None:
    """One line naming the directory and what is missing or broken, for every way a model directory can be."""
    where = f"model.name: {path}"
    config = _json_file(path / "config.json", where)
    if not isinstance(config, dict):
        raise UserError(f"{where}/config.json is not a JSON object")
    if list(path.glob("*.gguf")):
        return  # converted on load (model.py); no safetensors to look at here
    shards = _safetensors_files(path, where)
    if not shards:
        pickles = [name for name in PICKLE_WEIGHTS if (path / name).is_file()] + \
            sorted(p.name for p in path.glob("pytorch_model-*.bin"))
        if pickles:
            raise UserError(
                f"{where} holds only pickle weights ({pickles[0]}), which are never loaded (unpickling runs code); "
                f"convert them once, if you trust the file: python -c \"from transformers import "
                f"AutoModelForCausalLM as M; M.from_pretrained('{path}', use_safetensors=False)"
                f".save_pretrained('{path}-safetensors')\" and use that directory")
        raise UserError(f"{where} has no weights (model.safetensors or model.safetensors.index.json)")
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        shapes.update(_check_safetensors(shard, where))
    check_weights_fit_config(path, config, shapes, trust_remote_code, where)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{where} has weights but no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    tokenizer_config = path / "tokenizer_config.json"
    if tokenizer_config.is_file() and not trust_remote_code:
        settings = _json_file(tokenizer_config, where)
        if isinstance(settings, dict) and settings.get("auto_map"):
            raise UserError(f"{where}: the tokenizer needs its own Python code (auto_map in tokenizer_config.json), "
                            f"which is not run; set model.trust_remote_code=true only if you trust that code")


def _json_file(path: Path, where: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{where} has no {path.name}") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{where}: {path.name} is not valid JSON ({' '.join(str(exc).split())[:120]})") from None


def _safetensors_files(path: Path, where: str) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _json_file(index, where)
        names = sorted(set((weight_map or {}).get("weight_map", {}).values())) if isinstance(weight_map, dict) else []
        if not names:
            raise UserError(f"{where}: model.safetensors.index.json lists no weight files")
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise UserError(f"{where}: {len(missing)} weight file(s) listed in model.safetensors.index.json are "
                            f"missing (e.g. {missing[0][:100]})")
        return [path / n for n in names]
    return [path / "model.safetensors"] if (path / "model.safetensors").is_file() else []


def _check_safetensors(file: Path, where: str) -> dict[str, tuple[int, ...]]:
    """Parse the header and check that every tensor's bytes lie inside the file (a truncated copy fails here);
    return each tensor's shape."""
    import struct

    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            n = struct.unpack("<Q", head)[0]
            if n > min(size - 8, 100 * 2**20):
                raise ValueError("its header length is impossible")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"truncated: {size:,} bytes, its header needs {8 + n + end:,}")
        return {k: tuple(int(d) for d in t["shape"]) for k, t in header.items() if k != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, IndexError, RecursionError, struct.error) as exc:
        raise UserError(f"{where}: {file.name} is not a valid safetensors file "
                        f"({' '.join(str(exc).split())[:160]})") from None


def check_weights_fit_config(path: Path, config: dict, shapes: dict[str, tuple[int, ...]], trust_remote_code: bool,
                             where: str) -> None:
    """The tensors of the weights files (`shapes`, from their headers) against the model config.json describes
    (`weights_check`): a missing or unexpected tensor, or one of another shape, is one line naming them. Not for
    pre-quantized checkpoints (their packed tensors have other shapes by design) or models with their own code;
    the load checks those (`model.check_loading_info`)."""
    from frugal_spin.weights_check import compare, describe, layer_count

    if config.get("quantization_config") or config.get("auto_map"):
        return
    model = meta_model(str(path), trust_remote_code)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    rename, names_only_partly = _checkpoint_renamer(model)
    found = {rename(name): shape for name, shape in shapes.items()}
    prefix = model.base_model_prefix
    modules = {name for name, _ in model.named_modules() if name}
    modules |= {name.removeprefix(f"{prefix}.") for name in modules}  # checkpoints saved from the base model
    mismatch = compare(expected, found, optional=getattr(model, "all_tied_weights_keys", None) or {},
                       ignore_missing=model._keys_to_ignore_on_load_missing or (),
                       ignore_unexpected=model._keys_to_ignore_on_load_unexpected or (),
                       names_only_partly=names_only_partly, modules=modules)
    configured, held = getattr(model.config, "num_hidden_layers", None), layer_count(found)
    layers = (configured, held) if isinstance(configured, int) and held is not None else None
    if mismatch or (layers and layers[0] != layers[1]):  # the layer count also where names are converted (MoE)
        raise UserError(f"{where}: the weights do not fit config.json: "
                        f"{describe(mismatch, 'the weights', layers)}")


def _checkpoint_renamer(model):
    """(name in a checkpoint -> name in `model`, whether some names are converted rather than renamed), by the
    rules transformers loads with (its renamings and the base-model prefix). With a transformers whose loading
    code is laid out otherwise, names are taken as they are and only shapes are compared."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # pragma: no cover - transformers < 5
        return (lambda name: name), True
    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    partly = any(isinstance(c, WeightConverter) for c in conversions)
    state = model.state_dict()
    return (lambda name: rename_source_key(name, renamings, [], model.base_model_prefix, state)[0]), partly


def meta_model(source: str, trust_remote_code: bool):
    """The model `source`'s config describes, built on the `meta` device (no memory, no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError) as exc:
        raise UserError(f"model.name: cannot build the model {source!r} from its config: "
                        f"{' '.join(str(exc).split())[:240]}") from None


def module_names(source: str, trust_remote_code: bool) -> dict[str, str]:
    """name -> class name of every module of the model `source`'s config describes (built on `meta`)."""
    model = meta_model(source, trust_remote_code)
    return {name: type(module).__name__ for name, module in model.named_modules() if name}


# Layer types peft's LoRA can wrap (by class name: bitsandbytes and transformers' Conv1D included).
LORA_LAYER_TYPES = {"Linear", "Linear4bit", "Linear8bitLt", "Embedding", "Conv1d", "Conv2d", "Conv3d", "Conv1D"}


def check_target_modules(source: str, cfg: ModelConfig, lora: LoraSection) -> None:
    """Each `lora.target_modules` entry must match (as peft matches: the full name or its last dotted parts) at
    least one layer LoRA can adapt."""
    if lora.target_modules == ["all-linear"]:
        return
    names = module_names(source, cfg.trust_remote_code)
    adaptable = sorted({name.rsplit(".", 1)[-1] for name, kind in names.items() if kind in LORA_LAYER_TYPES})
    for entry in lora.target_modules:
        matched = [name for name in names if name == entry or name.endswith("." + entry)]
        if not matched:
            raise UserError(f"lora.target_modules: {entry[:80]!r} matches no module of {source} (layers LoRA can "
                            f"adapt: {', '.join(adaptable)[:300]}; or use [all-linear])")
        if not any(names[name] in LORA_LAYER_TYPES for name in matched):
            raise UserError(f"lora.target_modules: {entry[:80]!r} names {names[matched[0]]} modules, which LoRA "
                            f"cannot adapt (layers it can: {', '.join(adaptable)[:300]})")

