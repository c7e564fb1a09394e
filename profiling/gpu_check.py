"""Everything only a GPU can show, in commands sized for a short GPU window: see profiling/gpu_check.sh and
profiling/GPU.md (what to prepare, which command first, how to read the results back).

Parts (`PARTS`: time limit, estimated time on an H200, command group), each in a fresh process with its own limit,
its output kept as its log. The first group is the default (`--parts first`, at most `BUDGET_S`); the second is
what a second command runs if time remains (`--parts second`); `--parts a,b,c` runs any subset, in this order.

first:
- `env`: device, capability, versions; `resolve_runtime`'s dtype / GradScaler for dtype auto; where bitsandbytes'
  native library and datasets were loaded from.
- `kernels_compiled`: tests/test_kernels_cuda.py's script (read out of the file; no pytest): the compiled kernels
  forced against their torch references in bf16, fp16, fp32 at vocab 151,936.
- `self_checks`: every kernel variant's self-check and timing against the path without it, as the dispatch
  decides on this GPU (kernels/dispatch.py): one report per variant; a failed variant fails the part.
- `bench_lora`, `bench_logprobs`: the kernel benchmarks in their CUDA modes (profiling/bench_*.py --no-write).
- `stages_fp16`, `stages_bf16`: the pipeline (SFT, anchor, generate, score, SPIN train, eval; one iteration) on
  colab_t4's architecture (Qwen2.5-0.5B shape, random weights) through transformers + bitsandbytes NF4 with
  checkpointing on, on 64 rows of random text filling max_prompt_tokens / max_answer_tokens; per stage: wall time,
  tokens/s, CUDA peak allocated against the plan without its fixed CUDA-context term, and reserved plus the
  measured non-PyTorch memory against the whole plan; the fp16 run must hold no bf16 tensor (and the bf16 run no
  fp16 one): parameters, buffers, compute dtypes and every module output are watched.
- `packing`: shared-prompt pairs (x+y+y' in one sequence) against two sequences on the product's path, in fp32,
  fp16 and bf16: log-probs, LoRA gradients, and that y' never sees y.
- `tiny_cuda`: the shipped tiny base through recipes/cpu_tiny.yaml on CUDA (fp32), its evaluations against the
  README's CPU table within stated tolerances (gpu_parts.TINY_TOLERANCE).
second:
- `resume`: SFT killed with SIGKILL after step 3 (checkpoint every 2 steps, fp16), resumed; loss curve and adapter
  against the uninterrupted run.
- `bench_vs_trl`: profiling/bench_vs_trl.py --device cuda (needs the carried trl + datasets wheels).
- `vllm`: profiling/gpu_check_vllm.sh (skips itself where vllm is not installed, as on the lent H200).

Output: with `--out DIR`, at most 8 files there (OUT_FILES): gpu_check.md (tables), gpu_check.csv (one row per
measurement), gpu_check.json (every result), gpu_check_logs.tar.gz (each part's log) and gpu_check_runs.tar.gz (the
run records: metrics.jsonl, report.md/json, recipe, stage markers, pairs, charts; a whitelist, never weights, under
15 MiB), rewritten after every part so a run cut short keeps what it measured. Without --out: gpu_check.md and
gpu_check.csv in profiling/. `--dry-run` (no GPU needed) lists the parts, their commands, limits and estimates and
the planner's per-stage estimates, and writes nothing, or with --out only the plan (gpu_check_plan.md).
"""

from __future__ import annotations

import argparse
import ast
import csv
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import gpu_parts  # noqa: E402
from gpu_parts import WORK  # noqa: E402

REPORT_MD = HERE / "gpu_check.md"
REPORT_CSV = HERE / "gpu_check.csv"
BUDGET_S = 375  # of the first command's 8 minutes: ~1.5 min machine start and wheel install, 6 min 15 s of parts
OUT_FILES = ("gpu_check.md", "gpu_check.csv", "gpu_check.json", "gpu_check_logs.tar.gz", "gpu_check_runs.tar.gz")
PLAN_FILE = "gpu_check_plan.md"
MAX_OUT_FILES = 8  # what the device tool brings back from $OUT
ARCHIVE_LIMIT_BYTES = 15 * 2**20  # uncompressed members per archive: the archive stays under the tool's 16 MiB
LOG_TAIL_BYTES = 4 * 2**20  # of each part's log in the archive
RUN_DIRS = ("run_float16", "run_bfloat16", "tiny_cuda", "resume_reference", "resume_resumed")
# What of a run directory is a record (relative glob patterns), most useful first; weights, adapters,
# checkpoints, caches and the base are never matched.
RECORD_PATTERNS = ("metrics.jsonl", "report.md", "report.json", "recipe.yaml", "stages/*.json", "*.png",
                   "eval/anchor_pairs.jsonl", "iter_*/pairs.jsonl")


