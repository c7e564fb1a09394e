"""Run peft's 4-bit LoRA layers (`peft.tuners.lora.bnb.Linear4bit`) on the fused NF4 LoRA kernel.

`use_fused_lora_layers(model)` replaces the `forward` of every such layer, per instance, by one that calls
`kernels.nf4_lora.fused_lora_linear` when the layer is in the plain case the kernel computes, and peft's own
forward otherwise, decided at every call:
- one active adapter, plain LoRA (no DoRA or other variant), dropout off (`nn.Identity`, p = 0, or a dropout
  module in eval mode, as SPIN training keeps it; with active dropout the low-rank input differs from the base
  input, which the kernel does not take), adapters enabled and not merged, no per-row `adapter_names`;
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

from frugal_spin.kernels import nf4_lora
from frugal_spin.kernels.dispatch import use_triton
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
    if name in getattr(layer, "lora_variant", {}) or not _dropout_off(layer.lora_dropout[name]):
        return None
    weight = layer.get_base_layer().weight
    state = getattr(weight, "quant_state", None)
    if state is None or state.quant_type != "nf4" or weight.dtype != torch.uint8:
        return None
    return name if use_triton(x, weight) and nf4_lora.verified(x.device, _variant(layer, name, x)) else None


def _dropout_off(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Identity) or (
        isinstance(module, torch.nn.Dropout) and (not module.training or module.p == 0))


def _compute_dtype(layer, x: torch.Tensor | None) -> torch.dtype:
    """The dtype the fused call computes in (see `_forward`): autocast's, else bitsandbytes' compute dtype."""
    if x is not None and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    base = layer.get_base_layer()
    return base.compute_dtype or (x.dtype if x is not None else torch.float32)


def _variant(layer, name: str, x: torch.Tensor | None) -> nf4_lora.Variant:
    base = layer.get_base_layer()
    return nf4_lora.Variant(_compute_dtype(layer, x), layer.lora_A[name].weight.shape[0], base.bias is not None,
                            bool(base.weight.quant_state.nested))


def fused_variants(model: torch.nn.Module) -> dict[nf4_lora.Variant, str]:
    """Every kernel variant the swapped layers of `model` will call outside autocast (or under an autocast of
    bitsandbytes' compute dtype, as training and scoring run), with one layer name using it."""
    found: dict[nf4_lora.Variant, str] = {}
    for module_name, module in model.named_modules():
        if not getattr(module, "_frugal_spin_fused", False):
            continue
        weight = module.get_base_layer().weight
        if getattr(weight, "quant_state", None) is None or weight.quant_state.quant_type != "nf4":
            continue
        for name in module.active_adapters:
            if name in module.lora_A:
                found.setdefault(_variant(module, name, None), module_name)
    return found


def verify_fused_layers(model: torch.nn.Module) -> dict[nf4_lora.Variant, bool]:
    """Run the fused kernel's self-check now, for every variant `model`'s swapped layers will use, on their device:
    eagerly and outside any autograd graph, so a first use inside a checkpointed forward finds it decided."""
    results = {}
    for variant, layer_name in fused_variants(model).items():
        device = model.get_submodule(layer_name).get_base_layer().weight.device
        results[variant] = nf4_lora.verified(device, variant)
    return results


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
    compute_dtype = _compute_dtype(self, x)
    out_dtype = compute_dtype if torch.is_autocast_enabled(x.device.type) else x.dtype
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
            module._frugal_spin_fused = True
            changed += 1
    return changed
