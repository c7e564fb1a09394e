"""profiling/gpu_check.sh, the GPU check, in what the CPU can show: `--dry-run` lists every part and writes only a
plan; `--parts` selects; `--out` gets at most 8 files (md, csv, json, the parts' logs, a whitelisted archive of run
records, never weights); the self-check part reports every kernel variant and fails when one fails; a model
directory left by a part killed while saving is rebuilt, not trusted; the comparisons the GPU parts make (memory
like against like, dtype watch, loss curves, the README's CPU table) on hand-made inputs. The parts that need a GPU
run only there (profiling/GPU.md); those that can also run on the CPU (env, packing) run here through the driver."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "profiling" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "profiling"))

import gpu_check  # noqa: E402
import gpu_parts  # noqa: E402
import gpu_wheels  # noqa: E402


def _env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FRUGAL_SPIN_TRITON")}
    return {**env, "GPU_CHECK_WORK": str(tmp_path / "work"), **extra}


# ---------------------------------------------------------------------------------------------- dry run, --parts


def test_dry_run_lists_every_part_and_writes_only_the_plan(tmp_path):
    assert os.access(SCRIPT, os.X_OK)
    out = tmp_path / "out"
    before = {p: p.stat().st_mtime for p in (gpu_check.REPORT_MD, gpu_check.REPORT_CSV) if p.exists()}
    proc = subprocess.run([str(SCRIPT), "--dry-run", "--out", str(out), "--parts", "all"], capture_output=True,
                          text=True, env=_env(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for part in gpu_check.PARTS:
        assert re.search(rf"^\| {part.name} \| {part.group} \| {part.limit_s} \| {part.estimate_s} \|", proc.stdout,
                         re.M), part.name
    assert proc.stdout.count("plan estimate per stage (GiB, total / without the context term): sft_train") == 2
    assert "would install" in proc.stdout
    assert [p.name for p in out.iterdir()] == [gpu_check.PLAN_FILE]  # only the plan
    assert (out / gpu_check.PLAN_FILE).read_text() in proc.stdout
    assert not (tmp_path / "work").exists()  # nothing built, nothing run
    after = {p: p.stat().st_mtime for p in (gpu_check.REPORT_MD, gpu_check.REPORT_CSV) if p.exists()}
    assert before == after


def test_the_first_command_fits_its_window():
    first = gpu_check.select_parts("first")
    # The first command is the default, within ~8 minutes with the machine's start (GPU.md): the hard stop is the
    # budget plus 30 s, the parts' estimates fit the budget.
    assert [p.name for p in first] == [p.name for p in gpu_check.PARTS if p.group == "first"]
    assert sum(p.estimate_s for p in first) <= gpu_check.BUDGET_S <= 6.5 * 60 - 15
    assert {"resume", "bench_vs_trl"} <= {p.name for p in gpu_check.select_parts("second")}
    assert all(p.estimate_s < p.limit_s for p in gpu_check.PARTS)


@pytest.mark.parametrize("spec,names", [
    ("packing,env", ["env", "packing"]),  # the table's order, whatever the command line's
    ("resume", ["resume"]),
    (" tiny_cuda , bench_lora ", ["bench_lora", "tiny_cuda"]),
    ("all", gpu_check.PART_NAMES),
])
def test_parts_selects_a_subset_in_order(spec, names):
    assert [p.name for p in gpu_check.select_parts(spec)] == names


@pytest.mark.parametrize("spec", ["envv", "env,nope", ",", ""])
def test_an_unknown_part_is_one_line_and_exit_2(tmp_path, capsys, spec):
    assert gpu_check.main(["--parts", spec, "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --parts: unknown part") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_an_empty_out_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert gpu_check.main(["--out", "", "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith("error: --out is empty") and not list(tmp_path.iterdir())


def test_the_compiled_kernel_script_forces_the_kernels_and_reads_without_pytest():
    script = gpu_check.kernels_script()
    assert "CUDA OK" in script and "pytest" not in script
    assert 'os.environ["FRUGAL_SPIN_TRITON"] = "force"' in script  # auto mode might keep the reference
    compile(script, "kernels_compiled", "exec")


# ---------------------------------------------------------------------------------------------- --out


def test_out_gets_the_reports_logs_and_records_on_the_cpu(tmp_path):
    """The driver for real, with the part that runs anywhere (env, on the CPU): every output file, nothing else."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "profiling" / "gpu_check.py"), "--out", str(out), "--parts",
                           "env"], capture_output=True, text=True, env=_env(tmp_path, GPU_CHECK_DEVICE="cpu"),
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_check.OUT_FILES)
    report = json.loads((out / "gpu_check.json").read_text())
    (env,) = report["outcomes"]
    assert env["part"] == "env" and env["status"] == "ok" and env["result"]["torch"] == torch.__version__
    assert "| env | ok |" in (out / "gpu_check.md").read_text()
    with tarfile.open(out / "gpu_check_logs.tar.gz") as tar:
        assert tar.getnames() == ["env.log"]
        assert "RESULT " in tar.extractfile("env.log").read().decode()
    with tarfile.open(out / "gpu_check_runs.tar.gz") as tar:
        assert tar.getnames() == []  # no run directory yet