@dataclass(frozen=True)
class Part:
    name: str
    limit_s: int  # killed after this
    estimate_s: int  # expected on an H200, startup included (GPU.md says how each was estimated)
    group: str  # first | second
    what: str


PARTS = [
    Part("env", 60, 15, "first", "device, capability, versions, dtype auto, where bitsandbytes/datasets load from"),
    Part("kernels_compiled", 150, 40, "first", "tests/test_kernels_cuda.py's script: compiled kernels vs torch"),
    Part("self_checks", 150, 40, "first", "each kernel variant: self-check, timing vs reference, the choice"),
    Part("bench_lora", 120, 30, "first", "profiling/bench_lora.py --no-write --tokens 2048 (CUDA timings)"),
    Part("bench_logprobs", 120, 25, "first", "profiling/bench_logprobs.py --no-write --lengths 1024 4096"),
    Part("stages_fp16", 200, 75, "first", "pipeline on Qwen2.5-0.5B's shape, fp16: per stage time, tokens/s, "
                                           "memory vs plan; no bf16 tensor"),
    Part("stages_bf16", 160, 55, "first", "the same in bf16 (no fp16 tensor)"),
    Part("packing", 90, 20, "first", "shared-prompt pairs vs two sequences, fp32 / fp16 / bf16"),
    Part("tiny_cuda", 180, 75, "first", "recipes/cpu_tiny.yaml on CUDA (fp32) vs the README's CPU table"),
    Part("resume", 240, 70, "second", "SFT killed at step 3 (checkpoint every 2, fp16), resumed, vs uninterrupted"),
    Part("bench_vs_trl", 200, 100, "second", "profiling/bench_vs_trl.py --device cuda (needs trl + datasets)"),
    Part("vllm", 90, 5, "second", "profiling/gpu_check_vllm.sh (skips itself without vllm)"),
]
PART_NAMES = [p.name for p in PARTS]


class UsageError(Exception):
    """A wrong command line: one line, exit status 2."""


def select_parts(spec: str) -> list[Part]:
    """`first`, `second`, `all` or comma-separated part names; in PARTS order."""
    if spec in ("first", "second"):
        return [p for p in PARTS if p.group == spec]
    if spec == "all":
        return list(PARTS)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in PART_NAMES]
    if unknown or not names:
        raise UsageError(f"--parts: unknown part {', '.join(unknown) or '(none given)'} (known: "
                         f"{', '.join(PART_NAMES)}; or first, second, all)")
    return [p for p in PARTS if p.name in names]


