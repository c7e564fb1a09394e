"""The parts of the GPU check that run in Python (profiling/gpu_check.py runs each in a fresh process and reports).

Each part is a function returning a JSON-able dict. `problems` (a list of sentences) makes the part fail; `skipped`
(one sentence) marks it skipped. The device is CUDA unless GPU_CHECK_DEVICE says otherwise: the tests run the parts
that can run there on the CPU (`GPU_CHECK_DEVICE=cpu`), the GPU machine never sets it.

Parts here: env, self_checks, stages (fp16 / bf16), packing, tiny_cuda, resume. Their inputs live under WORK
(GPU_CHECK_WORK, default /tmp/frugal_spin_gpu_check), which the check owns: it deletes there only what it wrote.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/frugal_spin_gpu_check"))
DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")
RECIPE = REPO / "recipes" / "colab_t4.yaml"
TINY_RECIPE = REPO / "recipes" / "cpu_tiny.yaml"
ARCHITECTURE = "Qwen/Qwen2.5-0.5B-Instruct"  # colab_t4's model; its shape comes from the planner's offline table
TRAIN_ROWS, EVAL_ROWS = 64, 16
STAGE_MAP = {"sft": "sft_train", "anchor": "generate", "iter_0.generate": "generate", "iter_0.score": "score",
             "iter_0.train": "spin_train", "sft.eval": "eval", "iter_0.eval": "eval"}
PACKAGES = ("torch", "transformers", "peft", "triton", "bitsandbytes", "accelerate", "trl", "datasets", "dill",
            "multiprocess")
MODEL_MARKER = "gpu_check_model.json"  # written last into a complete model directory (see build_inputs)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    return out


# ---------------------------------------------------------------------------------------------- env


def part_env() -> dict:
    import torch

    from frugal_spin.config import ModelConfig
    from frugal_spin.model import resolve_runtime

    out: dict[str, Any] = {**versions(), "device": DEVICE}
    if DEVICE == "cuda":
        major, minor = torch.cuda.get_device_capability()
        free, total = torch.cuda.mem_get_info()
        out.update(device=torch.cuda.get_device_name(), capability=f"{major}.{minor}", cuda=torch.version.cuda,
                   memory_gib=round(total / 2**30, 1), free_gib=round(free / 2**30, 1),
                   is_bf16_supported=torch.cuda.is_bf16_supported())
    runtime = resolve_runtime(ModelConfig(backend="transformers", device=DEVICE))
    out.update(compute_dtype=str(runtime.compute_dtype).replace("torch.", ""), grad_scaler=runtime.needs_grad_scaler,
               checkpointing=runtime.gradient_checkpointing)
    # What the carried wheels must provide: bitsandbytes' native library for this CUDA, and a datasets that dill
    # treats as installed (its path must hold "site-packages", or dill pickles its modules by value).
    try:
        import bitsandbytes

        out["bitsandbytes_path"] = str(Path(bitsandbytes.__file__).parent)
        from bitsandbytes.cextension import lib

        out["bitsandbytes_library"] = Path(getattr(getattr(lib, "_lib", None), "_name", "") or "?").name
    except Exception as exc:  # noqa: BLE001  (a missing or broken wheel is what this part reports)
        out["bitsandbytes_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    try:
        import datasets

        out["datasets_path"] = str(Path(datasets.__file__).parent)
        out["datasets_under_site_packages"] = "site-packages" in out["datasets_path"]
    except Exception as exc:  # noqa: BLE001
        out["datasets_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return out


# ---------------------------------------------------------------------------------------------- self-checks


def part_self_checks() -> dict:
    """Every kernel variant's self-check and timing on this device, one report per variant (dispatch.decide):
    log-prob heads fp32 / fp16 / bf16; NF4 LoRA each dtype x ranks 16, 64 x bias / no bias. A variant that fails
    its check (or raises) makes the part fail; one slower than its reference is reported, not a failure."""
    import torch

    from frugal_spin import kernel_timing
    from frugal_spin.kernels import dispatch, logprob, nf4_lora

    kernel_timing.register()
    device = torch.device(DEVICE)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        logprob.verified(device, dtype)
        for rank in (16, 64):  # the recipes' rank, and a rank with another BLOCK_R tile
            for bias in (False, True):
                nf4_lora.verified(device, nf4_lora.Variant(dtype, rank, bias, True))
    return self_check_summary(dispatch.variant_reports())


def self_check_summary(reports: list[dict]) -> dict:
    """The part's result from the dispatch's reports: every variant listed; a failed one is a problem."""
    failed = [r for r in reports if not r["passed"]]
    problems = [f"{r['kernel']} {r['variant']}: " + (r["exception"] or f"error {r['error']:.2e} > {r['tolerance']:.0e}")
                for r in failed]
    if not reports:
        problems.append("no kernel variant was checked")
    return {"variants": reports, "checked": len(reports), "failed": len(failed),
            "used_triton": sum(r["used"] == "triton" for r in reports), "problems": problems}


# ---------------------------------------------------------------------------------------------- inputs


SPEC_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
               "tie_word_embeddings", "max_position_embeddings")  # what build_inputs builds the model from


def model_spec(shape) -> dict:
    """The fields of a planner ModelShape that decide the model build_inputs makes (its marker records them)."""
    return {name: getattr(shape, name) for name in SPEC_FIELDS}


def model_dir_complete(model_dir: Path, spec: dict) -> bool:
    """Whether `model_dir` holds a finished build of `spec`: the marker (written last) names the same spec and
    every weight file with its size, and each safetensors file's header parses. A part killed while saving leaves
    a directory with config.json and a partial weight file: that is not complete."""
    marker = model_dir / MODEL_MARKER
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if info.get("spec") != spec or not info.get("files"):
        return False
    from safetensors import safe_open

    for name, size in info["files"].items():
        path = model_dir / name
        if not path.is_file() or path.stat().st_size != size:
            return False
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(path), framework="pt") as f:
                    f.keys()
            except Exception:  # noqa: BLE001  (any unreadable header means rebuild)
                return False
    return True


def remove_partial_builds(work: Path) -> list[str]:
    """Delete the temporary build directories a killed part left in WORK (named `.model.partial-<pid>` by
    build_inputs: nothing else has that name there); returns their names."""
    removed = []
    for path in sorted(work.glob(".model.partial-*")):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


def build_inputs(work: Path = WORK, shape=None, rows: tuple[int, int] = (TRAIN_ROWS, EVAL_ROWS)) -> dict:
    """A random-weight model of `shape` (default: the colab_t4 architecture) and a local dataset of long random
    rows, under `work`. The model is saved into a temporary directory, checked, marked complete and renamed into
    place, so a part killed while saving (a 1 GB file for Qwen2.5-0.5B) never leaves a directory the next part
    would trust; a stale or partial one is rebuilt. Returns what it did."""
    import random

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from frugal_spin.io import write_json, write_text
    from frugal_spin.planner import KNOWN_SHAPES
    from frugal_spin.tiny_base import TinyBaseSpec, build_tokenizer

    shape = shape or KNOWN_SHAPES[ARCHITECTURE]
    work.mkdir(parents=True, exist_ok=True)
    done = {"removed_partial": remove_partial_builds(work), "built": False}
    spec = model_spec(shape)
    model_dir = work / "model"
    if not model_dir_complete(model_dir, spec):
        tmp = work / f".model.partial-{os.getpid()}"
        config = Qwen2Config(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                             num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
                             num_key_value_heads=shape.num_kv_heads, intermediate_size=shape.intermediate_size,
                             tie_word_embeddings=shape.tie_word_embeddings,
                             max_position_embeddings=shape.max_position_embeddings or 32768, use_cache=False)
        torch.manual_seed(0)
        # Random init on the GPU: seconds instead of a minute on the CPU (the CPU only for a local run).
        with torch.device("cuda" if DEVICE == "cuda" and torch.cuda.is_available() else "cpu"):
            model = Qwen2ForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(tmp)
        del model
        # The built-in base's byte-level tokenizer and chat template (nothing can be downloaded there). Its 371
        # ids are a subset of the model's vocabulary; sampled ids past them decode to nothing.
        build_tokenizer(TinyBaseSpec()).save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.suffix == ".safetensors"}
        write_json(tmp / MODEL_MARKER, {"spec": spec, "files": files})
        if not model_dir_complete(tmp, spec):
            raise RuntimeError(f"the model saved in {tmp} does not read back")
        if model_dir.exists():  # an incomplete build of ours (WORK is the check's own directory)
            shutil.rmtree(model_dir)
        os.replace(tmp, model_dir)
        done["built"] = True
    rng = random.Random(0)
    letters = "abcdefghij klmnopqrst uvwxyz"
    text = lambda n: "".join(rng.choice(letters) for _ in range(n))  # noqa: E731  (~1 token per character)
    lines = [json.dumps({"messages": [{"role": "user", "content": text(1200)},
                                      {"role": "assistant", "content": text(1200)}]}) for _ in range(sum(rows))]
    write_text(work / "data.jsonl", "\n".join(lines) + "\n")  # longer than max_prompt/answer_tokens: cut, as planned
    return done


# ---------------------------------------------------------------------------------------------- stage runs


def stage_overrides(dtype: str) -> list[str]:
    """The recipe overrides of one stage run (model and data are built by the part itself, under WORK)."""
    return [f"model.name={WORK / 'model'}", f"data.dataset={WORK / 'data.jsonl'}", "data.fraction=1.0",
            f"data.eval_size={EVAL_ROWS}", "spin.iterations=1", "model.backend=transformers",
            'model.gradient_checkpointing="on"', f"model.dtype={dtype}", "sft.checkpoint_every_steps=0",
            "spin.checkpoint_every_steps=0", f"output_dir={WORK / ('run_' + dtype)}"]


class DtypeWatch:
    """Records where a tensor of a forbidden dtype appears in a model: its parameters and buffers after loading,
    a module's bitsandbytes compute dtype, and every module's forward output for as long as the hooks stay (the
    whole pipeline run). For the fp16 run (a T4 has no bf16): no bf16 tensor anywhere."""

    def __init__(self, forbidden):
        self.forbidden = forbidden
        self.found: dict[str, int] = {}  # where -> how many times
        self.outputs_seen = 0

    def _add(self, where: str) -> None:
        self.found[where] = self.found.get(where, 0) + 1

    def scan(self, model) -> None:
        for name, param in model.named_parameters():
            if param.dtype == self.forbidden:
                self._add(f"parameter {name}")
        for name, buffer in model.named_buffers():
            if buffer.dtype == self.forbidden:
                self._add(f"buffer {name}")
        for name, module in model.named_modules():
            if getattr(module, "compute_dtype", None) == self.forbidden:
                self._add(f"compute_dtype of {name}")

    def attach(self, model) -> None:
        import torch

        def hook(name):
            def check(module, args, output):
                tensors = [output] if isinstance(output, torch.Tensor) else [
                    t for t in (output.values() if isinstance(output, dict) else
                                output if isinstance(output, (tuple, list)) else
                                getattr(output, "__dict__", {}).values())
                    if isinstance(t, torch.Tensor)]
                for t in tensors:
                    self.outputs_seen += 1
                    if t.dtype == self.forbidden:
                        self._add(f"output of {name or 'the model'}")
            return check

        for name, module in model.named_modules():
            module.register_forward_hook(hook(name))

    def summary(self, limit: int = 20) -> dict:
        return {"forbidden": str(self.forbidden).replace("torch.", ""), "outputs_checked": self.outputs_seen,
                "found": dict(sorted(self.found.items(), key=lambda kv: -kv[1])[:limit]), "places": len(self.found)}


def watch_loaded_models(forbidden) -> DtypeWatch:
    """Patch the run setup's `load_model` (context.py) so every model it loads is scanned and watched by one
    DtypeWatch."""
    from frugal_spin import context

    watch = DtypeWatch(forbidden)
    original = context.load_model

    def load_and_watch(*args, **kwargs):
        model = original(*args, **kwargs)
        watch.scan(model)
        watch.attach(model)
        return model

    context.load_model = load_and_watch
    return watch


def memory_rows(records: list[dict], plan, context_gib: float) -> list[dict]:
    """One row per stage with a CUDA peak: like against like. `max_memory_allocated` never sees the CUDA context
    and workspaces that the plan's fixed `overhead` term stands for, so allocated is compared with the plan
    without that term; reserved (the caching allocator's pool) plus the measured non-PyTorch memory with the whole
    plan."""
    gib = 2**30
    planned = {s.name: s for s in plan.stages}
    rows = []
    for record in records:
        metrics = record.get("metrics", {})
        if "peak_mem_gib" not in metrics:
            continue
        stage = planned.get(STAGE_MAP.get(record["stage"], ""))
        plan_total = stage.total_bytes / gib if stage else None
        plan_no_context = (stage.total_bytes - stage.parts.get("overhead", 0)) / gib if stage else None
        reserved = metrics.get("peak_reserved_gib")
        rows.append({
            "stage": record["stage"], "wall_s": round(record.get("wall_time_s", 0.0), 2),
            "tokens_per_s": round(metrics["tokens_per_s"], 1) if metrics.get("tokens_per_s") else None,
            "allocated_gib": metrics["peak_mem_gib"], "reserved_gib": reserved,
            "plan_gib": round(plan_total, 3) if stage else None,
            "plan_without_context_gib": round(plan_no_context, 3) if stage else None,
            "allocated_over_plan_without_context": round(metrics["peak_mem_gib"] / plan_no_context, 3) if stage
            else None,
            "reserved_plus_context_over_plan": round((reserved + context_gib) / plan_total, 3)
            if stage and reserved is not None else None,
            "loss": metrics.get("train_loss"), "skipped_steps": metrics.get("skipped_optimizer_steps"),
            "scaler_overflow_steps": metrics.get("scaler_overflow_steps")})
    return rows


def non_pytorch_gib() -> float:
    """GPU memory in use that the caching allocator does not hold: the CUDA context, loaded modules, library
    handles (what the plan's fixed overhead term stands for, with allocator rounding)."""
    import torch

    free, total = torch.cuda.mem_get_info()
    return (total - free - torch.cuda.memory_reserved()) / 2**30


def part_stages(dtype: str, shape=None, rows: tuple[int, int] = (TRAIN_ROWS, EVAL_ROWS),
                extra: tuple[str, ...] = ()) -> dict:
    """The stage run in `dtype` on `shape` (default colab_t4's architecture); `rows` and `extra` overrides shrink it
    for a CPU rehearsal."""
    import torch

    from frugal_spin.__main__ import main
    from frugal_spin.config import load_recipe
    from frugal_spin.kernels import dispatch
    from frugal_spin.planner import estimate, resolve_model_shape
    from frugal_spin.report import read_records

    cuda = DEVICE == "cuda"
    if cuda:
        torch.zeros(1, device="cuda")  # create the context before measuring it
        context_start = non_pytorch_gib()
    inputs = build_inputs(WORK, shape, rows)
    other = {"float16": torch.bfloat16, "bfloat16": torch.float16}.get(dtype)
    watch = watch_loaded_models(other) if other is not None else None
    overrides = [*stage_overrides(dtype), *extra]
    start = time.perf_counter()
    code = main([str(RECIPE), *overrides, "--restart"])
    wall = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"the pipeline exited with {code}")
    context_end = non_pytorch_gib() if cuda else 0.0
    recipe = load_recipe(RECIPE, overrides)
    plan = estimate(recipe, resolve_model_shape(str(WORK / "model"), allow_network=False))
    records = read_records(WORK / f"run_{dtype}")
    context = max(context_start, context_end) if cuda else 0.0
    rows = memory_rows(records, plan, context)
    problems = []
    if watch is not None and watch.found:
        problems.append(f"{watch.summary()['forbidden']} tensors in the {dtype} run: {list(watch.found)[:5]}")
    return {"dtype": dtype, "wall_s": round(wall, 1), "inputs": inputs, "stages": rows,
            "non_pytorch_gib": round(context, 3), "plan_overhead_gib": round(plan.stages[0].parts["overhead"] / 2**30, 3),
            "dtype_watch": watch.summary() if watch else None,
            "kernels": dispatch.variant_reports(),
            "max_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
            "problems": problems}


# ---------------------------------------------------------------------------------------------- packing


# Largest relative difference allowed between a pair scored packed (x+y+y') and as two sequences: fp32 shows any
# wrong mask or position (an O(1) change); half dtypes round the two layouts' sums differently.
PACKING_TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}


