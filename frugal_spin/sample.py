"""`python -m frugal_spin sample RUN_DIR --prompt "..." [--stages sft,iter_0,...]`: each stage's answer, side by side.

One base model is loaded (as the run loaded it: 4-bit when the run was, on the run's device) with one LoRA
adapter; each stage's adapter weights are loaded into it in turn, so memory is one base and one adapter however
many stages are compared. `base` (the adapter switched off) can be one of the stages. Decoding is greedy unless
`--temperature` > 0; with sampling every stage draws from the same seed, so differences come from the weights.
Prompts go through the tokenizer's chat template exactly as the run's prompts did (`data.encode_prompt`), and
are cut like the run's (their beginning dropped) to `data.max_prompt_tokens`. Reads are bounded: a prompts file
is read up to `MAX_FILE_BYTES` and a prompt up to `MAX_PROMPT_CHARS` (its last ones); whatever was cut is counted
in one warning line. Prompts and answers are printed as text (rich markup in them is shown, never applied).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections import Counter
from pathlib import Path

from frugal_spin.errors import UserError
from frugal_spin.finished_run import STAGE_HELP, checked_base_path, finished_stages, open_run, resolve_stage

MAX_FILE_BYTES = 4 << 20  # a prompts file is read up to this (/dev/zero, a log file given by mistake)
MAX_PROMPT_CHARS = 32_768  # a prompt keeps its last characters, before the token cut (tokenising is not free)


def _read_bounded(path: Path, cut: Counter) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise UserError(f"--prompts {path}: cannot read it ({exc.strerror or exc})") from None
    if len(data) > MAX_FILE_BYTES:
        cut["file"] += 1
        data = data[:MAX_FILE_BYTES]
        data = data[: data.rfind(b"\n") + 1] or data  # whole lines only, unless there is no line break at all
    try:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            if cut["file"] and exc.start >= len(data) - 3:  # the cut split the last character
                return data[: exc.start].decode("utf-8")
            raise
    except UnicodeDecodeError as exc:
        raise UserError(f"--prompts {path}: cannot read it (not UTF-8: {exc.reason} at byte {exc.start})") from None


def read_prompts(prompts: list[str], prompts_file: str | None, cut: Counter | None = None) -> list[str]:
    """`--prompt` values, then the file's: one prompt per non-empty line, or jsonl rows with a "prompt" key.
    `cut` counts what the bounds removed: "file" (read only up to MAX_FILE_BYTES), "chars" (prompts cut to
    their last MAX_PROMPT_CHARS characters)."""
    cut = Counter() if cut is None else cut
    out = list(prompts)
    if prompts_file:
        path = Path(prompts_file).expanduser()
        lines = _read_bounded(path, cut).splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    row = json.loads(line)
                    out.append(str(row["prompt"]))
                except (ValueError, KeyError, TypeError):
                    raise UserError(f"--prompts {path}:{number}: not a JSON object with a \"prompt\" key") from None
            else:
                out.append(line.strip())
    if not out:
        raise UserError("no prompt given: use --prompt \"...\" or --prompts FILE")
    cut["chars"] += sum(len(p) > MAX_PROMPT_CHARS for p in out)
    return [p[-MAX_PROMPT_CHARS:] for p in out]


def cut_line(cut: Counter) -> str | None:
    """What the bounds removed, in one line (None when nothing was cut)."""
    parts = []
    if cut["file"]:
        parts.append(f"--prompts: only its first {MAX_FILE_BYTES >> 20} MiB were read")
    if cut["chars"]:
        parts.append(f"{cut['chars']} prompt(s) longer than {MAX_PROMPT_CHARS:,} characters kept their last ones")
    if cut["tokens"]:
        parts.append(f"{cut['tokens']} prompt(s) longer than data.max_prompt_tokens={cut['max_prompt_tokens']} tokens lost "
                     "their beginning (as the run's prompts did)")
    return "; ".join(parts) or None


def stage_names(run_dir: Path, requested: str | None) -> list[str]:
    """The stages to answer with: the requested ones (checked), or base and every finished stage."""
    finished = finished_stages(run_dir)
    if requested is None:
        return ["base", *[s.usable().name for s in finished]]  # a damaged adapter is an error, never skipped
    names = [n.strip() for n in requested.split(",") if n.strip()]
    if not names:
        raise UserError(f"--stages is empty: give base or {STAGE_HELP}, separated by commas")
    return [n if n == "base" else resolve_stage(run_dir, n, finished).name for n in names]


def sample_answers(run_dir: str | Path, prompts: list[str], stages: str | None = None, *, max_new_tokens: int = 64,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, trust_remote_code: bool = False,
                   cut: Counter | None = None) -> dict[str, list[str]]:
    """Stage name -> the answer to each prompt, in the order asked. `cut["tokens"]` counts prompts cut to
    data.max_prompt_tokens."""
    import torch

    from frugal_spin.data import encode_prompt
    from frugal_spin.generate import generate_answers
    from frugal_spin.model import inference_mode, load_adapter_weights, load_model, load_tokenizer, resolve_runtime

    if max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be > 0, got {max_new_tokens}")
    if not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")
    run_dir, recipe = open_run(run_dir, trust_remote_code, "sample")
    names = stage_names(run_dir, stages)
    base = checked_base_path(run_dir, recipe, "sample")
    tokenizer = load_tokenizer(base, recipe.model.trust_remote_code)
    limit = recipe.data.max_prompt_tokens
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    if cut is not None:
        cut["tokens"] += sum(len(e) > limit for e in encoded)
        cut["max_prompt_tokens"] = limit
    encoded = [e[-limit:] for e in encoded]  # as data.truncate cuts the run's prompts
    runtime = resolve_runtime(recipe.model)
    torch.manual_seed(recipe.seed)
    model = load_model(base, recipe.model, recipe.lora, runtime,
                       max_seq_length=max(len(e) for e in encoded) + max_new_tokens, seed=recipe.seed)
    answers: dict[str, list[str]] = {}
    for name in names:
        if name != "base":
            load_adapter_weights(model, run_dir / name / "adapter")
        # The adapter is switched off before inference_mode looks at it: a disabled adapter is never merged.
        with (model.disable_adapter() if name == "base" else contextlib.nullcontext()), inference_mode(model, runtime):
            ids = generate_answers(model, tokenizer, encoded, max_new_tokens=max_new_tokens,
                                   batch_size=recipe.eval.batch_size, temperature=temperature, top_p=top_p, seed=seed)
        answers[name] = [tokenizer.decode(a, skip_special_tokens=True) for a in ids]
    return answers


def answers_table(prompt: str, answers: dict[str, str]):
    """One prompt: a column per stage, its answer below. Text objects, not strings: "[bold]" or "[/x]" in a prompt
    or an answer is printed as written, never taken as markup."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(prompt), title_justify="left", show_lines=True)
    for name in answers:
        table.add_column(Text(name), overflow="fold")
    table.add_row(*(Text(a) for a in answers.values()))
    return table


