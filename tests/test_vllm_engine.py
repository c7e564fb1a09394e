"""generation.engine: vllm, on the CPU against a recording stand-in of vLLM's API (`vllm.LLM`, `SamplingParams`,
`vllm.lora.request.LoRARequest`): no vLLM is installed here and it needs CUDA. The stand-in records what the engine
receives (the prompt ids, the adapter, the sampling settings and seeds) and answers with ids derived from them; the
pipeline test runs the whole method with it (the CUDA check mocked) and checks that pairs.jsonl holds exactly its
answers to exactly our prompt ids, from the opponent's adapter, and that scoring stays ours."""

import subprocess
import sys
import types
from pathlib import Path

import pytest

from frugal_spin import tiny_base
from frugal_spin.io import read_jsonl, read_safetensors

REPO = Path(__file__).resolve().parents[1]
EOS = 2


class Recorder:
    def __init__(self):
        self.engines, self.calls, self.closed = [], [], 0


def _stand_in(recorder: Recorder, eos_id: int, vocab: int = 40):
    """A fake `vllm` package: LLM(...) records its kwargs, generate(...) its prompts/params/adapter."""
    vllm = types.ModuleType("vllm")
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class LoRARequest:
        def __init__(self, name, int_id, path):
            self.name, self.int_id, self.path = name, int_id, path

    class LLM:
        def __init__(self, **kwargs):
            recorder.engines.append(kwargs)

        def generate(self, prompts, params, lora_request=None, use_tqdm=True):
            recorder.calls.append({"prompts": [p["prompt_token_ids"] for p in prompts],
                                   "params": [p.kwargs for p in params], "adapter": lora_request.path,
                                   "lora_name": lora_request.name})
            outputs = []
            for p, sp in zip(prompts, params):
                seed = sp.kwargs["seed"]
                ids = [3 + (seed + 7 * j + len(p["prompt_token_ids"])) % (vocab - 3) for j in range(3)]
                finish = "length"
                if seed % 2:  # half stop at eos, without returning it: the engine must add it back
                    finish = "stop"
                sample = types.SimpleNamespace(token_ids=tuple(ids), finish_reason=finish)
                outputs.append(types.SimpleNamespace(outputs=[sample]))
            return outputs

    def __del__(self):  # noqa: E306
        recorder.closed += 1

    LLM.__del__ = __del__
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    request.LoRARequest = LoRARequest
    vllm.lora, lora.request = lora, request
    return {"vllm": vllm, "vllm.lora": lora, "vllm.lora.request": request}


def test_the_engine_gets_our_prompt_ids_adapter_sampling_settings_and_a_seed_per_prompt(monkeypatch):
    from frugal_spin import vllm_engine

    recorder = Recorder()
    for name, module in _stand_in(recorder, EOS).items():
        monkeypatch.setitem(sys.modules, name, module)
    import torch

    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    make = lambda: vllm_engine.VllmOpponent("/base", lora_rank=12, load_in_4bit=True, dtype=torch.float16,  # noqa
                                            max_model_len=96, gpu_memory_utilization=0.3, seed=5)
    saved = []
    answers = vllm_engine.generate_with_vllm(make, prompts, "/run/sft/adapter", max_new_tokens=9, temperature=0.7,
                                             top_p=0.9, top_k=0, seed=11, eos_id=EOS, answered={1: [4, EOS]},
                                             on_answers=lambda i, a: saved.append((i, a)))
    (engine,) = recorder.engines
    assert engine["enable_lora"] and engine["max_lora_rank"] == 16 and engine["max_loras"] == 1
    assert engine["gpu_memory_utilization"] == 0.3 and engine["quantization"] == "bitsandbytes"
    assert engine["seed"] == 5 and engine["dtype"] == "float16" and engine["model"] == "/base"
    assert "distributed_executor_backend" not in engine  # one process: a plain engine
    (call,) = recorder.calls
    assert call["prompts"] == [prompts[0], prompts[2], prompts[3]]  # prompt 1 was answered before a crash
    assert call["adapter"] == "/run/sft/adapter"
    seeds = [vllm_engine.prompt_seed(11, i) for i in (0, 2, 3)]
    assert [p["seed"] for p in call["params"]] == seeds
    for p in call["params"]:
        assert (p["temperature"], p["top_p"], p["top_k"], p["max_tokens"]) == (0.7, 0.9, -1, 9)
        assert p["stop_token_ids"] == [EOS] and p["n"] == 1
    assert answers[1] == [4, EOS] and len(answers) == 4
    for i, seed in zip((0, 2, 3), seeds):
        assert answers[i][-1:] == ([EOS] if seed % 2 else answers[i][-1:]) and len(answers[i]) == 3 + seed % 2
    assert saved == [([0, 2, 3], [answers[0], answers[2], answers[3]])]
    assert recorder.closed == 1  # freed before scoring and training


