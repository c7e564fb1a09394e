"""Which models may score a SPIN pair packed as one sequence x+y+y' (shared_prompt.py), judged from the config alone.

Packing is exact only where everything a token sees is set by the attention mask and the position ids: y' must see
x and its own past exactly as it would in x+y' alone. That holds for full causal attention whose positions come from
the position ids, rotary (RoPE) or learned absolute embeddings. It fails where the layout itself leaks in:
- ALiBi (MPT, Bloom, Falcon with `alibi`): the bias is computed from key indices in the sequence, not from the
  position ids, so y' sits |y| tokens further from x (Bloom and Falcon also crash on a 4D mask);
- local attention windows counted in sequence indices (GPT-Neo's `attention_types`): y fills y''s window;
- recurrent or convolutional layers (Mamba, RWKV, LFM2, Jamba, Zamba2, ...): their state runs through y into y'.
Measured on tiny random configs (fp32, CPU, one pair with 60-token answers): 0.2 nats per answer for MPT, 0.4 for
Zamba2, 1.6 for RWKV, 2.2 for Mamba2, against <= 6e-5 for the listed architectures.

So a pair is packed only for a model type listed here, each checked against the two-sequence log-probs with a tiny
config in tests/test_pair_packing.py, and only with a position scheme that does not depend on the sequence length
(`dynamic` and `longrope` RoPE rescale by the largest position id), no ALiBi flag, and layer types that are
attention layers. A sliding window is a rule per batch: a packed sequence no longer than the window never meets it.
Everything else is scored as two sequences x+y and x+y', which is exact for every causal LM.

Torch-free: the memory planner (planner.py) imports it to model the same layout before anything is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# model_type -> how its positions enter attention; each one verified in tests/test_pair_packing.py.
PACKABLE_MODEL_TYPES: dict[str, str] = {
    "llama": "RoPE",  # also SmolLM2, TinyLlama and the built-in tiny base
    "mistral": "RoPE (sliding window per batch)",
    "qwen2": "RoPE (sliding window per batch)",
    "qwen3": "RoPE",
    "phi3": "RoPE (sliding window per batch)",
    "gemma": "RoPE",
    "smollm3": "RoPE, some layers without positions (NoPE)",
    "olmo2": "RoPE",
    "gpt_neox": "partial RoPE",
    "phi": "partial RoPE",
    "stablelm": "partial RoPE",
    "starcoder2": "RoPE (sliding window per batch)",
    "falcon": "RoPE (refused with alibi)",
    "gpt2": "learned absolute positions",
}
# RoPE variants whose frequencies are fixed; `dynamic` and `longrope` pick them from the largest position id.
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


@dataclass(frozen=True)
class PackingRule:
    """What a config allows: `refusal` says why pairs are never packed (None: they may be); `window` is a sliding
    attention window in tokens, which a packed sequence longer than it would break."""

    refusal: str | None = None
    window: int | None = None

    def refuses(self, longest: int | None = None) -> str | None:
        """Why a batch whose longest packed sequence has `longest` tokens (None: unknown) is not packed, or None."""
        if self.refusal is not None:
            return self.refusal
        if self.window and (longest is None or longest > self.window):
            return f"sliding window of {self.window} tokens shorter than the packed pair"
        return None


def _get(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


def _rope_types(config: Any) -> set[str]:
    """The RoPE types a config names: transformers 5's `rope_parameters` (one dict, or one per layer type) or the
    older `rope_scaling`; none named is the default."""
    types = set()
    for key in ("rope_parameters", "rope_scaling"):
        params = _get(config, key)
        if not isinstance(params, Mapping):
            continue
        per_layer = [v for v in params.values() if isinstance(v, Mapping)]
        for p in per_layer or [params]:
            types.add(str(p.get("rope_type") or p.get("type") or "default"))
    return types or {"default"}


def packing_rule(config: Any) -> PackingRule:
    """The rule for a (text) config: a transformers `PretrainedConfig` or the dict of a config.json."""
    model_type = str(_get(config, "model_type") or "")
    if model_type not in PACKABLE_MODEL_TYPES:
        return PackingRule(f"allowlist miss: model type {model_type or '(none)'!r} is not known to be exact packed")
    if _get(config, "alibi"):
        return PackingRule(f"allowlist miss: {model_type} with ALiBi (positions not set by position ids)")
    dynamic = _rope_types(config) - STATIC_ROPE_TYPES
    if dynamic:
        return PackingRule(f"allowlist miss: RoPE type {', '.join(sorted(dynamic))} depends on the sequence length")
    layer_types = set(_get(config, "layer_types") or ()) - ATTENTION_LAYER_TYPES
    if layer_types:
        return PackingRule(f"allowlist miss: layer types {', '.join(sorted(map(str, layer_types)))}")
    # A config.json may name a window it does not use (Qwen2.5: use_sliding_window false); the loaded config
    # object clears it in that case.
    window = _get(config, "sliding_window") if _get(config, "use_sliding_window") is not False else None
    return PackingRule(window=int(window) if window else None)
