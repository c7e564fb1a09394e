"""Which architectures score SPIN pairs packed (packing_rules.py, shared_prompt.probe_packing): for tiny random
configs of every family transformers ships that a user might load, the layout the toolkit picks gives the
two-sequence log-probs, nothing crashes, the listed families do pack, and scoring, training and the planner follow
one decision."""

import math

import pytest
import torch
import transformers as tf

from frugal_spin.data import collate_sequences
from frugal_spin.logprobs import sequence_logprobs
from frugal_spin.shared_prompt import pair_logprobs

PAD, VOCAB = 0, 97
LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)


def _config(cls, **kw):
    return lambda: cls(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, **kw)


# (name, model class, config factory, attention implementation, packs)
FAMILIES = [
    # Exact under a custom 4D mask + position ids: RoPE (full, partial, NoPE layers) and learned absolute.
    ("llama", tf.LlamaForCausalLM, _config(tf.LlamaConfig, **LLAMA_LIKE), "sdpa", True),
    ("llama-eager", tf.LlamaForCausalLM, _config(tf.LlamaConfig, **LLAMA_LIKE), "eager", True),
    ("mistral", tf.MistralForCausalLM, _config(tf.MistralConfig, **LLAMA_LIKE, sliding_window=None), "sdpa", True),
    ("qwen2", tf.Qwen2ForCausalLM, _config(tf.Qwen2Config, **LLAMA_LIKE), "sdpa", True),
    ("qwen3", tf.Qwen3ForCausalLM, _config(tf.Qwen3Config, **LLAMA_LIKE, head_dim=16), "sdpa", True),
    ("phi3", tf.Phi3ForCausalLM, _config(tf.Phi3Config, **LLAMA_LIKE), "sdpa", True),
    ("gemma", tf.GemmaForCausalLM, _config(tf.GemmaConfig, **LLAMA_LIKE, head_dim=16), "sdpa", True),
    ("smollm3", tf.SmolLM3ForCausalLM, _config(tf.SmolLM3Config, **{**LLAMA_LIKE, "num_hidden_layers": 4}),
     "sdpa", True),
    ("olmo2", tf.Olmo2ForCausalLM, _config(tf.Olmo2Config, **LLAMA_LIKE), "sdpa", True),
    ("gpt_neox", tf.GPTNeoXForCausalLM, _config(tf.GPTNeoXConfig, hidden_size=64, intermediate_size=128,
                                                num_hidden_layers=2, num_attention_heads=4), "sdpa", True),
    ("phi", tf.PhiForCausalLM, _config(tf.PhiConfig, **LLAMA_LIKE), "sdpa", True),
    ("stablelm", tf.StableLmForCausalLM, _config(tf.StableLmConfig, **LLAMA_LIKE), "sdpa", True),
    ("starcoder2", tf.Starcoder2ForCausalLM, _config(tf.Starcoder2Config, **LLAMA_LIKE, sliding_window=None),
     "sdpa", True),
    ("falcon-rope", tf.FalconForCausalLM, _config(tf.FalconConfig, hidden_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, alibi=False), "sdpa", True),
    ("gpt2", tf.GPT2LMHeadModel, _config(tf.GPT2Config, n_embd=64, n_layer=2, n_head=4, n_positions=128), "sdpa",
     True),
    # ALiBi: the bias comes from sequence indices, not position ids.
    ("mpt", tf.MptForCausalLM, _config(tf.MptConfig, d_model=64, n_heads=4, n_layers=2), "eager", False),
    ("bloom", tf.BloomForCausalLM, _config(tf.BloomConfig, hidden_size=64, n_layer=2, n_head=4), "eager", False),
    ("falcon-alibi", tf.FalconForCausalLM, _config(tf.FalconConfig, hidden_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, alibi=True), "sdpa", False),
    # Local attention windows counted in sequence indices.
    ("gpt_neo-local", tf.GPTNeoForCausalLM, _config(tf.GPTNeoConfig, hidden_size=64, num_layers=2, num_heads=4,
                                                    attention_types=[[["global", "local"], 1]], window_size=4,
                                                    max_position_embeddings=128), "eager", False),
    # A RoPE model whose frequencies follow the largest position id.
    ("llama-dynamic-rope", tf.LlamaForCausalLM,
     _config(tf.LlamaConfig, **LLAMA_LIKE, max_position_embeddings=16,
             rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}), "sdpa", False),
    # Recurrent or convolutional layers: their state runs through y into y'.
    ("lfm2", tf.Lfm2ForCausalLM, _config(tf.Lfm2Config, **LLAMA_LIKE, layer_types=["conv", "full_attention"]),
     "sdpa", False),
    ("zamba2", tf.Zamba2ForCausalLM,
     _config(tf.Zamba2Config, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
             mamba_d_state=8, mamba_headdim=16, n_mamba_heads=8, layers_block_type=["mamba", "hybrid"],
             hybrid_layer_ids=[1], intermediate_size=128, attention_head_dim=16, use_mem_rope=True), "sdpa", False),
    ("jamba", tf.JambaForCausalLM,
     _config(tf.JambaConfig, **LLAMA_LIKE, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
             expert_layer_offset=1, num_experts=2, mamba_d_state=8), "sdpa", False),
    ("rwkv", tf.RwkvForCausalLM, _config(tf.RwkvConfig, hidden_size=64, num_hidden_layers=2, attention_hidden_size=64,
                                         intermediate_size=128, context_length=128), "eager", False),
    ("mamba", tf.MambaForCausalLM, _config(tf.MambaConfig, hidden_size=64, num_hidden_layers=2, state_size=8),
     "eager", False),
    ("mamba2", tf.Mamba2ForCausalLM, _config(tf.Mamba2Config, hidden_size=64, num_hidden_layers=2, state_size=8,
                                             num_heads=8, head_dim=16, n_groups=1), "eager", False),
]
NAMES = [f[0] for f in FAMILIES]


