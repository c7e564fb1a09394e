"""The fused NF4 LoRA linear (`frugal_spin.kernels.nf4_lora`) against peft + bitsandbytes, on the linear layers
of one Qwen2.5-1.5B decoder layer (hidden 1,536, MLP 8,960, 12 query / 2 key-value heads of 128).

Per layer shape, the same NF4 weight (bitsandbytes `Linear4bit`, double quantisation, blocksize 64) and the
same LoRA factors (rank 16, alpha 32, dropout 0) go through
- `peft`: peft's `lora.bnb.Linear4bit` forward, autograd backward;
- `fused`: `fused_lora_linear` (Triton on CUDA; on the CPU its torch reference, and also the Triton kernel itself
  under TRITON_INTERPRET=1, which checks numbers only: the interpreter is numpy, its times mean nothing).
On CUDA: forward + backward time (d x, d A, d B), median of `--repeats` after warm-up, and the speedup.
On the CPU: parity only (max |fused - peft| relative to max |peft|, output and gradients); no timing claims.

    python profiling/bench_lora.py --quick                  # CPU: parity on every shape, about a minute
    python profiling/bench_lora.py --tokens 4096 --repeats 20   # CUDA timings

Prints a table, then last `speedup_fwd_bwd_total=<peft time / fused time summed over the 7 layers>` on CUDA, or
`parity_max_rel_err=<worst over shapes and tensors>` on the CPU; appends to profiling/results.csv and rewrites
profiling/bench_lora.md unless --no-write.
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

REPORT_MD = HERE / "bench_lora.md"
TARGET_SPEEDUP = 1.3
# (name, in_features, out_features) of one Qwen2.5-1.5B decoder layer.
SHAPES = [("q_proj", 1536, 1536), ("k_proj", 1536, 256), ("v_proj", 1536, 256), ("o_proj", 1536, 1536),
          ("gate_proj", 1536, 8960), ("up_proj", 1536, 8960), ("down_proj", 8960, 1536)]


class _Holder(torch.nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def peft_layer(in_features: int, out_features: int, rank: int, device: str, compute_dtype, seed: int = 0):
    """peft LoRA over a bitsandbytes NF4 Linear4bit, with non-zero B so the low-rank path counts."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen) / in_features**0.5
    base = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=compute_dtype,
                             compress_statistics=True, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4")
    base = base.to(device)  # quantises
    base.support_avx512bf16_for_cpu = False  # see DESIGN.md
    torch.manual_seed(seed + 1)
    model = get_peft_model(_Holder(base), LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                    target_modules=["proj"], init_lora_weights=False))
    return model.base_model.model.proj


def fused_call(layer, x):
    from frugal_spin.kernels.nf4_lora import NF4Weight, fused_lora_linear

    base = layer.get_base_layer()
    weight = NF4Weight.from_bnb(base.weight.data, base.weight.quant_state)
    return fused_lora_linear(x, weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                             layer.scaling["default"])


def dispatch_choice(device, dtype, rank: int) -> str:
    """What auto mode uses on this GPU for the benchmarked variant (self-check, then timing against peft's path)."""
    from frugal_spin import kernel_timing
    from frugal_spin.kernels import dispatch, nf4_lora

    os.environ.pop("FRUGAL_SPIN_TRITON", None)
    kernel_timing.register()
    nf4_lora.verified(device, nf4_lora.Variant(dtype, rank, False, True))
    r = dispatch.variant_reports()[-1]
    return (f"dispatch (auto) on {r['device_name']}: nf4_lora {r['variant']} -> {r['used']} ({r['reason']}; "
            f"kernel {r['kernel_ms']} ms, reference {r['reference_ms']} ms at kernel_timing.NF4_SHAPE)")


def forward_backward(fn, layer, x, upstream):
    params = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    y = fn(x)
    return [y.detach()] + list(torch.autograd.grad(y, params, upstream))


def rel_err(got, ref) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()


