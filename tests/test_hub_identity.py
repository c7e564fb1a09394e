"""Issue #11, defect 12: a hub model or dataset is identified by the commit its id resolves to, so new weights or
data on the hub never reuse stages built on the old ones. Nothing can be downloaded here: the hub's answers are
mocked (`HfApi.repo_info`, `datasets.load_dataset`), the hub cache is a temporary directory, and the "hub model"
is the small built-in base loaded from disk by stand-ins that record what they were asked to load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from frugal_spin import hub

SHA_A, SHA_B = "a" * 40, "b" * 40
REPO = Path(__file__).resolve().parents[1]


def test_revision_comes_from_the_hub_when_online(monkeypatch):
    from huggingface_hub import HfApi, constants

    asked = []

    def repo_info(self, repo_id, repo_type=None, **kwargs):
        asked.append((repo_id, repo_type))
        return type("Info", (), {"sha": SHA_A})()

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "repo_info", repo_info)
    assert hub.resolve_revision("org/model") == SHA_A
    assert hub.resolve_revision("org/data", "dataset") == SHA_A
    assert asked == [("org/model", "model"), ("org/data", "dataset")]


@pytest.mark.parametrize("offline", [True, False])
def test_revision_comes_from_the_cache_when_offline_or_unreachable(monkeypatch, tmp_path, offline):
    from huggingface_hub import HfApi, constants

    def unreachable(self, *args, **kwargs):
        if offline:
            raise AssertionError("offline: the hub must not be asked")
        raise OSError("no network")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(HfApi, "repo_info", unreachable)
    assert hub.resolve_revision("org/model") is None
    (tmp_path / "models--org--model" / "refs").mkdir(parents=True)
    (tmp_path / "models--org--model" / "refs" / "main").write_text(SHA_B)
    (tmp_path / "datasets--org--data" / "refs").mkdir(parents=True)
    (tmp_path / "datasets--org--data" / "refs" / "main").write_text("not a commit\n")
    assert hub.resolve_revision("org/model") == SHA_B
    assert hub.resolve_revision("org/data", "dataset") is None


def test_a_hub_dataset_is_loaded_at_the_resolved_commit_and_records_it(monkeypatch):
    import datasets

    from frugal_spin.config import DataConfig
    from frugal_spin.data import load_splits

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(20)]
    loaded = []

    def load_dataset(name, split, **kwargs):
        loaded.append((name, split, kwargs.get("revision")))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(hub, "repo_access", lambda repo_id, repo_type, key: hub.HubAccess(SHA_A, False))
    splits = load_splits(DataConfig(dataset="org/chat", eval_size=4), seed=0)
    assert splits.revision == SHA_A
    assert loaded == [("org/chat", "train_sft", SHA_A), ("org/chat", "test_sft", SHA_A)]


def _setup_as_hub_model(monkeypatch, tmp_path, small_base_cache, revision: str, name: str):
    """The run's setup for `model.name=org/tiny` whose hub id resolves to `revision`; the loaders read the small
    base from disk and record the revision they were given."""
    from frugal_spin import context, pipeline, tiny_base
    from frugal_spin.config import load_recipe
    from conftest import SMALL_BASE

    monkeypatch.setenv("FRUGAL_SPIN_CACHE", str(small_base_cache))
    local = tiny_base.ensure_tiny_base(tmp_path / "hub_copy", cache_root=small_base_cache, spec=SMALL_BASE,
                                       progress=False)
    (local / "build_info.json").unlink()  # a hub snapshot has no builder info: the commit must identify it
    from frugal_spin import model, preflight

    loaded = []
    load_tokenizer, load_model = model.load_tokenizer, context.load_model
    # preflight resolves the commit and loads the tokenizer; the hub itself is never asked (no network here)
    monkeypatch.setattr(preflight, "resolve_revision", lambda repo_id, repo_type="model": revision)
    monkeypatch.setattr(preflight, "base_source", lambda cfg: "org/tiny")
    monkeypatch.setattr(preflight, "check_hub_model", lambda name: None)
    monkeypatch.setattr(preflight, "check_target_modules", lambda source, cfg, lora: None)
    monkeypatch.setattr(context, "base_location", lambda cfg, run_dir: "org/tiny")
    monkeypatch.setattr(model, "load_tokenizer", lambda path, trc=False, rev=None: (
        loaded.append(("tokenizer", path, rev)), load_tokenizer(str(local), trc))[1])
    monkeypatch.setattr(context, "load_model", lambda path, *a, revision=None, **k: (
        loaded.append(("model", path, revision)), load_model(str(local), *a, **k))[1])
    recipe = load_recipe(REPO / "recipes" / "cpu_tiny.yaml",
                         [f"output_dir={tmp_path / name}", "data.fraction=0.02", "data.eval_size=4"])
    from frugal_spin.preflight import preflight

    with pipeline.prepared_run_dir(recipe) as run_dir:  # the run directory as a run holds it (identity, lock)
        ctx, _, _ = pipeline.start_run(recipe, run_dir, preflight(recipe))
    return ctx, loaded


def test_a_new_hub_commit_of_the_model_changes_every_fingerprint(monkeypatch, tmp_path, small_base_cache):
    first, loaded = _setup_as_hub_model(monkeypatch, tmp_path, small_base_cache, SHA_A, "run_a")
    assert loaded == [("tokenizer", "org/tiny", SHA_A), ("model", "org/tiny", SHA_A)]
    record = json.loads((first.run_dir / "stages" / "setup.json").read_text())
    assert record["metrics"]["model_revision"] == SHA_A and record["metrics"]["dataset_revision"] is None
    again, _ = _setup_as_hub_model(monkeypatch, tmp_path, small_base_cache, SHA_A, "run_a2")
    updated, _ = _setup_as_hub_model(monkeypatch, tmp_path, small_base_cache, SHA_B, "run_b")
    assert (again.base_fp, again.data_fp) == (first.base_fp, first.data_fp)
    assert updated.base_fp != first.base_fp and updated.data_fp != first.data_fp  # so every stage downstream


def test_local_weights_are_part_of_the_identity(tmp_path):
    """A local directory without builder info: re-exported weights with the same config are another base."""
    from frugal_spin.context import base_identity

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"old weights")
    run_dir = tmp_path / "run"
    (run_dir / "stages").mkdir(parents=True)
    before = base_identity(tmp_path, run_dir)
    (tmp_path / "model.safetensors").write_bytes(b"new weights!")  # another size: the memo is keyed by size+mtime
    assert base_identity(tmp_path, run_dir) != before