def _fake_run(root: Path, name: str) -> None:
    run = root / name
    for rel, size in [("metrics.jsonl", 100), ("report.md", 50), ("stages/sft.json", 20), ("metrics.png", 10),
                      ("iter_0/pairs.jsonl", 30), ("sft/adapter/adapter_model.safetensors", 500),
                      ("sft/checkpoint/state.safetensors", 500), ("base/model.safetensors", 900),
                      ("iter_0/opponent_logps.safetensors", 40), ("tb/events.out", 10)]:
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(b"x" * size)


def test_out_archives_hold_records_never_weights_and_stay_under_the_limit(tmp_path, monkeypatch):
    work = tmp_path / "work"
    monkeypatch.setattr(gpu_check, "WORK", work)
    for run in ("run_float16", "tiny_cuda"):
        _fake_run(work, run)
    (work / "logs").mkdir(parents=True)
    (work / "logs" / "stages_fp16.log").write_bytes(b"a" * 5000 + b"the end")
    monkeypatch.setattr(gpu_check, "LOG_TAIL_BYTES", 100)
    outcomes = [{"part": "stages_fp16", "status": "failed", "seconds": 1.0, "stderr": "boom",
                 "result": {"problems": ["x"]}}]
    out = tmp_path / "out"
    out.mkdir()
    gpu_check.write_outputs(outcomes, {"started_utc": "now", "elapsed_s": 1.0, "budget_s": 375, "parts": "x"}, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_check.OUT_FILES)
    with tarfile.open(out / "gpu_check_runs.tar.gz") as tar:
        names = tar.getnames()
    assert sorted(names) == sorted(f"{run}/{rel}" for run in ("run_float16", "tiny_cuda") for rel in (
        "metrics.jsonl", "report.md", "stages/sft.json", "metrics.png", "iter_0/pairs.jsonl"))
    with tarfile.open(out / "gpu_check_logs.tar.gz") as tar:
        log = tar.extractfile("stages_fp16.log").read()
    assert log.endswith(b"the end") and len(log) < 200  # the tail of a long log
    # Over the size limit: members are left out in order, and the archive says which.
    monkeypatch.setattr(gpu_check, "ARCHIVE_LIMIT_BYTES", 200)  # the two metrics.jsonl, first in the order
    gpu_check.write_outputs(outcomes, {"started_utc": "now", "elapsed_s": 1.0, "budget_s": 375, "parts": "x"}, out)
    with tarfile.open(out / "gpu_check_runs.tar.gz") as tar:
        names = tar.getnames()
        left_out = tar.extractfile("LEFT_OUT.txt").read().decode()
    assert names == ["run_float16/metrics.jsonl", "tiny_cuda/metrics.jsonl", "LEFT_OUT.txt"]
    assert "tiny_cuda/iter_0/pairs.jsonl" in left_out


