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
never touched; neither is one that holds the run directory. The run directory is only read.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from frugal_spin.errors import UserError
from frugal_spin.finished_run import STAGE_HELP, FinishedStage, base_path, open_run, resolve_stage

EXPORT_INFO = "export_info.json"
TOOL = "frugal_spin export"
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
    if out_dir.is_dir() and any(out_dir.iterdir()) and not _written_by_us(out_dir):
        raise UserError(f"OUT_DIR {out_dir} is not empty and was not written by `{TOOL}` (no {EXPORT_INFO}); "
                        "not overwriting it: give a new or empty directory")


def _written_by_us(out_dir: Path) -> bool:
    try:
        return json.loads((out_dir / EXPORT_INFO).read_text(encoding="utf-8")).get("tool") == TOOL
    except (OSError, ValueError, AttributeError):
        return False


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
                 command: str | None = None) -> Path:
    """Write stage `stage` of `run_dir` into `out_dir` (see the module docstring); returns `out_dir`."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    run_dir, recipe = open_run(run_dir)
    chosen = resolve_stage(run_dir, stage)
    out_dir = Path(out_dir).expanduser()
    check_out_dir(out_dir, run_dir)
    base = base_path(run_dir, recipe)
    command = command or " ".join(["python -m frugal_spin export", shlex.quote(str(run_dir)), "--stage", chosen.name,
                                   shlex.quote(str(out_dir))] + ([] if dtype == "float16" else ["--dtype", dtype]))
    model = merged_model(base, recipe, chosen.adapter_dir, DTYPES[dtype])

    def fill(tmp: Path) -> None:
        from transformers import AutoTokenizer

        from frugal_spin.io import write_json, write_text
        from frugal_spin.stages import file_digest

        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base, trust_remote_code=recipe.model.trust_remote_code).save_pretrained(tmp)
        shutil.copytree(chosen.adapter_dir, tmp / "adapter")
        write_text(tmp / "README.md", model_card(run_dir, recipe, chosen, base, dtype, command))
        write_json(tmp / EXPORT_INFO, {"tool": TOOL, "run_dir": str(run_dir.resolve()), "stage": chosen.name,
                                       "dtype": dtype, "base": recipe.model.name,
                                       "adapter_sha256": file_digest(chosen.adapter_dir)["sha256"]})

    try:
        _publish(out_dir, fill)
    except OSError as exc:
        raise UserError(f"cannot write OUT_DIR {out_dir}: {exc.strerror or exc}") from None
    return out_dir


def _publish(out_dir: Path, fill) -> None:
    """`fill(tmp)` in a temporary sibling, then swap it in for `out_dir` (absent, empty, or an earlier export)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    old = None
    try:
        fill(tmp)
        if out_dir.exists():
            if any(out_dir.iterdir()) and not _written_by_us(out_dir):  # filled by someone while we worked
                raise UserError(f"OUT_DIR {out_dir} is not empty and was not written by `{TOOL}`; not overwriting it")
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "previous")
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


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
    args = parser.parse_args(argv)
    from frugal_spin.ui import note, quiet_libraries

    quiet_libraries()
    out = export_stage(args.run_dir, args.out_dir, stage=args.stage, dtype=args.dtype,
                       command="python -m frugal_spin export " + " ".join(shlex.quote(a) for a in argv))
    note(f"exported to {out}")
    return 0
