"""What `model.name` names is decided once (model_source.py): every reader of the name (the loader's checks, the
planner's shapes, the checks before a run, a finished run's readers) goes through `resolve`."""

import pytest

from frugal_spin.config import ModelConfig
from frugal_spin.errors import UserError
from frugal_spin.model_source import check_model_reference, resolve

# (model.name, model.gguf_file, kind, path relative to the test directory or None)
CASES = [
    ("builtin:tiny-llama", "", "builtin", None),
    ("builtin:smollm2-135m-instruct", "", "builtin", None),
    ("Qwen/Qwen2.5-0.5B-Instruct", "", "hub", None),
    ("gpt2", "", "hub", None),
    ("./models/mine", "", "local", "models/mine"),
    ("models/nested/deeper", "", "local", "models/nested/deeper"),  # more than one slash: never a hub id
    ("existing", "", "local", "existing"),  # a directory that exists here, though it could be a hub name
    ("weights/m.Q4.GGUF", "", "gguf", "weights/m.Q4.GGUF"),
    ("weights", "m.gguf", "gguf", "weights/m.gguf"),
]


@pytest.mark.parametrize("name, gguf_file, kind, path", CASES, ids=[c[0] + c[1] for c in CASES])
def test_every_kind_of_model_name_is_told_apart(tmp_path, monkeypatch, name, gguf_file, kind, path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing").mkdir()
    source = resolve(name, gguf_file)
    assert source.kind == kind
    assert (source.path is None) == (path is None)
    if path is not None:
        assert source.path.resolve() == (tmp_path / path).resolve()
    assert source.key == ("model.gguf_file" if gguf_file else "model.name")


@pytest.mark.parametrize("name, gguf_file, message", [
    ("builtin:huge", "", "unknown built-in model 'builtin:huge'"),
    ("builtin:tiny-llama", "m.gguf", "model.gguf_file is only for a model.name that is a directory"),
])
def test_a_name_that_names_nothing_is_one_line(name, gguf_file, message):
    with pytest.raises(UserError, match=message):
        resolve(name, gguf_file)


def test_the_loader_and_the_planner_read_a_local_name_the_same_way(tmp_path):
    """Before, model.py and planner.py each held a copy of the local-path rule."""
    from frugal_spin.planner import resolve_model_shape

    name = str(tmp_path / "a" / "b")  # absent: both must call it a directory, neither a hub id
    with pytest.raises(UserError, match="directory not found"):
        check_model_reference(ModelConfig(name=name))
    with pytest.raises(UserError, match="is not a model directory"):
        resolve_model_shape(name, allow_network=False)
