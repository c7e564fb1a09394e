"""Peak transient memory and time of the lm_head log-prob paths, per number of scored tokens T.

The work: log p(target) for T rows through a frozen [V, H] head (the LoRA case), forward + backward to the
hidden states, with a random upstream gradient. Paths:
- `plain`: full fp32 logits + log_softmax + gather, by autograd (`frugal_spin.logprobs.reference_token_logprobs`);
- `chunked c=<C>`: the torch chunked path (`chunked_token_logprobs` with the Triton dispatch off), C rows a time;
- `triton c=<C>` (CUDA only): the same with the Triton softmax kernel (`frugal_spin.kernels.logprob`).

Transient memory = peak bytes of live tensors during forward + backward minus those alive before (inputs),
from torch.profiler's allocator events on the CPU (`frugal_spin.profiler.peak_live_tensor_bytes`), and
`torch.cuda.max_memory_allocated` minus the bytes allocated before on CUDA. Time = median wall time of
`--repeats` forward + backward runs after one warm-up.

    python profiling/bench_logprobs.py --quick      # CPU, hidden 128, T = 512..4,096, a few minutes
    python profiling/bench_logprobs.py --hidden 1536 --repeats 3   # Qwen2.5-1.5B's head (slow on a CPU)

Prints a table, then last `memory_ratio_at_T=<T> chunked/plain=<ratio>` (the smallest chunk size run);
appends rows to profiling/results.csv and rewrites profiling/bench_logprobs.md unless --no-write.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_vs_trl import CSV_COLUMNS, append_results, device_name, load_average, versions  # noqa: E402

from frugal_spin.kernels import dispatch  # noqa: E402
from frugal_spin.logprobs import chunked_token_logprobs, reference_token_logprobs  # noqa: E402

GIB = 1024**3
REPORT_MD = HERE / "bench_logprobs.md"
TARGET_GIB = 0.25


def make_inputs(tokens: int, vocab: int, hidden: int, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden, generator=gen) * 1.5 / hidden**0.5).to(device=device, dtype=dtype)
    targets = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
    upstream = torch.randn(tokens, generator=gen).to(device)
    return h, weight, targets, upstream


def run_path(path: str, chunk: int, h, weight, targets, upstream) -> None:
    """One forward + backward; `path` is plain, chunked or triton."""
    if path == "plain":
        out = reference_token_logprobs(h, weight, targets)
    else:
        # forced: auto mode may keep the torch path where it is faster (kernels/dispatch.py); this times the kernel
        os.environ[dispatch.MODE_ENV] = "force" if path == "triton" else "off"
        out = chunked_token_logprobs(h, weight, targets, None, chunk_size=chunk)
    torch.autograd.grad(out, [h], upstream)


def transient_bytes(fn, device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from frugal_spin.profiler import peak_live_tensor_bytes

    baseline = peak_live_tensor_bytes(lambda: torch.empty(1))  # what is alive already (inputs included)
    return peak_live_tensor_bytes(fn) - baseline


def seconds(fn, repeats: int, device: str) -> list[float]:
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[1:]


def plain_gib_estimate(tokens: int, vocab: int) -> float:
    """Peak of the plain path: log_softmax's saved output, its incoming gradient and the logits' gradient."""
    return 3 * tokens * vocab * 4 / GIB


def format_table(rows: list[dict]) -> str:
    lines = ["| T | path | fwd+bwd s (median) | transient GiB | transient / plain |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ratio']:.3f}" if r.get("ratio") is not None else "-"
        mem = f"{r['gib']:.3f}" if r["gib"] is not None else "not run"
        time_s = f"{r['seconds']:.3f}" if r["seconds"] is not None else "-"
        lines.append(f"| {r['T']} | {r['path']} | {time_s} | {mem} | {ratio} |")
    return "\n".join(lines)


def write_csv(rows: list[dict], args, device: str, ver: dict[str, str]) -> None:
    out = []
    for r in rows:
        if r["gib"] is None:
            continue
        out.append({"date": r["date"], "device": device, **{k: ver[k] for k in CSV_COLUMNS if k in ver},
                    "bench": "bench_logprobs", "T": r["T"], "tool": r["path"],
                    "s_per_step": f"{r['seconds']:.4f}", "peak_rss_gib": "",
                    "notes": f"transient_gib={r['gib']:.4f} (peak live tensor bytes beyond the inputs, "
                             f"not RSS); fwd+bwd median of {args.repeats}; vocab {args.vocab}; "
                             f"hidden {args.hidden}; {args.dtype}; triton {ver['triton']}; "
                             f"1-min load {r['load']}"})
    append_results(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="hidden 128, 1 timed run per row")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--chunks", type=int, nargs="+", default=[1024, 256],
                        help="chunk sizes of the chunked paths (1024 is the recipe default)")
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=None, help="head width (default 1536; quick 128)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="hidden and head dtype (default float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 3; quick 1)")
    parser.add_argument("--max-plain-gib", type=float, default=8.0,
                        help="skip the plain path where its estimated peak is larger (host RAM is shared)")
    parser.add_argument("--no-write", action="store_true", help="do not touch results.csv / bench_logprobs.md")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.hidden = args.hidden or (128 if args.quick else 1536)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    dtype = getattr(torch, args.dtype)
    paths = ["plain"] + [f"chunked c={c}" for c in args.chunks]
    if device == "cuda" and dispatch.triton_importable():
        paths += [f"triton c={c}" for c in args.chunks]

    rows = []
    for tokens in args.lengths:
        inputs = make_inputs(tokens, args.vocab, args.hidden, dtype, device)
        plain_gib = None
        for path in paths:
            kind, _, chunk = path.partition(" c=")
            row = dict(T=tokens, path=path, date=dt.datetime.now().isoformat(timespec="seconds"),
                       load=load_average().split()[0], gib=None, seconds=None, ratio=None)
            if kind == "plain" and plain_gib_estimate(tokens, args.vocab) > args.max_plain_gib:
                rows.append(row)
                print(f"T={tokens} plain: skipped (~{plain_gib_estimate(tokens, args.vocab):.1f} GiB)", flush=True)
                continue

            def fn():
                run_path(kind, int(chunk or 0), *inputs)

            row["seconds"] = statistics.median(seconds(fn, args.repeats, device))
            row["gib"] = transient_bytes(fn, device) / GIB
            if kind == "plain":
                plain_gib = row["gib"]
            row["ratio"] = row["gib"] / plain_gib if plain_gib else None
            rows.append(row)
            print(f"T={tokens} {path}: {row['seconds']:.3f} s, transient {row['gib']:.3f} GiB", flush=True)
        inputs = None  # free this T's tensors before the next T's are made
    os.environ.pop(dispatch.MODE_ENV, None)

    table = format_table(rows)
    print()
    print(table)
    top = max(args.lengths)
    smallest = f"chunked c={min(args.chunks)}"
    at_top = {r["path"]: r for r in rows if r["T"] == top}
    ratio = at_top[smallest]["ratio"]
    ratio_text = f"{ratio:.4f}" if ratio is not None else "n/a (plain not run)"
    final = (f"memory_ratio_at_T={top} {smallest}/plain={ratio_text} "
             f"transient_gib={at_top[smallest]['gib']:.3f} (target <= {TARGET_GIB})")
    if not args.no_write:
        ver = versions()
        try:
            from importlib.metadata import version

            ver["triton"] = version("triton")
        except Exception:
            ver["triton"] = "-"
        write_csv(rows, args, device_name() if device == "cpu" else torch.cuda.get_device_name(), ver)
        write_report(rows, args, device, ver, final, table)
    print(final)


def write_report(rows, args, device, ver, final, table) -> None:
    previous = REPORT_MD.read_text() if REPORT_MD.exists() else ""
    marker = "<!-- analysis -->"
    analysis = previous[previous.index(marker):] if marker in previous else marker + "\n"
    name = device_name() if device == "cpu" else torch.cuda.get_device_name()
    REPORT_MD.write_text(f"""# lm_head log-probs: plain vs chunked (vs Triton on CUDA)

Latest run: {rows[0]['date']}, {name}; torch {ver['torch']}, triton {ver['triton']}; 1-min load at the
start {rows[0]['load']}, at the end {rows[-1]['load']}.

Command: `python profiling/bench_logprobs.py {' '.join(sys.argv[1:])}`

T rows through a frozen [{args.vocab:,} x {args.hidden}] {args.dtype} head, forward + backward to the hidden states;
transient = peak live tensor bytes beyond the inputs; time = median of {args.repeats} run(s) after a warm-up.

{table}

`{final}`

{analysis}""")


if __name__ == "__main__":
    main()