def test_nothing_to_generate_builds_no_engine():
    from frugal_spin import vllm_engine

    def make():
        raise AssertionError("no engine should be built")

    assert vllm_engine.generate_with_vllm(make, [[1]], "/a", max_new_tokens=4, temperature=1.0, top_p=1.0,
                                          top_k=0, seed=0, eos_id=EOS, answered={0: [EOS]}) == [[EOS]]


def test_vllm_on_the_cpu_is_one_clear_error(tmp_path, capsys):
    from frugal_spin.__main__ import main

    assert main([str(REPO / "recipes" / "cpu_tiny.yaml"), f"output_dir={tmp_path / 'r'}",
                 "generation.engine=vllm"]) == 2
    assert capsys.readouterr().err.strip() == ("error: generation.engine: vllm needs a CUDA GPU (this run is on the "
                                               "CPU); use generation.engine=hf")
    assert not (tmp_path / "r").exists()  # refused before the run directory is touched


def test_the_cpu_path_never_imports_vllm():
    code = ("import sys, frugal_spin.__main__, frugal_spin.pipeline, frugal_spin.generate, frugal_spin.distributed; "
            "assert 'vllm' not in sys.modules and 'frugal_spin.vllm_engine' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={"PYTHONPATH": str(REPO),
                                                                            "PATH": "/usr/bin:/bin"})


def test_the_pipeline_takes_the_opponents_answers_from_vllm_and_scores_them_itself(tmp_path, monkeypatch,
                                                                                    small_base_cache):
    from conftest import SMALL_BASE
    from frugal_spin import vllm_engine
    from frugal_spin.__main__ import main

    recorder = Recorder()
    for name, module in _stand_in(recorder, EOS).items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(vllm_engine, "check_vllm", lambda device: None)  # the stand-in runs on the CPU
    monkeypatch.setenv("FRUGAL_SPIN_CACHE", str(small_base_cache))
    monkeypatch.setattr(tiny_base, "_resolve_spec", lambda seed, spec: SMALL_BASE)
    run = tmp_path / "run"
    assert main([str(REPO / "recipes" / "cpu_tiny.yaml"), f"output_dir={run}", "generation.engine=vllm",
                 "data.fraction=0.01", "data.eval_size=8", "spin.iterations=1", "sft.epochs=1",
                 "generation.max_new_tokens=8", "generation.temperature=0.5", "generation.top_k=5",
                 "eval.max_new_tokens=4"]) == 0
    assert [c["adapter"] for c in recorder.calls] == [str(run / "sft" / "adapter")] * 2  # anchor, iteration 0
    assert recorder.closed == 2
    pairs = read_jsonl(run / "iter_0" / "pairs.jsonl")
    call = recorder.calls[1]
    assert call["prompts"] == [p["prompt_ids"] for p in pairs]  # our prompt ids, in order
    assert all(p["temperature"] == 0.5 and p["top_k"] == 5 and p["max_tokens"] == 8 for p in call["params"])
    seed = 0 + 1000 * (0 + 1)  # the recipe's seed for iteration 0
    assert [p["seed"] for p in call["params"]] == [vllm_engine.prompt_seed(seed, i) for i in range(len(pairs))]
    logps = read_safetensors(run / "iter_0" / "opponent_logps.safetensors")
    assert logps["generated"].shape == (len(pairs),) and logps["generated"].isfinite().all()
    assert (logps["generated"] < 0).all()  # our scoring of the stand-in's ids, not anything vLLM returned


