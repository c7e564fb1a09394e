"""SPIN training work through frugal_spin and through TRL's DPOTrainer, side by side, one fresh process per run.

What is compared (the same for both tools):
- one random-init Qwen2 model (vocab 151,936, hidden 256, 4 layers, 4 heads / 2 kv heads, MLP 1,024, tied
  embeddings), saved once with `save_pretrained` and loaded by every worker;
- the same pairs (fixed seed): prompt T/4 random token ids, a "real" and a "generated" answer of 3T/4 ids each
  (the last id of each answer is eos, which TRL appends anyway);
- LoRA r=16, alpha 32, dropout 0 on all linear layers; one pair per optimizer step; beta 0.1; AdamW lr 1e-4,
  max grad norm 1.0, weight decay 0; fp32 compute on the CPU; no gradient checkpointing (frugal_spin's CPU
  default; TRL's own default is on, so `--trl-gc` adds a TRL run with it as an extra row);
- opponent / reference log-probs precomputed once, one pair (2 sequences) per forward, and not timed as training.

frugal_spin loads the base in NF4 4-bit (`load_base_model`) and trains with `train_adapter` + `spin_step_fn`.
TRL loads the fp32 base (4-bit changes nothing for TRL here: the tied 151,936-wide embedding stays fp32, see
DESIGN.md) and trains with `DPOTrainer(precompute_ref_log_probs=True, loss_type="sigmoid")`. TRL only takes text
datasets, so a local WordLevel tokenizer maps word "t<i>" to id i; the worker checks that the ids TRL tokenised
are exactly the ids frugal_spin trains on.

Per-step time: median (and min) of the gaps between consecutive optimizer-step ends, after `--warmup` steps.
Peak memory: `ru_maxrss` of the worker (whole life, precompute included; or the sampled peak if larger), plus the
RSS just before training and a sampled peak during training only.

    python profiling/bench_vs_trl.py --quick            # T = 128, 256; a few minutes
    python profiling/bench_vs_trl.py                    # T = 256, 512, 1024
    python profiling/bench_vs_trl.py --lengths 1024 --steps 8 --trl-gc

CUDA mode (`--device cuda`, used by profiling/gpu_check.sh): both tools on the GPU, in bf16 where the GPU has it
(capability >= 8.0) and fp16 otherwise (frugal_spin's `dtype: auto`; TRL's `bf16`/`fp16` flags to match),
frugal_spin with its GPU defaults (NF4, paged 8-bit AdamW, no checkpointing here, as TRL's run); the memory
columns then hold the CUDA peak (`torch.cuda.max_memory_allocated`, whole worker) instead of RSS.

Prints a table and, last, `ratio_time=<frugal/trl> ratio_peak_mem=<frugal/trl>` at the largest T; appends rows to
profiling/results.csv and rewrites profiling/bench_vs_trl.md (unless --no-write).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS_CSV = HERE / "results.csv"
REPORT_MD = HERE / "bench_vs_trl.md"
BENCH_NAME = "bench_vs_trl"
CSV_COLUMNS = ["date", "device", "torch", "transformers", "peft", "bitsandbytes", "trl", "bench", "T", "tool",
               "s_per_step", "peak_rss_gib", "notes"]
GIB = 1024 ** 3

# ---------------------------------------------------------------- shared setup: model, tokenizer, pairs


def model_config(vocab: int, hidden: int, layers: int):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=4 * hidden, max_position_embeddings=4096,
                       tie_word_embeddings=True, use_cache=False)


def build_model_dir(path: Path, vocab: int, hidden: int, layers: int, seed: int = 0) -> Path:
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(model_config(vocab, hidden, layers)).to(torch.float32)
    model.save_pretrained(str(path))
    return path


def special_ids(vocab: int) -> tuple[int, int]:
    """(unk_id, eos_id): the two last ids; words t0 .. t<vocab-3> take the others."""
    return vocab - 2, vocab - 1


def build_tokenizer(vocab: int):
    """A WordLevel tokenizer: word "t<i>" is id i, split on whitespace; eos (also pad) and unk are the last ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    unk_id, eos_id = special_ids(vocab)
    words = {f"t{i}": i for i in range(vocab - 2)}
    words["<unk>"] = unk_id
    words["<|endoftext|>"] = eos_id
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def make_pairs(n: int, seq_len: int, vocab: int, seed: int = 1234):
    """n (prompt, real, generated) id lists: prompt T/4 ids, answers 3T/4 ids each ending with eos."""
    import random

    rng = random.Random(seed)
    _, eos_id = special_ids(vocab)
    n_prompt = seq_len // 4
    n_answer = seq_len - n_prompt
    word = lambda: rng.randrange(vocab - 2)  # noqa: E731
    out = []
    for _ in range(n):
        prompt = [word() for _ in range(n_prompt)]
        real = [word() for _ in range(n_answer - 1)] + [eos_id]
        generated = [word() for _ in range(n_answer - 1)] + [eos_id]
        out.append((prompt, real, generated))
    return out