def kernels_script() -> str:
    """The SCRIPT string of tests/test_kernels_cuda.py, read without importing pytest."""
    tree = ast.parse((REPO / "tests" / "test_kernels_cuda.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SCRIPT" for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError("tests/test_kernels_cuda.py has no SCRIPT")


BENCH_COMMANDS = {
    "bench_lora": ["profiling/bench_lora.py", "--no-write", "--tokens", "2048", "--repeats", "10"],
    "bench_logprobs": ["profiling/bench_logprobs.py", "--no-write", "--lengths", "1024", "4096", "--repeats", "3"],
    "bench_vs_trl": ["profiling/bench_vs_trl.py", "--device", "cuda", "--lengths", "512", "1024", "--steps", "4",
                     "--warmup", "1", "--no-write"],
}


def part_command(name: str) -> list[str]:
    if name == "kernels_compiled":
        return [sys.executable, "-c", kernels_script()]
    if name == "vllm":
        return ["bash", str(REPO / "profiling" / "gpu_check_vllm.sh")]
    if name in BENCH_COMMANDS:
        return [sys.executable, *BENCH_COMMANDS[name]]
    return [sys.executable, str(Path(__file__).resolve()), "--part", name]


def missing_for_bench_vs_trl() -> str | None:
    """Why bench_vs_trl cannot run here (trl and datasets are carried wheels), or None."""
    from importlib.util import find_spec

    missing = [m for m in ("trl", "datasets") if find_spec(m) is None]
    return f"{' and '.join(missing)} not importable (carry the wheels: profiling/prepare_gpu_wheels.sh)" \
        if missing else None


# ---------------------------------------------------------------------------------------------- running


def _run(cmd: list[str], env: dict, limit: float) -> tuple[int | None, str, str]:
    """(return code or None on timeout, stdout, stderr) of a command in its own process group: on timeout the
    whole group is killed (a part's own subprocesses too)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO),
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=limit)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out, err
    except BaseException:  # interrupted (SIGTERM from the hard stop): take the part down with us
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise


def part_env_vars() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
               TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    if env.get("GPU_CHECK_DEVICE", "cuda") == "cuda":  # the compiled kernels, as a GPU run takes them
        env.pop("TRITON_INTERPRET", None)
    env.pop("FRUGAL_SPIN_TRITON", None)
    return env


def status_of(name: str, returncode: int | None, stdout: str, result: dict | None) -> tuple[str, dict]:
    """(ok | failed | skipped | timeout, result) of a finished part."""
    if returncode is None:
        return "timeout", result or {}
    if name == "kernels_compiled":
        lines = [line for line in stdout.splitlines() if line.startswith("rel err")]
        return ("ok" if returncode == 0 and "CUDA OK" in stdout else "failed"), {"errors": lines}
    if name == "vllm":
        if returncode != 0:
            return "failed", {}
        if "SKIPPED" in stdout:
            return "skipped", {"skipped": stdout.strip().splitlines()[-1][:300]}
        return "ok", {"output": stdout.strip()[-1500:]}
    if name in BENCH_COMMANDS:
        if returncode != 0:
            return "failed", {}
        lines = stdout.strip().splitlines()
        table = [line for line in lines if line.startswith("|")]
        return "ok", {"final": lines[-1] if lines else "", "table": "\n".join(table),
                      "dispatch": [line for line in lines if line.startswith("dispatch (auto)")]}
    if returncode != 0 or result is None:
        return "failed", result or {}
    if result.get("skipped"):
        return "skipped", result
    return ("failed" if result.get("problems") else "ok"), result


def run_part(part: Part, limit: float) -> dict:
    """Run one part in a fresh process; its stdout and stderr go to WORK/logs/<part>.log."""
    started = time.time()
    if part.name == "bench_vs_trl" and (why := missing_for_bench_vs_trl()):
        return {"part": part.name, "status": "skipped", "seconds": 0.0, "result": {"skipped": why}, "stderr": ""}
    code, out, err = _run(part_command(part.name), part_env_vars(), limit)
    logs = WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (logs / f"{part.name}.log").write_text(f"$ {part.name} (exit {code})\n--- stdout\n{out}\n--- stderr\n{err}",
                                           encoding="utf-8")
    result = next((json.loads(line[len("RESULT "):]) for line in out.splitlines() if line.startswith("RESULT ")),
                  None)
    status, result = status_of(part.name, code, out, result)
    return {"part": part.name, "status": status, "seconds": round(time.time() - started, 1), "result": result,
            "stderr": err[-3000:] if status in ("failed", "timeout") else ""}


# ---------------------------------------------------------------------------------------------- reports


def summary_line(o: dict) -> str:
    r = o["result"]
    name = o["part"]
    if r.get("skipped"):
        return str(r["skipped"])
    if r.get("problems"):
        return "; ".join(r["problems"])[:300]
    if name == "env":
        return f"{r.get('device')} {r.get('capability', '')}, torch {r.get('torch')}, dtype auto {r.get('compute_dtype')}"
    if name == "self_checks":
        return f"{r['checked']} variants, {r['failed']} failed, kernel used for {r['used_triton']}"
    if name.startswith("stages_"):
        return f"{len(r.get('stages', []))} stages in {r.get('wall_s')} s; no {r.get('dtype_watch', {}).get('forbidden')} tensor" \
            if r.get("dtype_watch") else f"{len(r.get('stages', []))} stages in {r.get('wall_s')} s"
    if name == "packing":
        return "; ".join(f"{x['dtype']} logp {x['logp_rel_err']:.1e} grad {x['grad_rel_err']:.1e}" for x in r["rows"])
    if name == "tiny_cuda":
        return f"{sum(x['ok'] for x in r['compare'])}/{len(r['compare'])} within tolerance, {r.get('wall_s')} s"
    if name == "resume":
        return f"{r['steps']} steps, max loss diff {r['max_loss_diff']:.2e}, adapter diff {r['max_adapter_diff']:.2e}"
    if name in BENCH_COMMANDS:
        return r.get("final", "")[:300]
    if name == "kernels_compiled":
        return f"{len(r.get('errors', []))} comparisons"
    return ""


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) < 1e-2 and value:
            return f"{value:.{digits}g}"
        text = f"{value + 0.0:.{digits}f}"  # + 0.0: no "-0"
        return text.rstrip("0").rstrip(".") if "." in text else text
    return str(value)


def render_md(outcomes: list[dict], meta: dict) -> str:
    env = next((o["result"] for o in outcomes if o["part"] == "env" and o["status"] == "ok"), {})
    lines = ["# GPU check (`profiling/gpu_check.sh`)", "",
             f"Run {meta['started_utc']}, {meta['elapsed_s']:.0f} s of a {meta['budget_s']} s budget; parts "
             f"`{meta['parts']}`. Device: {env.get('device', '?')} (compute capability {env.get('capability', '?')}, "
             f"{env.get('memory_gib', '?')} GiB, CUDA {env.get('cuda', '?')}).", "",
             "Versions: " + ", ".join(f"{k} {env.get(k, '?')}" for k in ("python", *gpu_parts.PACKAGES)) + ".", "",
             "| part | status | seconds | estimate s | result |", "|---|---|---|---|---|"]
    estimates = {p.name: p.estimate_s for p in PARTS}
    for o in outcomes:
        lines.append(f"| {o['part']} | {o['status']} | {o['seconds']} | {estimates.get(o['part'], '')} | "
                     f"{summary_line(o).replace('|', '/')} |")
    for o in outcomes:
        r, name = o["result"], o["part"]
        if name == "self_checks" and r.get("variants") or name.startswith("stages_") and r.get("kernels"):
            lines += ["", f"## {name}: kernel variants (self-check, timing, choice)", "",
                      "| kernel | variant | passed | error / tolerance | kernel ms | reference ms | used | why |",
                      "|---|---|---|---|---|---|---|---|"]
            for v in r.get("variants") or r.get("kernels"):
                check = v["exception"] or f"{_fmt(v['error'])} / {_fmt(v['tolerance'])}"
                lines.append(f"| {v['kernel']} | {v['variant']} | {v['passed']} | {check} | {_fmt(v['kernel_ms'])} | "
                             f"{_fmt(v['reference_ms'])} | {v['used']} | {v['reason']} |")
        if r.get("stages") and name.startswith("stages_"):
            lines += ["", f"## {name}: per stage (CUDA peaks against `plan`; like against like)", "",
                      f"Non-PyTorch GPU memory measured (CUDA context, modules, handles): {r.get('non_pytorch_gib')} "
                      f"GiB; the plan's fixed term for it: {r.get('plan_overhead_gib')} GiB.", "",
                      "| stage | wall s | tokens/s | allocated GiB | plan w/o context GiB | allocated / plan w/o "
                      "context | reserved GiB | (reserved + context) / plan | loss |", "|---|---|---|---|---|---|---|---|---|"]
            for s in r["stages"]:
                lines.append(f"| {s['stage']} | {s['wall_s']} | {_fmt(s['tokens_per_s'])} | {s['allocated_gib']} | "
                             f"{_fmt(s['plan_without_context_gib'])} | {_fmt(s['allocated_over_plan_without_context'])} | "
                             f"{_fmt(s['reserved_gib'])} | {_fmt(s['reserved_plus_context_over_plan'])} | "
                             f"{_fmt(s['loss'])} |")
            if r.get("dtype_watch"):
                w = r["dtype_watch"]
                lines += ["", f"{w['forbidden']} tensors: {w['places']} places ({w['outputs_checked']} module "
                              f"outputs checked){': ' + json.dumps(w['found']) if w['found'] else ''}."]
        if name == "packing" and r.get("rows"):
            lines += ["", "## packing: shared-prompt pairs vs two sequences", "",
                      "| dtype | attention | log-prob rel err | nats per token | LoRA grad rel err | y' change when y "
                      "changes | tolerance | ok |", "|---|---|---|---|---|---|---|---|"]
            for x in r["rows"]:
                lines.append(f"| {x['dtype']} | {x['attention']} | {x['logp_rel_err']:.2e} | "
                             f"{x['logp_nats_per_token']:.2e} | {x['grad_rel_err']:.2e} | {x['leak_rel_change']:.2e} | "
                             f"{x['tolerance']:.0e} | {x['ok']} |")
        if name == "tiny_cuda" and r.get("compare"):
            lines += ["", f"## tiny_cuda: `{r['command']}` against the README's CPU table", "",
                      "| stage | metric | CUDA | CPU (README) | difference | tolerance | ok |", "|---|---|---|---|---|---|---|"]
            for x in r["compare"]:
                lines.append(f"| {x['stage']} | {x['metric']} | {_fmt(x['cuda'], 4)} | {x['cpu']} | {_fmt(x['diff'], 4)} | "
                             f"{x['tolerance']} | {x['ok']} |")
            lines += ["", "Per stage: " + ", ".join(f"{s['stage']} {s['wall_s']} s ({_fmt(s['tokens_per_s'], 0)} tokens/s)"
                                                     for s in r["stages"]) + "."]
        if name == "resume" and "steps" in r:
            lines += ["", "## resume: SFT killed and resumed against uninterrupted", "",
                      f"{r['dtype']}, killed at `{r['crash_at']}`, checkpoint every {r['checkpoint_every_steps']} "
                      f"steps; checkpoints left by the kill: {r['checkpoints_after_kill']}; runs: {r['runs']}.", "",
                      f"Loss curve ({r['steps']} steps) uninterrupted: {[round(x, 5) for x in r['loss_curve_reference']]}",
                      f"resumed: {[round(x, 5) for x in r['loss_curve_resumed']]}; max |difference| "
                      f"{r['max_loss_diff']:.2e} (tolerance {r['tolerance']:g}); adapter max |difference| "
                      f"{r['max_adapter_diff']:.2e}."]
        if name in BENCH_COMMANDS and (r.get("table") or r.get("final")):
            lines += ["", f"## {name}", "", r.get("table", ""), "", f"`{r.get('final', '')}`",
                      *(["", *r["dispatch"]] if r.get("dispatch") else [])]
        if name == "kernels_compiled" and r.get("errors"):
            lines += ["", "## kernels_compiled", "", "```", *r["errors"], "```"]
        if o["stderr"]:
            lines += ["", f"## {name}: stderr (last lines)", "", "```", o["stderr"][-1500:], "```"]
    return "\n".join(lines) + "\n"


def csv_rows(outcomes: list[dict]) -> list[dict]:
    rows = []
    for o in outcomes:
        base = {"part": o["part"], "status": o["status"], "seconds": o["seconds"]}
        r = o["result"]
        added = len(rows)
        for v in r.get("variants") or []:
            rows.append({**base, "item": f"{v['kernel']} {v['variant']}", "value": v["used"], "plan": "", "ratio":
                         (v["kernel_ms"] / v["reference_ms"]) if v["kernel_ms"] and v["reference_ms"] else "",
                         "notes": f"passed {v['passed']}; error {v['error']} tolerance {v['tolerance']}; kernel_ms "
                                  f"{v['kernel_ms']} reference_ms {v['reference_ms']}; {v['exception'] or v['reason']}"})
        for s in r.get("stages") or []:
            if "allocated_gib" in s:
                rows.append({**base, "item": s["stage"], "value": s["allocated_gib"],
                             "plan": s["plan_without_context_gib"], "ratio": s["allocated_over_plan_without_context"],
                             "notes": f"{r.get('dtype')}; wall {s['wall_s']} s; tokens/s {s['tokens_per_s']}; reserved "
                                      f"{s['reserved_gib']} GiB; (reserved+context)/plan "
                                      f"{s['reserved_plus_context_over_plan']}"})
        for x in r.get("rows") or []:
            rows.append({**base, "item": f"packing {x['dtype']}", "value": x["logp_rel_err"], "plan": x["tolerance"],
                         "ratio": "", "notes": f"grad rel err {x['grad_rel_err']:.3e}; leak {x['leak_rel_change']:.3e}"})
        for x in r.get("compare") or []:
            rows.append({**base, "item": f"{x['stage']} {x['metric']}", "value": x["cuda"], "plan": x["cpu"],
                         "ratio": x["diff"], "notes": f"tolerance {x['tolerance']}; ok {x['ok']}"})
        if "max_loss_diff" in r:
            rows.append({**base, "item": "resume loss curve", "value": r["max_loss_diff"], "plan": r["tolerance"],
                         "ratio": "", "notes": f"{r['steps']} steps; adapter diff {r['max_adapter_diff']:.3e}"})
        if len(rows) == added:
            rows.append({**base, "item": "", "value": "", "plan": "", "ratio": "", "notes": summary_line(o)[:300]})
    return rows


def _archive(dest: Path, members: list[tuple[Path, str]], limit: int, tail_bytes: int | None = None) -> list[str]:
    """Write a .tar.gz of (file, name) members in order while their sizes stay under `limit` (a log is cut to its
    last `tail_bytes`); returns the names left out, which are also listed in the archive's LEFT_OUT.txt."""
    left_out, total = [], 0
    with tarfile.open(dest, "w:gz") as tar:
        for path, name in members:
            data = path.read_bytes()
            if tail_bytes is not None and len(data) > tail_bytes:
                data = b"[... cut: the log's last bytes follow]\n" + data[-tail_bytes:]
            if total + len(data) > limit:
                left_out.append(f"{name} ({len(data)} bytes)")
                continue
            total += len(data)
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), int(path.stat().st_mtime)
            tar.addfile(info, io.BytesIO(data))
        if left_out:
            data = ("left out to stay under the size limit:\n" + "\n".join(left_out) + "\n").encode()
            info = tarfile.TarInfo("LEFT_OUT.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return left_out


def record_members(work: Path) -> list[tuple[Path, str]]:
    """The whitelisted record files of the check's run directories, in RECORD_PATTERNS order per run."""
    members, seen = [], set()
    for pattern in RECORD_PATTERNS:
        for run in RUN_DIRS:
            for path in sorted((work / run).glob(pattern)):
                if path.is_file() and path not in seen:
                    seen.add(path)
                    members.append((path, f"{run}/{path.relative_to(work / run)}"))
    return members


def write_outputs(outcomes: list[dict], meta: dict, out_dir: Path | None) -> None:
    """The report files: into out_dir (OUT_FILES, at most MAX_OUT_FILES) or, without one, md + csv in profiling/."""
    from frugal_spin.io import copy_file, write_json, write_text

    md = render_md(outcomes, meta)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["part", "status", "seconds", "item", "value", "plan", "ratio",
                                                "notes"])
    writer.writeheader()
    writer.writerows(csv_rows(outcomes))
    if out_dir is None:
        write_text(REPORT_MD, md)
        write_text(REPORT_CSV, buffer.getvalue())
        return
    write_text(out_dir / "gpu_check.md", md)
    write_text(out_dir / "gpu_check.csv", buffer.getvalue())
    write_json(out_dir / "gpu_check.json", {"meta": meta, "outcomes": outcomes})
    staging = WORK / "archives"
    staging.mkdir(parents=True, exist_ok=True)
    logs = [(WORK / "logs" / f"{o['part']}.log", f"{o['part']}.log") for o in outcomes
            if (WORK / "logs" / f"{o['part']}.log").is_file()]
    _archive(staging / "logs.tar.gz", logs, ARCHIVE_LIMIT_BYTES, LOG_TAIL_BYTES)
    copy_file(staging / "logs.tar.gz", out_dir / "gpu_check_logs.tar.gz")
    _archive(staging / "runs.tar.gz", record_members(WORK), ARCHIVE_LIMIT_BYTES)
    copy_file(staging / "runs.tar.gz", out_dir / "gpu_check_runs.tar.gz")
    files = [p for p in out_dir.iterdir()]
    if len(files) > MAX_OUT_FILES or any(p.stat().st_size >= 16 * 2**20 for p in files if p.is_file()):
        raise RuntimeError(f"{out_dir} holds {len(files)} entries or a file over 16 MiB: the device tool would not "
                           f"bring them all back")


# ---------------------------------------------------------------------------------------------- dry run, main


def dry_run(parts: list[Part], budget: int, out_dir: Path | None) -> None:
    from frugal_spin.config import load_recipe
    from frugal_spin.planner import KNOWN_SHAPES, estimate

    lines = [f"# GPU check plan (`profiling/gpu_check.sh --dry-run`)", "",
             f"Parts in order, each in its own process; a part whose estimate exceeds the time left of the {budget} s "
             f"budget is skipped. Writes {', '.join(OUT_FILES)} into --out (at most {MAX_OUT_FILES} files).", "",
             "| part | group | limit s | estimate s | what | command |", "|---|---|---|---|---|---|"]
    for p in parts:
        cmd = part_command(p.name)
        shown = "python -c <SCRIPT of tests/test_kernels_cuda.py>" if p.name == "kernels_compiled" else \
            " ".join(Path(c).name if c == sys.executable else str(c).replace(str(REPO) + "/", "") for c in cmd)
        lines.append(f"| {p.name} | {p.group} | {p.limit_s} | {p.estimate_s} | {p.what} | `{shown}` |")
    lines += ["", f"Estimated total: {sum(p.estimate_s for p in parts)} s of parts (budget {budget} s).", ""]
    if any(p.name.startswith("stages_") for p in parts):
        for dtype in ("float16", "bfloat16"):
            overrides = gpu_parts.stage_overrides(dtype)
            recipe = load_recipe(gpu_parts.RECIPE, overrides)  # validates the overrides like the real run
            plan = estimate(recipe, KNOWN_SHAPES[gpu_parts.ARCHITECTURE])
            lines.append(f"stage run ({dtype}): `python -m frugal_spin {gpu_parts.RECIPE.relative_to(REPO)} "
                         f"{' '.join(overrides)} --restart`")
            lines.append("  plan estimate per stage (GiB, total / without the context term): " + ", ".join(
                f"{s.name} {s.total_bytes / 2**30:.2f} / {(s.total_bytes - s.parts['overhead']) / 2**30:.2f}"
                for s in plan.stages))
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if out_dir is not None:
        from frugal_spin.io import write_text

        write_text(out_dir / PLAN_FILE, text)


class _Stopped(Exception):
    pass


def _on_sigterm(signum, frame):  # the hard stop (timeout in gpu_check.sh): write what was measured, then exit
    raise _Stopped()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="list what would run; needs no GPU; writes only the "
                                                               "plan, and only into --out")
    parser.add_argument("--out", help="directory for the results (created; at most 8 files); default: "
                                      "gpu_check.md/.csv in profiling/")
    parser.add_argument("--parts", default="first", help="first (default), second, all, or a,b,c of: "
                                                         + ", ".join(PART_NAMES))
    parser.add_argument("--budget-s", type=int, default=BUDGET_S, help=f"seconds for all parts (default {BUDGET_S})")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one Python part in this process
    args = parser.parse_args(argv)
    if args.part:
        print("RESULT " + json.dumps(gpu_parts.RUNNERS[args.part](), default=str), flush=True)
        return 0
    try:
        parts = select_parts(args.parts)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out is not None and not args.out.strip():  # `--out "$OUT"` where OUT is unset: not the current directory
        print("error: --out is empty (on the GPU machine the device tool sets $OUT)", file=sys.stderr)
        return 2
    out_dir = Path(args.out).resolve() if args.out else None
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            print(f"error: --out {out_dir} is a file", file=sys.stderr)
            return 2
        out_dir.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        dry_run(parts, args.budget_s, out_dir)
        return 0
    signal.signal(signal.SIGTERM, _on_sigterm)
    started = time.time()
    meta = {"started_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)), "budget_s": args.budget_s,
            "parts": args.parts, "elapsed_s": 0.0}
    outcomes: list[dict] = []
    current = "(none)"
    try:
        for part in parts:
            current = part.name
            left = args.budget_s - (time.time() - started)
            if part.estimate_s > left:
                outcomes.append({"part": part.name, "status": "skipped", "seconds": 0.0, "stderr": "", "result": {
                    "skipped": f"estimated {part.estimate_s} s, {left:.0f} s of the budget left (run it with --parts)"}})
            else:
                outcomes.append(run_part(part, min(part.limit_s, left)))
            o = outcomes[-1]
            print(f"{o['part']:<17} {o['status']:<8} {o['seconds']:>6} s  {summary_line(o)[:150]}", flush=True)
            meta["elapsed_s"] = time.time() - started
            write_outputs(outcomes, meta, out_dir)  # after every part: a run cut short keeps what it measured
    except (_Stopped, KeyboardInterrupt):
        if current not in (o["part"] for o in outcomes):
            outcomes.append({"part": current, "status": "timeout", "seconds": 0.0, "stderr": "",
                             "result": {"skipped": "the hard stop (gpu_check.sh's timeout) ended the run in this part"}})
        meta["elapsed_s"] = time.time() - started
        write_outputs(outcomes, meta, out_dir)
        return 1
    return 0 if all(o["status"] in ("ok", "skipped") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
