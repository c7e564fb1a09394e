"""The opponent's answers from vLLM (`generation.engine: vllm`; CUDA only, optional extra `frugal_spin[vllm]`).

vLLM samples; everything else stays ours. It loads the same base (`quantization="bitsandbytes"` when the recipe's
base is 4-bit), serves the opponent's saved LoRA adapter (`enable_lora` + a `LoRARequest` naming the adapter
directory the pipeline just loaded into the training model), starts from exactly our prompt token ids and returns
token ids, which go into pairs.jsonl as the HF engine's would; the opponent's log-probs are then computed by
`scoring.py` on the training model, so the cache is still the opponent's log-probs of what it sampled.

Sampling: the recipe's temperature (0 = greedy), top_p, top_k (0 = off, vLLM's -1) and max_new_tokens; every prompt
gets its own seed, `seed * 1_000_003 + prompt index`, so its answer depends neither on how vLLM batches it nor on
how many ranks share the prompts (rank r takes prompts i % N == r). The HF engine seeds per batch instead, so the
two engines give different (equally distributed) samples.

Memory: vLLM lives in the training process, taking `generation.vllm_gpu_memory_utilization` of the GPU for its
weights and KV cache next to the 4-bit training model, for one generation stage only: `close()` frees it before
scoring and training. vLLM is imported only here, and this module only when the recipe asks for it on a GPU.

GPUs below compute capability 8.0 (a T4 is 7.5): vLLM's V1 engine runs there only through its Triton attention
backend (its FlashAttention and FlashInfer backends need 8.0), so the engine is built with
`attention_backend="TRITON_ATTN"` on such a GPU, and a vLLM too old to take that argument (its `EngineArgs` has no
`attention_backend` field) is refused before any work with one line naming the GPU and the fix.
"""

from __future__ import annotations

import dataclasses
import gc
from typing import Any, Callable, Sequence

import torch

from frugal_spin.turns import cut_after_first
from frugal_spin.distributed import current as current_world
from frugal_spin.errors import UserError

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
# vLLM's only attention backend for NVIDIA GPUs below compute capability 8.0.
PRE_AMPERE_ATTENTION_BACKEND = "TRITON_ATTN"


