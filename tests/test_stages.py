"""Stage markers and metrics.jsonl (the output directory checks: tests/test_rundir.py)."""

import json

from frugal_spin.fingerprints import fingerprint
from frugal_spin.stage_store import StageStore


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


def test_fingerprints_and_digests_keep_their_values():
    """Both are formats on disk: every marker of every run directory holds them. A change here makes existing run
    directories recompute everything (values computed before the hash moved into fingerprints.py)."""
    from dataclasses import dataclass

    @dataclass
    class Section:
        x: int = 1

    assert fingerprint("sft", "abc", {"epochs": 1.0, "lr": 2e-4}, 0) == "35410a074c4bf90b"
    assert fingerprint(Section(), None, [1, 2]) == "ad5ef31060435ad7"


def test_file_digest_is_sha256sum_for_a_file_and_names_plus_contents_for_a_directory(tmp_path):
    from frugal_spin.fingerprints import file_digest

    (tmp_path / "a").write_bytes(b"hello")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"x")
    assert file_digest(tmp_path / "a") == {  # sha256sum of "hello"
        "sha256": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824", "bytes": 5}
    assert file_digest(tmp_path) == {"sha256": "71dfe047c515eb1b137a6424e72221d187011141e338b7870885828228d2887e",
                                     "bytes": 6}
