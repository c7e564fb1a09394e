"""`model.threads`: auto gives torch the cores other processes leave free (at least one); a number is used as is;
the run records what it used."""

import json
from pathlib import Path

import pytest
import torch

from frugal_spin import threads
from frugal_spin.config import load_recipe


@pytest.mark.parametrize("cores, busy, expected", [(2, 0.0, 2), (2, 0.3, 2), (2, 0.7, 1), (2, 1.0, 1), (2, 9.0, 1),
                                                   (8, 2.2, 6), (1, 0.0, 1)])
def test_auto_takes_the_free_cores(cores, busy, expected):
    assert threads.choose_threads("auto", cores=cores, busy=busy) == expected


def test_a_number_is_used_as_is_and_applied(monkeypatch):
    monkeypatch.setattr(threads, "busy_cores", lambda: pytest.fail("a fixed count must not sample the load"))
    previous = torch.get_num_threads()
    try:
        assert threads.apply_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)


def test_busy_cores_measures_something_plausible():
    busy = threads.busy_cores(sample_s=0.1)
    assert 0.0 <= busy <= threads.usable_cores() + 1e-6


def test_the_recipes_default_is_auto_and_a_run_records_its_threads(finished_run):
    assert load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "cpu_tiny.yaml").model.threads == "auto"
    setup = json.loads((finished_run / "stages" / "setup.json").read_text())["metrics"]
    assert 1 <= setup["torch_threads"] <= threads.usable_cores()