def test_the_engine_ignores_the_models_generation_config_and_stops_at_every_stop_id(monkeypatch):
    """Issue #11, defects 5 and 6 on the vLLM path: LLM(generation_config="vllm") keeps the model's
    generation_config.json out of the sampling defaults, and every stop id (the end-of-turn token first) ends an
    answer; a stop the engine does not return is added back as the token vLLM names, else the end-of-turn token."""
    import torch

    from frugal_spin import vllm_engine

    recorder = Recorder()
    for name, module in _stand_in(recorder, EOS).items():
        monkeypatch.setitem(sys.modules, name, module)
    end = EOS + 1
    make = lambda: vllm_engine.VllmOpponent("/base", lora_rank=8, load_in_4bit=False, dtype=torch.float16,  # noqa
                                            max_model_len=64, gpu_memory_utilization=0.3, seed=0)
    answers = vllm_engine.generate_with_vllm(make, [[5, 6], [7], [8, 9, 10]], "/a", max_new_tokens=3,
                                             temperature=1.0, top_p=1.0, top_k=0, seed=3, eos_id=[end, EOS])
    (engine,) = recorder.engines
    assert engine["generation_config"] == "vllm"
    (call,) = recorder.calls
    assert all(p["stop_token_ids"] == [end, EOS] for p in call["params"])
    for i, p in enumerate(call["params"]):
        stopped = p["seed"] % 2  # the stand-in stops these without returning the stop token
        assert (answers[i][-1] == end) if stopped else len(answers[i]) == 3


def _with_engine_args(monkeypatch, *, selects_backend: bool, version: str = "0.9.2"):
    """The stand-in plus `vllm.engine.arg_utils.EngineArgs`, with or without the `attention_backend` field."""
    import dataclasses

    recorder = Recorder()
    modules = _stand_in(recorder, EOS)
    engine, arg_utils = types.ModuleType("vllm.engine"), types.ModuleType("vllm.engine.arg_utils")
    fields = [("model", str, dataclasses.field(default=""))]
    if selects_backend:
        fields.append(("attention_backend", object, dataclasses.field(default=None)))
    arg_utils.EngineArgs = dataclasses.make_dataclass("EngineArgs", fields)
    modules["vllm"].engine, engine.arg_utils, modules["vllm"].__version__ = engine, arg_utils, version
    modules.update({"vllm.engine": engine, "vllm.engine.arg_utils": arg_utils})
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return recorder


# (compute capability, vLLM takes attention_backend=, the backend the engine is built with, the one-line error)
T4_CASES = [
    ((7, 5), True, "TRITON_ATTN", None),
    ((7, 0), True, "TRITON_ATTN", None),
    ((8, 0), True, None, None),
    ((9, 0), False, None, None),  # an older vLLM is fine where its default backends run
    ((7, 5), False, None, "generation.engine: vllm on this GPU (compute capability 7.5, below 8.0) needs vLLM's "
                          "Triton attention backend, which vllm 0.9.2 cannot select; upgrade vllm (pip install -U "
                          "'frugal_spin[vllm]') or use generation.engine=hf"),
]


@pytest.mark.parametrize("capability,selects,backend,error", T4_CASES)
def test_below_compute_capability_8_vllm_uses_its_triton_attention_or_refuses(monkeypatch, capability, selects,
                                                                              backend, error):
    """vLLM's V1 engine runs on a T4 (7.5) only through its Triton attention backend (simulated GPU)."""
    import torch

    from frugal_spin import vllm_engine
    from frugal_spin.errors import UserError

    recorder = _with_engine_args(monkeypatch, selects_backend=selects)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    gpu = torch.device("cuda")
    if error:
        with pytest.raises(UserError) as refused:
            vllm_engine.check_vllm(gpu)
        assert str(refused.value) == error
        return
    vllm_engine.check_vllm(gpu)
    recipe = types.SimpleNamespace(lora=types.SimpleNamespace(r=8), model=types.SimpleNamespace(load_in_4bit=True),
                                   generation=types.SimpleNamespace(vllm_gpu_memory_utilization=0.3))
    runtime = types.SimpleNamespace(device=gpu, compute_dtype=torch.float16)
    vllm_engine.engine_factory("/base", recipe, runtime, max_model_len=64, seed=0)()
    (engine,) = recorder.engines
    assert engine.get("attention_backend") == backend
    assert ("attention_backend" in engine) == (backend is not None)  # else vLLM picks its own


def test_vllm_refused_on_a_t4_before_the_run_starts(tmp_path, monkeypatch, capsys):
    """The same refusal through the command line, on a simulated T4 with a vLLM that cannot select the backend:
    one line, exit 2, no run directory."""
    import torch

    from frugal_spin import model as model_mod
    from frugal_spin.__main__ import main

    _with_engine_args(monkeypatch, selects_backend=False, version="0.10.1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 5))
    monkeypatch.setattr(model_mod, "unsloth_installed", lambda: False)
    assert main([str(REPO / "recipes" / "cpu_tiny.yaml"), f"output_dir={tmp_path / 'r'}", "model.device=cuda",
                 "generation.engine=vllm"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: generation.engine: vllm on this GPU (compute capability 7.5, below 8.0)"), err
    assert "vllm 0.10.1 cannot select" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()
