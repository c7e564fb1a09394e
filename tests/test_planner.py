"""The memory planner: hand-worked arithmetic, shape lookup, fits on small and large GPUs, the CLI, and one
estimate checked against the measured live-tensor peak of a real training step on a tiny model."""

import json
import sys
from pathlib import Path

import pytest

from frugal_spin.config import Recipe
from frugal_spin.errors import UserError
from frugal_spin.planner import (GIB, KNOWN_SHAPES, ModelShape, estimate, kv_cache_bytes, lora_param_count,
                                 Target, plan_main, resolve_model_shape, resolve_target, weight_bytes)

ROOT = Path(__file__).resolve().parents[1]

# One Llama layer: q 128x128, k and v 128x64, o 128x128, gate/up/down 128x384 = 196,608 linear weights.
ONE_LAYER = ModelShape(hidden_size=128, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=32,
                       intermediate_size=384, vocab_size=384, tie_word_embeddings=True, max_position_embeddings=128)


def _recipe(**sections) -> Recipe:
    recipe = Recipe()
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(recipe, section), key, value)
    return recipe


GPU_BF16 = Target("cuda", 2, checkpointing=True, optimizer="paged_adamw_8bit", overhead_bytes=0)
CPU_FP32 = Target("cpu", 4, checkpointing=False, optimizer="adamw", overhead_bytes=0)


def test_nf4_weight_bytes_by_hand():
    # NF4 with double quantisation: 196,608 * (1/2 + 1/64 + 4/16384) = 98,304 + 3,072 + 48 = 101,424 bytes;
    # bf16 tied embedding 384 * 128 * 2 = 98,304; three norms 3 * 128 * 2 = 768.
    assert weight_bytes(ONE_LAYER, Recipe(), GPU_BF16) == 101_424 + 98_304 + 768
    # Untied: the head is a second 384 x 128 matrix; without 4-bit every linear is bf16.
    untied = ModelShape(**{**ONE_LAYER.__dict__, "tie_word_embeddings": False})
    assert weight_bytes(untied, Recipe(), GPU_BF16) == 101_424 + 2 * 98_304 + 768
    no_4bit = _recipe(model={"load_in_4bit": False})
    assert weight_bytes(ONE_LAYER, no_4bit, GPU_BF16) == 196_608 * 2 + 98_304 + 768


def test_cpu_weights_follow_model_cpu_4bit_weights():
    # On the CPU `auto` and `dequantized` hold the NF4 linears dequantised in fp32 (4 bytes each) plus their packed
    # NF4 data (kept to restore the in-place merge of generation), `packed` keeps them NF4 only; the tied embedding
    # and norms are fp32 either way.
    rest = 98_304 * 2 + 768 * 2
    assert weight_bytes(ONE_LAYER, Recipe(), CPU_FP32) == 196_608 * 4 + 101_424 + rest
    assert weight_bytes(ONE_LAYER, _recipe(model={"cpu_4bit_weights": "dequantized"}), CPU_FP32) == \
        196_608 * 4 + 101_424 + rest
    assert weight_bytes(ONE_LAYER, _recipe(model={"cpu_4bit_weights": "packed"}), CPU_FP32) == 101_424 + rest


def test_lora_params_qwen25_05b_r16_all_linear():
    # Per layer 16 * (7 * 896 + 2 * 896 + 2 * 128 + 3 * 4864) = 16 * 22,912 = 366,592; 24 layers.
    assert lora_param_count(KNOWN_SHAPES["Qwen/Qwen2.5-0.5B"], Recipe()) == 8_798_208
    only_qv = _recipe(lora={"target_modules": ["q_proj", "v_proj"], "r": 8})
    assert lora_param_count(KNOWN_SHAPES["Qwen/Qwen2.5-0.5B"], only_qv) == 24 * 8 * ((896 + 896) + (896 + 128))
    with pytest.raises(UserError, match="lora.target_modules"):
        lora_param_count(ONE_LAYER, _recipe(lora={"target_modules": ["c_attn"]}))


def test_kv_cache_bytes_by_hand():
    # Qwen2.5-1.5B: 2 * 28 layers * 2 kv heads * 128 = 14,336 values per token; bf16, 512 tokens, 32 prompts.
    shape = KNOWN_SHAPES["Qwen/Qwen2.5-1.5B-Instruct"]
    assert kv_cache_bytes(shape, 512, 32, 2) == 14_336 * 2 * 512 * 32 == int(0.4375 * GIB)


def test_offline_table_lookup_is_case_insensitive_and_needs_no_network():
    shape = resolve_model_shape("qwen/qwen2.5-1.5b-instruct", allow_network=False)
    assert (shape.hidden_size, shape.num_layers, shape.num_kv_heads, shape.vocab_size) == (1536, 28, 2, 151936)
    assert resolve_model_shape("TinyLlama/TinyLlama-1.1B-Chat-v1.0", allow_network=False).tie_word_embeddings is False
    assert resolve_model_shape("builtin:tiny-llama").hidden_size == 128


