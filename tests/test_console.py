"""A normal run, export and sample print no library warning: in a fresh interpreter with Python's default warning
filters (what a user gets, unlike pytest's), stderr stays empty and stdout carries only our own output."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import FINISHED_RUN_OVERRIDES, SMALL_BASE_PATCH

REPO = Path(__file__).resolve().parents[1]


def test_run_export_and_sample_print_no_library_warnings(tmp_path, small_base_cache):
    run, out = tmp_path / "run", tmp_path / "exported"
    script = (f"import sys; {SMALL_BASE_PATCH}; from frugal_spin.__main__ import main; "
              f"args = sys.argv[1:]; cut = args.index('--'); "
              f"codes = [main(args[:cut]), main(['export', {str(run)!r}, {str(out)!r}]), "
              f"main(['sample', {str(run)!r}, '--prompt', 'What is 2 + 3?', '--max-new-tokens', '6'])]; "
              f"sys.exit(max(codes))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(FRUGAL_SPIN_CACHE=str(small_base_cache), PYTHONPATH=str(REPO), COLUMNS="120")
    overrides = [o for o in FINISHED_RUN_OVERRIDES if not o.startswith("log.")]
    proc = subprocess.run([sys.executable, "-c", script, str(REPO / "recipes" / "cpu_tiny.yaml"),
                           f"output_dir={run}", *overrides, "--"], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == "", proc.stderr
    for word in ("Warning", "warn(", "deprecated", "kernels-community"):
        assert word not in proc.stdout, [line for line in proc.stdout.splitlines() if word in line]
    assert "frugal_spin run summary" in proc.stdout and "exported to" in proc.stdout
