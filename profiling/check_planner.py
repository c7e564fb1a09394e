"""Check `frugal_spin.planner` against measured peaks of live tensor memory in real training steps.

What it does: for a few random-init model shapes (built from configs, saved, then loaded through
`frugal_spin.model.load_base_model` in bitsandbytes NF4 exactly as a run loads them) and a few sequence lengths,
it runs one SFT step and one SPIN step through `frugal_spin.train.train_adapter` with the real step functions
(`sft_step_fn`, `spin_step_fn`: chunked log-probs, LoRA on every linear layer, torch AdamW on the CPU), and
records the peak of live tensor bytes during the step. It then asks `planner.estimate` for the same recipe on
the CPU (fp32 compute, torch AdamW's 8 bytes/parameter of state) and prints estimated, measured and error %.

What "measured" means: there is no GPU here, so the script measures on the CPU what CUDA's caching allocator
would report as `max_memory_allocated`: the bytes held by live tensors. torch.profiler's memory events carry the
CPU allocator's running total of bytes allocated since profiling began and not yet freed; its maximum during the
step, plus the bytes of the model's tensors that existed before (parameters, buffers, NF4 quantisation state),
is the peak. Unlike RSS it excludes the Python heap, shared libraries and the allocator's cached pages, and it
includes temporaries inside ops that a tensor-level hook would miss.

Inputs: none (`--quick` runs only the smallest cases; `--markdown PATH` also writes the table as markdown).
Output: a table on stdout; exit status 1 if any case is off by more than the tolerance (15%).
Assumptions: a CPU build of torch; bitsandbytes' CPU 4-bit path; 2 threads are enough (sizes are small).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from frugal_spin.config import LoraSection, ModelConfig, Recipe, SFTConfig, SpinConfig
from frugal_spin.data import Encoded
from frugal_spin.model import Runtime, attach_lora, load_base_model
from frugal_spin.planner import estimate, shape_from_config
from frugal_spin.profiler import peak_live_tensor_bytes
from frugal_spin.train import sft_step_fn, spin_step_fn, train_adapter

TOLERANCE = 0.15
MIB = 1024 ** 2


@dataclass(frozen=True)
class Case:
    shape: str  # key of SHAPES
    prompt: int
    answer: int
    micro_batch: int
    checkpointing: bool = False


# Random-init shapes: a Qwen2-like one with the real Qwen2.5 vocabulary (the head dominates, as in DESIGN.md's
# TRL comparison) and the built-in tiny Llama's shape (frugal_spin/tiny_base.py TinyBaseSpec).
SHAPES = {
    "qwen2-v151936-h256-l4": dict(model_type="qwen2", vocab_size=151936, hidden_size=256, intermediate_size=1024,
                                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=4096, tie_word_embeddings=True),
    "tiny-llama-h128-l4": dict(model_type="llama", vocab_size=384, hidden_size=128, intermediate_size=384,
                               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=2048, tie_word_embeddings=True),
}

CASES = [
    Case("tiny-llama-h128-l4", prompt=32, answer=96, micro_batch=4),
    Case("tiny-llama-h128-l4", prompt=128, answer=384, micro_batch=4),
    Case("tiny-llama-h128-l4", prompt=128, answer=384, micro_batch=4, checkpointing=True),
    Case("qwen2-v151936-h256-l4", prompt=64, answer=192, micro_batch=1),
    Case("qwen2-v151936-h256-l4", prompt=256, answer=768, micro_batch=1),
    Case("qwen2-v151936-h256-l4", prompt=256, answer=768, micro_batch=1, checkpointing=True),
]
QUICK = CASES[:1] + CASES[3:4]


def build_model_dir(name: str, root: Path) -> Path:
    """Save a random-init model of the shape `name` (fp32 safetensors) so it loads like a hub checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = root / name
    if not (path / "config.json").exists():
        spec = dict(SHAPES[name])
        config = AutoConfig.for_model(spec.pop("model_type"), **spec)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def tensor_bytes(model) -> int:
    """Bytes of the distinct storages behind the model's parameters, buffers and NF4 quantisation state."""
    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()

    # Dequantised NF4 layers keep their packed data and its state beside the dense weight (`nf4_source`).
    sources = [m.nf4_source for m in model.modules() if getattr(m, "nf4_source", None) is not None]
    for t in list(model.parameters()) + list(model.buffers()) + [packed for packed, _ in sources]:
        add(t)
        state = getattr(t, "quant_state", None)
        while state is not None:
            for attr in ("absmax", "code", "offset"):
                add(getattr(state, attr, None))
            state = getattr(state, "state2", None)
    for _, state in sources:
        while state is not None:
            for attr in ("absmax", "code", "offset"):
                add(getattr(state, attr, None))
            state = getattr(state, "state2", None)
    return sum(seen.values())


def recipe_for(case: Case, chunk_size: int = ModelConfig.logprob_chunk_size) -> Recipe:
    recipe = Recipe()
    recipe.model = ModelConfig(name="measured", device="cpu", dtype="float32",
                               gradient_checkpointing="on" if case.checkpointing else "off",
                               logprob_chunk_size=chunk_size)
    recipe.lora = LoraSection(r=16, alpha=32, target_modules=["all-linear"])
    recipe.data.max_prompt_tokens, recipe.data.max_answer_tokens = case.prompt, case.answer
    recipe.sft = SFTConfig(micro_batch_size=case.micro_batch)
    recipe.spin = SpinConfig(micro_batch_size=case.micro_batch)
    recipe.generation.max_new_tokens = case.answer
    return recipe