def test_out_refuses_to_leave_more_than_the_tool_brings_back(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "WORK", tmp_path / "work")
    out = tmp_path / "out"
    out.mkdir()
    for i in range(4):
        (out / f"other{i}.txt").write_text("x")
    with pytest.raises(RuntimeError, match="9 entries"):
        gpu_check.write_outputs([], {"started_utc": "now", "elapsed_s": 0, "budget_s": 375, "parts": "x"}, out)


def test_report_tables_from_outcomes(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "REPORT_MD", tmp_path / "gpu_check.md")
    monkeypatch.setattr(gpu_check, "REPORT_CSV", tmp_path / "gpu_check.csv")
    variant = {"kernel": "logprob", "variant": "(head float16)", "device": "cuda:0", "device_name": "NVIDIA H200",
               "capability": "9.0", "passed": True, "error": 1e-4, "tolerance": 5e-3, "exception": None,
               "kernel_ms": 0.5, "reference_ms": 1.0, "timing_exception": None, "used": "triton",
               "reason": "faster than the reference (0.50x its time)"}
    stage = {"stage": "sft", "wall_s": 4.0, "tokens_per_s": 8000.0, "allocated_gib": 1.2, "reserved_gib": 1.5,
             "plan_gib": 1.5, "plan_without_context_gib": 1.0, "allocated_over_plan_without_context": 1.2,
             "reserved_plus_context_over_plan": 1.33, "loss": 12.0, "skipped_steps": 0, "scaler_overflow_steps": 0}
    outcomes = [
        {"part": "env", "status": "ok", "seconds": 1.0, "stderr": "",
         "result": {"device": "NVIDIA H200", "capability": "9.0", "torch": "2.11.0", "compute_dtype": "bfloat16"}},
        {"part": "self_checks", "status": "ok", "seconds": 3.0, "stderr": "",
         "result": gpu_parts.self_check_summary([variant])},
        {"part": "stages_fp16", "status": "ok", "seconds": 90.0, "stderr": "",
         "result": {"dtype": "float16", "stages": [stage], "non_pytorch_gib": 0.6, "plan_overhead_gib": 0.5,
                    "kernels": [variant], "dtype_watch": {"forbidden": "bfloat16", "outputs_checked": 9,
                                                          "found": {}, "places": 0}}},
        {"part": "bench_vs_trl", "status": "skipped", "seconds": 0.0, "stderr": "",
         "result": {"skipped": "trl not importable"}},
    ]
    gpu_check.write_outputs(outcomes, {"started_utc": "now", "elapsed_s": 94.0, "budget_s": 375, "parts": "first"},
                            None)
    md = (tmp_path / "gpu_check.md").read_text()
    assert "NVIDIA H200 (compute capability 9.0" in md
    assert "| sft | 4.0 | 8000 | 1.2 | 1 | 1.2 | 1.5 | 1.33 | 12 |" in md
    assert "| logprob | (head float16) | True | 0.0001 / 0.005 | 0.5 | 1 | triton |" in md
    assert "bfloat16 tensors: 0 places (9 module outputs checked)." in md
    rows = list(csv.DictReader(io.StringIO((tmp_path / "gpu_check.csv").read_text())))
    assert {"part": "stages_fp16", "item": "sft", "value": "1.2", "plan": "1.0", "ratio": "1.2"}.items() <= rows[2].items()
    assert rows[1]["item"] == "logprob (head float16)" and rows[1]["value"] == "triton" and rows[1]["ratio"] == "0.5"
    assert rows[-1]["status"] == "skipped" and rows[-1]["notes"] == "trl not importable"


@pytest.mark.parametrize("value,digits,text", [(1020.17, 0, "1020"), (8000.0, 0, "8000"), (1.5, 3, "1.5"),
                                               (0.25, 3, "0.25"), (1e-4, 3, "0.0001"), (-0.0, 4, "0"), (None, 3, "-"),
                                               (12, 3, "12")])
def test_numbers_in_the_report(value, digits, text):
    assert gpu_check._fmt(value, digits) == text


# ---------------------------------------------------------------------------------------------- self-checks