def sample_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m frugal_spin sample",
        description="Answer the same prompts with each stage's adapter (one base in memory, adapters swapped) and "
                    "print the answers side by side. Greedy unless --temperature > 0.")
    parser.add_argument("run_dir", help="a run directory (the recipe's output_dir)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    parser.add_argument("--prompts", metavar="FILE",
                        help="more prompts: one per line, or a .jsonl file of {\"prompt\": ...} rows")
    parser.add_argument("--stages", help=f"comma-separated: base, {STAGE_HELP} (default: base and every "
                                         "finished stage)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling with --temperature (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every stage")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the run's model to run Python code shipped with it (needed only when the run's "
                             "recipe set model.trust_remote_code; the run directory alone never grants it)")
    args = parser.parse_args(argv)
    cut: Counter = Counter()
    prompts = read_prompts(args.prompt, args.prompts, cut)
    from frugal_spin.ui import console, quiet_libraries, warn

    quiet_libraries()
    answers = sample_answers(args.run_dir, prompts, args.stages, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                             trust_remote_code=args.trust_remote_code, cut=cut)
    line = cut_line(cut)
    if line:
        warn(line)
    for i, prompt in enumerate(prompts):
        console.print(answers_table(prompt, {name: texts[i] for name, texts in answers.items()}))
    return 0