# ---------------------------------------------------------------- memory probes


def cuda_peak_bytes(device: str) -> int:
    """The CUDA allocator's peak of this worker (0 on the CPU)."""
    import torch

    return torch.cuda.max_memory_allocated() if device == "cuda" else 0


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class PeakSampler:
    """Samples this process's RSS every `interval` seconds in a thread; `.peak` is the largest seen."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def step_times(ends: list[float], start: float, warmup: int) -> list[float]:
    """Gaps between consecutive optimizer-step ends (the first from `start`), without the first `warmup` steps."""
    gaps = [b - a for a, b in zip([start] + ends[:-1], ends)]
    return gaps[warmup:]


# ---------------------------------------------------------------- workers (each in a fresh process)


def worker_frugal(args) -> dict:
    import torch

    from frugal_spin.config import LoraSection, ModelConfig, TrainConfig
    from frugal_spin.model import attach_lora, load_base_model, resolve_runtime
    from frugal_spin.scoring import score_responses
    from frugal_spin.train import spin_step_fn, train_adapter

    torch.manual_seed(0)
    pairs = make_pairs(args.warmup + args.steps, args.seq_len, args.vocab)
    _, eos_id = special_ids(args.vocab)
    cfg = ModelConfig(name=args.model_dir, device=args.device, dtype="float32" if args.device == "cpu" else "auto",
                      load_in_4bit=not args.no_4bit, gradient_checkpointing="off")
    runtime = resolve_runtime(cfg)
    model = attach_lora(load_base_model(args.model_dir, cfg, runtime),
                        LoraSection(r=16, alpha=32, dropout=0.0, target_modules=["all-linear"]))
    prompts = [p for p, _, _ in pairs]
    real = [r for _, r, _ in pairs]
    generated = [g for _, _, g in pairs]

    # Opponent log-probs: one pair (2 sequences) per forward, like TRL's precompute with batch size 1 below.
    t0 = time.perf_counter()
    scores = score_responses(model, [(p, r) for p, r in zip(prompts, real)] + [(p, g) for p, g in
                                                                            zip(prompts, generated)],
                             pad_id=eos_id, batch_size=2, chunk_size=cfg.logprob_chunk_size)
    precompute_s = (time.perf_counter() - t0) / len(pairs)
    opp_real, opp_generated = scores[: len(pairs)], scores[len(pairs):]

    step = spin_step_fn(model, prompts, real, generated, opp_real, opp_generated, beta=0.1, pad_id=eos_id,
                        chunk_size=cfg.logprob_chunk_size, device=runtime.device)
    train_cfg = TrainConfig(epochs=1.0, learning_rate=1e-4, micro_batch_size=1, grad_accum_steps=1,
                            lr_scheduler="constant", warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0)
    ends: list[float] = []
    losses: list[float] = []

    def on_step(_step: int, loss: float) -> None:
        ends.append(time.perf_counter())
        losses.append(loss)

    rss_before = rss_bytes()
    with PeakSampler() as sampler:
        start = time.perf_counter()
        train_adapter(model, runtime, train_cfg, [len(p) + len(r) for p, r in zip(prompts, real)], step,
                      seed=0, on_step=on_step)
    times = step_times(ends, start, args.warmup)
    peak = cuda_peak_bytes(args.device) or max(maxrss_bytes(), sampler.peak)
    return {"tool": "frugal_spin", "s_per_step": statistics.median(times), "step_times": times,
            "peak_rss": peak, "train_peak_rss": sampler.peak, "rss_before": rss_before,
            "precompute_s_per_pair": precompute_s, "first_loss": losses[0], "last_loss": losses[-1]}


def worker_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    pairs = make_pairs(args.warmup + args.steps, args.seq_len, args.vocab)
    tokenizer = build_tokenizer(args.vocab)
    words = lambda ids: " ".join(f"t{i}" for i in ids)  # noqa: E731
    _, eos_id = special_ids(args.vocab)
    # Answers are given without their final eos: TRL appends the eos token to chosen and rejected itself.
    rows = {"prompt": [words(p) for p, _, _ in pairs],
            "chosen": [" " + words(r[:-1]) for _, r, _ in pairs],
            "rejected": [" " + words(g[:-1]) for _, _, g in pairs]}
    cuda = args.device == "cuda"
    half = (torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16) if cuda else None
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, device_map=args.device)
    model.config.use_cache = False
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", bias="none",
                             task_type="CAUSAL_LM")
    out_dir = tempfile.mkdtemp(prefix="bench_trl_")
    config = DPOConfig(
        output_dir=out_dir, precompute_ref_log_probs=True, precompute_ref_batch_size=1, loss_type="sigmoid",
        beta=0.1, per_device_train_batch_size=1, gradient_accumulation_steps=1, max_length=args.seq_len,
        learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        num_train_epochs=1, bf16=half == torch.bfloat16, fp16=half == torch.float16, use_cpu=not cuda,
        report_to=[], save_strategy="no",
        logging_steps=1, gradient_checkpointing=args.trl_gc, dataloader_num_workers=0, seed=0,
        disable_tqdm=True,
    )

    # Time the reference precompute (it runs inside the trainer's constructor) without changing what it does.
    precompute = {"s": 0.0}
    original = DPOTrainer._precompute_ref_logps

    def timed(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return original(self, *a, **k)
        finally:
            precompute["s"] += time.perf_counter() - t0

    DPOTrainer._precompute_ref_logps = timed
    ends: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *_a, **_k):
            ends.append(time.perf_counter())

    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_dict(rows), processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[Stamp()])
    # Both tools must train on identical ids.
    ds = trainer.train_dataset
    for i, (p, r, g) in enumerate(pairs):
        if ds[i]["prompt_ids"] != p or ds[i]["chosen_ids"] != r or ds[i]["rejected_ids"] != g:
            raise RuntimeError(f"TRL tokenised pair {i} differently from the ids frugal_spin trains on")
    if len(ds) != len(pairs):
        raise RuntimeError(f"TRL kept {len(ds)} of {len(pairs)} pairs")

    rss_before = rss_bytes()
    with PeakSampler() as sampler:
        start = time.perf_counter()
        trainer.train()
    times = step_times(ends, start, args.warmup)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    peak = cuda_peak_bytes(args.device) or max(maxrss_bytes(), sampler.peak)
    return {"tool": "trl_gc" if args.trl_gc else "trl", "s_per_step": statistics.median(times),
            "step_times": times, "peak_rss": peak, "train_peak_rss": sampler.peak,
            "rss_before": rss_before, "precompute_s_per_pair": precompute["s"] / len(pairs),
            "first_loss": losses[0] if losses else float("nan"), "last_loss": losses[-1] if losses else float("nan")}


# ---------------------------------------------------------------- driver


def run_worker(tool: str, seq_len: int, args, model_dir: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, "--seq-len", str(seq_len),
           "--model-dir", str(model_dir), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--vocab", str(args.vocab), "--device", args.device]
    if args.no_4bit:
        cmd.append("--no-4bit")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"worker {tool} T={seq_len} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")


def merge_runs(runs: list[dict], seq_len: int, warmup: int) -> dict:
    """One row from repeated runs of one tool: median over all measured steps, the largest memory figures."""
    times = [t for r in runs for t in r["step_times"]]
    loads = [float(r[key].split()[0]) for r in runs for key in ("load_start", "load")]
    return {"tool": runs[0]["tool"], "T": seq_len, "s_per_step": statistics.median(times), "step_times": times,
            "peak_rss": max(r["peak_rss"] for r in runs), "train_peak_rss": max(r["train_peak_rss"] for r in runs),
            "rss_before": max(r["rss_before"] for r in runs),
            "precompute_s_per_pair": statistics.median(r["precompute_s_per_pair"] for r in runs),
            "load_start": runs[0]["load_start"], "load": runs[-1]["load"],
            "load_1min": f"{min(loads):.2f}-{max(loads):.2f}", "threads": runs[0].get("threads"),
            "warmup": warmup, "runs": len(runs),
            "date": dt.datetime.now().isoformat(timespec="seconds")}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "trl"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    return out


def device_name() -> str:
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def format_table(results: list[dict]) -> str:
    head = ("| T | tool | s/step (median) | s/step (min) | peak RSS GiB | RSS before training GiB "
            "| train-phase peak RSS GiB | reference precompute s/pair | 1-min load avg seen (min-max) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        lines.append(f"| {r['T']} | {r['tool']} | {r['s_per_step']:.2f} | {min(r['step_times']):.2f} | "
                     f"{r['peak_rss'] / GIB:.2f} | "
                     f"{r['rss_before'] / GIB:.2f} | {r['train_peak_rss'] / GIB:.2f} | "
                     f"{r['precompute_s_per_pair']:.2f} | {r['load_1min']} |")
    return "\n".join(lines)


def ratios(results: list[dict]) -> tuple[int, float, float]:
    top = max(r["T"] for r in results)
    by_tool = {r["tool"]: r for r in results if r["T"] == top}
    frugal, trl = by_tool["frugal_spin"], by_tool["trl"]
    return top, frugal["s_per_step"] / trl["s_per_step"], frugal["peak_rss"] / trl["peak_rss"]


def append_results(rows: list[dict]) -> None:
    """Append rows (dicts over CSV_COLUMNS) to profiling/results.csv, with the header when the file is new;
    shared by every benchmark here."""
    new = not RESULTS_CSV.exists()
    with RESULTS_CSV.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def write_csv(results: list[dict], ver: dict[str, str], device: str) -> None:
    rows = []
    for r in results:
        rows.append({"date": r["date"], "device": device, **ver, "bench": BENCH_NAME, "T": r["T"],
                     "tool": r["tool"], "s_per_step": f"{r['s_per_step']:.3f}",
                     "peak_rss_gib": f"{r['peak_rss'] / GIB:.3f}",
                     "notes": f"1-min load {r['load_1min']} (1/5/15 at start {r['load_start']}); "
                              f"steps {len(r['step_times'])} after {r['warmup']} warm-up x {r['runs']} runs; "
                              f"rss_before {r['rss_before'] / GIB:.3f} GiB; "
                              f"min {min(r['step_times']):.3f} s/step; "
                              f"precompute {r['precompute_s_per_pair']:.2f} s/pair; "
                              f"torch threads {r['threads']}"})
    append_results(rows)


def write_report(results, command: str, ver, device, top, ratio_time, ratio_mem) -> None:
    previous = REPORT_MD.read_text() if REPORT_MD.exists() else ""
    marker = "<!-- analysis -->"
    analysis = previous[previous.index(marker):] if marker in previous else marker + "\n"
    verdict_t = "meets" if ratio_time <= 0.8 else "misses"
    verdict_m = "meets" if ratio_mem <= 0.6 else "misses"
    text = f"""# frugal_spin vs TRL DPOTrainer: SPIN training on the CPU

