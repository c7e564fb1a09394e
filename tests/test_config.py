import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from frugal_spin.config import Recipe, load_recipe, recipe_from_dict
from frugal_spin.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads_and_dry_runs_offline(path, capsys, monkeypatch, tmp_path):
    from frugal_spin.__main__ import main

    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# stages: setup | sft | anchor | sft.eval | iter_0.generate" in out
    assert f"# output directory: {recipe.output_dir}" in out and f"# model: {recipe.model.name}" in out
    printed = recipe_from_dict(yaml.safe_load(out.split("# model:")[0]))
    assert printed.to_dict() == recipe.to_dict()  # the printed recipe is the resolved one
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_spells_out_every_knob_with_a_comment(path):
    def leaves(d, prefix=""):
        return {k for key, value in d.items()
                for k in (leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"})}

    assert leaves(yaml.safe_load(path.read_text())) == leaves(Recipe().to_dict())
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\s*[a-z_]+:\s*[^\s#]", line):  # a key with a value (section headers have none)
            assert "#" in line or lines[i - 1].lstrip().startswith("#"), f"{path.name}:{i + 1} has no comment"


def test_recipes_directory_is_not_empty():
    assert (REPO / "recipes" / "cpu_tiny.yaml").is_file()


def test_exponent_floats_are_numbers_in_files_and_overrides(tmp_path):
    (tmp_path / "r.yaml").write_text("sft:\n  learning_rate: 2e-4\nspin:\n  learning_rate: 5E-5\n")
    recipe = load_recipe(tmp_path / "r.yaml", ["spin.beta=1e-1"])
    assert (recipe.sft.learning_rate, recipe.spin.learning_rate, recipe.spin.beta) == (2e-4, 5e-5, 0.1)
    with pytest.raises(UserError, match="spin.iterations must be int"):
        recipe_from_dict({}, ["spin.iterations=1e3"])


def test_defaults_and_typed_overrides():
    recipe = recipe_from_dict({"output_dir": "x"}, ["spin.iterations=3", "spin.beta=0.5", "data.fraction=1",
                                                    "lora.target_modules=[q_proj, v_proj]", "model.load_in_4bit=false"])
    assert recipe.spin.iterations == 3 and recipe.spin.beta == 0.5
    assert recipe.data.fraction == 1.0 and isinstance(recipe.data.fraction, float)
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.model.load_in_4bit is False


@pytest.mark.parametrize("data, overrides, message", [
    ({"bogus": 1}, [], "unknown key bogus"),
    ({"spin": {"betta": 0.1}}, [], "unknown key spin.betta"),
    ({}, ["spin.nope=1"], "unknown key spin.nope"),
    ({"spin": {"iterations": "two"}}, [], "spin.iterations must be int"),
    ({"spin": {"iterations": 1.5}}, [], "spin.iterations must be int"),
    ({"spin": {"iterations": True}}, [], "spin.iterations must be int"),
    ({"spin": {"beta": "high"}}, [], "spin.beta must be float"),
    ({"model": {"load_in_4bit": "yes"}}, [], "model.load_in_4bit must be bool"),
    ({"model": {"device": "tpu"}}, [], "model.device must be"),
    ({"spin": 3}, [], "spin must be SpinConfig"),
    ({}, ["spin.beta=-0.1"], "spin.beta must be > 0"),
    ({}, ["spin.iterations=-1"], "spin.iterations must be >= 0"),
    ({}, ["data.fraction=0"], "data.fraction must be in (0, 1]"),
    ({}, ["data.fraction=1.5"], "data.fraction must be in (0, 1]"),
    ({}, ["sft.learning_rate=0"], "sft.learning_rate must be > 0"),
    ({}, ["spin.beta"], "not of the form section.key=value"),
    ({}, ["spin.beta=[1"], "not valid YAML"),
    ({}, ["spin.beta.x=1"], "spin.beta is not a section"),
    ({}, ["spin.loss=ipo"], "spin.loss must be 'sigmoid' | 'hinge' | 'space', got 'ipo'"),
    ({}, ["compare.spin_losses=[hinge, dpo]"], "compare.spin_losses[1] must be 'sigmoid' | 'hinge' | 'space'"),
    ({}, ["compare.spin_losses=[hinge, space, hinge]"], "compare.spin_losses names hinge more than once"),
])
def test_bad_recipes_name_the_key(data, overrides, message):
    with pytest.raises(UserError) as info:
        recipe_from_dict(data, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_file_errors(tmp_path):
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(UserError, match="is empty"):
        load_recipe(tmp_path / "empty.yaml")
    (tmp_path / "bad.yaml").write_text("spin: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must be a mapping"):
        load_recipe(tmp_path / "list.yaml")


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "frugal_spin", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


BAD_ROWS_ONLY = '{"messages": [{"role": "user", "content": "q"}]}\n' * 5 + "{torn\n"

# Every user mistake of the reliability issue: (recipe text, overrides, files to create, expected message).
# RUN is an earlier run's directory that must come out byte for byte untouched; FILE is a plain file; DIR is tmp.
BAD_INPUTS = [
    ("spin: [unclosed\n", [], {}, "is not valid YAML"),
    ("", [], {}, "is empty"),
    ("whatever: 1\n", [], {}, "unknown key whatever"),
    ("sft:\n  epochs: many\n", [], {}, "sft.epochs"),
    ("spin:\n  beta: -1\n", [], {}, "spin.beta must be > 0"),
    ("spin: {iterations: 1}\n", ["spin.iterations=-2"], {}, "spin.iterations must be >= 0"),
    ("data:\n  dataset: ./nowhere.jsonl\n", [], {}, "data.dataset: file or directory not found"),
    ("data:\n  dataset: DIR/broken.parquet\n", [], {"broken.parquet": "not parquet at all"}, "cannot read"),
    ("data:\n  dataset: DIR/bad.jsonl\n", ["data.eval_size=1"], {"bad.jsonl": BAD_ROWS_ONLY}, "no usable training rows"),
    ("data:\n  dataset: DIR/bad.jsonl\n", [], {"bad.jsonl": BAD_ROWS_ONLY}, "would hold out all of them"),
    ("model:\n  name: ./no_such_model_dir\n", [], {}, "model.name: directory not found"),
    ("output_dir: FILE\n", [], {}, "is not a directory"),
    ("output_dir: FILE/run\n", [], {}, "is not writable"),
    pytest.param("seed: 0\n", ["model.device=cuda"], {}, "no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="only a machine without CUDA errs")),
]


def _tree(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("content, overrides, files, message", BAD_INPUTS)
def test_cli_bad_input_is_one_line_exit_2_and_leaves_earlier_results_untouched(tmp_path, content, overrides, files,
                                                                                message):
    (tmp_path / "FILE").write_text("I am a file")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    earlier = tmp_path / "run"
    (earlier / "stages").mkdir(parents=True)
    (earlier / "stages" / "run_directory.json").write_text('{"tool": "frugal_spin"}\n')  # a run directory
    (earlier / "recipe.yaml").write_text("output_dir: earlier\n")
    (earlier / "stages" / "sft.json").write_text('{"stage": "sft"}\n')
    (earlier / "metrics.jsonl").write_text('{"stage": "sft"}\n')
    before = _tree(tmp_path)
    text = content if "output_dir" in content or not content else f"output_dir: RUN\n{content}"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text.replace("FILE", str(tmp_path / "FILE")).replace("RUN", str(earlier))
                      .replace("DIR", str(tmp_path)))
    result = _cli(str(recipe), *overrides, *([] if "output_dir" in content else [f"output_dir={earlier}"]),
                  cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert {k: v for k, v in _tree(tmp_path).items() if k != "r.yaml"} == before  # nothing written or changed


def test_cli_missing_recipe_file(tmp_path):
    result = _cli(str(tmp_path / "nowhere.yaml"), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "nowhere.yaml" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_dry_run_prints_plan_without_loading(tmp_path):
    result = _cli(str(REPO / "recipes" / "cpu_tiny.yaml"), "spin.iterations=1", "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "iter_0.train" in result.stdout and "iter_1" not in result.stdout
    assert not (tmp_path / "runs").exists()