def test_self_checks_report_every_variant_and_fail_when_they_all_fail(monkeypatch):
    """Seen in a CPU dry run of the old check: every variant failed and the part still said ok."""
    from frugal_spin.kernels import dispatch, logprob, nf4_lora

    def broken(device, variant):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(logprob, "self_check", broken)
    monkeypatch.setattr(nf4_lora, "self_check", broken)
    monkeypatch.setattr(gpu_parts, "DEVICE", "cpu")
    monkeypatch.delenv(dispatch.MODE_ENV, raising=False)
    dispatch.forget_verifications()
    try:
        result = gpu_parts.part_self_checks()
    finally:
        dispatch.forget_verifications()
    assert result["checked"] == 15 == result["failed"] and result["used_triton"] == 0
    assert len(result["problems"]) == 15 and all("no compiler" in p for p in result["problems"])
    variants = {f"{v['kernel']} {v['variant']}" for v in result["variants"]}
    assert "logprob (head bfloat16)" in variants and "nf4_lora (float16, rank 64, bias, double quantisation)" in variants
    status, _ = gpu_check.status_of("self_checks", 0, "", json.loads(json.dumps(result)))
    assert status == "failed"
    assert "15 failed" not in gpu_check.summary_line({"part": "self_checks", "result": result})  # problems first


@pytest.mark.parametrize("name,code,stdout,result,status", [
    ("env", 0, "", {"device": "x"}, "ok"),
    ("env", 1, "", None, "failed"),
    ("env", None, "", None, "timeout"),
    ("stages_fp16", 0, "", {"problems": ["bfloat16 tensors"]}, "failed"),
    ("packing", 0, "", {"skipped": "no GPU"}, "skipped"),
    ("kernels_compiled", 0, "rel err x: 1e-3\nCUDA OK\n", None, "ok"),
    ("kernels_compiled", 1, "rel err x: nan\n", None, "failed"),
    ("vllm", 0, "gpu_check_vllm: SKIPPED, vllm is not installed\n", None, "skipped"),
    ("bench_lora", 0, "| t |\nspeedup_fwd_bwd_total=1.5\n", None, "ok"),
    ("bench_lora", 1, "", None, "failed"),
])
def test_status_of_a_part(name, code, stdout, result, status):
    assert gpu_check.status_of(name, code, stdout, result)[0] == status


# ---------------------------------------------------------------------------------------------- killed saves


TINY_SHAPE = dict(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
                  vocab_size=512, tie_word_embeddings=True, max_position_embeddings=256, attention_bias=True)


def test_a_model_left_by_a_part_killed_while_saving_is_rebuilt(tmp_path):
    from frugal_spin.planner import ModelShape

    shape = ModelShape(**TINY_SHAPE)
    work = tmp_path / "work"
    # What a part killed while saving left: config.json and a partial weight file, and its temp directory.
    (work / "model").mkdir(parents=True)
    (work / "model" / "config.json").write_text("{}")
    (work / "model" / "model.safetensors").write_bytes(b"\x00" * 1000)
    stale = work / ".model.partial-12345"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\x00" * 5000)
    done = gpu_parts.build_inputs(work, shape, rows=(3, 2))
    assert done == {"removed_partial": [".model.partial-12345"], "built": True}
    assert not stale.exists() and sorted(p.name for p in work.iterdir()) == ["data.jsonl", "model"]
    spec = gpu_parts.model_spec(shape)
    assert gpu_parts.model_dir_complete(work / "model", spec)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(work / "model").config.hidden_size == 64
    assert len((work / "data.jsonl").read_text().splitlines()) == 5
    # A complete build is reused ...
    assert gpu_parts.build_inputs(work, shape, rows=(3, 2))["built"] is False
    # ... but not once its weights are cut short, or when it was built for another shape.
    weights = work / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert not gpu_parts.model_dir_complete(work / "model", spec)
    assert gpu_parts.build_inputs(work, shape, rows=(3, 2))["built"] is True
    assert gpu_parts.build_inputs(work, ModelShape(**{**TINY_SHAPE, "vocab_size": 640}), rows=(3, 2))["built"]


