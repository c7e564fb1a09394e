"""The model layer: 4-bit loading on CPU, LoRA gradients, adapter save/load."""

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from frugal_spin.config import LoraSection, ModelConfig
from frugal_spin.errors import UserError
from frugal_spin.model import attach_lora, load_adapter_weights, load_base_model, resolve_runtime, save_adapter
from frugal_spin.model_source import check_model_reference


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _lora_model(path: Path, fix_trap: bool = True, cpu_4bit_weights: str = "packed"):
    cfg = ModelConfig(name=str(path), device="cpu", cpu_4bit_weights=cpu_4bit_weights)
    model = load_base_model(str(path), cfg, resolve_runtime(cfg))
    if not fix_trap:
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = True
    torch.manual_seed(1)  # peft draws lora_A from the global generator: the same seed gives the same adapter
    model = attach_lora(model, LoraSection(r=8))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapter matter so gradients reach every tensor
            torch.nn.init.normal_(param, std=0.02)
    return model


def _lora_grads(model, eval_forward_first: bool) -> dict[str, torch.Tensor]:
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    if eval_forward_first:  # what generation and opponent scoring do before the player trains
        model.eval()
        with torch.no_grad():
            model(input_ids=x)
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _cpu_has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def test_lora_gradients_on_4bit_base_survive_an_eval_forward(tiny_dir):
    """DESIGN.md's bitsandbytes CPU trap: an eval forward repacks Linear4bit weights on AVX512-BF16 CPUs and later
    backward passes drop gradients. With the loader's fix the gradients are identical either way."""
    model = _lora_model(tiny_dir)
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    clean = _lora_grads(model, eval_forward_first=False)
    model.zero_grad()
    after_eval = _lora_grads(_lora_model(tiny_dir), eval_forward_first=True)
    assert clean.keys() == after_eval.keys() and len(clean) > 0
    for name in clean:
        assert clean[name].abs().sum() > 0, name
        torch.testing.assert_close(after_eval[name], clean[name], rtol=1e-5, atol=1e-7)
    if _cpu_has_avx512_bf16():  # the trap is real on this CPU: without the fix the gradients differ
        broken = _lora_grads(_lora_model(tiny_dir, fix_trap=False), eval_forward_first=True)
        assert any(not torch.allclose(broken[n], clean[n], rtol=1e-3, atol=1e-6) for n in clean)


def test_adapter_round_trip(tiny_dir, tmp_path):
    model = _lora_model(tiny_dir)
    save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for param in model.parameters():
        if param.requires_grad:
            param.data.zero_()
    load_adapter_weights(model, tmp_path / "adapter")
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, before[name])


def test_adapter_of_another_layout_is_refused(tiny_dir, tmp_path):
    save_adapter(_lora_model(tiny_dir), tmp_path / "r8")
    cfg = ModelConfig(name=str(tiny_dir), device="cpu")
    other = attach_lora(load_base_model(str(tiny_dir), cfg, resolve_runtime(cfg)),
                        LoraSection(r=8, target_modules=["q_proj"]))
    with pytest.raises(UserError, match="does not match"):
        load_adapter_weights(other, tmp_path / "r8")


def test_model_reference_checks(tmp_path):
    with pytest.raises(UserError, match="directory not found"):
        check_model_reference(ModelConfig(name=str(tmp_path / "nope")))
    with pytest.raises(UserError, match="no config.json"):
        check_model_reference(ModelConfig(name=str(tmp_path)))
    with pytest.raises(UserError, match="unknown built-in model"):
        check_model_reference(ModelConfig(name="builtin:huge"))
    check_model_reference(ModelConfig(name="Qwen/Qwen2.5-0.5B-Instruct"))  # a hub id: checked when loaded


def test_runtime_on_cpu():
    runtime = resolve_runtime(ModelConfig(device="auto"))
    if not torch.cuda.is_available():
        assert runtime.device.type == "cpu" and runtime.compute_dtype == torch.float32
        assert runtime.gradient_checkpointing is False and runtime.autocast_dtype is None
        with pytest.raises(UserError, match="no CUDA GPU"):
            resolve_runtime(ModelConfig(device="cuda"))