def measure(case: Case, model_dir: Path, stages: tuple[str, ...] = ("sft", "spin"),
            chunk_size: int = ModelConfig.logprob_chunk_size) -> dict[str, int]:
    """Measured peak bytes of one SFT and one SPIN step (each with a fresh model and adapter) and the weights."""
    recipe = recipe_for(case, chunk_size)
    runtime = Runtime(torch.device("cpu"), torch.float32, case.checkpointing)
    vocab = SHAPES[case.shape]["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    n = case.micro_batch

    def ids(length):
        return torch.randint(3, vocab, (length,), generator=gen).tolist()

    # Two micro-batches, so the second step runs with the optimizer state of the first, as every later step of a
    # run does. The last item of each is one token shorter: batches carry padding and an attention mask.
    items = 2 * n
    lengths = [case.answer - 1 if n > 1 and i % n == n - 1 else case.answer for i in range(items)]
    prompts = [ids(case.prompt) for _ in range(items)]
    real = [ids(a) for a in lengths]
    # Generated answers one token shorter than the real ones: a SPIN pair's two sequences almost never have the same
    # length, so its batch carries padding and a mask (what the planner assumes for more than one sequence).
    generated = [ids(case.answer - 1) for _ in range(items)]
    out: dict[str, int] = {}
    for stage in stages:
        model = attach_lora(load_base_model(str(model_dir), ModelConfig(name=str(model_dir), device="cpu"),
                                            runtime), recipe.lora)
        out["weights"] = tensor_bytes(model)  # base + LoRA weights
        if stage == "sft":
            step = sft_step_fn(model, [Encoded(p, a) for p, a in zip(prompts, real)], 0,
                               recipe.model.logprob_chunk_size, runtime.device)
            cfg = recipe.sft
        else:
            step = spin_step_fn(model, prompts, real, generated, torch.zeros(items), torch.zeros(items), 0.1, 0,
                                recipe.model.logprob_chunk_size, runtime.device)
            cfg = recipe.spin
        before = tensor_bytes(model)
        peak = peak_live_tensor_bytes(lambda: train_adapter(model, runtime, cfg, [1] * items, step, seed=0))
        out[stage] = before + peak
        del model, step
    return out


def run(cases: list[Case], root: Path, chunk_size: int = ModelConfig.logprob_chunk_size) -> list[dict]:
    rows = []
    for case in cases:
        model_dir = build_model_dir(case.shape, root)
        shape = shape_from_config(json.loads((model_dir / "config.json").read_text()), source=case.shape)
        plan = estimate(recipe_for(case, chunk_size), shape, device="cpu")
        measured = measure(case, model_dir, chunk_size=chunk_size)
        estimates = {"weights+LoRA": plan.weights_bytes + 4 * plan.lora_params,
                     "SFT step": plan.stage("sft_train").total_bytes,
                     "SPIN step": plan.stage("spin_train").total_bytes}
        for (label, est), got in zip(estimates.items(), (measured["weights"], measured["sft"], measured["spin"])):
            rows.append(dict(shape=case.shape, seq=f"{case.prompt}+{case.answer}", micro_batch=case.micro_batch,
                             checkpointing=case.checkpointing, stage=label, estimated=est, measured=got,
                             error=(est - got) / got))
        print(f"measured {case}", file=sys.stderr, flush=True)
    return rows


def environment() -> str:
    import bitsandbytes
    import peft
    import transformers

    return (f"{datetime.date.today().isoformat()}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, peft {peft.__version__}, "
            f"bitsandbytes {bitsandbytes.__version__}")


def markdown(rows: list[dict]) -> str:
    lines = ["| shape | prompt+answer | micro-batch | checkpointing | what | estimated MiB | measured MiB | error |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['seq']} | {r['micro_batch']} | {'on' if r['checkpointing'] else 'off'} | "
                     f"{r['stage']} | {r['estimated'] / MIB:.1f} | {r['measured'] / MIB:.1f} | {r['error']:+.1%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the two smallest cases")
    parser.add_argument("--markdown", type=Path, help="also write the table (markdown) to this file")
    parser.add_argument("--chunk-size", type=int, default=ModelConfig.logprob_chunk_size,
                        help="model.logprob_chunk_size of every case (default: the recipe default)")
    parser.add_argument("--only", choices=sorted(SHAPES), help="only the cases of this shape")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from frugal_spin.ui import quiet_libraries

    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        cases = [c for c in (QUICK if args.quick else CASES) if args.only in (None, c.shape)]
        rows = run(cases, Path(tmp), args.chunk_size)
    table = markdown(rows)
    print(environment())
    print(table)
    worst = max(abs(r["error"]) for r in rows)
    print(f"worst error {worst:.1%} (tolerance ±{TOLERANCE:.0%})")
    if args.markdown:
        args.markdown.write_text(f"Measured: {environment()}; model.logprob_chunk_size {args.chunk_size}\n\n{table}\n"
                                 f"worst error {worst:.1%}\n")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
