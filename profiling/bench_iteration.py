"""One whole SPIN iteration on SmolLM2-135M-Instruct: frugal_spin against what a TRL user writes, fresh processes.

The iteration, the same for every tool: N chitchat training prompts (seed 0, the ChatML template); the opponent
(the base plus a fresh LoRA adapter, i.e. the base) samples one answer per prompt (temperature 1.0, top_p 1.0,
top_k 0, `--max-new-tokens`, batches of `--gen-batch`); the opponent's log-probs of the real and the generated
answers are computed once; the player (LoRA r=16, alpha 32, all linear layers, dropout 0) trains one epoch on
the N pairs with the SPIN/DPO sigmoid loss (beta 0.1, AdamW lr 5e-5, `--micro-batch` pairs per step). Prompts
are cut to `--max-prompt-tokens`, real answers to `--max-new-tokens`.

Tools (each in its own fresh process):
- `frugal_spin`: the package's own stages as a run uses them (`load_model` with NF4 and `cpu_4bit_weights=auto`,
  `inference_mode` + `generate_answers` (on the CPU: sampling from the merged adapter), `score_pairs` and
  `train_adapter` + `spin_step_fn` (on the CPU: one copy of the prompt per pair, `shared_prompt.py`), the
  recipe's gradient checkpointing);
- `frugal_spin_packed`: the same with bitsandbytes' packed 4-bit layers (`cpu_4bit_weights=packed`), what the
  package did before;
- `trl`: plain transformers (fp32 model, `generate` with the same sampling, left padding, prompts in data
  order), then TRL's `DPOTrainer` with `precompute_ref_log_probs=True` and a peft `LoraConfig` (same LoRA), on
  the conversational dataset (prompt / chosen / rejected messages; TRL applies the chat template);
- `hf_bf16`: plain transformers in bf16, generation and scoring only (TRL's bf16 path is not a CPU default).

Per phase: wall time, CPU time of the process (all threads), tokens, tokens/s, peak RSS sampled in the phase;
for the whole process ru_maxrss. The machine this project runs on is shared: compare CPU seconds as well as wall.

    python profiling/bench_iteration.py                  # N=64, 32 new tokens
    python profiling/bench_iteration.py --n 32 --tools frugal_spin trl

Prints a table, then `ratio_time=<frugal/trl whole iteration wall> ratio_peak_mem=<frugal/trl peak RSS>`, and
appends one row per tool to profiling/results.csv (through bench_vs_trl's shared appender).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from bench_vs_trl import (GIB, PeakSampler, append_results, device_name, load_average,  # noqa: E402
                          versions)

BENCH_NAME = "bench_iteration"
TOOLS = ("frugal_spin", "frugal_spin_packed", "trl", "hf_bf16")


class Phase:
    """Wall and CPU seconds and the sampled peak RSS of one phase."""

    def __init__(self, results: dict, name: str, tokens_fn=None):
        self.results, self.name, self.tokens_fn = results, name, tokens_fn

    def __enter__(self):
        self.sampler = PeakSampler(0.01).__enter__()
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        self.sampler.__exit__(*exc)
        self.results[self.name] = {"wall_s": wall, "cpu_s": cpu, "peak_rss_gib": self.sampler.peak / GIB}
        return False


def chitchat_examples(n: int):
    from frugal_spin.tasks.chitchat import build_splits

    rows = build_splits(0, n_heldout=40)["train"][:n]
    return [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows]


def encoded_examples(tokenizer, n: int, max_prompt: int, max_answer: int):
    from frugal_spin.config import DataConfig
    from frugal_spin.data import Example, encode_example

    cfg = DataConfig(max_prompt_tokens=max_prompt, max_answer_tokens=max_answer)
    examples = [Example(p, a) for p, a in chitchat_examples(n)]
    return examples, [encode_example(tokenizer, e, cfg) for e in examples]


# ---------------------------------------------------------------- workers


def worker_frugal(args, packed: bool) -> dict:
    import torch

    from frugal_spin.config import LoraSection, ModelConfig, TrainConfig
    from frugal_spin.generate import generate_answers
    from frugal_spin.model import inference_mode, load_model, load_tokenizer, resolve_runtime
    from frugal_spin.model_source import builtin_smollm2_dir
    from frugal_spin.scoring import score_pairs
    from frugal_spin.shared_prompt import packs_pairs
    from frugal_spin.train import spin_step_fn, train_adapter

    out: dict = {}
    path = str(builtin_smollm2_dir())
    with Phase(out, "load"):
        cfg = ModelConfig(name=path, device="cpu", gradient_checkpointing=args.frugal_gc,
                          cpu_4bit_weights="packed" if packed else "auto")
        runtime = resolve_runtime(cfg)
        tokenizer = load_tokenizer(path)
        torch.manual_seed(0)
        model = load_model(path, cfg, LoraSection(r=16, alpha=32), runtime, max_seq_length=512, seed=0)
    out["weights"] = runtime.base_weights
    examples, encoded = encoded_examples(tokenizer, args.n, args.max_prompt_tokens, args.max_new_tokens)
    prompts = [e.prompt_ids for e in encoded]
    with Phase(out, "generate"), inference_mode(model, runtime) as merged:  # as the pipeline samples
        generated = generate_answers(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                     batch_size=args.gen_batch, temperature=1.0, seed=0)
    out["weights"] += "; sampling from the merged adapter" if merged else ""
    out["generate"]["tokens"] = sum(map(len, generated))
    real = [e.answer_ids for e in encoded]
    pad = tokenizer.pad_token_id
    triples = list(zip(prompts, real, generated))
    with Phase(out, "score"):
        cache_real, cache_gen = score_pairs(model, triples, pad_id=pad, batch_size=args.gen_batch, chunk_size=256)
    # Tokens of the pairs as two sequences each, whatever the layout: the same work counted for every tool.
    out["score"]["tokens"] = sum(2 * len(p) + len(r) + len(g) for p, r, g in triples)
    out["shared_prompt"] = packs_pairs(model, triples)  # for all pairs at once; decided per batch
    step = spin_step_fn(model, prompts, real, generated, cache_real, cache_gen, 0.1, pad, 256, runtime.device)
    lengths = [len(p) + len(r) + len(g) for p, r, g in triples]
    train_cfg = TrainConfig(epochs=1.0, learning_rate=5e-5, micro_batch_size=args.micro_batch, grad_accum_steps=1,
                            lr_scheduler="constant", warmup_ratio=0.0, checkpoint_every_steps=0)
    with Phase(out, "train"):
        result = train_adapter(model, runtime, train_cfg, lengths, step, seed=0)
    out["train"]["tokens"] = out["score"]["tokens"]  # counted as two sequences per pair, as for TRL
    out["first_loss"], out["last_loss"] = result.losses[0], result.losses[-1]
    return out


def _hf_generate(model, tokenizer, prompts, args) -> list[list[int]]:
    """What a transformers user writes: batches in data order, left padding, the same sampling settings."""
    import torch

    eos = tokenizer.eos_token_id
    answers = []
    torch.manual_seed(0)
    for start in range(0, len(prompts), args.gen_batch):
        batch = prompts[start:start + args.gen_batch]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        with torch.no_grad():
            output = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                                    top_k=0, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=eos)
        for row in output[:, width:].tolist():
            answers.append(row[: row.index(eos) + 1] if eos in row else row)
    return answers


def worker_trl(args, dtype_name: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from frugal_spin.model import load_tokenizer
    from frugal_spin.model_source import builtin_smollm2_dir

    out: dict = {}
    path = str(builtin_smollm2_dir())
    dtype = getattr(torch, dtype_name)
    with Phase(out, "load"):
        tokenizer = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    out["weights"] = f"{dtype_name} (transformers)"
    examples, encoded = encoded_examples(tokenizer, args.n, args.max_prompt_tokens, args.max_new_tokens)
    prompts = [e.prompt_ids for e in encoded]
    model.eval()
    with Phase(out, "generate"):
        generated = _hf_generate(model, tokenizer, prompts, args)
    out["generate"]["tokens"] = sum(map(len, generated))
    if dtype_name == "bfloat16":  # generation and plain full-logits scoring only
        with Phase(out, "score"):
            with torch.no_grad():
                for p, a in [(p, e.answer_ids) for p, e in zip(prompts, encoded)] + list(zip(prompts, generated)):
                    ids = torch.tensor([list(p) + list(a)])
                    torch.log_softmax(model(input_ids=ids).logits.float(), -1)
        out["score"]["tokens"] = sum(2 * len(p) + len(e.answer_ids) + len(g)
                                     for p, e, g in zip(prompts, encoded, generated))
        return out

    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    texts = [tokenizer.decode(g, skip_special_tokens=True) for g in generated]
    rows = {"prompt": [[{"role": "user", "content": e.prompt}] for e in examples],
            "chosen": [[{"role": "assistant", "content": e.answer}] for e in examples],
            "rejected": [[{"role": "assistant", "content": t}] for t in texts]}
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_iteration_trl_"), precompute_ref_log_probs=True,
        precompute_ref_batch_size=args.gen_batch, loss_type="sigmoid", beta=0.1,
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=1,
        max_length=args.max_prompt_tokens + args.max_new_tokens, learning_rate=5e-5, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, num_train_epochs=1, bf16=False, fp16=False,
        use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, gradient_checkpointing=args.trl_gc,
        dataloader_num_workers=0, seed=0, disable_tqdm=True)
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", bias="none",
                             task_type="CAUSAL_LM")
    model.config.use_cache = False
    # The reference precompute runs inside the constructor: that is TRL's scoring phase.
    with Phase(out, "score"):
        trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_dict(rows),
                             processing_class=tokenizer, peft_config=peft_config)
    ds = trainer.train_dataset
    out["score"]["tokens"] = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"])
                                 for r in ds)
    with Phase(out, "train"):
        trainer.train()
    out["train"]["tokens"] = out["score"]["tokens"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out["first_loss"], out["last_loss"] = (losses[0], losses[-1]) if losses else (float("nan"), float("nan"))
    return out


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    started, load_start = time.perf_counter(), load_average()
    if args.worker == "frugal_spin":
        out = worker_frugal(args, packed=False)
    elif args.worker == "frugal_spin_packed":
        out = worker_frugal(args, packed=True)
    elif args.worker == "trl":
        out = worker_trl(args, "float32")
    else:
        out = worker_trl(args, "bfloat16")
    out.update(tool=args.worker, total_wall_s=time.perf_counter() - started,
               peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
               load_start=load_start, load_end=load_average(), threads=torch.get_num_threads())
    return out


# ---------------------------------------------------------------- driver


def run_worker(tool: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, "--n", str(args.n),
           "--max-new-tokens", str(args.max_new_tokens), "--max-prompt-tokens", str(args.max_prompt_tokens),
           "--gen-batch", str(args.gen_batch), "--micro-batch", str(args.micro_batch),
           "--frugal-gc", args.frugal_gc] + (["--trl-gc"] if args.trl_gc else []) \
        + (["--threads", str(args.threads)] if args.threads else [])
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"worker {tool} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")


def iteration_wall(r: dict) -> float:
    return sum(r[p]["wall_s"] for p in ("generate", "score", "train") if p in r)


def format_table(results: list[dict]) -> str:
    lines = ["| tool | weights | phase | wall s | CPU s | tokens | tokens/s (wall) | tokens/CPU-s | peak RSS GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for phase in ("load", "generate", "score", "train"):
            if phase not in r:
                continue
            p = r[phase]
            tokens = p.get("tokens")
            rate = f"{tokens / p['wall_s']:.0f}" if tokens else "–"
            cpu_rate = f"{tokens / p['cpu_s']:.0f}" if tokens and p["cpu_s"] else "–"
            lines.append(f"| {r['tool']} | {r['weights']} | {phase} | {p['wall_s']:.1f} | {p['cpu_s']:.1f} | "
                         f"{tokens or '–'} | {rate} | {cpu_rate} | {p['peak_rss_gib']:.2f} |")
        lines.append(f"| {r['tool']} | | **iteration** (generate+score+train) | {iteration_wall(r):.1f} | "
                     f"{sum(r[p]['cpu_s'] for p in ('generate', 'score', 'train') if p in r):.1f} | | | | "
                     f"{r['peak_rss_gib']:.2f} (process) |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", choices=TOOLS)
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=["frugal_spin", "trl"])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-prompt-tokens", type=int, default=96)
    parser.add_argument("--gen-batch", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--frugal-gc", choices=["on", "off"], default="on")
    parser.add_argument("--trl-gc", action="store_true", help="TRL with gradient checkpointing (its own default)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return
    results = []
    for tool in args.tools:
        print(f"running {tool} ...", flush=True)
        results.append(run_worker(tool, args))
        print(json.dumps(results[-1]), flush=True)
    print(format_table(results))
    by_tool = {r["tool"]: r for r in results}
    ratio_time = ratio_mem = None
    if "frugal_spin" in by_tool and "trl" in by_tool:
        frugal, trl = by_tool["frugal_spin"], by_tool["trl"]
        ratio_time = iteration_wall(frugal) / iteration_wall(trl)
        ratio_mem = frugal["peak_rss_gib"] / trl["peak_rss_gib"]
        cpu = lambda r: sum(r[p]["cpu_s"] for p in ("generate", "score", "train"))  # noqa: E731
        print(f"ratio_cpu_time={cpu(frugal) / cpu(trl):.3f}")
        print(f"ratio_time={ratio_time:.3f} ratio_peak_mem={ratio_mem:.3f}")
    if args.no_write:
        return
    ver, device, date = versions(), device_name(), dt.datetime.now().isoformat(timespec="seconds")
    append_results([{
        "date": date, "device": device, **ver, "bench": BENCH_NAME, "T": args.max_prompt_tokens + args.max_new_tokens,
        "tool": r["tool"], "s_per_step": f"{iteration_wall(r):.3f}", "peak_rss_gib": f"{r['peak_rss_gib']:.3f}",
        "notes": (f"whole iteration s (generate+score+train) for N={args.n}, {args.max_new_tokens} new tokens, "
                  f"micro-batch {args.micro_batch}; weights {r['weights']}; "
                  + "; ".join(f"{p} {r[p]['wall_s']:.1f}s wall {r[p]['cpu_s']:.1f}s cpu"
                              for p in ("generate", "score", "train") if p in r)
                  + f"; load 1/5/15 {r['load_start']} -> {r['load_end']}")}
        for r in results])


if __name__ == "__main__":
    main()
