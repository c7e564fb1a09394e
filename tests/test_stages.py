"""Stage markers and metrics.jsonl (the output directory checks: tests/test_rundir.py)."""

import json

from frugal_spin.stages import StageStore, fingerprint


def test_marker_counts_only_with_the_same_fingerprint(tmp_path):
    store = StageStore(tmp_path)
    assert store.completed("sft", "a") is None
    store.complete("sft", "a", "train", {"train_loss": 1.0}, 2.0)
    assert StageStore(tmp_path).completed("sft", "a")["metrics"] == {"train_loss": 1.0}
    assert StageStore(tmp_path).completed("sft", "b") is None  # the recipe changed: redo


def test_metrics_jsonl_follows_pipeline_order_and_drops_stale_markers(tmp_path):
    first = StageStore(tmp_path)
    first.complete("sft", "a", "train", {}, 1.0)
    first.complete("iter_0.train", "x", "train", {}, 1.0)
    second = StageStore(tmp_path)  # a rerun where SFT is unchanged but iteration 0 is stale
    assert second.completed("sft", "a") is not None
    assert second.completed("iter_0.train", "y") is None
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["stage"] for l in lines] == ["sft"] and "fingerprint" not in lines[0]


def test_a_torn_marker_is_not_trusted(tmp_path):
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "sft.json").write_text('{"stage": "sft", "fingerp')
    assert StageStore(tmp_path).completed("sft", "a") is None


def test_fingerprint_is_stable_and_sensitive():
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
