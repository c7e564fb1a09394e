"""A full disk (ENOSPC, mocked at the write) gives one line naming the path and the space needed, and the rerun
resumes; the run's copy of the base is checked against its source (truncated or altered: copied again), and the
base's weights are hashed into its identity once (then remembered by size and mtime)."""

import errno
import hashlib
import shutil
from pathlib import Path

import pytest

from conftest import SMALL_BASE
from frugal_spin import tiny_base

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "cpu_tiny.yaml"
TINY = ["data.fraction=0.02", "data.eval_size=8", "spin.iterations=1", "sft.epochs=1", "generation.max_new_tokens=4",
        "eval.max_new_tokens=4", "eval.batch_size=8", "generation.batch_size=8"]


@pytest.fixture
def cli(monkeypatch, small_base_cache, capsys):
    from frugal_spin.__main__ import main

    monkeypatch.setenv("FRUGAL_SPIN_CACHE", str(small_base_cache))
    monkeypatch.setattr(tiny_base, "_resolve_spec", lambda seed, spec: SMALL_BASE)

    def run(output_dir, *extra):
        code = main([str(RECIPE), f"output_dir={output_dir}", *TINY, *extra])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def _one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    return lines[0]


def test_disk_full_in_a_save_or_a_copy_is_one_line_and_the_rerun_resumes(cli, monkeypatch, tmp_path):
    import safetensors.torch

    real_save = safetensors.torch.save_file

    def full_disk(tensors, filename, metadata=None):
        if "opponent_logps" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real_save(tensors, filename, metadata=metadata)

    run = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", full_disk)
        code, out, err = cli(run)
    assert code == 2
    line = _one_line(err)
    assert line.startswith(f"error: no space left on device writing {run / 'iter_0' / 'opponent_logps.safetensors'} "
                           "(it needs about ") and " free there); free some space and rerun" in line, line
    assert not (run / "iter_0" / "opponent_logps.safetensors").exists()
    assert not list(run.rglob(".*.tmp"))  # nothing half-written left behind

    # A copy: the built-in base into a new run directory.
    def copy_fails(src, dst, dirs_exist_ok=False):
        raise shutil.Error([(str(src), str(dst), "[Errno 28] No space left on device")])

    other = tmp_path / "other"
    with monkeypatch.context() as m:
        m.setattr(shutil, "copytree", copy_fails)
        code, out, err = cli(other)
    assert code == 2
    line = _one_line(err)
    assert line.startswith(f"error: no space left on device writing {other / 'base'} (it needs about "), line
    assert not (other / "base").exists()

    # A save through peft (the adapter): still one line, naming the adapter directory.
    import peft

    def save_fails(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    third = tmp_path / "third"
    with monkeypatch.context() as m:
        m.setattr(peft.PeftModel, "save_pretrained", save_fails)
        code, out, err = cli(third)
    assert code == 2
    assert _one_line(err).startswith(f"error: no space left on device writing {third / 'sft' / 'adapter'} (it needs")

    # Space freed: the same command resumes where it stopped.
    code, out, err = cli(run)
    assert code == 0, err[-3000:]
    assert "sft: complete, skipped" in out
    assert (run / "iter_0" / "opponent_logps.safetensors").is_file()


def test_a_truncated_or_altered_copy_of_the_base_is_copied_again(cli, tmp_path):
    run = tmp_path / "run"
    code, out, err = cli(run, "spin.iterations=0")
    assert code == 0, err[-3000:]
    weights = run / "base" / "model.safetensors"
    original = weights.read_bytes()
    for damage in (original[: len(original) // 2], original[:-1] + bytes([original[-1] ^ 0xFF])):
        weights.write_bytes(damage)
        code, out, err = cli(run, "spin.iterations=0")
        assert code == 0, err[-3000:]
        assert "base/ differs from the built base it was copied from" in err
        assert weights.read_bytes() == original
        assert "sft: complete, skipped" in out  # the stages were computed from the original: still valid


def test_the_base_identity_hashes_the_weights_once_and_sees_a_change(tmp_path, monkeypatch, small_base_cache):
    from frugal_spin import base_weights
    from frugal_spin.context import base_identity

    model = tmp_path / "model"
    shutil.copytree(next(small_base_cache.glob("tiny-llama-*")), model)
    run = tmp_path / "run"
    hashed = []
    real = base_weights._sha256
    monkeypatch.setattr(base_weights, "_sha256", lambda p: hashed.append(p.name) or real(p))
    first = base_identity(model, run)
    assert base_identity(model, run) == first and hashed == ["model.safetensors"]  # once, then from the memo
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # a valid file with one other weight: same config, same tokenizer
    weights.write_bytes(bytes(data))
    assert base_identity(model, run) != first  # so no stage computed from the old weights is reused
    assert hashed == ["model.safetensors", "model.safetensors"]


@pytest.mark.parametrize("damage", ["config.json", "tokenizer_config.json", "added_file.py"])
def test_an_altered_config_or_tokenizer_of_the_base_copy_is_seen_and_copied_again(cli, tmp_path, damage):
    """Not only the weights: config, tokenizer files and code decide the model too (main used them unseen)."""
    import json

    run = tmp_path / "run"
    code, out, err = cli(run, "spin.iterations=0")
    assert code == 0, err[-3000:]
    path = run / "base" / damage
    original = path.read_bytes() if path.exists() else None
    if damage == "added_file.py":
        path.write_text("print('not the built base')\n")
    else:
        data = json.loads(path.read_text())
        if damage == "config.json":
            data["rms_norm_eps"] = 0.5  # valid, loads, and gives another model
        else:
            data["model_max_length"] = 7
        path.write_text(json.dumps(data))
    code, out, err = cli(run, "spin.iterations=0")
    assert code == 0, err[-3000:]
    assert f"base/ differs from the built base it was copied from ({damage} changed" in err
    assert (path.read_bytes() if path.exists() else None) == original
    assert "sft: complete, skipped" in out  # the stages were computed from the original: still valid


def test_a_changed_config_of_a_local_base_is_named_when_the_run_resumes(cli, tmp_path, small_base_cache):
    import json

    model = tmp_path / "model"
    shutil.copytree(next(small_base_cache.glob("tiny-llama-*")), model)
    run = tmp_path / "run"
    code, out, err = cli(run, f"model.name={model}", "spin.iterations=0")
    assert code == 0, err[-3000:]
    config = json.loads((model / "config.json").read_text())
    config["rms_norm_eps"] = 0.5
    (model / "config.json").write_text(json.dumps(config))
    code, out, err = cli(run, f"model.name={model}", "spin.iterations=0")
    assert code == 0, err[-3000:]
    assert f"model.name {model}: config.json changed since this run directory last used it" in err
    assert "sft: complete, skipped" not in out  # the other model's stages are recomputed, and said why
    recorded = json.loads((run / "stages" / "base_files.json").read_text())["files"]
    assert recorded["config.json"] == hashlib.sha256((model / "config.json").read_bytes()).hexdigest()