def test_a_weight_file_with_a_broken_header_is_not_complete(tmp_path):
    from frugal_spin.planner import ModelShape

    work = tmp_path / "work"
    gpu_parts.build_inputs(work, ModelShape(**TINY_SHAPE), rows=(1, 1))
    assert gpu_parts.model_dir_complete(work / "model", gpu_parts.model_spec(ModelShape(**TINY_SHAPE)))
    weights = work / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"{garbage"  # same size, unreadable header
    weights.write_bytes(bytes(data))
    assert gpu_parts.model_dir_complete(work / "model", gpu_parts.model_spec(ModelShape(**TINY_SHAPE))) is False


# ---------------------------------------------------------------------------------------------- comparisons


def _record(stage, **metrics):
    return {"stage": stage, "kind": "train", "wall_time_s": 2.0, "metrics": metrics}


def test_memory_is_compared_like_with_like():
    from frugal_spin.planner import StageEstimate

    class Plan:
        stages = [StageEstimate("sft_train", {"weights": 2**30, "activations": 2**30, "overhead": 2**29})]

    records = [_record("setup"), _record("sft", peak_mem_gib=1.5, peak_reserved_gib=1.8, tokens_per_s=1000.0,
                                         train_loss=3.0)]
    (row,) = gpu_parts.memory_rows(records, Plan(), context_gib=0.7)
    # allocated never sees the CUDA context: against the plan without its 0.5 GiB term (2 GiB), not 2.5 GiB
    assert row["plan_gib"] == 2.5 and row["plan_without_context_gib"] == 2.0
    assert row["allocated_over_plan_without_context"] == 0.75
    assert row["reserved_plus_context_over_plan"] == round((1.8 + 0.7) / 2.5, 3)
    assert row["tokens_per_s"] == 1000.0 and row["loss"] == 3.0


def test_dtype_watch_finds_bf16_in_parameters_buffers_and_outputs():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[1].register_buffer("scale", torch.ones(2, dtype=torch.bfloat16))
    clean = gpu_parts.DtypeWatch(torch.bfloat16)
    clean.scan(torch.nn.Linear(4, 4))
    assert clean.found == {}
    watch = gpu_parts.DtypeWatch(torch.bfloat16)
    model[1].to(torch.bfloat16)
    watch.scan(model)
    watch.attach(model)
    model[1](torch.randn(2, 4, dtype=torch.bfloat16))
    assert set(watch.found) == {"parameter 1.weight", "parameter 1.bias", "buffer 1.scale", "output of 1"}
    assert watch.summary()["places"] == 4 and watch.summary()["forbidden"] == "bfloat16"


@pytest.mark.parametrize("reference,resumed,tolerance,problems", [
    ([1.0, 0.5, 0.25], [1.0, 0.5, 0.25], 0.0, 0),
    ([1.0, 0.5, 0.25], [1.0, 0.5, 0.2504], 1e-3, 0),
    ([1.0, 0.5, 0.25], [1.0, 0.5, 0.26], 1e-3, 1),
    ([1.0, 0.5, 0.25], [1.0, 0.5], 1e-3, 1),  # steps lost
    ([1.0, float("nan")], [1.0, float("nan")], 1e-3, 1),
    ([], [], 1e-3, 1),
])
def test_resumed_loss_curve_against_uninterrupted(reference, resumed, tolerance, problems):
    assert len(gpu_parts.compare_loss_curves(reference, resumed, tolerance)[1]) == problems


def test_tiny_base_on_cuda_is_compared_with_the_readme_table():
    records = [_record(stage, **{k: v + (0.2 if (stage, k) == ("iter_1.eval", "exact_match") else 0.001)
                                 for k, v in metrics.items()}) for stage, metrics in gpu_parts.CPU_TABLE.items()]
    rows, problems = gpu_parts.compare_with_cpu_table(records)
    assert len(rows) == 12 and sum(not r["ok"] for r in rows) == 1
    assert problems == ["iter_1.eval exact_match: CUDA 0.595 vs CPU 0.395 (tolerance 0.09)"]
    assert gpu_parts.compare_with_cpu_table(records[:1])[1][-1] == "iter_1.eval: no record"