def attention_backend_for(device: torch.device) -> str | None:
    """The attention backend to ask vLLM for on `device`: Triton's below compute capability 8.0, else vLLM's own
    choice (None)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return PRE_AMPERE_ATTENTION_BACKEND
    return None


def vllm_selects_attention_backend() -> bool:
    """Whether this vLLM takes `attention_backend=` (an `EngineArgs` field since the V1 engine's AttentionConfig;
    the older environment variable is ignored by current releases)."""
    from vllm.engine.arg_utils import EngineArgs

    return "attention_backend" in {f.name for f in dataclasses.fields(EngineArgs)}


def check_vllm(device: torch.device) -> None:
    """Fail before any long work when the recipe asks for vLLM where it cannot run."""
    if device.type != "cuda":
        raise UserError("generation.engine: vllm needs a CUDA GPU (this run is on the CPU); use generation.engine=hf")
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise UserError("generation.engine: vllm is not installed (pip install 'frugal_spin[vllm]'), or use "
                        "generation.engine=hf") from None
    if attention_backend_for(device) is not None and not vllm_selects_attention_backend():
        major, minor = torch.cuda.get_device_capability(device)
        raise UserError(f"generation.engine: vllm on this GPU (compute capability {major}.{minor}, below 8.0) needs "
                        f"vLLM's Triton attention backend, which vllm {_vllm_version()} cannot select; upgrade vllm "
                        f"(pip install -U 'frugal_spin[vllm]') or use generation.engine=hf")


def _vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "(unknown version)"))


def prompt_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index) % 2**63


class VllmOpponent:
    """One vLLM engine over the base, for one generation stage; `close()` gives its GPU memory back."""

    def __init__(self, base_path: str, *, lora_rank: int, load_in_4bit: bool, dtype: torch.dtype,
                 max_model_len: int, gpu_memory_utilization: float, seed: int, ranks: int = 1,
                 attention_backend: str | None = None):
        from vllm import LLM

        rank = next((r for r in LORA_RANKS if r >= lora_rank), lora_rank)
        extra: dict[str, Any] = {"quantization": "bitsandbytes"} if load_in_4bit else {}
        if attention_backend is not None:  # below compute capability 8.0 (see the module docstring)
            extra["attention_backend"] = attention_backend
        if ranks > 1:
            # Under torchrun every rank is one vLLM engine of a data-parallel group (vLLM's "external_launcher":
            # one worker per process, the prompts split by us); experimental in vLLM, not yet run on GPUs here.
            extra.update(data_parallel_size=ranks, distributed_executor_backend="external_launcher")
        # generation_config="vllm": the model's own generation_config.json (a repetition penalty, top_k, ...) must
        # not become the sampling defaults; only the recipe's fields decide how y' is drawn (as in generate.py).
        self.llm = LLM(model=base_path, tokenizer=base_path, enable_lora=True, max_loras=1, max_lora_rank=rank,
                       generation_config="vllm",
                       gpu_memory_utilization=gpu_memory_utilization, seed=seed,
                       dtype=str(dtype).replace("torch.", ""), max_model_len=max_model_len, **extra)

    def generate(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int], adapter_dir: str, *,
                 max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                 eos_id: int | Sequence[int]) -> list[list[int]]:
        """One answer per prompt (ids), each cut after its first stop token (inclusive), as the HF engine returns
        them; `eos_id` is one id or the run's stop ids (turns.stop_token_ids: the end-of-turn token first)."""
        stops = [eos_id] if isinstance(eos_id, int) else [int(i) for i in eos_id]
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        params = [SamplingParams(n=1, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1,
                                 max_tokens=max_new_tokens, seed=s, stop_token_ids=stops) for s in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params,
                                    lora_request=LoRARequest("opponent", 1, str(adapter_dir)), use_tqdm=False)
        answers = []
        for out in outputs:
            sample = out.outputs[0]
            ids = cut_after_first(list(sample.token_ids), stops)
            if sample.finish_reason == "stop" and not set(ids[-1:]) & set(stops):
                # Stopped at a stop token without returning it: score it as the HF engine does (vLLM names the
                # token in stop_reason; without one, the first stop id, the end-of-turn token).
                reason = getattr(sample, "stop_reason", None)
                ids.append(reason if isinstance(reason, int) and reason in stops else stops[0])
            answers.append(ids)
        return answers

    def close(self) -> None:
        """Free vLLM's weights and KV cache before the training model needs the memory back."""
        try:
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

            destroy_model_parallel()
            destroy_distributed_environment()
        except Exception:  # best effort: older and newer vLLMs move these; deleting the engine is what matters
            pass
        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def engine_factory(base_path: str, recipe, runtime, max_model_len: int, seed: int) -> Callable[[], VllmOpponent]:
    """How to build this recipe's engine (built only when there is something to generate)."""
    return lambda: VllmOpponent(base_path, lora_rank=recipe.lora.r, load_in_4bit=recipe.model.load_in_4bit,
                                dtype=runtime.compute_dtype, max_model_len=max_model_len,
                                gpu_memory_utilization=recipe.generation.vllm_gpu_memory_utilization, seed=seed,
                                ranks=current_world().size, attention_backend=attention_backend_for(runtime.device))


def generate_with_vllm(make_engine: Callable[[], Any], prompts: Sequence[Sequence[int]], adapter_dir: str, *,
                       max_new_tokens: int, temperature: float, top_p: float, top_k: int, seed: int,
                       eos_id: int | Sequence[int],
                       answered: dict[int, list[int]] | None = None,
                       on_answers: Callable[[list[int], list[list[int]]], None] | None = None,
                       on_batch: Callable[[int], None] | None = None) -> list[list[int]]:
    """`generate_answers`' contract with vLLM: this rank's unanswered prompts (i % N == rank) in one call, which
    vLLM batches itself, saved through `on_answers`; then every rank's answers, in prompt order."""
    answered = answered or {}
    world = current_world()
    todo = [i for i in range(len(prompts)) if i not in answered and world.owns(i)]
    answers: list[list[int] | None] = [list(answered[i]) if i in answered else None for i in range(len(prompts))]
    if len(answered) < len(prompts):  # every rank agrees (`answered` is every rank's log): all build the engine
        engine = make_engine()
        try:
            new = engine.generate([prompts[i] for i in todo], [prompt_seed(seed, i) for i in todo], adapter_dir,
                                  max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                  eos_id=eos_id)
        finally:
            engine.close()
        for i, ids in zip(todo, new):
            answers[i] = ids
        if on_answers is not None:
            on_answers(todo, new)
    if on_batch is not None:
        on_batch(len(prompts))
    return world.merge(answers)  # type: ignore[return-value]