def test_bitsandbytes_cpu_dequantiser_bug_is_still_there():
    """Why `cpu_nf4_misdequantised_layers` exists. When this fails, bitsandbytes fixed its CPU kernel: drop the
    workaround in model.py (and this test)."""
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * 0.05
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    native = F.dequantize_4bit(packed, state)
    generic = _dequantize_4bit_compute(packed.reshape(-1), state.absmax.float(), state.code, 64, (64, 96),
                                       torch.float32)
    native_error, generic_error = (native - w).abs().max(), (generic - w).abs().max()
    assert native_error > 2 * generic_error  # the generic path's error is NF4's own quantisation error


def test_layers_the_cpu_kernel_gets_wrong_stay_unquantised(tmp_path, capsys):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=192, num_hidden_layers=1,
                         num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    cfg = ModelConfig(name=str(tmp_path / "m"), device="cpu", cpu_4bit_weights="packed")
    model = load_base_model(str(tmp_path / "m"), cfg, resolve_runtime(cfg))
    layer = model.model.layers[0]
    # inputs of 96 (q/k/v/o, gate/up) stay fp32; down_proj's input of 192 = 3 x 64 is quantised as usual
    for linear in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj):
        assert type(linear) is torch.nn.Linear and linear.weight.dtype == torch.float32
    assert isinstance(layer.mlp.down_proj, bnb.nn.Linear4bit)
    assert "keeping 6 such layers in float32" in capsys.readouterr().err
    model = attach_lora(model, LoraSection(r=4))
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()


def test_dequantized_cpu_weights_are_the_packed_nf4_model(tiny_dir):
    """model.cpu_4bit_weights=dequantized replaces bitsandbytes' layers by plain ones holding the same NF4 values:
    logits and LoRA gradients equal the packed model's up to float rounding, and nothing 4-bit is left."""
    import bitsandbytes as bnb

    packed, dense = _lora_model(tiny_dir), _lora_model(tiny_dir, cpu_4bit_weights="dequantized")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in packed.modules())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in dense.modules())
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (packed(input_ids=x).logits - dense(input_ids=x).logits).abs().max().item()
    assert diff < 1e-5
    got, want = _lora_grads(dense, eval_forward_first=True), _lora_grads(packed, eval_forward_first=True)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-4, atol=1e-6), name
    assert sum(p.numel() for p in dense.parameters() if p.requires_grad) == \
        sum(p.numel() for p in packed.parameters() if p.requires_grad)


def test_auto_cpu_weights_follow_available_memory(tiny_dir, monkeypatch):
    import psutil

    from frugal_spin import model as model_module

    cfg = ModelConfig(name=str(tiny_dir), device="cpu")
    runtime = resolve_runtime(cfg)
    base = load_base_model(str(tiny_dir), cfg, runtime)
    assert runtime.base_weights.startswith("nf4 dequantized once to float32")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("VM", (), {"available": 1024})())
    runtime = resolve_runtime(cfg)
    base = load_base_model(str(tiny_dir), cfg, runtime)
    assert runtime.base_weights.startswith("nf4 packed (bitsandbytes") and model_module.linear_4bit_layers(base)


def _weights_snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _plain_lora_model(path: Path):
    """The tiny model unquantised (load_in_4bit false), with the same kind of adapter as `_lora_model`."""
    cfg = ModelConfig(name=str(path), device="cpu", load_in_4bit=False)
    model = load_base_model(str(path), cfg, resolve_runtime(cfg))
    torch.manual_seed(1)
    model = attach_lora(model, LoraSection(r=8))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model, cfg