def test_local_config_json(tmp_path):
    config = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 3, "num_attention_heads": 8,
              "intermediate_size": 704, "vocab_size": 1000, "tie_word_embeddings": False,
              "max_position_embeddings": 512}
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape = resolve_model_shape(str(tmp_path), allow_network=False)
    assert (shape.num_kv_heads, shape.head_dim, shape.tie_word_embeddings) == (8, 32, False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no config.json"):
        resolve_model_shape(str(empty))


def test_unknown_model_offline_and_hub_failure_are_user_errors(monkeypatch):
    with pytest.raises(UserError, match="offline table"):
        resolve_model_shape("someone/unknown-model", allow_network=False)

    def no_network(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    import huggingface_hub
    import transformers
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # The hub answers the quick existence probe (preflight.check_hub_model), then the config download fails.
    monkeypatch.setattr(huggingface_hub, "model_info", lambda name, timeout=None: None)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_network)
    with pytest.raises(UserError, match="cannot get the config of 'someone/unknown-model'"):
        resolve_model_shape("someone/unknown-model")
    # Unreachable hub: the probe fails at once, in one line, before any download and its retries.
    monkeypatch.setattr(huggingface_hub, "model_info", no_network)
    with pytest.raises(UserError, match="the hub cannot be reached to fetch 'someone/unknown-model'"):
        resolve_model_shape("someone/unknown-model")


def _big_recipe(micro_batch: int, chunk: int = 1024) -> Recipe:
    return _recipe(model={"name": "Qwen/Qwen2.5-1.5B-Instruct", "logprob_chunk_size": chunk},
                   data={"max_prompt_tokens": 512, "max_answer_tokens": 1024},
                   sft={"micro_batch_size": micro_batch}, spin={"micro_batch_size": 2},
                   generation={"max_new_tokens": 1024, "batch_size": 64}, eval={"batch_size": 64})


def test_fits_on_h100_not_on_t4_for_a_15b_recipe():
    shape = resolve_model_shape("Qwen/Qwen2.5-1.5B-Instruct", allow_network=False)
    recipe = _big_recipe(micro_batch=64)
    t4, h100 = estimate(recipe, shape, "t4"), estimate(recipe, shape, "h100")
    assert t4.fits("sft_train") is False and h100.fits("sft_train") is True
    assert all(h100.fits(stage.name) for stage in h100.stages)
    # The largest micro-batch reported fits, one more does not.
    largest = t4.max_micro_batch["sft_train"]
    assert 1 <= largest < 64
    assert estimate(_big_recipe(largest), shape, "t4").fits("sft_train")
    assert not estimate(_big_recipe(largest + 1), shape, "t4").fits("sft_train")
    # SPIN logits by hand, 2 pairs = 4 sequences of 512 + 1024 tokens, 4,096 response tokens, chunk 1,024, bf16:
    # one fp32 [1024 x V] chunk buffer + one bf16 product, gathered rows (2H each), the final hidden state
    # (2H per token), the fp32 hidden-gradient buffer (4H per response token). Not 6,144 x V x 4 (3.5 GiB).
    h, v = 1536, 151936
    spin = h100.stage("spin_train")
    assert spin.parts["logits"] == 1024 * v * (4 + 2) + 4096 * 2 * h + 6144 * 2 * h + 4096 * 4 * h
    assert spin.parts["kv_cache"] == 0 and h100.stage("generate").parts["kv_cache"] > 0
    # At chunk 256 the head's buffers (forward) are smaller than one checkpointed layer's recomputation
    # (backward), which then sets the peak; the two never coexist.
    small = estimate(_big_recipe(64, chunk=256), shape, "h100").stage("spin_train")
    assert small.parts["logits"] == 4096 * 4 * h
    assert small.parts["activations"] > spin.parts["activations"]
    assert small.total_bytes < spin.total_bytes


def test_target_resolution_errors_and_defaults():
    assert resolve_target(Recipe(), "cuda", "t4").checkpointing is True
    cpu = resolve_target(Recipe(), "cpu", None)
    assert (cpu.compute_bytes, cpu.checkpointing, cpu.optimizer) == (4, False, "adamw")
    with pytest.raises(UserError, match="T4"):
        resolve_target(_recipe(model={"dtype": "bfloat16"}), "cuda", "t4")
    with pytest.raises(UserError, match="float16"):
        resolve_target(_recipe(model={"dtype": "float16"}), "cpu", None)
    with pytest.raises(UserError, match="unknown GPU"):
        estimate(Recipe(), ONE_LAYER, "v100")


def test_cli_prints_the_table(capsys):
    assert plan_main([str(ROOT / "recipes/cpu_tiny.yaml"), "sft.micro_batch_size=4", "--gpu", "t4",
                      "--offline"]) == 0
    out = capsys.readouterr().out
    for text in ("SFT train", "SPIN train", "generate", "score", "eval", "largest micro-batch", "yes"):
        assert text in out
    assert plan_main([str(ROOT / "recipes/cpu_tiny.yaml"), "model.device=cpu", "--offline"]) == 0
    assert "host RAM about" in capsys.readouterr().out
    with pytest.raises(UserError, match="unknown key"):
        plan_main([str(ROOT / "recipes/cpu_tiny.yaml"), "sft.nope=1"])


def test_estimate_matches_a_measured_training_step(tmp_path):
    """Live-tensor peak of one real SFT step (4-bit tiny Llama, LoRA, chunked log-probs, AdamW), deterministic
    byte counts from torch.profiler's allocator events, against the CPU estimate: within 15%."""
    sys.path.insert(0, str(ROOT / "profiling"))
    try:
        import check_planner
    finally:
        sys.path.remove(str(ROOT / "profiling"))
    case = check_planner.Case("tiny-llama-h128-l4", prompt=32, answer=96, micro_batch=4)
    model_dir = check_planner.build_model_dir(case.shape, tmp_path)
    shape = resolve_model_shape(str(model_dir), allow_network=False)
    measured = check_planner.measure(case, model_dir, stages=("sft",))
    plan = estimate(check_planner.recipe_for(case), shape, device="cpu")
    assert measured["weights"] == pytest.approx(plan.weights_bytes + 4 * plan.lora_params, rel=0.05)
    assert plan.stage("sft_train").total_bytes == pytest.approx(measured["sft"], rel=0.15)
