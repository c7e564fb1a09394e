"""profiling/gpu_check.sh, the one-command GPU check, in its CPU mode: `--dry-run` lists every part with its time
limit and the planner's per-stage estimates, validates the stage runs' overrides, and writes nothing. The parts
themselves need a CUDA GPU and run only there (what they check is listed in profiling/gpu_check.py)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "profiling" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "profiling"))

import gpu_check  # noqa: E402


def test_dry_run_lists_the_parts_and_writes_nothing(tmp_path):
    assert os.access(SCRIPT, os.X_OK)
    before = {p: p.stat().st_mtime for p in (gpu_check.REPORT_MD, gpu_check.REPORT_CSV) if p.exists()}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for name, limit, _ in gpu_check.PARTS:
        assert f"  {name} " in out
    assert sum(limit for _, limit, _ in gpu_check.PARTS) > gpu_check.DEADLINE_S  # the deadline, not the sum, rules
    assert gpu_check.DEADLINE_S + 30 <= 8 * 60
    assert out.count("plan estimate per stage (GiB): sft_train") == 2 and "model.dtype=bfloat16" in out
    assert "would install:" in out
    after = {p: p.stat().st_mtime for p in (gpu_check.REPORT_MD, gpu_check.REPORT_CSV) if p.exists()}
    assert before == after


def test_the_compiled_kernel_script_is_read_from_its_test_without_pytest():
    script = gpu_check.kernels_script()
    assert "CUDA OK" in script and "pytest" not in script


def test_every_pipeline_stage_with_a_peak_maps_to_a_planner_stage():
    from frugal_spin.config import load_recipe
    from frugal_spin.planner import KNOWN_SHAPES, estimate

    plan = estimate(load_recipe(gpu_check.RECIPE, gpu_check.stage_overrides("float16")),
                    KNOWN_SHAPES[gpu_check.ARCHITECTURE])
    assert set(gpu_check.STAGE_MAP.values()) == {s.name for s in plan.stages}


def test_report_is_written_from_outcomes(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "REPORT_MD", tmp_path / "gpu_check.md")
    monkeypatch.setattr(gpu_check, "REPORT_CSV", tmp_path / "gpu_check.csv")
    outcomes = [
        {"part": "env", "status": "ok", "seconds": 1.0, "stderr": "",
         "result": {"device": "NVIDIA H200", "capability": "9.0", "torch": "2.11.0", "compute_dtype": "bfloat16"}},
        {"part": "self_checks", "status": "ok", "seconds": 3.0, "stderr": "",
         "result": {"logprob (head float16)": True, "kernel_warnings": []}},
        {"part": "stages_fp16", "status": "ok", "seconds": 90.0, "stderr": "",
         "result": {"dtype": "float16", "stages": [{"stage": "sft", "wall_s": 4.0, "peak_gib": 1.2,
                                                    "reserved_gib": 1.5, "plan_gib": 1.5,
                                                    "measured_over_plan": 0.8, "loss": 12.0}]}},
        {"part": "bench_vs_trl", "status": "skipped", "seconds": 0.1, "stderr": "",
         "result": {"skipped": "trl is not installed"}},
    ]
    gpu_check.write_report(outcomes, started=0.0)
    md = (tmp_path / "gpu_check.md").read_text()
    assert "NVIDIA H200 (compute capability 9.0" in md and "| sft | 4.0 | 1.2 | 1.5 | 1.5 | 0.8 | 12.0 |" in md
    csv_text = (tmp_path / "gpu_check.csv").read_text()
    assert "stages_fp16,ok,90.0,sft,1.2,1.5,0.8" in csv_text and "logprob (head float16),True" in csv_text
