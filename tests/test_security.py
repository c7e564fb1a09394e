"""Only safetensors and JSON are loaded from disk, nothing in a recipe is executed, remote code is off by default."""

import ast
from pathlib import Path

import pytest

import yaml

from frugal_spin.config import ModelConfig, _RecipeLoader, load_recipe, recipe_from_dict
from frugal_spin.errors import UserError

PACKAGE = Path(__file__).resolve().parents[1] / "frugal_spin"


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_pickle_no_eval_and_torch_load_only_with_weights_only(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names} | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {"pickle", "cPickle", "dill", "joblib"} & imported
    for call, name in _calls(tree):
        assert name not in ("eval", "exec", "yaml.unsafe_load", "yaml.full_load"), f"{path.name}:{call.lineno}: {name}"
        if name == "yaml.load":
            loader = next(ast.unparse(k.value) for k in call.keywords if k.arg == "Loader")
            assert loader in ("yaml.SafeLoader", "_RecipeLoader"), f"{path.name}:{call.lineno}: yaml.load({loader})"
        if name.endswith("from_pretrained") and "AutoModelForCausalLM" in name and \
                not any(k.arg == "gguf_file" for k in call.keywords):  # a GGUF file is no pickle either
            # safetensors only: transformers would otherwise fall back to unpickling pytorch_model.bin
            assert any(k.arg == "use_safetensors" and ast.unparse(k.value) == "True" for k in call.keywords), \
                f"{path.name}:{call.lineno}: {name} without use_safetensors=True"
        if name == "torch.load":
            assert any(k.arg == "weights_only" and ast.unparse(k.value) == "True" for k in call.keywords), \
                f"{path.name}:{call.lineno}: torch.load without weights_only=True"


def test_a_recipe_cannot_run_code(tmp_path):
    assert issubclass(_RecipeLoader, yaml.SafeLoader)
    marker = tmp_path / "pwned"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f'seed: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(UserError):
        load_recipe(recipe)
    assert not marker.exists()


def test_remote_code_is_off_unless_the_recipe_asks():
    assert ModelConfig().trust_remote_code is False
    assert recipe_from_dict({"model": {"trust_remote_code": True}}).model.trust_remote_code is True