Latest run: {results[0]['date']}, {device}; torch {ver['torch']}, transformers {ver['transformers']},
peft {ver['peft']}, bitsandbytes {ver['bitsandbytes']}, trl {ver['trl']}.

Command: `{command}`

Same work for both tools: random-init Qwen2 (vocab 151,936, hidden 256, 4 layers, tied embeddings), the same
random-id pairs (prompt T/4, real and generated answers 3T/4 each), LoRA r=16/alpha 32 all-linear, one pair per
optimizer step, beta 0.1, AdamW lr 1e-4, fp32, no gradient checkpointing unless the tool is `trl_gc` (TRL's own
default). frugal_spin runs on an NF4 base, TRL on the fp32 base. Each row is a fresh process. s/step is the median
of {len(results[0]['step_times'])} steps ({results[0]['runs']} fresh runs alternating the tools, each after
{results[0]['warmup']} warm-up steps); peak RSS is the larger of `ru_maxrss`
and the sampled RSS of the worker (reference precompute included); torch threads per worker:
{results[0]['threads']}; the train-phase peak is sampled every 5 ms during training only.

{format_table(results)}

At T={top}: `ratio_time={ratio_time:.3f} ratio_peak_mem={ratio_mem:.3f}` (frugal_spin / TRL).
Targets (CPU, 1,024 tokens): step time <= 0.8x TRL ({verdict_t}), peak memory <= 0.6x TRL ({verdict_m}).
The 2 CPU cores are shared with other jobs: compare rows of one run, and read the load average beside them.

