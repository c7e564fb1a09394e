"""Hostile and mistaken input, table-driven: each case gives one `error:` line and exit status 2, and leaves every
file under the test's directory (an earlier finished run, the user's own directories, the model and data)
exactly as it was, byte for byte. Runs `frugal_spin.__main__.main` in this process (the table is long; the
restart and lock cases with real processes are in tests/test_rundir.py, the CLI subprocess table in
tests/test_config.py)."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import SMALL_BASE
from frugal_spin import rundir, tiny_base

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "cpu_tiny.yaml"
TINY = ["data.fraction=0.02", "data.eval_size=8", "spin.iterations=1"]
CHAT = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def _rows(n):
    return "".join(json.dumps({"messages": CHAT}) + "\n" for _ in range(n))


# (name, recipe text or None for recipes/cpu_tiny.yaml, arguments, expected text in the one error line)
# Placeholders: RUN an earlier finished run, USER a user's directory, HOME, DIR the test directory, MODEL:<kind> a
# model directory broken as `_break_model` says, FILE a plain file.
CASES = [
    # 6: every float is finite-checked at load
    ("nan learning rate", None, ["sft.learning_rate=.nan"], "sft.learning_rate must be a finite number, got nan"),
    ("inf epochs", None, ["sft.epochs=.inf"], "sft.epochs must be a finite number, got inf"),
    ("nan temperature", None, ["generation.temperature=.nan"], "generation.temperature must be a finite number"),
    ("nan grad norm", None, ["spin.max_grad_norm=.nan"], "spin.max_grad_norm must be a finite number"),
    ("nan beta", None, ["spin.beta=.nan"], "spin.beta must be a finite number"),
    ("inf in beta list", None, ["spin.iterations=2", "spin.beta=[0.1,.inf]"], "spin.beta[1] must be a finite"),
    ("nan in the file", "output_dir: RUN\nspin:\n  beta: .nan\n", [], "spin.beta must be a finite number"),
    # 7: YAML
    ("duplicate section", "output_dir: RUN\nspin:\n  beta: 0.2\nsft:\n  epochs: 1\nspin:\n  iterations: 1\n", [],
     "duplicate key 'spin' at line 6 (first at line 2)"),
    ("duplicate key", "output_dir: RUN\nspin:\n  beta: 0.2\n  beta: 0.3\n", [], "duplicate key 'beta' at line 4"),
    ("alias bomb", "output_dir: RUN\na: &a [1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
     "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\nseed: [*d,*d,*d,*d,*d,*d,*d,*d]\n",
     [], "expands to more than 10,000 values"),
    ("alias bomb under a valid key", "output_dir: RUN\nx: &a [[1,1,1,1,1,1,1,1,1],[1,1,1,1,1,1,1,1,1]]\n"
     "lora:\n  target_modules: [*a, *a, *a]\n", [], "unknown key x"),
    ("wide value in a message", "output_dir: RUN\nseed: [" + ",".join(["1"] * 5000) + "]\n", [],
     "seed must be int, got [1, 1, 1, 1, 1, 1, ...] (list)"),
    ("deep nesting", "output_dir: RUN\nseed: " + "[" * 5000 + "]" * 5000 + "\n", [], "nested more than 50 levels"),
    ("self-referencing alias", "output_dir: RUN\nseed: &a [*a]\n", [], "an alias refers to itself"),
    ("huge integer", "output_dir: RUN\nseed: 1" + "0" * 5000 + "\n", [], "has 5001 digits"),
    ("int64 overflow", None, ["seed=100000000000000000000"], "seed is out of range"),
    # 1, 2: obviously wrong roots and other people's directories
    ("output_dir is /", None, ["output_dir=/"], "is the filesystem root"),
    ("output_dir is / with --restart", None, ["output_dir=/", "--restart"], "is the filesystem root"),
    ("output_dir is home", None, ["output_dir=HOME", "--restart"], "is your home directory"),
    ("output_dir is an ancestor of cwd", None, ["output_dir=..", "--restart"], "ancestor of the current directory"),
    ("output_dir is top-level", None, ["output_dir=/usr"], "is a top-level directory"),
    ("user dir with a recipe.yaml, --restart", None, ["output_dir=USER", "--restart"],
     "--restart: USER is not a frugal_spin run directory"),
    ("user dir without the flag", None, ["output_dir=USER"], "is not empty and is not a frugal_spin run directory"),
    ("output_dir is a file", None, ["output_dir=FILE"], "exists and is not a directory"),
    # 3, 9, 10: the model, checked before anything is written (with --restart too: the earlier run stays)
    ("config.json only", None, ["model.name=MODEL:config_only"], "has no weights (model.safetensors"),
    ("weights without a tokenizer", None, ["model.name=MODEL:no_tokenizer"], "has weights but no tokenizer"),
    ("random bytes as weights", None, ["model.name=MODEL:random_weights", "--restart"],
     "model.safetensors is not a valid safetensors file"),
    ("truncated weights", None, ["model.name=MODEL:truncated_weights"], "model.safetensors is not a valid "
     "safetensors file (truncated"),
    ("tokenizer with auto_map", None, ["model.name=MODEL:auto_map"], "the tokenizer needs its own Python code"),
    ("pickle weights only", None, ["model.name=MODEL:pickle_only"], "holds only pickle weights (pytorch_model.bin)"),
    ("no chat template", None, ["model.name=MODEL:no_template", "--restart"], "has no chat template"),
    ("broken config.json", None, ["model.name=MODEL:bad_config"], "config.json is not valid JSON"),
    # 9, 10: weights that do not fit config.json (transformers loads half a model, or random tensors, and warns)
    ("config with fewer layers than the weights", None, ["model.name=MODEL:fewer_layers"], "the weights do not fit "
     "config.json: config.json says num_hidden_layers=2, the weights hold 4 layers; 18 tensor(s) in the weights "
     "have no place in the model (model.layers.{2-3}.* (18 tensors))"),
    ("config with more layers than the weights", None, ["model.name=MODEL:more_layers"], "config.json says "
     "num_hidden_layers=6, the weights hold 4 layers; 18 tensor(s) the model needs are missing from the weights "
     "(model.layers.{4-5}.* (18 tensors))"),
    ("weights missing a tensor", None, ["model.name=MODEL:missing_tensor", "--restart"], "the weights do not fit "
     "config.json: 1 tensor(s) the model needs are missing from the weights (model.layers.1.mlp.up_proj.weight)"),
    ("config and weights of other shapes", None, ["model.name=MODEL:other_shapes"], "the weights do not fit "
     "config.json: 12 tensor(s) have other shapes than config.json gives them (model.layers.{0-3}.* (12 tensors)), "
     "e.g. model.layers.0.mlp.down_proj.weight: [128, 384] in the weights, [128, 256] from config.json"),
    ("a weight of another shape", None, ["model.name=MODEL:one_other_shape"], "1 tensor(s) have other shapes than "
     "config.json gives them (model.layers.0.mlp.up_proj.weight), e.g. model.layers.0.mlp.up_proj.weight: "
     "[100, 128] in the weights, [384, 128] from config.json"),
    ("unknown target module", None, ["model.name=MODEL:good", "lora.target_modules=[q_proj,qproj]", "--restart"],
     "lora.target_modules: 'qproj' matches no module"),
    ("non-linear target module", None, ["lora.target_modules=[layers]"], "'layers' names ModuleList modules"),
    # 10: a chat template that raises (it is code that came with the model): one line naming the row and the error
    ("template syntax error", None, ["model.name=MODEL:template_syntax"], "models/template_syntax: row 1 (prompt "
     "'Sort these digits: 2 3 2 2.'): the chat template raised TemplateSyntaxError (template line 1): unexpected "
     "'}'"),
    ("template TypeError", None, ["model.name=MODEL:template_type_error"], "the chat template raised TypeError: can "
     "only concatenate str (not \"int\") to str"),
    ("template recursion", None, ["model.name=MODEL:template_recursion"], "the chat template raised RecursionError"),
    ("template writes nothing", None, ["model.name=MODEL:template_empty"], "the chat template writes no tokens for "
     "a user turn"),
    # 10: a cache that cannot be written, when the run needs to write it (env:NAME=VALUE sets the variable)
    ("FRUGAL_SPIN_CACHE is a file", None, ["env:FRUGAL_SPIN_CACHE=FILE"], "model.name builtin:tiny-llama: "
     "FRUGAL_SPIN_CACHE=FILE cannot hold the cache: FILE is a file, not a directory; set FRUGAL_SPIN_CACHE to a "
     "writable directory (it holds built, converted and downloaded models), or unset it to use "
     "~/.cache/frugal_spin"),
    ("FRUGAL_SPIN_CACHE below a file", None, ["env:FRUGAL_SPIN_CACHE=FILE/cache"], "FRUGAL_SPIN_CACHE=FILE/cache "
     "cannot hold the cache: FILE is a file, not a directory"),
    ("FRUGAL_SPIN_CACHE a file, SmolLM2", None, ["env:FRUGAL_SPIN_CACHE=FILE",
                                                "model.name=builtin:smollm2-135m-instruct"],
     "model.name builtin:smollm2-135m-instruct: FRUGAL_SPIN_CACHE=FILE cannot hold the cache: FILE is a file"),
    # 12, 14: data
    ("built-in eval_size too large", None, ["data.eval_size=1000000"], "more than the built-in task"),
    ("fewer rows than eval_size", None, ["data.dataset=DIR/small.jsonl", "data.eval_size=200"],
     "the file has 50 rows and data.eval_size=200 would hold out all of them"),
    ("only unusable training rows", None, ["data.dataset=DIR/unusable.jsonl", "data.eval_size=2", "data.fraction=1"],
     "no usable training rows: all 8 rows drawn for training were skipped (skipped_no_answer: 8)"),
    ("dataset dir of .txt files", None, ["data.dataset=DIR/texts"], "holds no dataset files"),
    # 11: advice that can be followed
    ("one-row file", None, ["data.dataset=DIR/one.jsonl", "data.eval_size=1"], "the file has 1 row; a run needs at "
     "least 2 (data.eval_size of them held out for evaluation, the rest to train on): add rows to the file"),
    # 10: a row nested 100,000 deep in a .json list (one document: the whole file is unreadable; .jsonl skips it)
    ("deep row in a .json file", None, ["data.dataset=DIR/deep.json"], "deep.json: nested too deeply"),
    # 10: paths no filesystem can hold, from the recipe file and from overrides, before any file is looked at
    ("NUL in output_dir", 'output_dir: "DIR/ru\\0n"\n', [], "output_dir contains a NUL character, which no path "
     "can hold: 'DIR/ru\\x00n'"),
    ("NUL in model.name", 'output_dir: RUN\nmodel:\n  name: "DIR/m\\0"\n', [], "model.name contains a NUL character"),
    ("NUL in data.dataset", 'output_dir: RUN\ndata:\n  dataset: "d\\0.jsonl"\n', [],
     "data.dataset contains a NUL character"),
    ("over-long output_dir name", None, ["output_dir=DIR/" + "a" * 300], "output_dir: the name '" + "a" * 37 +
     "..." + "a" * 38 + "' is 300 bytes long; a file or directory name is at most 255 bytes"),
    ("over-long output_dir", None, ["output_dir=DIR/" + "b/" * 2100], "bytes long; a path is at most 4,096 bytes"),
    ("over-long model.name directory", None, ["model.name=DIR/" + "m" * 256], "model.name: the name 'mmm"),
    ("over-long model.name hub id", None, ["model.name=org/" + "m" * 200],
     "model.name: 'org/mmm"),
    ("over-long data.dataset", None, ["data.dataset=DIR/" + "d" * 300 + ".jsonl"], "data.dataset: the name 'ddd"),
    ("over-long gguf_file", None, ["model.name=DIR", "model.gguf_file=" + "g" * 300 + ".gguf"],
     "model.gguf_file: the name 'ggg"),
]


TEMPLATES = {"template_syntax": "{% for m in messages %}{{ m.content }",
             "template_type_error": "{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}",
             "template_recursion": "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
             "template_empty": "",
             # refuses only some rows: those are skipped and counted
             "template_picky": "{% for m in messages %}{% if 'boom' in m['content'] %}{{ 1 // 0 }}{% endif %}"
                               "{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
                               "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"}


def _break_model(source: Path, target: Path, kind: str) -> Path:
    shutil.copytree(source, target)
    weights = target / "model.safetensors"
    if kind == "config_only":
        for p in target.iterdir():
            if p.name != "config.json":
                p.unlink()
    elif kind == "no_tokenizer":
        for p in target.iterdir():
            if p.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                p.unlink()
    elif kind == "random_weights":
        weights.write_bytes(os.urandom(4096))
    elif kind == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "auto_map":
        config = json.loads((target / "tokenizer_config.json").read_text())
        config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
        (target / "tokenizer_config.json").write_text(json.dumps(config))
        (target / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    elif kind == "pickle_only":
        weights.unlink()
        torch.save({"w": torch.zeros(2)}, target / "pytorch_model.bin")
    elif kind == "no_template":
        (target / "chat_template.jinja").unlink(missing_ok=True)
        config = json.loads((target / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (target / "tokenizer_config.json").write_text(json.dumps(config))
    elif kind == "bad_config":
        (target / "config.json").write_text("{not json")
    elif kind in ("fewer_layers", "more_layers", "other_shapes"):
        config = json.loads((target / "config.json").read_text())
        config.update({"fewer_layers": {"num_hidden_layers": 2}, "more_layers": {"num_hidden_layers": 6},
                       "other_shapes": {"intermediate_size": 256}}[kind])
        (target / "config.json").write_text(json.dumps(config))
    elif kind in ("missing_tensor", "one_other_shape"):
        from safetensors.torch import load_file, save_file

        tensors = load_file(weights)
        if kind == "missing_tensor":
            del tensors["model.layers.1.mlp.up_proj.weight"]
        else:
            tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(100, 128)
        save_file(tensors, weights, metadata={"format": "pt"})
    elif kind.startswith("template_"):
        (target / "chat_template.jinja").write_text(TEMPLATES[kind])
    return target


@pytest.fixture
def world(tmp_path, monkeypatch, small_base_cache):
    """The test directory: an earlier run, a user's directories, home and cwd, data files; the small base."""
    monkeypatch.setenv("FRUGAL_SPIN_CACHE", str(small_base_cache))
    monkeypatch.setattr(tiny_base, "_resolve_spec", lambda seed, spec: SMALL_BASE)
    home, cwd = tmp_path / "home", tmp_path / "home" / "work" / "here"
    cwd.mkdir(parents=True)
    (home / "diary.txt").write_text("private")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    run = tmp_path / "run"
    (run / "stages").mkdir(parents=True)
    rundir.write_identity(run, ["recipe.yaml", "metrics.jsonl", "report.md", "sft", "stages"])  # what it wrote
    (run / "recipe.yaml").write_text("output_dir: earlier\n")
    (run / "stages" / "sft.json").write_text('{"stage": "sft"}\n')
    (run / "metrics.jsonl").write_text('{"stage": "sft"}\n')
    (run / "report.md").write_text("# the earlier run's report\n")
    user = tmp_path / "user"
    (user / "data").mkdir(parents=True)
    (user / "recipe.yaml").write_text("my own recipe\n")
    (user / "report.md").write_text("my report\n")
    (user / "metrics.jsonl").write_text("my metrics\n")
    (user / "data" / "precious.txt").write_text("years of work\n")
    (tmp_path / "FILE").write_text("I am a file\n")
    (tmp_path / "small.jsonl").write_text(_rows(50))
    (tmp_path / "unusable.jsonl").write_text(
        "".join(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n" for _ in range(10)))
    (tmp_path / "one.jsonl").write_text(_rows(1))
    (tmp_path / "deep.json").write_text("[" + json.dumps({"messages": CHAT}) + ", " + "[" * 100_000 + "]" * 100_000
                                        + "]")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("plain text\n")
    return tmp_path, small_base_cache


def _place(text: str, root: Path, base: Path) -> str:
    if "MODEL:" in text:
        kind = text.split("MODEL:")[1]
        target = root / "models" / kind
        if not target.exists():
            _break_model(base, target, kind)
        text = text.split("MODEL:")[0] + str(target)
    return (text.replace("RUN", str(root / "run")).replace("USER", str(root / "user"))
            .replace("HOME", str(root / "home")).replace("FILE", str(root / "FILE")).replace("DIR", str(root)))


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _run_main(argv, capsys):
    from frugal_spin.__main__ import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("name, text, args, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_exit_2_and_changes_nothing(world, capsys, monkeypatch, name, text, args, message):
    root, cache = world
    base = next(cache.glob("tiny-llama-*"))
    recipe = root / "r.yaml"
    if text is None:
        recipe.write_text(RECIPE.read_text())
    else:
        recipe.write_text(_place(text, root, base))
    for variable, value in (a[len("env:"):].split("=", 1) for a in args if a.startswith("env:")):
        monkeypatch.setenv(variable, _place(value, root, base))
    args = [_place(a, root, base) for a in args if not a.startswith("env:")]
    if not any(a.startswith("output_dir=") for a in args) and (text is None or "output_dir" not in text):
        args.append(f"output_dir={root / 'run'}")
    before = _tree(root)
    code, out, err = _run_main([str(recipe), *TINY, *args], capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert _place(message, root, base) in lines[0], lines[0]
    assert len(lines[0]) < 800  # bounded: no value of unbounded size is formatted into it
    assert out == ""
    assert _tree(root) == before  # the earlier run, the user's files, the model and the data: untouched


# What only loading finds (the tokenizer and what its chat template writes, the modules of the model built from its
# config, the data rows) and what only writing finds (a cache that cannot take what the run must put there): the dry
# run, which loads and writes nothing, passes these; it refuses every other case of the table as the run does.
LOADING_FINDS = {"no chat template", "unknown target module", "non-linear target module", "fewer rows than eval_size",
                 "only unusable training rows", "template syntax error", "template TypeError", "template recursion",
                 "template writes nothing", "one-row file", "deep row in a .json file", "FRUGAL_SPIN_CACHE is a file",
                 "FRUGAL_SPIN_CACHE below a file", "FRUGAL_SPIN_CACHE a file, SmolLM2"}


@pytest.mark.parametrize("name, text, args, message", CASES, ids=[c[0] for c in CASES])
def test_the_dry_run_refuses_what_the_run_refuses_before_loading(world, capsys, monkeypatch, name, text, args,
                                                                  message):
    """Item 11 of issue 20: `--dry-run` applied none of the output directory's checks (output_dir=/ and the home
    directory passed); it now applies every check the run makes before it loads anything."""
    root, cache = world
    base = next(cache.glob("tiny-llama-*"))
    recipe = root / "r.yaml"
    recipe.write_text(RECIPE.read_text() if text is None else _place(text, root, base))
    for variable, value in (a[len("env:"):].split("=", 1) for a in args if a.startswith("env:")):
        monkeypatch.setenv(variable, _place(value, root, base))
    args = [_place(a, root, base) for a in args if not a.startswith("env:")]
    if not any(a.startswith("output_dir=") for a in args) and (text is None or "output_dir" not in text):
        args.append(f"output_dir={root / 'run'}")
    before = _tree(root)
    code, out, err = _run_main([str(recipe), *TINY, *args, "--dry-run"], capsys)
    if name in LOADING_FINDS:
        assert code == 0 and "# stages: setup | sft | anchor | sft.eval | iter_0.generate" in out, err
    else:
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and _place(message, root, base) in lines[0], err
        assert out == ""
    assert _tree(root) == before


def test_an_absurd_epoch_count_is_one_line_not_a_hang(world, capsys):
    """Issue 20 item 11: sft.epochs=1e12 hung while planning the training in memory; now the stage counts its
    steps by arithmetic first and refuses, naming the key."""
    root, _ = world
    code, out, err = _run_main([str(RECIPE), *TINY, f"output_dir={root / 'new'}", "sft.epochs=1e12"], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1] == ("error: sft.epochs=1e+12 plans 3,000,000,000,000 optimizer steps over 40 "
                                            "training items, more than the 1,000,000 one stage may plan; lower "
                                            "sft.epochs")


def test_report_of_a_file_says_it_is_a_file(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    code, out, err = _run_main(["report", str(tmp_path / "notes.txt")], capsys)
    assert code == 2 and err.strip() == f"error: {tmp_path / 'notes.txt'} is a file, not a run directory " \
                                        "(give the recipe's output_dir)"


def test_plan_of_an_unknown_hub_id_offline_fails_at_once_in_one_line(tmp_path, capsys, monkeypatch):
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    started = time.perf_counter()
    code, out, err = _run_main(["plan", str(RECIPE), "model.name=nobody/no-such-model", "--gpu", "t4"], capsys)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == ["error: model.name: 'nobody/no-such-model' is not in the local hub cache "
                                        "and the hub is off (HF_HUB_OFFLINE); use a local model directory"]
    assert time.perf_counter() - started < 5


def test_plan_of_an_unreachable_hub_fails_in_one_line_without_retries(tmp_path, capsys, monkeypatch):
    """The hub's own answer is replaced by a connection error (no network is used): one line, one attempt."""
    import huggingface_hub

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []

    def unreachable(name, timeout=None):
        calls.append(name)
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    code, out, err = _run_main(["plan", str(RECIPE), "model.name=nobody/no-such-model", "--gpu", "t4"], capsys)
    assert code == 2 and calls == ["nobody/no-such-model"]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "the hub cannot be reached to fetch 'nobody/no-such-model'" in lines[0]


def test_plan_with_an_absolute_local_model_path_prints_it_as_text(tmp_path, capsys, small_base_cache):
    model = tmp_path / "[bold]models[/x]"
    shutil.copytree(next(small_base_cache.glob("tiny-llama-*")), model)
    code, out, err = _run_main(["plan", str(RECIPE), f"model.name={model}", "--gpu", "t4"], capsys)
    assert code == 0, err
    flat = "".join(out.split())  # rich wraps long lines
    assert f"model{model}:".replace(" ", "") in flat and f"[{model / 'config.json'}]" in flat


def test_rows_with_a_lone_surrogate_or_a_tool_turn_are_skipped_and_counted(world, capsys):
    """Item 11: not errors, so not in the table: the run's checks count them and go on."""
    from frugal_spin.config import load_recipe
    from frugal_spin.preflight import preflight

    root, _ = world
    good = _rows(30)
    surrogate = '{"messages": [{"role": "user", "content": "\\ud800 q"}, {"role": "assistant", "content": "a"}]}\n'
    tool = json.dumps({"messages": [{"role": "user", "content": "q0"}, {"role": "tool", "content": "{}"},
                                    {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n"
    (root / "odd.jsonl").write_text(good + surrogate * 3 + tool * 2)
    recipe = load_recipe(RECIPE, [f"data.dataset={root / 'odd.jsonl'}", "data.eval_size=5", "data.multi_turn=true",
                                  f"output_dir={root / 'new'}"])
    checked = preflight(recipe)
    assert checked.splits.counts["skipped_invalid_unicode"] == 3
    assert checked.splits.counts["skipped_template_error"] == 2
    assert len(checked.train) + len(checked.heldout) == 30
    assert not (root / "new").exists()  # checks write nothing


def test_a_row_nested_100000_deep_is_skipped_and_counted(world):
    """Item 10: a .jsonl line deeper than the JSON parser's recursion limit is one skipped row, not a RecursionError."""
    from frugal_spin.config import load_recipe
    from frugal_spin.preflight import preflight

    root, _ = world
    deep = '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}\n"
    (root / "deep.jsonl").write_text(_rows(20) + deep + _rows(10))
    recipe = load_recipe(RECIPE, [f"data.dataset={root / 'deep.jsonl'}", "data.eval_size=5",
                                  f"output_dir={root / 'new'}"])
    checked = preflight(recipe)
    assert checked.splits.counts["skipped_too_deep"] == 1
    assert len(checked.train) + len(checked.heldout) == 30


# ---------------------------------------------------------------- 10: `report` on records it cannot use

GOOD_RECORDS = [{"stage": "setup", "kind": "setup", "metrics": {"train_examples": 3}, "wall_time_s": 1.0},
                {"stage": "sft", "kind": "train", "metrics": {"train_loss": 1.0, "loss_curve": [1.0, 0.5]},
                 "wall_time_s": 2.0},
                {"stage": "sft.eval", "kind": "eval", "metrics": {"heldout_nll": 1.0}, "wall_time_s": 1.0}]


def _records_with(line3: bytes | None = None, **metrics) -> bytes:
    records = json.loads(json.dumps(GOOD_RECORDS))
    records[2]["metrics"].update(metrics)
    lines = [json.dumps(r).encode() for r in records]
    return b"\n".join(lines[:2] + [line3 if line3 is not None else lines[2]]) + b"\n"


# (name, metrics.jsonl bytes, the stderr line after "error: <run>/metrics.jsonl:")
REPORT_CASES = [
    ("latin-1 byte", _records_with(b'{"stage": "caf\xe9"}'), "3: not UTF-8 text (byte 0xe9 at column 15)"),
    ("nested 100,000 deep", _records_with(b"[" * 100_000 + b"]" * 100_000), "3: nested too deeply to be a stage record"),
    ("5,000-digit integer", _records_with(b'{"stage": ' + b"1" * 5000 + b"}"),
     "3: not a stage record (a number too long to read)"),
    ("infinite wall time", _records_with(json.dumps({**GOOD_RECORDS[2], "wall_time_s": 1e999}).encode()),
     "3: wall_time_s must be a finite number >= 0, got inf"),
    ("NaN memory peak", _records_with(peak_rss_gib=float("nan")), "3: metrics.peak_rss_gib must be a finite number, "
     "got nan (float)"),
    ("a list as memory peak", _records_with(peak_mem_gib=[1]), "3: metrics.peak_mem_gib must be a finite number, got "
     "[1] (list)"),
    ("a dict as NLL", _records_with(heldout_nll={"a": 1}), "3: metrics.heldout_nll must be a number, got {'a': 1} "
     "(dict)"),
    ("a 400-digit NLL", _records_with(heldout_nll=10 ** 400), "3: metrics.heldout_nll must be a number, got "
     + "1" + "0" * 39 + " (int)"),
    ("a string as a diagnostic", _records_with(identical_share="x"), "3: metrics.identical_share must be a number, "
     "got x (str)"),
    ("samples of numbers", _records_with(samples=[1, 2]), "3: metrics.samples must be a list of {prompt, real, greedy} "
     "objects"),
    ("a string as loss curve", _records_with(loss_curve="x"), "3: metrics.loss_curve must be a list, got str"),
]


@pytest.mark.parametrize("name, raw, message", REPORT_CASES, ids=[c[0] for c in REPORT_CASES])
def test_report_on_a_malformed_record_is_one_line_and_writes_nothing(tmp_path, capsys, name, raw, message):
    rundir.write_identity(tmp_path)
    (tmp_path / "metrics.jsonl").write_bytes(raw)
    before = _tree(tmp_path)
    code, out, err = _run_main(["report", str(tmp_path)], capsys)
    assert code == 2 and out == ""
    assert err == f"error: {tmp_path / 'metrics.jsonl'}:{message}\n"
    assert _tree(tmp_path) == before


def test_report_ignores_a_recipe_that_is_not_utf8(tmp_path, capsys):
    """recipe.yaml is read only to tell a finished run from a partial one: a broken one leaves that unknown."""
    rundir.write_identity(tmp_path)
    (tmp_path / "metrics.jsonl").write_bytes(_records_with())
    (tmp_path / "recipe.yaml").write_bytes(b"spin:\n  iterations: \xff\n")
    code, out, err = _run_main(["report", str(tmp_path)], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "report.json").read_text())["complete"] is None


def test_report_of_an_over_long_path_is_one_line(tmp_path, capsys):
    code, out, err = _run_main(["report", str(tmp_path / ("r" * 256))], capsys)
    assert code == 2 and err == ("error: run directory: the name '" + "r" * 37 + "..." + "r" * 38 + "' is 256 bytes "
                                 "long; a file or directory name is at most 255 bytes\n")


@pytest.mark.parametrize("raw", [b'{"stage": "sft", "fingerprint": "a\xff"}', b"[" * 100_000 + b"]" * 100_000,
                                 b'["sft"]', b'{"stage": "sft", "fingerprint": "a", "outputs": {"x": 1}}'],
                         ids=["not utf-8", "nested 100,000 deep", "a list", "outputs not records"])
def test_a_malformed_stage_marker_is_recomputed_with_a_warning(tmp_path, capsys, raw):
    from frugal_spin.stage_store import StageStore

    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "sft.json").write_bytes(raw)
    store = StageStore(tmp_path)
    assert store.completed("sft", "a") is None
    assert store.records() == []
    assert capsys.readouterr().err.startswith("warning: sft: stages/sft.json is not a stage marker this tool wrote")


# ---------------------------------------------------------------- 11: a hub dataset when the hub cannot be reached


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """Online mode, empty hub and datasets caches, and a network whose name lookups fail (as with no network at
    all): every library goes through its real code path down to the socket."""
    import socket

    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")
    lookups = []

    def unreachable(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unreachable)
    return lookups


def test_an_unreachable_hub_dataset_fails_at_once_in_one_line(world, capsys, no_hub):
    """Not 25 s of `datasets` retrying each file five times with backoff (11 log lines): one request, one line."""
    import time

    started = time.perf_counter()
    code, out, err = _run_main([str(RECIPE), *TINY, "data.dataset=nobody/chat", f"output_dir={world[0] / 'new'}"],
                               capsys)
    assert code == 2 and out == ""
    assert err == ("error: data.dataset: 'nobody/chat' is not in the local cache and the hub cannot be reached "
                   "([Errno -2] Name or service not known); load it once with the hub reachable, or use a local "
                   "file\n")
    assert time.perf_counter() - started < 5
    assert len(no_hub) <= 2  # the one repo_info request (and the offline load asks nothing)


@pytest.mark.parametrize("flag", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_a_hub_dataset_with_the_hub_off_is_one_line_without_asking_the_network(world, capsys, no_hub, monkeypatch,
                                                                            flag):
    import datasets
    from huggingface_hub import constants

    if flag == "HF_HUB_OFFLINE":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # what datasets reads from either variable
    code, out, err = _run_main([str(RECIPE), *TINY, "data.dataset=nobody/chat", f"output_dir={world[0] / 'new'}"],
                               capsys)
    assert code == 2 and no_hub == []
    assert err == ("error: data.dataset: 'nobody/chat' is not in the local cache and the hub is off (HF_HUB_OFFLINE "
                   "or HF_DATASETS_OFFLINE); load it once with the hub reachable, or use a local file\n")


def test_a_cached_hub_dataset_loads_in_offline_mode_when_the_hub_is_unreachable(no_hub, monkeypatch, tmp_path):
    """The dataset `datasets` cached on an earlier online run is read from its cache, in its offline mode (which
    asks nothing of the network), at the commit the hub cache recorded."""
    import datasets
    from huggingface_hub import constants

    from frugal_spin.config import DataConfig
    from frugal_spin.data import load_splits

    sha = "c" * 40
    refs = Path(constants.HF_HUB_CACHE) / "datasets--org--chat" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(sha)
    calls = []

    def load_dataset(name, split, **kwargs):
        calls.append((name, split, kwargs.get("revision"), constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE))
        return datasets.Dataset.from_list([{"messages": CHAT}] * 10)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    splits = load_splits(DataConfig(dataset="org/chat", eval_size=2), seed=0)
    assert splits.revision == sha and len(splits.train) == 10
    assert calls == [("org/chat", "train_sft", sha, True, True), ("org/chat", "test_sft", sha, True, True)]
    assert constants.HF_HUB_OFFLINE is False and datasets.config.HF_HUB_OFFLINE is False  # restored after


def test_rows_a_chat_template_refuses_are_skipped_counted_and_named_once(world, capsys):
    from frugal_spin.config import load_recipe
    from frugal_spin.preflight import preflight

    root, cache = world
    model = _break_model(next(cache.glob("tiny-llama-*")), root / "picky", "template_picky")
    boom = json.dumps({"messages": [{"role": "user", "content": "boom"}, {"role": "assistant", "content": "a"}]})
    (root / "boom.jsonl").write_text(boom + "\n" + _rows(30) + boom + "\n")
    recipe = load_recipe(RECIPE, [f"data.dataset={root / 'boom.jsonl'}", "data.eval_size=5", "data.fraction=1",
                                  f"model.name={model}", f"output_dir={root / 'new'}"])
    checked = preflight(recipe)
    assert checked.splits.counts["skipped_template_error"] == 2
    assert len(checked.train) + len(checked.heldout) == 30
    warnings = [line for line in capsys.readouterr().err.splitlines() if "chat template" in line]
    assert warnings and all(" rows skipped: the chat template cannot write them (first: row " in w and
                            "(prompt 'boom'): the chat template raised ZeroDivisionError: integer division or "
                            "modulo by zero)" in w for w in warnings)

def test_the_builtin_base_with_an_edited_config_is_refused_before_the_run(tmp_path, capsys, monkeypatch,
                                                                          small_base_cache):
    """The built-in base is a local model directory too (here: the cache's build the run would copy)."""
    cache = tmp_path / "cache"
    shutil.copytree(small_base_cache, cache, ignore=shutil.ignore_patterns("first_build"))
    base = next(cache.glob("tiny-llama-*"))
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    monkeypatch.setenv("FRUGAL_SPIN_CACHE", str(cache))
    monkeypatch.setattr(tiny_base, "_resolve_spec", lambda seed, spec: SMALL_BASE)
    code, out, err = _run_main([str(RECIPE), *TINY, f"output_dir={tmp_path / 'run'}"], capsys)
    assert code == 2 and not (tmp_path / "run").exists()
    assert err == (f"error: model.name: {base}: the weights do not fit config.json: config.json says "
                   f"num_hidden_layers=3, the weights hold 4 layers; 9 tensor(s) in the weights have no place in the "
                   f"model (model.layers.3.* (9 tensors))\n")


@pytest.mark.parametrize("load_in_4bit", [True, False], ids=["nf4", "fp32"])
@pytest.mark.parametrize("kind, message", [
    ("fewer_layers", "18 tensor(s) in the weights have no place in the model (model.layers.{2-3}.* (18 tensors))"),
    ("missing_tensor", "1 tensor(s) the model needs are missing from the weights (model.layers.1.mlp.up_proj.weight)"),
    ("other_shapes", "some tensors have other shapes than config.json gives them")])
def test_the_load_itself_refuses_weights_that_do_not_fit(tmp_path, small_base_cache, load_in_4bit, kind, message):
    """What preflight cannot see (a run's base/ changed after its checks) the load reports: transformers itself
    would warn and go on with random or dropped tensors. In 4-bit, other shapes load silently: only preflight's
    header check sees them."""
    from frugal_spin.config import ModelConfig
    from frugal_spin.errors import UserError
    from frugal_spin.model import load_base_model, resolve_runtime

    model_dir = _break_model(next(small_base_cache.glob("tiny-llama-*")), tmp_path / kind, kind)
    cfg = ModelConfig(name=str(model_dir), load_in_4bit=load_in_4bit, device="cpu")
    if kind == "other_shapes" and load_in_4bit:
        load_base_model(str(model_dir), cfg, resolve_runtime(cfg))  # bitsandbytes cannot tell: preflight must
        return
    with pytest.raises(UserError) as err:
        load_base_model(str(model_dir), cfg, resolve_runtime(cfg))
    assert str(err.value) == f"model.name: {model_dir}: the weights do not fit config.json: {message}"


ARCHITECTURES = {  # tiny configs of families whose checkpoints are laid out differently
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128),  # saved without "transformer." below
    "mixtral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=128, num_local_experts=2),  # experts fused on load
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=128),
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                word_embed_proj_dim=64),
}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_weights_that_fit_pass_and_a_shorter_config_is_caught_across_architectures(tmp_path, small_base_cache, arch):
    """No false alarm on a checkpoint saved by transformers (tied heads, names saved from the base model, old
    buffers), and the check still sees a config with a layer less."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from frugal_spin.errors import UserError
    from frugal_spin.preflight import check_model_dir

    model_dir = tmp_path / arch
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **ARCHITECTURES[arch])).save_pretrained(model_dir)
    for p in next(small_base_cache.glob("tiny-llama-*")).iterdir():
        if p.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(p, model_dir / p.name)
    if arch == "gpt2":  # as the hub's GPT-2 files are: base-model names, no head, an old attention buffer
        tensors = load_file(model_dir / "model.safetensors")
        tensors = {k.removeprefix("transformer."): v for k, v in tensors.items() if k != "lm_head.weight"}
        tensors["h.0.attn.masked_bias"] = torch.tensor(-1e4)
        save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    check_model_dir(model_dir, trust_remote_code=False)
    config = json.loads((model_dir / "config.json").read_text())
    layers_key = next(k for k in ("num_hidden_layers", "n_layer") if k in config)
    (model_dir / "config.json").write_text(json.dumps({**config, layers_key: 1}))
    with pytest.raises(UserError, match="do not fit config.json: .*(=1, the weights hold 2 layers|have no place)"):
        check_model_dir(model_dir, trust_remote_code=False)


# ---------------------------------------------------------------- 10, 11: GGUF files cut short, and killed conversions

GGUF_CUTS = [  # (bytes kept of the 80,832-byte tiny GGUF, the message after "error: model.name: <file> ")
    (3, "is not a GGUF file (it does not start with the bytes GGUF)"),
    (20, "is truncated: the file ends inside its header (needs 8 bytes at byte 16; the file has 20 bytes); download "
         "or copy it again"),
    (100, "is truncated: the file ends inside its metadata, key 2 of 11 (needs 4 bytes at byte 98; the file has 100 "
          "bytes); download or copy it again"),
    (4022, "is truncated: the file ends inside its tensor table, tensor 1 of 1 (needs 8 bytes at byte 4,018; the file "
           "has 4,022 bytes); download or copy it again"),
    (40416, "is truncated: its tensor data needs 80,832 bytes, the file has 40,416; download or copy it again"),
]


@pytest.mark.parametrize("kept, message", GGUF_CUTS, ids=[str(c[0]) for c in GGUF_CUTS])
@pytest.mark.parametrize("command", ["run", "plan"])
def test_a_gguf_file_cut_short_is_one_line_saying_where(tmp_path, capsys, monkeypatch, kept, message, command):
    from test_pypi_assets import _tiny_llama_gguf

    whole = _tiny_llama_gguf(tmp_path / "whole.gguf").read_bytes()
    assert len(whole) == 80_832
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:kept])
    monkeypatch.setenv("FRUGAL_SPIN_CACHE", str(tmp_path / "cache"))
    argv = ([str(RECIPE), *TINY, f"model.name={cut}", f"output_dir={tmp_path / 'run'}"] if command == "run" else
            ["plan", str(RECIPE), f"model.name={cut}", "--offline"])
    code, out, err = _run_main(argv, capsys)
    assert code == 2 and out == ""
    assert err == f"error: model.name: {cut} {message}\n"
    assert not (tmp_path / "run").exists() and not list((tmp_path / "cache").glob("gguf-*"))


_CONVERTING = """
import os, sys, time
from pathlib import Path
from frugal_spin import gguf_import

def slow_convert(gguf_path, out_dir, what):
    (Path(out_dir) / "model.safetensors").write_bytes(b"0" * 1_000_000)  # the 517 MB of a real conversion
    print("converting", flush=True)
    time.sleep(60)

gguf_import.convert = slow_convert
if sys.argv[2] == "kill":  # SIGKILL itself mid-way: nothing can clean up after that
    gguf_import.convert = lambda *a: (Path(a[1], "model.safetensors").write_bytes(b"0"), os.kill(os.getpid(), 9))
gguf_import.converted_dir(Path(sys.argv[1]), cache_root=Path(sys.argv[3]))
"""


def _converting(tmp_path, how):
    import subprocess
    import sys

    from test_pypi_assets import _tiny_llama_gguf

    gguf = _tiny_llama_gguf(tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", _CONVERTING, str(gguf), how, str(cache)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), gguf, cache


def test_sigterm_during_a_gguf_conversion_leaves_nothing_in_the_cache(tmp_path):
    import signal

    process, _, cache = _converting(tmp_path, "term")
    assert process.stdout.readline() == "converting\n"
    assert [p.name for p in cache.iterdir() if p.is_dir()][0].startswith(".gguf-")  # the partial directory is there
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert list(cache.iterdir()) == []


def test_the_next_conversion_removes_what_a_killed_one_left_and_nothing_else(tmp_path, monkeypatch):
    from frugal_spin import gguf_import
    from frugal_spin.partial_dirs import OWNER_SUFFIX, owner_record

    process, gguf, cache = _converting(tmp_path, "kill")
    assert process.wait(timeout=60) == -9
    left = sorted(p.name for p in cache.iterdir())
    assert len(left) == 2 and left[1] == left[0] + OWNER_SUFFIX  # the partial directory and its owner record
    foreign = cache / ".gguf-0123.partial-someone"  # no owner record: not provably ours
    foreign.mkdir()
    alive = cache / ".gguf-4567.partial-alive"  # a conversion running now, in this very process
    alive.mkdir()
    (cache / (alive.name + OWNER_SUFFIX)).write_text(json.dumps(owner_record()))

    def convert(gguf_path, out_dir, what):
        (out_dir / "config.json").write_text("{}")
        return {}

    monkeypatch.setattr(gguf_import, "convert", convert)
    target = gguf_import.converted_dir(gguf, cache_root=cache)
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [target.name, foreign.name, alive.name, alive.name + OWNER_SUFFIX])
    assert (target / gguf_import.INFO).is_file() and not list(target.glob("*" + OWNER_SUFFIX))



def test_a_read_only_cache_is_one_line_when_the_run_must_write_it(world, capsys, monkeypatch):
    """As root (CI containers) permissions do not stop a write: there, the directory is reported not writable as
    a read-only filesystem would report it (os.access)."""
    root, _ = world
    cache = root / "read_only_cache"
    cache.mkdir()
    monkeypatch.setenv("FRUGAL_SPIN_CACHE", str(cache))
    if os.geteuid() == 0:
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == cache else access(p, mode, **k))
    else:
        cache.chmod(0o555)
    try:
        code, out, err = _run_main([str(RECIPE), *TINY, f"output_dir={root / 'new'}"], capsys)
    finally:
        cache.chmod(0o755)
    assert code == 2 and out == "" and not (root / "new").exists()
    build = f"tiny-llama-{SMALL_BASE.fingerprint()}"
    assert err == (f"error: model.name builtin:tiny-llama: FRUGAL_SPIN_CACHE={cache} is not writable (no permission "
                   f"to write there) and does not hold {build} yet; set FRUGAL_SPIN_CACHE to a writable "
                   f"directory (it holds built, converted and downloaded models), or unset it to use "
                   f"~/.cache/frugal_spin\n")
    assert list(cache.iterdir()) == []


def test_a_read_only_cache_that_holds_the_base_is_used(world, capsys, monkeypatch):
    """Written only when something is missing: a shared read-only cache with the base built works."""
    from frugal_spin.config import load_recipe
    from frugal_spin.preflight import preflight

    root, cache = world
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == cache else access(p, mode, **k))
    recipe = load_recipe(RECIPE, [*TINY, f"output_dir={root / 'new'}"])
    assert preflight(recipe).base_source.startswith(str(cache))

@pytest.mark.parametrize("argv", [["export", "LONG", "DIR/out"], ["sample", "LONG", "--prompt", "hi"],
                                  ["build-base", "--out", "LONG"]], ids=["export", "sample", "build-base"])
def test_an_over_long_path_on_any_command_line_is_one_line(tmp_path, capsys, argv):
    """The commands whose paths no recipe check sees: the filesystem's ENAMETOOLONG becomes one line."""
    from frugal_spin.config import short

    long = str(tmp_path / ("p" * 300))
    argv = [a.replace("LONG", long).replace("DIR", str(tmp_path)) for a in argv]
    code, out, err = _run_main(argv, capsys)
    assert code == 2 and out == ""
    assert err == f"error: a path is too long for the filesystem: {short(long)}\n"


def test_a_cached_hub_model_is_read_from_the_cache_without_retries_when_the_hub_is_unreachable(world, capsys,
                                                                                             no_hub):
    """transformers asks the hub about every file even when the cache has the model, retrying each five times
    with backoff (120 s for a tiny model's tokenizer): the first unanswered request switches to the cache."""
    from huggingface_hub import constants

    from frugal_spin.config import load_recipe
    from frugal_spin.preflight import preflight

    root, cache = world
    sha = "b" * 40
    repo = Path(constants.HF_HUB_CACHE) / "models--org--tiny"
    shutil.copytree(next(cache.glob("tiny-llama-*")), repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    recipe = load_recipe(RECIPE, [*TINY, "model.name=org/tiny", f"output_dir={root / 'new'}"])
    checked = preflight(recipe)
    assert checked.model_revision == sha and checked.tokenizer.chat_template
    assert len(no_hub) <= 2  # the one request that found the hub unreachable (its client may look up twice)
    assert capsys.readouterr().err == ("warning: the hub cannot be reached ([Errno -2] Name or service not known): "
                                       "reading the local hub cache only for the rest of this run (as with "
                                       "HF_HUB_OFFLINE=1)\n")