def _model(name):
    _, cls, make_config, attn, _ = FAMILIES[NAMES.index(name)]
    config = make_config()
    config._attn_implementation = attn  # the models without attention accept "eager"
    torch.manual_seed(0)
    return cls(config).eval()


def _triples(seed=0):
    """Long prompts, so the token ratio alone would pack them (shared_prompt.MAX_TOKEN_RATIO)."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    return [(ids(30), ids(12), ids(9)), (ids(26), ids(7), ids(14))]


def _apart(model, triples):
    seqs = collate_sequences([(x, y) for x, y, _ in triples] + [(x, g) for x, _, g in triples], PAD)
    logps = sequence_logprobs(model, seqs.input_ids, seqs.attention_mask, seqs.response_mask, chunk_size=16)
    return logps[:len(triples)], logps[len(triples):]


@pytest.mark.parametrize("name", NAMES)
def test_each_family_scores_exactly_and_packs_only_if_listed(name):
    """What scoring and the player's step compute (`pair_logprobs`), by the rules alone and again after the setup
    probe on one real pair, against x+y and x+y' scored apart (ALiBi, local windows and recurrent layers used to
    be packed, off by 1e-4 to 2 nats, or crashed). Listed families pack and the probe measured float rounding;
    the others are refused by the allowlist without a packed forward."""
    packs = FAMILIES[NAMES.index(name)][4]
    model, triples = _model(name), _triples()
    with torch.no_grad():
        want = _apart(model, triples)
        before_probe = pair_logprobs(model, triples, PAD, chunk_size=16)
    for got, w in zip(before_probe, want):
        assert torch.allclose(got, w, rtol=0, atol=1e-5), (name, (got - w).abs().max().item())

    from frugal_spin.shared_prompt import packs_pairs, probe_packing, probe_triple

    decision = probe_packing(model, probe_triple([(x, y) for x, y, _ in triples]), PAD, chunk_size=16)
    assert decision.packed is packs and packs_pairs(model, triples) is packs, decision
    if packs:
        assert decision.reason == "on" and decision.probe_difference_per_token <= decision.tolerance_per_token
    else:
        assert decision.reason.startswith("allowlist miss") and decision.probe_difference_per_token is None
    with torch.no_grad():
        after_probe = pair_logprobs(model, triples, PAD, chunk_size=16)
    assert all(torch.allclose(got, w, rtol=0, atol=1e-5) for got, w in zip(after_probe, want))


def _let_the_rules_through(monkeypatch):
    """As if the allowlist named every architecture: only the probe stands between a model and packing."""
    from frugal_spin import shared_prompt
    from frugal_spin.packing_rules import PackingRule

    monkeypatch.setattr(shared_prompt, "packing_rule", lambda config: PackingRule())


@pytest.mark.parametrize("name", ["mpt", "gpt_neo-local", "rwkv", "zamba2", "mamba2"])
def test_the_probe_catches_an_architecture_listed_by_mistake(name, monkeypatch):
    """If the allowlist named a leaking architecture, the probe's comparison on one real pair still keeps the two
    sequences, and says by how much the layouts differed."""
    from frugal_spin.shared_prompt import packs_pairs, probe_packing, probe_triple

    model, triples = _model(name), _triples(2)
    _let_the_rules_through(monkeypatch)
    decision = probe_packing(model, probe_triple([(x, y) for x, y, _ in triples]), PAD, chunk_size=16)
    assert not decision.packed and decision.reason.startswith("probe difference"), decision
    assert decision.probe_difference_per_token > 10 * decision.tolerance_per_token
    assert not packs_pairs(model, triples)


def test_a_packed_forward_that_raises_means_two_sequences(monkeypatch):
    """Bloom rejects the 4D mask: listed by mistake, the probe records the error and packing stays off."""
    from frugal_spin.shared_prompt import probe_packing, probe_triple, shares_prompt

    model, triples = _model("bloom"), _triples(3)
    _let_the_rules_through(monkeypatch)
    assert shares_prompt(model)
    decision = probe_packing(model, probe_triple([(x, y) for x, y, _ in triples]), PAD, chunk_size=16)
    assert not decision.packed and decision.reason.startswith("probe error") and not shares_prompt(model)


def test_scoring_and_the_first_training_step_follow_one_decision(monkeypatch):
    """The opponent cache (`score_pairs`) and the player's step (`spin_step_fn`) read the probe's verdict from the
    model: with packing refused both run two sequences, so at the player's first step (the opponent's weights)
    the two numbers are equal bit for bit: SPIN loss exactly log 2, margin exactly 0."""
    from frugal_spin.scoring import score_pairs
    from frugal_spin.shared_prompt import pair_tokens, probe_packing, probe_triple
    from frugal_spin.train import spin_step_fn

    model, triples = _model("mpt"), _triples(4)
    _let_the_rules_through(monkeypatch)
    assert not probe_packing(model, probe_triple([(x, y) for x, y, _ in triples]), PAD, chunk_size=16).packed
    real, generated = score_pairs(model, triples, pad_id=PAD, batch_size=len(triples), chunk_size=16)
    with torch.no_grad():
        want_real, want_generated = _apart(model, triples)
    assert torch.equal(real, want_real) and torch.equal(generated, want_generated)
    prompts, reals, gens = (list(t) for t in zip(*triples))
    step = spin_step_fn(model, prompts, reals, gens, real, generated, beta=0.1, pad_id=PAD, chunk_size=16,
                        device=torch.device("cpu"))
    with torch.no_grad():
        out = step(list(range(len(triples))))
    assert out.metrics["reward_margin"] == 0.0 and out.loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert out.tokens == pair_tokens(triples, shared=False)


def test_the_decision_travels_with_the_model_through_peft():
    """The run's model is a peft wrapper: the verdict is kept on the base model, which both see."""
    from frugal_spin.config import LoraSection
    from frugal_spin.model import attach_lora
    from frugal_spin.shared_prompt import PackingDecision, packing_decision, probe_packing, probe_triple

    model = attach_lora(_model("llama").train(), LoraSection(r=4, alpha=8))
    triples = _triples(5)
    decision = probe_packing(model, probe_triple([(x, y) for x, y, _ in triples]), PAD, chunk_size=16)
    assert decision.packed and model.training  # the probe restores training mode
    assert packing_decision(model) is decision and packing_decision(model.get_base_model()) is decision
    assert decision.record() == {"packed": True, "reason": "on",
                                 "probe_difference_per_token": decision.probe_difference_per_token,
                                 "tolerance_per_token": 1e-5}
    assert packing_decision(_model("rwkv")) == PackingDecision(
        False, "allowlist miss: model type 'rwkv' is not known to be exact packed")