def test_the_cpu_table_is_the_readme_s():
    """The numbers tiny_cuda compares with are the ones the documentation shows (README or docs/)."""
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    text = "\n".join(p.read_text(encoding="utf-8") for p in docs if p.exists())
    names = {"sft.eval": "SFT", "iter_0.eval": "SPIN iteration 0", "iter_1.eval": "SPIN iteration 1"}
    for stage, metrics in gpu_parts.CPU_TABLE.items():
        row = (f"| {names[stage]} | {metrics['heldout_nll']:.3f} | {metrics['spin_loss']:.3f}"
               f"{' (log 2)' if stage == 'sft.eval' else ''} | {metrics['reward_accuracy']:.3f} | "
               f"{metrics['exact_match']:.3f} |")
        assert row in text, row


def test_packing_part_on_the_cpu(tmp_path, monkeypatch):
    """The packing part's comparison on the product path, here in fp32 (the GPU adds fp16 and bf16)."""
    row = gpu_parts.packing_parity("float32", device="cpu", work=tmp_path)
    assert row["ok"] and row["attention"] == "sdpa" and row["pairs"] == 6
    assert row["logp_rel_err"] < 1e-5 and row["leak_rel_change"] == 0.0


# ---------------------------------------------------------------------------------------------- wheels


def test_slim_wheel_keeps_the_named_libraries_and_a_matching_record(tmp_path):
    src = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    libs = ["cpu", "cuda118", "cuda130", "rocm64"]
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("bitsandbytes/__init__.py", "x = 1\n")
        for lib in libs:
            z.writestr(f"bitsandbytes/libbitsandbytes_{lib}.so", b"\x7fELF" + lib.encode() * 100)
        record = [f"bitsandbytes/libbitsandbytes_{lib}.so,sha256=abc,404" for lib in libs]
        z.writestr("bitsandbytes-0.50.2.dist-info/RECORD", "\n".join(["bitsandbytes/__init__.py,sha256=x,6", *record,
                                                                     "bitsandbytes-0.50.2.dist-info/RECORD,,"]) + "\n")
    dest = tmp_path / "slim" / src.name
    dest.parent.mkdir()
    removed = gpu_wheels.slim_wheel(src, dest)
    assert sorted(removed) == ["bitsandbytes/libbitsandbytes_cuda118.so", "bitsandbytes/libbitsandbytes_rocm64.so"]
    with zipfile.ZipFile(dest) as z:
        names = z.namelist()
        record = z.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
        assert z.read("bitsandbytes/libbitsandbytes_cuda130.so") == b"\x7fELF" + b"cuda130" * 100
    assert sorted(n for n in names if n.endswith(".so")) == ["bitsandbytes/libbitsandbytes_cpu.so",
                                                              "bitsandbytes/libbitsandbytes_cuda130.so"]
    assert "cuda118" not in record and "rocm64" not in record and "libbitsandbytes_cpu.so" in record
    with pytest.raises(ValueError, match="every native library"):
        gpu_wheels.slim_wheel(src, tmp_path / "none.whl", keep=("cuda999",))


def test_the_wheel_pins_carry_hashes():
    lines = [line for line in (REPO / "profiling" / "gpu_wheels.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert {line.split("==")[0] for line in lines} == {"bitsandbytes", "trl", "datasets", "dill", "multiprocess"}
    assert all(re.search(r"==[\w.]+ --hash=sha256:[0-9a-f]{64}$", line) for line in lines)


def test_the_hard_stop_keeps_what_was_measured(tmp_path):
    """gpu_check.sh's timeout sends SIGTERM: the running part (and its children) are killed, the report says so."""
    import signal
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(REPO / "profiling" / "gpu_check.py"), "--out", str(out), "--parts",
                             "env"], env=_env(tmp_path, GPU_CHECK_DEVICE="cpu"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(4)  # the env part is importing torch by now
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 1
    (outcome,) = json.loads((out / "gpu_check.json").read_text())["outcomes"]
    assert outcome["part"] == "env" and outcome["status"] == "timeout"
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_check.OUT_FILES)
