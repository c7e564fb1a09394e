"""Shared-prompt pairs (shared_prompt.py): x+y+y' in one sequence gives the log-probs and LoRA gradients of x+y and
x+y' scored apart, for both attention implementations that take a custom mask."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from frugal_spin.config import LoraSection
from frugal_spin.data import collate_sequences
from frugal_spin.logprobs import sequence_logprobs
from frugal_spin.model import attach_lora
from frugal_spin.shared_prompt import collate_shared_prompt, pair_logprobs, shared_prompt_logprobs, shares_prompt

PAD = 0


def _model(attn: str, sliding_window=None):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         attn_implementation=attn)
    if sliding_window is not None:
        config.sliding_window = sliding_window
    base = LlamaForCausalLM(config)
    torch.manual_seed(1)
    model = attach_lora(base, LoraSection(r=4, alpha=8))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def _triples(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(1, 97, (n,), generator=g).tolist()  # noqa: E731
    # different prompt, real and generated lengths, one empty generated answer (an all-cut pair)
    return [(ids(5), ids(7), ids(3)), (ids(9), ids(2), ids(11)), (ids(3), ids(6), []), (ids(12), ids(1), ids(1))]


def _apart(model, triples):
    seqs = collate_sequences([(x, y) for x, y, _ in triples] + [(x, g) for x, _, g in triples], PAD)
    logps = sequence_logprobs(model, seqs.input_ids, seqs.attention_mask, seqs.response_mask, chunk_size=16)
    return logps[:len(triples)], logps[len(triples):]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_logprobs_equal_the_two_sequences(attn):
    model = _model(attn)
    model.eval()
    triples = _triples()
    assert shares_prompt(model)
    with torch.no_grad():
        real, gen = shared_prompt_logprobs(model, triples, PAD, chunk_size=16)
        want_real, want_gen = _apart(model, triples)
    assert torch.allclose(real, want_real, atol=1e-5) and torch.allclose(gen, want_gen, atol=1e-5)
    assert gen[2].item() == 0.0  # no generated token, nothing summed


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prompt_gradients_equal_the_two_sequences(checkpointing):
    model = _model("sdpa")
    if checkpointing:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    triples = _triples(1)
    grads = []
    for fn in (lambda: shared_prompt_logprobs(model, triples, PAD, chunk_size=16), lambda: _apart(model, triples)):
        model.zero_grad()
        real, gen = fn()
        (real.sum() - 0.5 * gen.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6), name


def test_the_generated_answer_never_sees_the_real_one():
    model = _model("sdpa")
    model.eval()
    triples = _triples(2)
    changed = [(x, [(t % 96) + 1 for t in y], g) for x, y, g in triples]
    with torch.no_grad():
        _, gen = shared_prompt_logprobs(model, triples, PAD, chunk_size=16)
        real_changed, gen_changed = shared_prompt_logprobs(model, changed, PAD, chunk_size=16)
        real, _ = shared_prompt_logprobs(model, triples, PAD, chunk_size=16)
    assert torch.equal(gen, gen_changed)
    assert (real - real_changed).abs().max() > 1e-3  # the real answers did change


def test_layout():
    batch = collate_shared_prompt([([5, 6], [7, 8, 9], [10])], PAD)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 10]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 2]]
    assert batch.allowed[0, 5].tolist() == [True, True, False, False, False, True]
    assert batch.predictors.tolist() == [1, 2, 3, 1] and batch.targets.tolist() == [2, 3, 4, 5]
    assert batch.outputs.tolist() == [0, 0, 0, 1]
    with pytest.raises(ValueError, match="empty prompt"):
        collate_shared_prompt([([], [1], [2])], PAD)


def test_falls_back_where_the_mask_would_be_wrong():
    """A sliding window shorter than the packed pair, or an attention implementation without custom masks,
    scores the two sequences apart, with the same numbers."""
    triples = _triples(3)
    windowed = _model("sdpa", sliding_window=8)
    assert not shares_prompt(windowed, longest=30) and shares_prompt(windowed, longest=8)
    windowed.eval()
    with torch.no_grad():
        got, want = pair_logprobs(windowed, triples, PAD, 16), _apart(windowed, triples)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    model = _model("sdpa")
    model.get_base_model().config._attn_implementation = "flash_attention_2"
    assert not shares_prompt(model)


def test_pairs_are_packed_only_where_it_cuts_the_tokens():
    """A short prompt saves too little to pay for leaving SDPA's causal fast path: those pairs run as two
    sequences, with exactly the two-sequence numbers; a long prompt is packed. The planner uses the same ratio."""
    from frugal_spin.planner import PACKED_PAIR_TOKEN_RATIO
    from frugal_spin.shared_prompt import MAX_TOKEN_RATIO, packs_pairs

    assert PACKED_PAIR_TOKEN_RATIO == MAX_TOKEN_RATIO
    model = _model("sdpa")
    model.eval()
    short_prompt = [([5], list(range(10, 30)), list(range(40, 60)))]  # 41 tokens packed against 2 x 21
    long_prompt = [(list(range(1, 31)), list(range(31, 41)), list(range(41, 51)))]  # 50 against 2 x 40
    assert not packs_pairs(model, short_prompt) and packs_pairs(model, long_prompt)
    with torch.no_grad():
        got, want = pair_logprobs(model, short_prompt, PAD, 16), _apart(model, short_prompt)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
