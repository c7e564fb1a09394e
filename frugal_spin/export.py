"""`python -m frugal_spin export RUN_DIR [--stage sft|iter_<t>|last] OUT_DIR`: one stage as a plain model directory.

What it writes into OUT_DIR (all at once: built in a temporary sibling directory, then renamed into place):
- the stage's LoRA adapter merged into a 16-bit copy of the base (`save_pretrained`, safetensors), with the
  tokenizer and its chat template: `AutoModelForCausalLM.from_pretrained(OUT_DIR)` and engines that take a
  transformers directory load it with no frugal_spin or peft installed;
- `adapter/`: the plain PEFT adapter, unchanged (`PeftModel.from_pretrained(base, OUT_DIR/adapter)`);
- `README.md`: a model card (base, data, recipe, the stage's metrics, the commands that made it);
- `export_info.json`, written last inside the temporary directory: what was exported, and the mark that lets a
  later export replace this directory.

Which base weights are merged. With `model.load_in_4bit: true` the adapter was trained against the NF4 base, not
the original weights; merging into the original would add the quantisation error (larger than fp16 rounding)
to every merged layer. So each 4-bit layer's weight is first dequantised exactly as the run's forward does
(bitsandbytes' own dequantiser), the adapter's delta s·B·A is added in fp32, and only then is everything cast to
16 bits: the merged model computes what the run's model computed, up to fp16 rounding (tests/test_export.py).

Safety: an OUT_DIR that exists, is not empty and was not written by this command (no `export_info.json`) is
never touched; neither is one that holds the run directory. An earlier export is replaced only when every entry
in it is one that export wrote (`export_info.json` lists them; an export of an earlier version, which did not,
owns the names that version writes): a file a user added there is refused with one line, never deleted.
The run directory is only read; its recipe's `model.trust_remote_code` needs `--trust-remote-code` on the
command line, and its base must be the files the run recorded (finished_run.py).

Interrupted exports: the temporary siblings (`.<OUT_DIR name>.partial-*`, `.old-*`) carry `PARTIAL_MARK` with the
writer's pid and host while they exist; the next export of the same OUT_DIR removes those whose writer is dead
(SIGKILL, power loss), and nothing without the mark. A full disk is one error line; the temporary is removed and
OUT_DIR keeps what it held, so a rerun never finds a half-written export.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch

from frugal_spin.errors import UserError
from frugal_spin.finished_run import STAGE_HELP, FinishedStage, checked_base_path, open_run, resolve_stage

EXPORT_INFO = "export_info.json"
TOOL = "frugal_spin export"
PARTIAL_MARK = ".frugal_spin_partial.json"
# What an export written before export_info.json listed its entries holds (save_pretrained of model and tokenizer,
# the adapter, the card): the only names such an export may replace.
LEGACY_ENTRIES = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
                  "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
                  "tokenizer.model", "adapter", "README.md", EXPORT_INFO)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
EVAL_METRICS = ("heldout_nll", "spin_loss", "reward_margin", "reward_accuracy", "exact_match")
TRAIN_METRICS = ("train_loss", "optimizer_steps", "train_reward_margin", "train_reward_accuracy", "pairs", "beta")


def check_out_dir(out_dir: Path, run_dir: Path) -> None:
    """Refuse, before any work, an OUT_DIR that would replace something this command did not write."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"OUT_DIR {out_dir} exists and is not a directory")
    resolved, run = out_dir.resolve(), run_dir.resolve()
    if resolved == run or resolved in run.parents:
        raise UserError(f"OUT_DIR {out_dir} holds the run directory {run_dir}; export somewhere else")
    if run in resolved.parents:
        raise UserError(f"OUT_DIR {out_dir} is inside the run directory {run_dir}; export somewhere else")
    _check_replaceable(out_dir)