@pytest.mark.parametrize("weights", ["dequantized nf4", "unquantized"])
def test_generation_samples_from_merged_weights_and_restores_the_exact_ones(tiny_dir, weights):
    """On the CPU, inference_mode folds the adapter into the plain base weights (in place for dequantised NF4,
    into copies for an unquantised base): logits equal base + adapter to float rounding, greedy answers are the
    unmerged model's, and afterwards every parameter is bitwise what it was (rewritten from the packed NF4 data
    or the original tensor put back, never unmerged by subtraction) with the LoRA path back on. Packed 4-bit
    layers are never merged."""
    from frugal_spin.generate import generate_answers
    from frugal_spin.model import inference_mode

    if weights == "unquantized":
        model, cfg = _plain_lora_model(tiny_dir)
    else:
        cfg = ModelConfig(name=str(tiny_dir), device="cpu", cpu_4bit_weights="dequantized")
        model = _lora_model(tiny_dir, cpu_4bit_weights="dequantized")
    runtime = resolve_runtime(cfg)
    model.eval()
    before = _weights_snapshot(model)
    x = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(5))
    prompts = [list(range(5, 12)), list(range(30, 34)), list(range(70, 80))]

    class Tok:
        pad_token_id = 0
        eos_token_id = 1

    with torch.no_grad():
        want_logits = model(input_ids=x).logits
    want_answers = generate_answers(model, Tok(), prompts, max_new_tokens=8, batch_size=2, temperature=0.0,
                                    stop_ids=[1])
    with inference_mode(model, runtime) as merged:
        assert merged
        layers = [m for m in model.modules() if hasattr(m, "merged_adapters")]
        assert layers and all(m.merged for m in layers)
        with torch.no_grad():
            got_logits = model(input_ids=x).logits
        got_answers = generate_answers(model, Tok(), prompts, max_new_tokens=8, batch_size=2, temperature=0.0,
                                       stop_ids=[1])
    assert (want_logits - got_logits).abs().max().item() < 1e-5
    with model.disable_adapter(), torch.no_grad():  # the adapter matters: the bare base answers otherwise
        assert (model(input_ids=x).logits - want_logits).abs().max().item() > 1e-3
    assert got_answers == want_answers
    after = _weights_snapshot(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(m.merged for m in layers)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, want_logits)


def test_packed_4bit_layers_are_never_merged(tiny_dir):
    from frugal_spin.model import inference_mode

    with inference_mode(_lora_model(tiny_dir), resolve_runtime(ModelConfig(name=str(tiny_dir), device="cpu"))) \
            as merged:
        assert not merged


def test_merging_into_copies_gives_way_to_low_memory(tiny_dir, monkeypatch):
    """An unquantised base needs a copy of its weights to merge into; dequantised NF4 merges in place."""
    import psutil

    from frugal_spin.model import adapter_merged_for_generation

    plain, plain_cfg = _plain_lora_model(tiny_dir)
    nf4_cfg = ModelConfig(name=str(tiny_dir), device="cpu", cpu_4bit_weights="dequantized")
    nf4 = _lora_model(tiny_dir, cpu_4bit_weights="dequantized")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("VM", (), {"available": 1024})())
    with adapter_merged_for_generation(plain, resolve_runtime(plain_cfg)) as merged:
        assert not merged
    with adapter_merged_for_generation(nf4, resolve_runtime(nf4_cfg)) as merged:
        assert merged


def test_the_checkpoint_file_is_not_kept_mapped(tiny_dir):
    """After loading on the CPU no parameter points into the memory-mapped safetensors file, so its pages are
    not resident for the whole run; the tied embedding and head stay one tensor."""
    from frugal_spin.model import _mapped_checkpoint_ranges

    tied_dir = tiny_dir.parent / "tied"
    if not tied_dir.exists():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             tie_word_embeddings=True)
        LlamaForCausalLM(config).save_pretrained(tied_dir)
    cfg = ModelConfig(name=str(tied_dir), device="cpu")
    model = load_base_model(str(tied_dir), cfg, resolve_runtime(cfg))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ranges = _mapped_checkpoint_ranges()
    assert not [n for n, p in model.named_parameters() if any(a <= p.data_ptr() < b for a, b in ranges)]
