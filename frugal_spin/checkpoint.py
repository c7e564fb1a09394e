"""Mid-stage training checkpoints: everything needed to continue a training stage exactly where it stopped.

A checkpoint directory holds two plain files:
- `tensors.safetensors`: the adapter's trainable weights (`param.<name>`), the optimizer's tensor state
  (`optim.<param index>.<key>`), and the RNG states (`rng.torch`, `rng.cuda.<device>`);
- `state.json`: the stage fingerprint, a digest of the micro-batch plan (the data order), the position in it,
  the progress so far (losses, metrics, counters), the optimizer's param groups and scalar state, the scheduler's
  and the GradScaler's state dicts, Python's RNG state, the SHA-256 of `tensors.safetensors`, and `state_sha256`,
  the SHA-256 of everything else in the file (`seal`).

Nothing is pickled. A checkpoint is used only when its fingerprint and plan digest match the stage being run, its
state.json still has the seal it was written with (an edited position, progress or optimizer setting is valid
JSON but not the state the tensors belong to) and its tensors file has the recorded hash; otherwise it is ignored
with a warning, and the stage starts from its beginning. A checkpoint written before the seal existed has none
and is ignored the same way. It is written to a temporary
directory and renamed into place; the previous checkpoint is kept as `<name>.prev` until the new one is in place,
so a crash while saving leaves one complete checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from frugal_spin.io import mkdtemp, read_safetensors, write_json, write_safetensors
from frugal_spin.fingerprints import file_digest

TENSORS = "tensors.safetensors"
STATE = "state.json"


SEAL = "state_sha256"


def seal(state: dict[str, Any]) -> str:
    """SHA-256 of a state dict's canonical JSON, without its own seal."""
    body = {k: v for k, v in state.items() if k != SEAL}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def plan_digest(micro_batches: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(micro_batches).encode()).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    """Scalars, lists and dicts pass; tuples become lists; anything else is refused (it would need a pickle)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint's JSON")


def save_checkpoint(ckpt_dir: Path, *, model, optimizer, scheduler, scaler, fingerprint: str, plan: str,
                    next_micro_batch: int, progress: dict[str, Any]) -> None:
    ckpt_dir = Path(ckpt_dir)
    tensors: dict[str, torch.Tensor] = {f"param.{n}": p.detach() for n, p in model.named_parameters()
                                        if p.requires_grad}
    optim_state = optimizer.state_dict()
    optim_scalars: dict[str, dict[str, Any]] = {}
    for index, state in optim_state["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value
            else:
                optim_scalars.setdefault(str(index), {})[key] = _jsonable(value)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = mkdtemp(prefix=f".{ckpt_dir.name}.", dir=ckpt_dir.parent)
    try:
        write_safetensors(tmp / TENSORS, tensors)
        state = {
            "fingerprint": fingerprint, "plan": plan, "next_micro_batch": next_micro_batch,
            "progress": _jsonable(progress),
            "optimizer": {"param_groups": _jsonable(optim_state["param_groups"]), "scalars": optim_scalars},
            "scheduler": _jsonable(scheduler.state_dict()),
            "scaler": _jsonable(scaler.state_dict()) if scaler is not None else None,
            "python_rng": _jsonable(random.getstate()),
            "tensors_sha256": file_digest(tmp / TENSORS)["sha256"],
        }
        # The seal is taken over the state as it reads back from JSON (floats and tuples round-trip as written).
        state = json.loads(json.dumps(state))
        write_json(tmp / STATE, {**state, SEAL: seal(state)})
        previous = ckpt_dir.with_name(ckpt_dir.name + ".prev")
        if ckpt_dir.exists():
            if previous.exists():
                shutil.rmtree(previous)
            os.replace(ckpt_dir, previous)
        os.replace(tmp, ckpt_dir)
        if previous.exists():
            shutil.rmtree(previous)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def find_checkpoint(ckpt_dir: Path, *, fingerprint: str, plan: str) -> tuple[Path, dict[str, Any]] | None:
    """The newest intact checkpoint of this exact stage (`<dir>` or, after a crash while saving, `<dir>.prev`)."""
    from frugal_spin.ui import warn

    for candidate in (Path(ckpt_dir), Path(ckpt_dir).with_name(Path(ckpt_dir).name + ".prev")):
        if not (candidate / STATE).is_file():
            continue
        try:
            state = json.loads((candidate / STATE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            warn(f"{candidate}: unreadable checkpoint state; ignoring it")
            continue
        if not isinstance(state, dict) or state.get(SEAL) != seal(state):
            warn(f"{candidate}: checkpoint state.json was changed after it was written (or predates sealed "
                 f"checkpoints); ignoring it")
            continue
        if state.get("fingerprint") != fingerprint or state.get("plan") != plan:
            warn(f"{candidate}: checkpoint of another recipe or data order; ignoring it")
            continue
        if not (candidate / TENSORS).is_file() or file_digest(candidate / TENSORS)["sha256"] != state.get(
                "tensors_sha256"):
            warn(f"{candidate}: checkpoint tensors are truncated or corrupt; ignoring them")
            continue
        return candidate, state
    return None


def restore_checkpoint(candidate: Path, state: dict[str, Any], *, model, optimizer, scheduler, scaler) -> None:
    device = next(p for p in model.parameters() if p.requires_grad).device
    tensors = read_safetensors(candidate / TENSORS)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("param."):
                params[key[len("param."):]].copy_(value)
    optim_state: dict[str, Any] = {"state": {}, "param_groups": state["optimizer"]["param_groups"]}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            optim_state["state"].setdefault(int(index), {})[name] = value.to(device) if value.dim() else value
    for index, scalars in state["optimizer"]["scalars"].items():
        optim_state["state"].setdefault(int(index), {}).update(scalars)
    optimizer.load_state_dict(optim_state)
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))


def remove_checkpoint(ckpt_dir: Path) -> None:
    for path in (Path(ckpt_dir), Path(ckpt_dir).with_name(Path(ckpt_dir).name + ".prev")):
        if path.exists():
            shutil.rmtree(path)
