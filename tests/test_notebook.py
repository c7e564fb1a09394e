"""The Colab notebook, executed as CI runs it: its parameters cell swapped for the CPU recipe and this checkout,
every cell run by a real kernel (nbclient), so the notebook cannot silently rot."""

import json
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from conftest import SMALL_BASE_PATCH

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "colab_t4.ipynb"


def _parameters_cell_index(nb) -> int:
    tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    return tagged[0]


def test_notebook_defaults_are_the_colab_recipe():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    source = nb.cells[_parameters_cell_index(nb)].source
    assert 'RECIPE = "recipes/colab_t4.yaml"' in source and "INSTALL = True" in source
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code")  # stored clean


def test_notebook_runs_the_cpu_recipe_end_to_end(tmp_path, small_base_cache, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    run_dir = tmp_path / "run"
    overrides = [f"output_dir={run_dir}", "data.fraction=0.03", "data.eval_size=16", "spin.iterations=1",
                 "sft.epochs=1", "generation.max_new_tokens=12", "eval.max_new_tokens=12"]
    # Like papermill's injected parameters: a cell right after the tagged one. Besides the CPU recipe and this
    # checkout it uses the session's small built-in base (see conftest.py).
    injected = nbformat.v4.new_code_cell("\n".join([
        f"SOURCE = {str(REPO)!r}",
        "INSTALL = False",
        'RECIPE = "recipes/cpu_tiny.yaml"',
        f"OVERRIDES = {overrides!r}",
        "import os, sys",
        f"os.environ['FRUGAL_SPIN_CACHE'] = {str(small_base_cache)!r}",
        f"sys.path.insert(0, {str(REPO)!r})",
        SMALL_BASE_PATCH,
    ]))
    nb.cells.insert(_parameters_cell_index(nb) + 1, injected)
    # A kernel spec of our own that runs this very interpreter: the stock "python3" spec runs whatever `python` is
    # first on PATH, which in a virtual environment that is not activated is another Python without the package.
    spec_dir = tmp_path / "jupyter" / "kernels" / "frugal_spin_test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "frugal_spin test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    NotebookClient(nb, timeout=600, kernel_name="frugal_spin_test",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    report = json.loads((run_dir / "report.json").read_text())
    assert report["complete"] and [s["stage"] for s in report["stages"]][-1] == "iter_0.eval"
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "frugal_spin from" in text and str(REPO) in text
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    markdown = [o for o in outputs if o.output_type == "display_data" and "text/markdown" in o.data]
    assert len(images) == 2 and markdown and "iter_0" in markdown[0].data["text/markdown"]
