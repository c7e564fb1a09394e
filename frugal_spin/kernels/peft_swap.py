"""Run peft's 4-bit LoRA layers (`peft.tuners.lora.bnb.Linear4bit`) on the fused NF4 LoRA kernel.

`use_fused_lora_layers(model)` replaces the `forward` of every such layer, per instance, by one that calls
`kernels.nf4_lora.fused_lora_linear` when the layer is in the plain case the kernel computes, and peft's own
forward otherwise, decided at every call:
- one active adapter, plain LoRA (no DoRA or other variant), dropout off (`nn.Identity`; with dropout p > 0 the
  low-rank input differs from the base input, which the kernel does not take), adapters enabled and not merged,
  no per-row `adapter_names`;
- an NF4 bitsandbytes weight with uint8 storage, and `dispatch.use_triton` true (CUDA tensors, triton present).
Numbers follow peft's: the base product in bitsandbytes' compute dtype (or autocast's), the output in the
input's dtype (autocast's under autocast).

Not applied when unsloth is imported: unsloth patches these layers with its own fused LoRA kernels, and a second
fused path on top would only hide which one runs.
"""

from __future__ import annotations

import sys
import types

import torch

from frugal_spin.kernels.dispatch import kernel_verified, use_triton
from frugal_spin.kernels.nf4_lora import NF4Weight, fused_lora_linear


def _peft_linear4bit_class():
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # peft without bitsandbytes support
        return None
    return Linear4bit


def _fused_case(layer, x: torch.Tensor, args, kwargs) -> str | None:
    """The active adapter's name if the fused kernel computes this call exactly, else None."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return None
    weight = layer.get_base_layer().weight
    state = getattr(weight, "quant_state", None)
    if state is None or state.quant_type != "nf4" or weight.dtype != torch.uint8:
        return None
    return name if use_triton(x, weight) and kernel_verified("nf4_lora", x.device) else None


def _nf4_weight(layer, param) -> NF4Weight:
    """The layer's NF4Weight, rebuilt only when the packed data or its quant state changes: building it makes a
    few tiny tensors (the double-quantisation offset on the device), not worth doing in every forward."""
    cached = getattr(layer, "_frugal_spin_nf4", None)  # (data pointer, quant state object, NF4Weight)
    if cached is None or cached[0] != param.data.data_ptr() or cached[1] is not param.quant_state:
        cached = (param.data.data_ptr(), param.quant_state, NF4Weight.from_bnb(param.data, param.quant_state))
        layer._frugal_spin_nf4 = cached
    return cached[2]


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = _fused_case(self, x, args, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.get_base_layer()
    if torch.is_autocast_enabled(x.device.type):
        compute_dtype = out_dtype = torch.get_autocast_dtype(x.device.type)
    else:
        compute_dtype, out_dtype = (base.compute_dtype or x.dtype), x.dtype
    weight = _nf4_weight(self, base.weight)
    bias = base.bias.to(compute_dtype) if base.bias is not None else None
    y = fused_lora_linear(x.to(compute_dtype), weight, self.lora_A[name].weight, self.lora_B[name].weight,
                          self.scaling[name], bias)
    return y.to(out_dtype)


def use_fused_lora_layers(model: torch.nn.Module) -> int:
    """Point every peft 4-bit LoRA layer of `model` at the fused kernel; returns how many were changed (0 when
    unsloth is imported or peft has no bitsandbytes layers). Idempotent."""
    layer_class = _peft_linear4bit_class()
    if layer_class is None or "unsloth" in sys.modules:
        return 0
    changed = 0
    for module in model.modules():
        if isinstance(module, layer_class):
            module.forward = types.MethodType(_forward, module)
            changed += 1
    return changed
