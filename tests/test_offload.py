"""model.offload_activations: the knob loads, is a no-op on the CPU, and the offloaded code path gives the same
gradients. (The CPU cannot show the memory saving; save_on_cpu pins host memory only when CUDA is present.)"""

import contextlib

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from frugal_spin.config import LoraSection, SFTConfig, recipe_from_dict
from frugal_spin.data import Encoded
from frugal_spin.model import Runtime, attach_lora, resolve_runtime
from frugal_spin.train import sft_step_fn, train_adapter


def test_knob_loads_and_is_off_by_default_and_on_the_cpu():
    assert recipe_from_dict({}).model.offload_activations is False
    recipe = recipe_from_dict({}, ["model.offload_activations=true", "model.device=cpu"])
    assert recipe.model.offload_activations is True
    runtime = resolve_runtime(recipe.model)
    assert runtime.offload_activations is False  # no-op on the CPU
    assert isinstance(runtime.activation_offload(), contextlib.nullcontext)


def _model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         initializer_range=0.3)
    base = LlamaForCausalLM(config)
    for p in base.parameters():
        p.requires_grad_(False)
    return attach_lora(base, LoraSection(r=4, alpha=8))


def _one_step_adapter(offload: bool, monkeypatch, checkpointing: bool = False):
    model = _model()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    g = torch.Generator().manual_seed(1)
    examples = [Encoded(torch.randint(3, 64, (5,), generator=g).tolist(), [7, 8, 9]) for _ in range(4)]
    step = sft_step_fn(model, examples, pad_id=0, chunk_size=16, device="cpu")
    packed = []
    real_save_on_cpu = torch.autograd.graph.save_on_cpu

    class CountingSaveOnCpu(real_save_on_cpu):  # proves the offload hooks really saw the activations
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(pin_memory=pin_memory, device_type=device_type)
            pack = self.pack_hook

            def counting_pack(tensor):
                packed.append(tuple(tensor.shape))
                return pack(tensor)

            self.pack_hook = counting_pack

    # Built by hand: resolve_runtime never turns offload on for the CPU, but the code path is the same.
    runtime = Runtime(torch.device("cpu"), torch.float32, gradient_checkpointing=checkpointing,
                      offload_activations=offload)
    cfg = SFTConfig(epochs=1, learning_rate=1e-2, micro_batch_size=4, warmup_ratio=0.0, max_grad_norm=0.0)
    with monkeypatch.context() as patch:  # undone on return, so a second call does not wrap this wrapper
        patch.setattr(torch.autograd.graph, "save_on_cpu", CountingSaveOnCpu)
        result = train_adapter(model, runtime, cfg, [8] * 4, step, seed=0)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return result.losses, weights, packed


@pytest.mark.parametrize("checkpointing", [False, True])
def test_offloaded_training_step_gives_the_same_update(monkeypatch, checkpointing):
    losses, weights, packed_off = _one_step_adapter(False, monkeypatch, checkpointing)
    losses_offloaded, weights_offloaded, packed_on = _one_step_adapter(True, monkeypatch, checkpointing)
    assert packed_off == []
    if checkpointing:
        # What checkpointing keeps, each decoder layer's input [batch, seq, hidden], goes through the offload hooks.
        layer_inputs = [shape for shape in packed_on if len(shape) == 3 and shape[-1] == 32]
        assert len(layer_inputs) >= 2 and len(packed_on) < 20, packed_on
    else:
        assert len(packed_on) > 20  # every saved activation
    assert losses == losses_offloaded
    for name, w in weights.items():
        torch.testing.assert_close(weights_offloaded[name], w, atol=0, rtol=0, msg=name)