def median_seconds(fn, repeats: int, warmup: int = 3) -> float:
    times = []
    for i in range(warmup + repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="accepted for a uniform interface: the CPU run is quick")
    parser.add_argument("--tokens", type=int, default=None, help="rows of x (default 2048 on CUDA, 64 on CPU)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-interpret", action="store_true",
                        help="CPU: skip the Triton kernel under TRITON_INTERPRET=1 (about a minute for all shapes)")
    parser.add_argument("--no-write", action="store_true", help="do not touch results.csv / bench_lora.md")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    tokens = args.tokens or (2048 if cuda else 64)
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    interpret_shapes = set()
    if not cuda and not args.no_interpret:
        # Our kernels are decorated on first use (kernels/dispatch.py), so setting this now is early enough.
        os.environ["TRITON_INTERPRET"] = "1"
        interpret_shapes = {name for name, _, _ in SHAPES}

    rows = []
    for name, fan_in, fan_out in SHAPES:
        layer = peft_layer(fan_in, fan_out, args.rank, device, dtype)
        gen = torch.Generator().manual_seed(2)
        x = torch.randn(tokens, fan_in, generator=gen).to(device, dtype).requires_grad_()
        upstream = torch.randn(tokens, fan_out, generator=gen).to(device, dtype)
        row = dict(name=name, shape=f"{fan_in}->{fan_out}", date=dt.datetime.now().isoformat(timespec="seconds"),
                   load=load_average().split()[0])
        # On CUDA the kernel is forced: in auto mode the dispatch keeps the torch reference where that is faster
        # (kernels/dispatch.py), and this compares the kernel itself; the dispatch's own choice is printed last.
        os.environ["FRUGAL_SPIN_TRITON"] = "force" if cuda else "auto"
        ref = forward_backward(layer, layer, x, upstream)
        got = forward_backward(lambda t: fused_call(layer, t), layer, x, upstream)
        row["err"] = max(rel_err(g, r) for g, r in zip(got, ref))
        row["path"] = "triton" if cuda else "torch reference"
        if name in interpret_shapes:
            os.environ["FRUGAL_SPIN_TRITON"] = "force"
            start = time.perf_counter()
            got = forward_backward(lambda t: fused_call(layer, t), layer, x, upstream)
            row["interp_err"] = max(rel_err(g, r) for g, r in zip(got, ref))
            row["interp_s"] = time.perf_counter() - start
            os.environ["FRUGAL_SPIN_TRITON"] = "auto"
        if cuda:  # still forced (above)
            row["peft_ms"] = 1e3 * median_seconds(lambda: forward_backward(layer, layer, x, upstream), args.repeats)
            row["fused_ms"] = 1e3 * median_seconds(
                lambda: forward_backward(lambda t: fused_call(layer, t), layer, x, upstream), args.repeats)
        rows.append(row)
        print(row, flush=True)

    lines = ["| layer | in->out | fused path | max rel err vs peft (y, dx, dA, dB) | Triton interpreter rel err | "
             "peft fwd+bwd ms | fused fwd+bwd ms | speedup |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        interp = f"{r['interp_err']:.2e} ({r['interp_s']:.0f} s)" if "interp_err" in r else "-"
        timing = (f"{r['peft_ms']:.3f} | {r['fused_ms']:.3f} | {r['peft_ms'] / r['fused_ms']:.2f}"
                  if "peft_ms" in r else "- | - | -")
        lines.append(f"| {r['name']} | {r['shape']} | {r['path']} | {r['err']:.2e} | {interp} | {timing} |")
    table = "\n".join(lines)
    print()
    print(table)
    if cuda:
        print(dispatch_choice(torch.device("cuda"), dtype, args.rank))
    worst = max([r["err"] for r in rows] + [r["interp_err"] for r in rows if "interp_err" in r])
    if cuda:
        speedup = sum(r["peft_ms"] for r in rows) / sum(r["fused_ms"] for r in rows)
        final = f"speedup_fwd_bwd_total={speedup:.3f} (target >= {TARGET_SPEEDUP}) parity_max_rel_err={worst:.2e}"
    else:
        final = f"parity_max_rel_err={worst:.2e} (CPU: no timing; the speedup target needs CUDA)"
    if not args.no_write:
        write_outputs(rows, args, tokens, dtype, device, table, final)
    print(final)


def write_outputs(rows, args, tokens, dtype, device, table, final) -> None:
    from importlib.metadata import version

    ver = versions()
    try:
        ver["triton"] = version("triton")
    except Exception:
        ver["triton"] = "-"
    name = torch.cuda.get_device_name() if device == "cuda" else device_name()
    out = []
    for r in rows:
        timing = (f"peft_ms={r['peft_ms']:.3f} fused_ms={r['fused_ms']:.3f}; " if "peft_ms" in r
                  else "no timing (CPU); ")
        interp = f"interpreter rel err {r['interp_err']:.2e}; " if "interp_err" in r else ""
        out.append({"date": r["date"], "device": name, **{k: ver[k] for k in CSV_COLUMNS if k in ver},
                    "bench": "bench_lora", "T": tokens, "tool": f"{r['name']} {r['shape']}",
                    "s_per_step": f"{r['fused_ms'] / 1e3:.5f}" if "fused_ms" in r else "",
                    "peak_rss_gib": "",
                    "notes": f"{timing}fused path {r['path']}; max rel err vs peft {r['err']:.2e}; "
                             f"{interp}rank {args.rank}; {str(dtype).removeprefix('torch.')}; "
                             f"triton {ver['triton']}; 1-min load {r['load']}"})
    append_results(out)
    previous = REPORT_MD.read_text() if REPORT_MD.exists() else ""
    marker = "<!-- analysis -->"
    analysis = previous[previous.index(marker):] if marker in previous else marker + "\n"
    REPORT_MD.write_text(f"""# Fused NF4 LoRA linear vs peft + bitsandbytes (Qwen2.5-1.5B layer shapes)

Latest run: {rows[0]['date']}, {name}; torch {ver['torch']}, peft {ver['peft']}, bitsandbytes {ver['bitsandbytes']},
triton {ver['triton']}; 1-min load at the start {rows[0]['load']}, at the end {rows[-1]['load']}.

Command: `python profiling/bench_lora.py {' '.join(sys.argv[1:])}`

{tokens} tokens, rank {args.rank}, alpha {2 * args.rank}, {str(dtype).removeprefix('torch.')}; forward + backward
(d x, d A, d B). Relative error = max |fused - peft| / max |peft| over the output and the three gradients.

{table}

`{final}`

{analysis}""")


if __name__ == "__main__":
    main()
