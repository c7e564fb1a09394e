"""`python -m frugal_spin export`: the merged 16-bit model computes what base + adapter computed in the run, loads
with transformers alone, and comes with its tokenizer, adapter and model card; mistakes are one line; a user's
directory is never overwritten."""

import json

import pytest
import torch

from frugal_spin.__main__ import main
from frugal_spin.config import load_recipe
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


def test_an_earlier_export_is_replaced_and_an_empty_directory_used(finished_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()  # empty: fine
    export_stage(finished_run, out, stage="sft")
    assert json.loads((out / "export_info.json").read_text())["stage"] == "sft"
    (out / "stale.txt").write_text("from the first export")
    export_stage(finished_run, out, stage="iter_0")
    assert json.loads((out / "export_info.json").read_text())["stage"] == "iter_0"
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left behind