def _triples(seed: int, n: int = 6, vocab: int = 1024):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(3, vocab, (k,), generator=g).tolist()  # noqa: E731
    lengths = [(120, 60, 90), (40, 100, 20), (200, 30, 30), (64, 64, 0), (10, 150, 140), (90, 1, 70)]
    return [(ids(p), ids(r), ids(q)) for p, r, q in lengths[:n]]


def packing_model_dir(work: Path = WORK) -> Path:
    """A small random Qwen2 (RoPE, full attention: packing is exact for it) saved once, for the packing part."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = work / "packing_model"
    if not (path / "config.json").is_file():
        config = Qwen2Config(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                             tie_word_embeddings=True, attn_implementation="sdpa")
        torch.manual_seed(0)
        tmp = work / f".packing_model.partial-{os.getpid()}"
        Qwen2ForCausalLM(config).save_pretrained(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    return path


def packing_parity(dtype: str, device: str = DEVICE, work: Path = WORK) -> dict:
    """Pairs scored packed (shared_prompt_logprobs) against the same pairs as two sequences, on the product's path
    (NF4 base + LoRA, the runtime's autocast): summed log-probs, LoRA gradients, and that the generated answer's
    log-probs do not move when the real answer's tokens change."""
    import torch

    from frugal_spin.config import LoraSection, ModelConfig
    from frugal_spin.model import load_model, resolve_runtime
    from frugal_spin.shared_prompt import attention_implementation, shared_prompt_logprobs, two_sequence_logprobs

    work.mkdir(parents=True, exist_ok=True)
    path = packing_model_dir(work)
    cfg = ModelConfig(name=str(path), backend="transformers", device=device, dtype=dtype,
                      gradient_checkpointing="off", cpu_4bit_weights="packed")
    runtime = resolve_runtime(cfg)
    model = load_model(str(path), cfg, LoraSection(r=16, alpha=32), runtime, max_seq_length=1024, seed=0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    model.train()
    triples = _triples(0)

    results = []
    for fn in (lambda: shared_prompt_logprobs(model, triples, 0, chunk_size=64),
               lambda: two_sequence_logprobs(model, triples, 0, chunk_size=64)):
        model.zero_grad(set_to_none=True)
        with runtime.autocast():
            real, gen = fn()
        (real.sum() - 0.5 * gen.sum()).backward()
        grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((real.detach().float(), gen.detach().float(), grads))
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()  # noqa: E731
    (p_real, p_gen, p_grads), (a_real, a_gen, a_grads) = results
    logp_err = max(rel(p_real, a_real), rel(p_gen, a_gen))
    # The same difference in the unit of shared_prompt's probe (nats per scored token), to calibrate its half
    # precision tolerance (HALF_PROBE_TOLERANCE_PER_TOKEN) on a GPU.
    tokens = torch.tensor([[max(1, len(y)), max(1, len(g))] for _, y, g in triples], dtype=torch.float32)
    per_token = (torch.stack([(p_real - a_real).abs().cpu(), (p_gen - a_gen).abs().cpu()], 1) / tokens).max().item()
    grad_err = max(rel(p_grads[n], a_grads[n]) for n in a_grads)
    # The real answers replaced by other tokens: the generated answers' log-probs must not move (y' never sees y).
    changed = [(x, [(t * 7 + 1) % 1000 + 3 for t in y], g) for x, y, g in triples]
    with torch.no_grad(), runtime.autocast():
        _, gen_changed = shared_prompt_logprobs(model, changed, 0, chunk_size=64)
        _, gen_again = shared_prompt_logprobs(model, triples, 0, chunk_size=64)
    leak = rel(gen_changed.float(), gen_again.float())
    tolerance = PACKING_TOLERANCE[dtype]
    out = {"dtype": dtype, "attention": attention_implementation(model), "pairs": len(triples),
           "logp_rel_err": logp_err, "logp_nats_per_token": per_token, "grad_rel_err": grad_err, "leak_rel_change": leak, "tolerance": tolerance,
           "base_weights": runtime.base_weights}
    out["ok"] = bool(logp_err <= tolerance and grad_err <= 10 * tolerance and leak <= tolerance)
    return out


def part_packing() -> dict:
    dtypes = ["float32", "float16", "bfloat16"] if DEVICE == "cuda" else ["float32"]
    rows = [packing_parity(d) for d in dtypes]
    return {"rows": rows, "problems": [f"packing {r['dtype']}: log-prob error {r['logp_rel_err']:.2e}, gradient "
                                       f"error {r['grad_rel_err']:.2e}, leak {r['leak_rel_change']:.2e} (tolerance "
                                       f"{r['tolerance']:.0e}, x10 for gradients)" for r in rows if not r["ok"]]}


# ---------------------------------------------------------------------------------------------- tiny base on CUDA


# The README's CPU table ("Results on the built-in CPU default": `python -m frugal_spin recipes/cpu_tiny.yaml`,
# seed 0, measured 2026-12-02 on 2 AMD EPYC cores, torch 2.13.0+cpu): held-out NLL, SPIN loss, reward accuracy,
# exact match after each stage. tests/test_gpu_check.py checks these against the README.
CPU_TABLE = {
    "sft.eval": {"heldout_nll": 0.221, "spin_loss": 0.693, "reward_accuracy": 0.000, "exact_match": 0.405},
    "iter_0.eval": {"heldout_nll": 0.227, "spin_loss": 0.694, "reward_accuracy": 0.450, "exact_match": 0.385},
    "iter_1.eval": {"heldout_nll": 0.223, "spin_loss": 0.690, "reward_accuracy": 0.495, "exact_match": 0.395},
}
# Allowed |CUDA - CPU|: twice the spread between seeds of the same command on the CPU (README, "Results: LoRA-SPIN
# against LoRA-SFT", CPU default: held-out NLL std 0.008-0.009, exact match 0.03-0.045, reward accuracy 0.035-0.048,
# SPIN loss 0.0015). CUDA draws other random numbers (LoRA init, sampling), so a run there is like another seed;
# fp32 (model.dtype=float32) keeps the arithmetic the CPU table's.
TINY_TOLERANCE = {"heldout_nll": 0.018, "spin_loss": 0.004, "reward_accuracy": 0.10, "exact_match": 0.09}


def compare_with_cpu_table(records: list[dict]) -> tuple[list[dict], list[str]]:
    """(one row per stage and metric: CUDA, CPU, difference, within tolerance), problems."""
    by_stage = {r["stage"]: r.get("metrics", {}) for r in records}
    rows, problems = [], []
    for stage, expected in CPU_TABLE.items():
        if stage not in by_stage:
            problems.append(f"{stage}: no record")
            continue
        for metric, cpu in expected.items():
            got = by_stage[stage].get(metric)
            diff = None if got is None else got - cpu
            ok = diff is not None and abs(diff) <= TINY_TOLERANCE[metric]
            rows.append({"stage": stage, "metric": metric, "cuda": got, "cpu": cpu,
                         "diff": None if diff is None else round(diff, 4), "tolerance": TINY_TOLERANCE[metric],
                         "ok": ok})
            if not ok:
                problems.append(f"{stage} {metric}: CUDA {got} vs CPU {cpu} (tolerance {TINY_TOLERANCE[metric]})")
    return rows, problems


def part_tiny_cuda() -> dict:
    from frugal_spin.__main__ import main
    from frugal_spin.report import read_records

    run_dir = WORK / "tiny_cuda"
    overrides = [f"output_dir={run_dir}", f"model.device={DEVICE}", "model.dtype=float32"]
    start = time.perf_counter()
    code = main([str(TINY_RECIPE), *overrides, "--restart"])
    wall = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"the pipeline exited with {code}")
    records = read_records(run_dir)
    rows, problems = compare_with_cpu_table(records)
    stages = [{"stage": r["stage"], "wall_s": round(r.get("wall_time_s", 0.0), 2),
               "tokens_per_s": r.get("metrics", {}).get("tokens_per_s")} for r in records]
    return {"command": f"python -m frugal_spin {TINY_RECIPE.relative_to(REPO)} {' '.join(overrides)}",
            "wall_s": round(wall, 1), "compare": rows, "stages": stages, "problems": problems}


# ---------------------------------------------------------------------------------------------- resume


RESUME_OVERRIDES = ["data.fraction=0.04", "data.eval_size=16", "spin.iterations=0", "sft.epochs=1",
                    "sft.micro_batch_size=8", "sft.checkpoint_every_steps=2", "eval.max_new_tokens=8",
                    "eval.batch_size=16", "generation.batch_size=16", "generation.max_new_tokens=8"]
CRASH_AT = "sft.step@3"  # after SFT's third optimizer step: the checkpoint of step 2 is the one to resume from


def resume_command(run_dir: Path, dtype: str) -> list[str]:
    return [sys.executable, "-m", "frugal_spin", str(TINY_RECIPE), f"output_dir={run_dir}",
            f"model.device={DEVICE}", f"model.dtype={dtype}", *RESUME_OVERRIDES]


def compare_loss_curves(reference: list[float], resumed: list[float], tolerance: float) -> tuple[float, list[str]]:
    """(largest |difference| per step, problems): the same number of steps, each within `tolerance`."""
    problems = []
    if len(reference) != len(resumed):
        problems.append(f"{len(resumed)} optimizer steps after the resume, {len(reference)} uninterrupted")
    diffs = [abs(a - b) for a, b in zip(reference, resumed)]
    worst = math.nan if any(math.isnan(d) for d in diffs) else max(diffs, default=math.inf)  # max() skips NaN
    if not diffs or not worst <= tolerance:
        problems.append(f"loss curves differ by up to {worst:.3g} (tolerance {tolerance:g})")
    return worst, problems


def part_resume() -> dict:
    """SFT killed with SIGKILL after its third optimizer step (a checkpoint every 2 steps), resumed by rerunning
    the command, against the same SFT uninterrupted: the loss curves (restored steps included) and the final
    adapters. fp16 on CUDA, so the GradScaler's and the paged 8-bit AdamW's states are saved and restored too."""
    from frugal_spin.io import read_safetensors
    from frugal_spin.report import read_records

    dtype = "float16" if DEVICE == "cuda" else "float32"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    env.pop("FRUGAL_SPIN_CRASH_AT", None)
    runs, logs = {}, {}
    for name in ("reference", "resumed"):
        run_dir = WORK / f"resume_{name}"
        if run_dir.exists():
            shutil.rmtree(run_dir)  # the check's own directory from an earlier run of this part
        runs[name] = run_dir
    steps = []

    def run(run_dir: Path, crash: str | None) -> subprocess.CompletedProcess:
        start = time.perf_counter()
        proc = subprocess.run(resume_command(run_dir, dtype), env={**env, **({"FRUGAL_SPIN_CRASH_AT": crash}
                                                                              if crash else {})},
                              cwd=str(REPO), capture_output=True, text=True, timeout=240)
        steps.append({"run": run_dir.name, "crash_at": crash, "returncode": proc.returncode,
                      "seconds": round(time.perf_counter() - start, 1)})
        return proc

    reference = run(runs["reference"], None)
    if reference.returncode != 0:
        raise RuntimeError(f"uninterrupted run failed:\n{reference.stderr[-1500:]}")
    killed = run(runs["resumed"], CRASH_AT)
    problems = []
    if killed.returncode != -signal.SIGKILL:
        problems.append(f"the run was not killed at {CRASH_AT} (exit {killed.returncode}): {killed.stderr[-300:]}")
    checkpoints = sorted(str(p.relative_to(runs["resumed"])) for p in runs["resumed"].rglob("checkpoint*"))
    resumed = run(runs["resumed"], None)
    if resumed.returncode != 0:
        raise RuntimeError(f"resumed run failed:\n{resumed.stderr[-1500:]}")
    curves = {}
    for name, run_dir in runs.items():
        sft = next(r for r in read_records(run_dir) if r["stage"] == "sft")
        curves[name] = sft["metrics"]["loss_curve"]
    tolerance = 1e-3 if dtype == "float16" else 1e-5
    worst, curve_problems = compare_loss_curves(curves["reference"], curves["resumed"], tolerance)
    problems += curve_problems
    adapters = [read_safetensors(r / "sft" / "adapter" / "adapter_model.safetensors") for r in runs.values()]
    adapter_diff = max((adapters[0][k].float() - adapters[1][k].float()).abs().max().item() for k in adapters[0])
    return {"dtype": dtype, "crash_at": CRASH_AT, "checkpoint_every_steps": 2, "runs": steps,
            "checkpoints_after_kill": checkpoints, "steps": len(curves["reference"]),
            "loss_curve_reference": curves["reference"], "loss_curve_resumed": curves["resumed"],
            "max_loss_diff": worst, "max_adapter_diff": adapter_diff, "tolerance": tolerance, "problems": problems}


RUNNERS = {"env": part_env, "self_checks": part_self_checks, "stages_fp16": lambda: part_stages("float16"),
           "stages_bf16": lambda: part_stages("bfloat16"), "packing": part_packing, "tiny_cuda": part_tiny_cuda,
           "resume": part_resume}