def _check_replaceable(out_dir: Path) -> None:
    """OUT_DIR absent, empty, or an earlier export holding only what that export wrote."""
    if out_dir.is_symlink():
        raise UserError(f"OUT_DIR {out_dir} is a symbolic link; not replacing it: give the real directory")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    info = _export_info(out_dir)
    if info is None:
        raise UserError(f"OUT_DIR {out_dir} is not empty and was not written by `{TOOL}` (no {EXPORT_INFO}); "
                        "not overwriting it: give a new or empty directory")
    foreign = sorted(p.name for p in out_dir.iterdir() if not _exported(p.name, info))
    if foreign:
        raise UserError(f"OUT_DIR {out_dir} is an earlier export, but {', '.join(foreign[:3])}"
                        f"{' and more' if len(foreign) > 3 else ''} in it was not written by `{TOOL}`; not "
                        "replacing the directory: move that away or export elsewhere")


def _export_info(out_dir: Path) -> dict | None:
    try:
        info = json.loads((out_dir / EXPORT_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("tool") == TOOL else None


def _exported(name: str, info: dict) -> bool:
    entries = info.get("entries")
    if isinstance(entries, list):
        return name in entries
    return any(fnmatch(name, pattern) for pattern in LEGACY_ENTRIES)


def merged_model(base: str, recipe, adapter_dir: Path, dtype: torch.dtype):
    """base (dequantised as the run saw it) + the adapter, merged in fp32, then cast to `dtype`; on the CPU."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, device_map="cpu", use_safetensors=True,
                                                 trust_remote_code=recipe.model.trust_remote_code)
    if recipe.model.load_in_4bit:
        _use_dequantised_weights(plain, base, recipe)
    from frugal_spin.model import peft_deprecations_quiet

    with peft_deprecations_quiet():
        merged = PeftModel.from_pretrained(plain, str(adapter_dir)).merge_and_unload()
    return merged.to(dtype).eval()


def _use_dequantised_weights(plain, base: str, recipe) -> int:
    """Overwrite every weight that the run held in NF4 with its dequantised value; returns how many."""
    import bitsandbytes as bnb
    from dataclasses import replace

    from frugal_spin.model import Runtime, load_base_model

    runtime = Runtime(torch.device("cpu"), torch.float32, gradient_checkpointing=False)
    quantized = load_base_model(base, replace(recipe.model, device="cpu", gradient_checkpointing="off"), runtime)
    plain_modules = dict(plain.named_modules())
    replaced = 0
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            elif isinstance(module, torch.nn.Linear) and name in plain_modules:
                # model.cpu_4bit_weights may have dequantised the layer already (model.dequantize_4bit_layers);
                # a layer never quantised (the head, skipped layers) copies its own weights: no change.
                weight = module.weight.data
            else:
                continue
            plain_modules[name].weight.copy_(weight.to(torch.float32).reshape(plain_modules[name].weight.shape))
            replaced += 1
    del quantized
    return replaced


def model_card(run_dir: Path, recipe, stage: FinishedStage, base: str, dtype: str, command: str) -> str:
    """README.md for OUT_DIR: base, data, recipe, the stage's metrics, the commands that made it."""
    from frugal_spin.config import dump_recipe

    setup = _read_json(run_dir / "stages" / "setup.json").get("metrics", {})
    build = _read_json(Path(base) / "build_info.json") if Path(base).is_dir() else {}
    lines = ["---", "library_name: transformers", "tags: [frugal_spin, spin, lora, merged]", "---", "",
             f"# {run_dir.name}: stage `{stage.name}` (frugal_spin)", "",
             f"The LoRA adapter of stage `{stage.name}` merged into its base, stored in {dtype}. "
             "Load it with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` on this "
             "directory (the tokenizer carries the chat template); `adapter/` holds the plain PEFT adapter.", "",
             "## Base", "", f"- `model.name`: `{recipe.model.name}`"]
    if build:
        lines.append(f"- built-in base: {build.get('parameters')} parameters, spec fingerprint "
                     f"`{build.get('fingerprint')}`, held-out exact match "
                     f"{build.get('heldout_greedy', {}).get('exact_match')} before any adapter")
    lines.append("- merged into the NF4-dequantised base weights the adapter was trained on"
                 if recipe.model.load_in_4bit else "- merged into the base weights as loaded by the run")
    lines += ["", "## Data", "", f"- `data.dataset`: `{recipe.data.dataset}` (fraction {recipe.data.fraction}, "
              f"{setup.get('train_examples', '?')} training and {setup.get('heldout_examples', '?')} held-out "
              "examples)", "", "## Metrics of this stage", "", "| metric | value |", "|---|---|"]
    train = stage.train_record.get("metrics", {})
    for key in TRAIN_METRICS:
        if key in train:
            lines.append(f"| {key} (training) | {_fmt(train[key])} |")
    evaluation = (stage.eval_record or {}).get("metrics", {})
    for key in EVAL_METRICS:
        if key in evaluation:
            lines.append(f"| {key} (held-out) | {_fmt(evaluation[key])} |")
    if not evaluation:
        lines.append("| held-out evaluation | not run for this stage |")
    lines += ["", "## How it was made", "",
              f"Trained by `python -m frugal_spin RECIPE.yaml` into `{recipe.output_dir}` with this resolved "
              "recipe (the run's `recipe.yaml`), then exported with:", "", "```bash", command, "```", "",
              "```yaml", dump_recipe(recipe).rstrip(), "```", ""]
    return "\n".join(lines)


def export_stage(run_dir: str | Path, out_dir: str | Path, stage: str = "last", dtype: str = "float16",
                 command: str | None = None, trust_remote_code: bool = False) -> Path:
    """Write stage `stage` of `run_dir` into `out_dir` (see the module docstring); returns `out_dir`.
    `trust_remote_code`: the command line's --trust-remote-code (the run's recipe alone never grants it)."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    run_dir, recipe = open_run(run_dir, trust_remote_code, "export")
    chosen = resolve_stage(run_dir, stage)
    out_dir = Path(out_dir).expanduser()
    check_out_dir(out_dir, run_dir)
    base = checked_base_path(run_dir, recipe, "export")
    command = command or " ".join(["python -m frugal_spin export", shlex.quote(str(run_dir)), "--stage", chosen.name,
                                   shlex.quote(str(out_dir))] + ([] if dtype == "float16" else ["--dtype", dtype]))
    model = merged_model(base, recipe, chosen.adapter_dir, DTYPES[dtype])

    def fill(tmp: Path) -> None:
        from transformers import AutoTokenizer

        from frugal_spin.io import write_json, write_text
        from frugal_spin.fingerprints import file_digest

        from frugal_spin.faults import crash_point

        model.save_pretrained(tmp)
        crash_point("export.fill")  # tests: SIGKILL with a half-filled temporary (tests/test_export.py)
        AutoTokenizer.from_pretrained(base, trust_remote_code=recipe.model.trust_remote_code).save_pretrained(tmp)
        shutil.copytree(chosen.adapter_dir, tmp / "adapter")
        write_text(tmp / "README.md", model_card(run_dir, recipe, chosen, base, dtype, command))
        entries = sorted(p.name for p in tmp.iterdir() if p.name != PARTIAL_MARK) + [EXPORT_INFO]
        write_json(tmp / EXPORT_INFO, {"tool": TOOL, "run_dir": str(run_dir.resolve()), "stage": chosen.name,
                                       "dtype": dtype, "base": recipe.model.name,
                                       "adapter_sha256": file_digest(chosen.adapter_dir)["sha256"],
                                       "entries": sorted(set(entries))})

    from frugal_spin.io import free_bytes, gib, is_disk_full

    needed = sum(p.numel() for p in model.parameters()) * DTYPES[dtype].itemsize
    try:
        _publish(out_dir, fill)
    except Exception as exc:
        if is_disk_full(exc):  # the temporary copy is gone; OUT_DIR holds what it held before
            free = free_bytes(out_dir.parent)
            raise UserError(f"no space left on device writing {out_dir} (the export needs about {gib(needed)}"
                            f"{f', {gib(free)} free there' if free is not None else ''}); nothing was replaced: "
                            "free some space and rerun the export") from None
        if isinstance(exc, OSError):
            raise UserError(f"cannot write OUT_DIR {out_dir}: {exc.strerror or exc}") from None
        raise
    return out_dir


def _publish(out_dir: Path, fill) -> None:
    """`fill(tmp)` in a temporary sibling, then swap it in for `out_dir` (absent, empty, or an earlier export)."""
    from frugal_spin.io import apply_umask
    from frugal_spin.ui import note

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    removed = remove_dead_partials(out_dir)
    if removed:
        note(f"removed {removed} partial copies left by an interrupted export of {_shown(out_dir)}")
    tmp = _marked_temporary(out_dir, "partial")
    old = None
    try:
        fill(tmp)
        _check_replaceable(out_dir)  # filled by someone while we worked: refused like at the start
        if out_dir.exists():
            old = _marked_temporary(out_dir, "old")
            os.replace(out_dir, old / "previous")
        (tmp / PARTIAL_MARK).unlink()  # from here on it is the export itself
        apply_umask(tmp)  # mkdtemp's 0700, safetensors' 0600: the modes a plain mkdir/open would give
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _marked_temporary(out_dir: Path, kind: str) -> Path:
    """A hidden sibling of OUT_DIR, marked as this process's (`remove_dead_partials` trusts only the mark)."""
    from frugal_spin.io import mkdtemp, write_json

    tmp = mkdtemp(prefix=f".{out_dir.name}.{kind}-", dir=out_dir.parent)
    write_json(tmp / PARTIAL_MARK, {"tool": TOOL, "pid": os.getpid(), "host": socket.gethostname()})
    return tmp


def remove_dead_partials(out_dir: Path) -> int:
    """Remove the temporary siblings of OUT_DIR that an export which has died left (module docstring)."""
    from frugal_spin.rundir import holder_alive

    shape = re.compile(rf"^\.{re.escape(out_dir.name)}\.(partial|old)-[a-z0-9_]{{8}}$")
    removed = 0
    for sibling in out_dir.parent.iterdir():
        if not shape.match(sibling.name) or sibling.is_symlink() or not sibling.is_dir():
            continue
        try:
            mark = json.loads((sibling / PARTIAL_MARK).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # not provably ours
        if isinstance(mark, dict) and mark.get("tool") == TOOL and mark.get("host") == socket.gethostname() \
                and not holder_alive(mark):
            shutil.rmtree(sibling, ignore_errors=True)
            removed += 1
    return removed


def _shown(path: Path) -> str:
    from frugal_spin.ui import escape

    return escape(str(path))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def export_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m frugal_spin export",
        description="Merge a stage's LoRA adapter into a 16-bit copy of the base and write it, with the tokenizer, "
                    "the plain adapter and a model card, into OUT_DIR (a new or empty directory, or an earlier "
                    "export).")
    parser.add_argument("run_dir", help="a run directory (the recipe's output_dir)")
    parser.add_argument("out_dir", help="where to write the model directory")
    parser.add_argument("--stage", default="last", help=f"which stage: {STAGE_HELP} (default: last)")
    parser.add_argument("--dtype", default="float16", help="float16 (default) or bfloat16")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the run's model to run Python code shipped with it (needed only when the run's "
                             "recipe set model.trust_remote_code; the run directory alone never grants it)")
    args = parser.parse_args(argv)
    from frugal_spin.ui import note, quiet_libraries

    quiet_libraries()
    out = export_stage(args.run_dir, args.out_dir, stage=args.stage, dtype=args.dtype,
                       command="python -m frugal_spin export " + " ".join(shlex.quote(a) for a in argv),
                       trust_remote_code=args.trust_remote_code)
    note(f"exported to {_shown(out)}")
    return 0
