"""The unsloth backend (CUDA only, optional extra `frugal_spin[unsloth]`).

unsloth loads the 4-bit base through its own `FastLanguageModel`, which patches the decoder with fused Triton
kernels (NF4 dequantisation + LoRA matmuls, RoPE, RMSNorm, attention) and adds a faster inference mode for
generation. Everything downstream stays ours: the chunked log-prob head (`logprobs.py`) runs on the decoder's
hidden states, the training loop is `train.py`'s, and adapters are saved as plain PEFT adapters, so a run started
with unsloth can be resumed or evaluated with the transformers backend.

This module is imported only after `model.resolve_backend` chose unsloth, i.e. with a CUDA GPU and unsloth
installed; nothing on the CPU path imports it.
"""

from __future__ import annotations

import torch

from frugal_spin.config import LoraSection, ModelConfig
from frugal_spin.errors import UserError


def import_unsloth():
    """unsloth wants to be imported before transformers so that its patches apply everywhere; the pipeline calls
    this first thing when the backend is unsloth (later calls are free)."""
    import unsloth  # noqa: F401  (the import applies the patches)
    from unsloth import FastLanguageModel

    return FastLanguageModel


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """What `all-linear` means for unsloth, which wants explicit names: every linear layer's name but the head's."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and name}
    names.discard("lm_head")
    return sorted(names)


def load_unsloth_model(path: str, cfg: ModelConfig, lora: LoraSection, runtime, *, max_seq_length: int, seed: int,
                       revision: str | None = None):
    fast = import_unsloth()
    try:
        model, _tokenizer = fast.from_pretrained(
            model_name=path, max_seq_length=max_seq_length, dtype=runtime.compute_dtype,
            load_in_4bit=cfg.load_in_4bit, trust_remote_code=cfg.trust_remote_code,
            **({"revision": revision} if revision else {}))
    except OSError as exc:
        raise UserError(f"model.name: cannot load {path!r} with unsloth: {' '.join(str(exc).split())[:300]}") from None
    targets = linear_module_names(model) if lora.target_modules == ["all-linear"] else list(lora.target_modules)
    model = fast.get_peft_model(
        model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, bias="none",
        # "unsloth" checkpointing also offloads the checkpointed activations to CPU memory.
        use_gradient_checkpointing="unsloth" if runtime.gradient_checkpointing else False,
        random_state=seed, max_seq_length=max_seq_length)
    # fp16 training keeps fp32 master weights for the adapter (the GradScaler unscales into them); unsloth may
    # create them in the compute dtype.
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    model.config.use_cache = False
    return model


def for_inference(model) -> None:
    import_unsloth().for_inference(model)


def for_training(model, runtime) -> None:
    import_unsloth().for_training(model, use_gradient_checkpointing=runtime.gradient_checkpointing)