{analysis}"""
    REPORT_MD.write_text(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T = 128, 256 with 1 warm-up + 3 measured steps")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="tokens per sequence (default 256 512 1024)")
    parser.add_argument("--steps", type=int, default=None, help="measured optimizer steps (default 6; quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps left out (default 2; quick 1)")
    parser.add_argument("--tools", nargs="+", default=["frugal_spin", "trl"], choices=["frugal_spin", "trl"])
    parser.add_argument("--trl-gc", action="store_true", help="also run TRL with its default gradient checkpointing")
    parser.add_argument("--repeats", type=int, default=1, help="fresh runs per (T, tool), alternating the tools")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads in every worker (default: torch's own choice, one per core)")
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--no-4bit", action="store_true", help="frugal_spin on the fp32 base (diagnostic only)")
    parser.add_argument("--no-write", action="store_true", help="do not touch results.csv / bench_vs_trl.md")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: both tools on the GPU; memory columns are then the CUDA peak")
    # worker mode (internal)
    parser.add_argument("--worker", choices=["frugal_spin", "trl", "trl_gc"], help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 3 if args.quick else 6
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2

    if args.worker:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        args.trl_gc = args.worker == "trl_gc"
        result = worker_frugal(args) if args.worker == "frugal_spin" else worker_trl(args)
        result["threads"] = torch.get_num_threads()
        print("RESULT " + json.dumps(result), flush=True)
        return

    lengths = args.lengths or ([128, 256] if args.quick else [256, 512, 1024])
    tools = list(args.tools) + (["trl_gc"] if args.trl_gc else [])
    command = "python profiling/bench_vs_trl.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_vs_trl_model_") as tmp:
        model_dir = build_model_dir(Path(tmp) / "qwen2", args.vocab, args.hidden, args.layers)
        for seq_len in lengths:
            runs: dict[str, list[dict]] = {tool: [] for tool in tools}
            for repeat in range(args.repeats):
                # Alternate the order, so that neither tool always runs first under a drifting machine load.
                for tool in tools if repeat % 2 == 0 else tools[::-1]:
                    load_start = load_average()
                    r = run_worker(tool, seq_len, args, model_dir)
                    r.update(load_start=load_start, load=load_average())
                    runs[tool].append(r)
                    print(f"T={seq_len} {tool} run {repeat + 1}/{args.repeats}: {r['s_per_step']:.2f} s/step, "
                          f"peak RSS {r['peak_rss'] / GIB:.2f} GiB, steps {[round(t, 2) for t in r['step_times']]}, "
                          f"loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}, load {load_start} -> {r['load']}",
                          flush=True)
            for tool in tools:
                results.append(merge_runs(runs[tool], seq_len, args.warmup))
    print()
    print(format_table(results))
    if "frugal_spin" in tools and "trl" in tools:
        top, ratio_time, ratio_mem = ratios(results)
        if not args.no_write:
            ver, device = versions(), device_name()
            write_csv(results, ver, device)
            write_report(results, command, ver, device, top, ratio_time, ratio_mem)
        print(f"ratio_time={ratio_time:.3f} ratio_peak_mem={ratio_mem:.3f}")
    elif not args.no_write:
        write_csv(results, versions(), device_name())


if __name__ == "__main__":
    main()
