"""Backend and dtype selection on simulated GPUs, the unsloth glue against a recording stand-in of its API, and the
guarantee that the CPU path never imports unsloth. (The real unsloth needs a CUDA GPU; see profiling/ for GPU runs.)"""

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from frugal_spin import model as model_mod
from frugal_spin.config import LoraSection, ModelConfig
from frugal_spin.errors import UserError
from frugal_spin.model import Runtime, attach_lora, inference_mode, load_model, resolve_runtime

REPO = Path(__file__).resolve().parents[1]


def _simulate_gpu(monkeypatch, *, bf16: bool, unsloth: bool, capability: tuple[int, int] | None = None):
    """A visible CUDA GPU of `capability` (default: 8.0 with bf16, 7.5 without). `is_bf16_supported` says True
    either way, as torch's does on a T4 through emulation: the dtype must not be decided by it."""
    capability = capability or ((8, 0) if bf16 else (7, 5))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    monkeypatch.setattr(model_mod, "unsloth_installed", lambda: unsloth)


@pytest.mark.parametrize("capability,dtype", [((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                              ((8, 9), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_dtype_follows_compute_capability_and_scaler_and_backend_agree(monkeypatch, fake_unsloth, capability, dtype):
    """Regression: `torch.cuda.is_bf16_supported()` is True on a T4 (sm_75, emulated bf16), which made a T4 run
    bf16 without a GradScaler while unsloth loaded it in fp16. The dtype now follows the compute capability, and
    the autocast dtype, the GradScaler and both backends' load dtype are that one dtype. (Simulated GPU.)"""
    _simulate_gpu(monkeypatch, bf16=True, unsloth=True, capability=capability)
    runtime = resolve_runtime(ModelConfig())
    assert runtime.compute_dtype == dtype and runtime.autocast_dtype == dtype
    assert runtime.needs_grad_scaler == (dtype == torch.float16)
    assert runtime.backend == "unsloth"
    transformers_runtime = resolve_runtime(ModelConfig(backend="transformers"))
    assert transformers_runtime.compute_dtype == dtype  # load_base_model's dtype and bnb compute dtype
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the loading itself runs on the CPU here
    load_model("some/model", ModelConfig(name="some/model"), LoraSection(r=4, alpha=8), runtime,
               max_seq_length=32, seed=0)
    assert fake_unsloth[0][1]["dtype"] == dtype  # unsloth loads in the dtype the loop trains in


def test_bf16_on_a_gpu_without_it_is_a_clear_error(monkeypatch):
    _simulate_gpu(monkeypatch, bf16=False, unsloth=False)
    with pytest.raises(UserError, match="model.dtype bfloat16 needs a GPU of compute capability 8.0 or newer; "
                                        "this one is 7.5"):
        resolve_runtime(ModelConfig(dtype="bfloat16"))
    assert resolve_runtime(ModelConfig(dtype="float16")).needs_grad_scaler


def test_t4_like_gpu_gets_fp16_checkpointing_and_transformers_without_unsloth(monkeypatch):
    _simulate_gpu(monkeypatch, bf16=False, unsloth=False)
    runtime = resolve_runtime(ModelConfig())
    assert runtime.device.type == "cuda" and runtime.compute_dtype == torch.float16
    assert runtime.gradient_checkpointing and runtime.backend == "transformers"
    assert runtime.autocast_dtype == torch.float16


def test_auto_picks_unsloth_on_a_gpu_where_it_is_installed_and_bf16_where_supported(monkeypatch):
    _simulate_gpu(monkeypatch, bf16=True, unsloth=True)
    runtime = resolve_runtime(ModelConfig())
    assert (runtime.backend, runtime.compute_dtype) == ("unsloth", torch.bfloat16)
    assert resolve_runtime(ModelConfig(backend="transformers")).backend == "transformers"
    assert not resolve_runtime(ModelConfig(gradient_checkpointing="off")).gradient_checkpointing


def test_cpu_never_selects_unsloth_even_when_installed(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(model_mod, "unsloth_installed", lambda: True)
    runtime = resolve_runtime(ModelConfig())
    assert (runtime.device.type, runtime.backend, runtime.compute_dtype) == ("cpu", "transformers", torch.float32)
    assert not runtime.gradient_checkpointing
    with pytest.raises(UserError, match="unsloth, which needs a CUDA GPU"):
        resolve_runtime(ModelConfig(backend="unsloth"))


def test_unsloth_requested_but_missing_says_how_to_install(monkeypatch):
    _simulate_gpu(monkeypatch, bf16=False, unsloth=False)
    with pytest.raises(UserError, match=r'pip install "frugal_spin\[unsloth\]"'):
        resolve_runtime(ModelConfig(backend="unsloth"))


def _tiny_llama(dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).to(dtype)


def test_lora_weights_stay_fp32_on_a_half_precision_base():
    """fp16 training (T4) unscales gradients into fp32 master weights: the adapter must be fp32."""
    model = attach_lora(_tiny_llama(torch.float16), LoraSection(r=4, alpha=8))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.float16 for p in model.parameters() if not p.requires_grad)


class _RecordingFastLanguageModel:
    """The slice of unsloth's FastLanguageModel API the backend uses; records every call."""

    calls: list = []

    @classmethod
    def from_pretrained(cls, **kwargs):
        cls.calls.append(("from_pretrained", kwargs))
        return _tiny_llama(kwargs["dtype"]), None

    @classmethod
    def get_peft_model(cls, model, **kwargs):
        from peft import LoraConfig, get_peft_model

        cls.calls.append(("get_peft_model", kwargs))
        config = LoraConfig(r=kwargs["r"], lora_alpha=kwargs["lora_alpha"], lora_dropout=kwargs["lora_dropout"],
                            target_modules=kwargs["target_modules"], bias=kwargs["bias"], task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)  # like unsloth: compute dtype
        return peft_model

    @classmethod
    def for_inference(cls, model):
        cls.calls.append(("for_inference", model))

    @classmethod
    def for_training(cls, model, use_gradient_checkpointing=True):
        cls.calls.append(("for_training", use_gradient_checkpointing))


@pytest.fixture
def fake_unsloth(monkeypatch):
    module = types.ModuleType("unsloth")
    module.FastLanguageModel = _RecordingFastLanguageModel
    _RecordingFastLanguageModel.calls = []
    monkeypatch.setitem(sys.modules, "unsloth", module)
    return _RecordingFastLanguageModel.calls


def test_unsloth_backend_loads_through_fast_language_model(fake_unsloth):
    runtime = Runtime(torch.device("cpu"), torch.float16, gradient_checkpointing=True, backend="unsloth")
    model = load_model("some/model", ModelConfig(name="some/model"), LoraSection(r=8, alpha=16), runtime,
                       max_seq_length=96, seed=5)
    (name, loaded), (name2, peft_args) = fake_unsloth
    assert name == "from_pretrained" and name2 == "get_peft_model"
    assert loaded["model_name"] == "some/model" and loaded["max_seq_length"] == 96
    assert loaded["dtype"] == torch.float16 and loaded["load_in_4bit"] is True
    assert loaded["trust_remote_code"] is False
    # all-linear becomes unsloth's explicit list of the decoder's linear layers, without the head
    assert peft_args["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                           "v_proj"]
    assert (peft_args["r"], peft_args["lora_alpha"], peft_args["random_state"]) == (8, 16, 5)
    assert peft_args["use_gradient_checkpointing"] == "unsloth"
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # cast from the fake's fp16


def test_generation_uses_unsloth_inference_mode_and_returns_to_training(fake_unsloth):
    runtime = Runtime(torch.device("cpu"), torch.float16, gradient_checkpointing=False, backend="unsloth")
    marker = object()
    with pytest.raises(RuntimeError):
        with inference_mode(marker, runtime):
            assert fake_unsloth == [("for_inference", marker)]
            raise RuntimeError("generation failed")
    assert fake_unsloth[-1] == ("for_training", False)  # even when generation raised


def test_transformers_backend_inference_mode_touches_nothing(fake_unsloth):
    with inference_mode(object(), Runtime(torch.device("cpu"), torch.float32, False)):
        pass
    assert fake_unsloth == []


def test_cpu_run_never_imports_unsloth(tmp_path):
    """An installed unsloth that cannot import on this machine (its real behaviour without a GPU) must not matter."""
    fake = tmp_path / "site" / "unsloth"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('unsloth: no GPU found')\n")
    code = ("import sys, torch; from frugal_spin.config import ModelConfig; from frugal_spin.model import "
            "resolve_runtime, unsloth_installed; from frugal_spin.__main__ import main; "
            "assert unsloth_installed(); assert resolve_runtime(ModelConfig()).backend == 'transformers'; "
            f"assert main([{str(REPO / 'recipes' / 'colab_t4.yaml')!r}, '--dry-run']) == 0; "
            "assert 'unsloth' not in sys.modules; print('ok')")
    env = {"PYTHONPATH": f"{tmp_path / 'site'}:{REPO}", "CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


UNSLOTH_API_CHECK = r'''
import inspect, json, os, types
os.environ["UNSLOTH_ALLOW_CPU"] = "1"  # unsloth >= 2026.8 imports on a CPU-only torch with this (it loads no model)
import torch
from frugal_spin import unsloth_backend
from frugal_spin.config import LoraSection, ModelConfig

real = unsloth_backend.import_unsloth()
calls = []


class Recording:
    """Stands in for FastLanguageModel while the backend runs, recording the keywords of every call."""

    @staticmethod
    def from_pretrained(**kwargs):
        calls.append(("from_pretrained", kwargs))
        model = torch.nn.Sequential()
        model.add_module("q_proj", torch.nn.Linear(4, 4))
        model.config = types.SimpleNamespace()
        return model, None

    @staticmethod
    def get_peft_model(model, **kwargs):
        calls.append(("get_peft_model", kwargs))
        return model

    @staticmethod
    def for_inference(model):
        calls.append(("for_inference", {}))

    @staticmethod
    def for_training(model, **kwargs):
        calls.append(("for_training", kwargs))


unsloth_backend.import_unsloth = lambda: Recording
runtime = types.SimpleNamespace(compute_dtype=torch.float16, gradient_checkpointing=True)
model = unsloth_backend.load_unsloth_model("some/model", ModelConfig(name="some/model"), LoraSection(r=4, alpha=8),
                                           runtime, max_seq_length=32, seed=0, revision="main")
unsloth_backend.for_inference(model)
unsloth_backend.for_training(model, runtime)
problems = []
for name, kwargs in calls:
    params = inspect.signature(getattr(real, name)).parameters
    for key in kwargs:  # a keyword that only **kwargs would swallow is one unsloth does not know
        if key not in params or params[key].kind is inspect.Parameter.VAR_KEYWORD:
            problems.append(f"FastLanguageModel.{name} has no parameter {key!r}")
import unsloth
print("RESULT " + json.dumps({"version": unsloth.__version__, "calls": [c[0] for c in calls], "problems": problems}))
'''


def test_unsloth_backend_calls_match_the_real_unsloth_api(tmp_path):
    """The stand-in above checks what the backend asks for; this checks that the real unsloth takes it: every keyword
    the backend passes to FastLanguageModel's four methods is a named parameter of the installed release. unsloth
    imports on the CPU with UNSLOTH_ALLOW_CPU=1 but loads models only on a GPU, so the calls themselves are recorded.
    Runs where unsloth is installed: .ci/oldest installs `.[unsloth]` (unsloth 2026.10.9, constraints-oldest.txt)
    and sets FRUGAL_SPIN_REQUIRE_UNSLOTH=1, which turns the skip below into a failure; the main environment has no
    unsloth (its caps, transformers<=5.17, contradict constraints.txt). A subprocess: importing unsloth patches
    transformers for the whole process."""
    import importlib.util
    import json
    import os

    if importlib.util.find_spec("unsloth") is None:
        if os.environ.get("FRUGAL_SPIN_REQUIRE_UNSLOTH") == "1":
            pytest.fail("FRUGAL_SPIN_REQUIRE_UNSLOTH=1 but unsloth is not installed")
        pytest.skip("unsloth is not installed here; .ci/oldest runs this check against unsloth 2026.10.9")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # cwd: unsloth writes an unsloth_compiled_cache/ folder into the working directory on import
    done = subprocess.run([sys.executable, "-c", UNSLOTH_API_CHECK], capture_output=True, text=True, env=env,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["calls"] == ["from_pretrained", "get_peft_model", "for_inference", "for_training"]
    assert result["problems"] == [], (result["version"], result["problems"])