def test_probe_pair_takes_the_longest_real_rows():
    from frugal_spin.shared_prompt import probe_triple

    rows = [([1], [2, 3]), ([4, 5, 6], [7]), ([8], [9, 10, 11, 12])]
    assert probe_triple(rows) == ([8], [9, 10, 11, 12], [2, 3])  # longest row; longest answer of another row
    assert probe_triple(rows[:1]) == ([1], [2, 3], [2, 3])
    with pytest.raises(ValueError):
        probe_triple([])


# (config.json fields, refuses a 5,000-token pair, refuses a 100-token pair): the rules read raw config.json
# dicts (the planner) exactly as they read transformers config objects (the run).
RULES = [
    ({"model_type": "llama"}, False, False),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, False, False),
    ({"model_type": "llama", "rope_scaling": {"type": "dynamic", "factor": 2.0}}, True, True),
    ({"model_type": "phi3", "rope_scaling": {"type": "longrope"}}, True, True),
    # Qwen2.5's config.json names a window it does not use.
    ({"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False}, False, False),
    ({"model_type": "mistral", "sliding_window": 4096}, True, False),
    ({"model_type": "qwen3", "layer_types": ["full_attention", "linear_attention"]}, True, True),
    ({"model_type": "falcon", "alibi": True}, True, True),
    ({"model_type": "falcon", "alibi": False}, False, False),
    ({"model_type": "mpt"}, True, True),
    ({"model_type": "lfm2"}, True, True),
    ({}, True, True),
]


@pytest.mark.parametrize("config, refuses_long, refuses_short", RULES)
def test_packing_rule_of_config_json(config, refuses_long, refuses_short):
    from frugal_spin.packing_rules import packing_rule

    rule = packing_rule(config)
    assert (rule.refuses(5000) is not None, rule.refuses(100) is not None) == (refuses_long, refuses_short)


@pytest.mark.parametrize("model_type, packs", [("llama", True), ("qwen2", True), ("lfm2", False), ("jamba", False),
                                               ("some_new_arch", False)])
def test_the_planner_follows_the_same_decision(tmp_path, model_type, packs):
    """The planner sizes a CPU SPIN step as one packed sequence only for an architecture the run would pack; an
    unknown or leaking one (with a Llama-like config.json the planner can read) is planned as two sequences."""
    import json

    from frugal_spin.config import Recipe
    from frugal_spin.planner import estimate, resolve_model_shape

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": model_type, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": VOCAB, "max_position_embeddings": 512}))
    recipe = Recipe()
    recipe.data.max_prompt_tokens, recipe.data.max_answer_tokens, recipe.generation.max_new_tokens = 200, 100, 100
    plan = estimate(recipe, resolve_model_shape(str(tmp_path)), device="cpu")
    score = next(s for s in plan.stages if s.name == "score")
    assert score.notes.endswith(f"x {400 if packs else 300} tokens")


def test_only_a_refusal_on_a_model_earlier_versions_packed_changes_the_base_fingerprint():
    """Runs whose pair layout is unchanged keep their fingerprints (and so their finished stages); a model the guard
    now refuses, whose caches earlier versions scored packed (wrongly), gets a new one, so they are redone."""
    from frugal_spin.context import packing_identity
    from frugal_spin.shared_prompt import PackingDecision

    assert packing_identity(PackingDecision(True, "on", 1e-7, 1e-5)) == ()
    assert packing_identity(PackingDecision(False, "not on the CPU (cuda: pairs are packed only where it is tested)")) == ()
    assert packing_identity(PackingDecision(False, "attention implementation 'flash_attention_2' takes no 4D mask")) == ()
    refused = packing_identity(PackingDecision(False, "allowlist miss: mpt with ALiBi (positions not set by position ids)"))
    probed = packing_identity(PackingDecision(False, "probe difference: 3.5e-03 nats per token", 3.5e-3, 1e-5))
    assert refused and probed and refused != probed
    # the measured difference is not part of it: a rerun whose probe differs by rounding keeps its stages
    assert probed == packing_identity(PackingDecision(False, "probe difference: 3.6e-03 nats per token", 3.6e-3, 1e-5))
