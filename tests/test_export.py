"""`python -m frugal_spin export`: the merged 16-bit model computes what base + adapter computed in the run, loads
with transformers alone, and comes with its tokenizer, adapter and model card; mistakes are one line; a user's
directory is never overwritten."""

import json
import shutil

import pytest
import torch

from frugal_spin.__main__ import main
from frugal_spin.config import load_recipe
from frugal_spin.errors import UserError
from frugal_spin.export import export_stage
from frugal_spin.model import load_adapter_weights, load_model, resolve_runtime

FP16_EPS = 2.0 ** -11  # unit roundoff of float16


@pytest.fixture(scope="module")
def exported(finished_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model"
    assert main(["export", str(finished_run), "--stage", "last", str(out)]) == 0
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def test_merged_logits_equal_base_plus_adapter_within_fp16_tolerance(finished_run, exported):
    """Reference: the run's own model (NF4 base + LoRA adapter of the last stage, as loaded by the pipeline).
    The merged fp16 weights, upcast to fp32, must give the same logits up to fp16 rounding of the weights; the
    adapter's own effect on the logits is checked to be far larger, so the comparison can fail."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = load_recipe(finished_run / "recipe.yaml")
    reference = load_model(str(finished_run / "base"), recipe.model, recipe.lora, resolve_runtime(recipe.model),
                           max_seq_length=64, seed=0)
    load_adapter_weights(reference, finished_run / "iter_0" / "adapter")
    reference.eval()
    merged = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 47 + 38?"},
                                         {"role": "assistant", "content": "47 + 38 = 85"}], return_dict=False)
    expected, got = _logits(reference, ids), _logits(merged, ids)
    with reference.disable_adapter():
        bare = _logits(reference, ids)
    scale = expected.abs().max().item()
    error = (got - expected).abs().max().item()
    assert error <= 20 * FP16_EPS * scale, (error, scale)
    assert (expected - bare).abs().max().item() > 50 * error  # the adapter matters far beyond the tolerance
    assert got.argmax(-1).tolist() == expected.argmax(-1).tolist()


def test_export_is_a_plain_16_bit_transformers_directory_with_adapter_and_card(finished_run, exported):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    config = json.loads((exported / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float16"
    assert "quantization_config" not in config
    with safe_open(str(exported / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
        assert not any("lora_" in k for k in f.keys())
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert tokenizer.chat_template is not None and tokenizer.eos_token == "<|end|>"
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (exported / "adapter" / name).read_bytes() == (finished_run / "iter_0" / "adapter" / name).read_bytes()
    card = (exported / "README.md").read_text()
    evaluation = json.loads((finished_run / "stages" / "iter_0.eval.json").read_text())["metrics"]
    assert f"| heldout_nll (held-out) | {evaluation['heldout_nll']:.4f} |" in card
    assert "builtin:tiny-llama" in card and "builtin:arithmetic" in card
    assert f"python -m frugal_spin export {finished_run} --stage last {exported}" in card
    assert "spin:" in card and "learning_rate" in card  # the recipe itself
    assert json.loads((exported / "export_info.json").read_text())["stage"] == "iter_0"


@pytest.mark.parametrize("stage, message", [
    ("iter_x", "error: unknown stage 'iter_x': use sft, iter_<t> (e.g. iter_0) or last"),
    ("iter_3", "error: stage iter_3 has not finished in"),
    ("final", "error: unknown stage 'final'"),
])
def test_bad_or_missing_stage_is_one_line_and_writes_nothing(finished_run, tmp_path, capsys, stage, message):
    out = tmp_path / "out"
    assert main(["export", str(finished_run), "--stage", stage, str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_users_non_empty_directory_is_never_overwritten(finished_run, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["export", str(finished_run), str(mine)]) == 2
    assert "is not empty and was not written by `frugal_spin export`" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    for inside in (finished_run / "exported", finished_run.parent):
        assert main(["export", str(finished_run), str(inside)]) == 2
        assert "run directory" in capsys.readouterr().err
    assert not (finished_run / "exported").exists()


def test_an_earlier_export_is_replaced_and_an_empty_directory_used(finished_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()  # empty: fine
    export_stage(finished_run, out, stage="sft")
    written = sorted(p.name for p in out.iterdir())
    (out / "notes.txt").write_text("the user's, added after the first export")
    assert main(["export", str(finished_run), "--stage", "iter_0", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: OUT_DIR {out} is an earlier export, but notes.txt in it was not written by") \
        and err.count("\n") == 1, err
    assert (out / "notes.txt").read_text() == "the user's, added after the first export"
    info = json.loads((out / "export_info.json").read_text())
    assert info["stage"] == "sft" and sorted(info["entries"]) == written
    (out / "notes.txt").unlink()
    export_stage(finished_run, out, stage="iter_0")
    assert json.loads((out / "export_info.json").read_text())["stage"] == "iter_0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left behind


def test_an_export_of_the_previous_format_is_replaced_only_with_the_names_it_wrote(finished_run, tmp_path):
    out = tmp_path / "out"
    export_stage(finished_run, out, stage="sft")
    info = json.loads((out / "export_info.json").read_text())
    del info["entries"]  # as main wrote it
    (out / "export_info.json").write_text(json.dumps(info))
    (out / "model_notes.md").write_text("mine")
    with pytest.raises(UserError, match="model_notes.md in it was not written by"):
        export_stage(finished_run, out, stage="iter_0")
    (out / "model_notes.md").unlink()
    export_stage(finished_run, out, stage="iter_0")


# ---------------------------------------------------------------------------------------------------- issue 20


def _copy_run(finished_run, tmp_path):
    """A copy to damage (the session's finished run is shared)."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, symlinks=True)
    return run


def _one_line(capsys, start):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and start in lines[0], err[-2000:]
    return lines[0]


SAMPLE = ["--prompt", "What is 2 + 3?", "--max-new-tokens", "4"]


@pytest.mark.parametrize("command", ["export", "sample"])
def test_trust_remote_code_comes_from_the_command_line_never_from_the_run_directory(finished_run, tmp_path, capsys,
                                                                                    command):
    run = _copy_run(finished_run, tmp_path)
    marker = tmp_path / "code_ran"
    recipe = (run / "recipe.yaml").read_text()
    assert "trust_remote_code: false" in recipe
    (run / "recipe.yaml").write_text(recipe.replace("trust_remote_code: false", "trust_remote_code: true"))
    config = json.loads((run / "base" / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (run / "base" / "config.json").write_text(json.dumps(config))
    (run / "base" / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                          "from transformers import LlamaConfig as EvilConfig\n"
                                          "from transformers import LlamaForCausalLM as EvilModel\n")
    args = ["export", str(run), str(tmp_path / "out")] if command == "export" else ["sample", str(run), *SAMPLE]
    assert main(args) == 2
    line = _one_line(capsys, "sets model.trust_remote_code: true")
    assert "--trust-remote-code" in line
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["export", "sample"])
@pytest.mark.parametrize("changed", ["model.safetensors", "config.json", "tokenizer.json"])
def test_a_base_changed_after_the_run_is_refused(finished_run, tmp_path, capsys, command, changed):
    run = _copy_run(finished_run, tmp_path)
    path = run / "base" / changed
    if changed.endswith(".json"):
        data = json.loads(path.read_text())
        if changed == "config.json":
            data["rms_norm_eps"] = 0.5  # valid, loads, and gives another model
        else:
            data["added_tokens"][0]["content"] += "x"
        path.write_text(json.dumps(data))
    else:
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x01
        path.write_bytes(bytes(data))
    args = ["export", str(run), str(tmp_path / "out")] if command == "export" else ["sample", str(run), *SAMPLE]
    assert main(args) == 2
    line = _one_line(capsys, f"the base {run / 'base'} is not the one the run used: {changed} changed")
    assert command in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["export", "sample"])
def test_a_corrupted_last_adapter_is_an_error_naming_it_never_a_quiet_fall_back(finished_run, tmp_path, capsys,
                                                                               command):
    run = _copy_run(finished_run, tmp_path)
    weights = run / "iter_0" / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    args = (["export", str(run), "--stage", "last", str(tmp_path / "out")] if command == "export"
            else ["sample", str(run), *SAMPLE])
    assert main(args) == 2
    _one_line(capsys, f"stage iter_0: its adapter {run / 'iter_0' / 'adapter'} differs from the one its stage "
                      "recorded")
    assert not (tmp_path / "out").exists()
    assert main([command, str(run), "--stage" if command == "export" else "--stages", "sft",
                 *([str(tmp_path / "out")] if command == "export" else SAMPLE)]) == 0  # the intact one, by name


def test_a_full_disk_during_export_is_one_line_and_leaves_the_earlier_export(finished_run, tmp_path, capsys,
                                                                             monkeypatch):
    import transformers.modeling_utils
    from safetensors import SafetensorError

    out = tmp_path / "out"
    export_stage(finished_run, out, stage="sft")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    real = transformers.modeling_utils.safe_save_file

    def fills_the_disk(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # half the weights are written...
            f.truncate(f.seek(0, 2) // 2)
        # ...then the disk is full: what safetensors' Rust writer raises (not an OSError)
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" })")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", fills_the_disk)
    assert main(["export", str(finished_run), "--stage", "iter_0", str(out)]) == 2
    line = _one_line(capsys, f"error: no space left on device writing {out} (the export needs about ")
    assert "nothing was replaced" in line
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the temporary is gone


def test_an_export_killed_with_sigkill_is_cleaned_by_the_next_one_and_only_its_own_leftovers(
        finished_run, tmp_path, small_base_cache):
    """Real processes: the export SIGKILLs itself half-way (faults.py); the next export removes that partial copy
    (it carries the mark of a dead export) but not a look-alike directory without the mark."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "model"
    lookalike = tmp_path / ".model.partial-abcdefgh"
    lookalike.mkdir()
    (lookalike / "keep.txt").write_text("not the tool's")
    code = "import sys; from frugal_spin.__main__ import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(repo), "FRUGAL_SPIN_CACHE": str(small_base_cache)}

    def export(**extra):
        return subprocess.run([sys.executable, "-c", code, "export", str(finished_run), str(out)],
                              env={**env, **extra}, capture_output=True, text=True, timeout=300)

    killed = export(FRUGAL_SPIN_CRASH_AT="export.fill")
    assert killed.returncode == -9, killed.stderr[-2000:]
    partials = [p for p in tmp_path.iterdir() if p.name.startswith(".model.partial-") and p != lookalike]
    assert len(partials) == 1 and (partials[0] / "model.safetensors").is_file() and not out.exists()
    done = export()
    assert done.returncode == 0, done.stderr[-2000:]
    assert "removed 1 partial copies left by an interrupted export" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".model.partial-abcdefgh", "model"])
    assert (lookalike / "keep.txt").read_text() == "not the tool's"


def test_an_export_path_with_rich_markup_is_printed_as_text_and_outputs_follow_the_umask(finished_run, tmp_path,
                                                                                         capsys):
    import os
    import stat

    out = tmp_path / "odd[" / "x]"
    old = os.umask(0o022)
    try:
        assert main(["export", str(finished_run), "--stage", "sft", str(out)]) == 0
    finally:
        os.umask(old)
    assert f"exported to {out}" in "".join(capsys.readouterr().out.splitlines())
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()} == {0o644}
