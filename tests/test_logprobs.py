"""Parity, gradient and memory tests for frugal_spin.logprobs (CPU, tiny shapes, tiny random models)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from frugal_spin.errors import UserError
from frugal_spin.logprobs import (
    chunked_token_logprobs,
    decoder_and_head,
    reference_token_logprobs,
    response_logprobs_from_hidden,
    response_mask_from_lengths,
    sequence_logprobs,
    sequence_logprobs_and_counts,
)

VOCAB = 301  # odd on purpose


# ---------------------------------------------------------------- helpers


def _head_inputs(n, v, h, dtype=torch.float32, weight_dtype=None, bias=True, weight_grad=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype).requires_grad_()
    # Scale so logits have std ~1.5: realistic spread, large enough for the softmax to be far from uniform.
    weight = (torch.randn(v, h, generator=gen) * 1.5 / h**0.5).to(weight_dtype or dtype).requires_grad_(weight_grad)
    b = (torch.randn(v, generator=gen) * 0.5).to(weight_dtype or dtype).requires_grad_(weight_grad) if bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    upstream = torch.randn(n, generator=gen)  # a non-uniform dL/dout, so grad scaling per row is exercised
    return hidden, weight, b, targets, upstream


def _values_and_grads(fn, hidden, weight, bias, targets, upstream, **kw):
    out = fn(hidden, weight, targets, bias, **kw)
    inputs = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, inputs, upstream, allow_unused=True) if out.numel() else [None] * len(inputs)
    return out, grads


class _LargestAllocation(TorchDispatchMode):
    """Records every op called and every freshly allocated output (views and in-place results share an input's
    storage: skipped)."""

    def __init__(self):
        super().__init__()
        self.shapes = []
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        storages = {a.untyped_storage().data_ptr() for a in inputs}
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in storages:
                self.shapes.append(tuple(o.shape))
        return out

    def max_numel(self, last_dim=None):
        sizes = [torch.Size(s).numel() for s in self.shapes if last_dim is None or (s and s[-1] == last_dim)]
        return max(sizes, default=0)


def _tiny_llama(tie=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).float()
    # Random init gives near-uniform predictions; larger head weights make log-probs vary between tokens.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


def _right_padded_batch(lengths=(17, 9, 12), prompts=(5, 3, 1), seq_len=19, seed=1):
    gen = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    input_ids = torch.randint(3, VOCAB, (batch, seq_len), generator=gen)
    total = torch.tensor(lengths)
    attention_mask = (torch.arange(seq_len)[None] < total[:, None]).long()
    input_ids[attention_mask == 0] = 0  # pad id; must not matter
    response_mask = response_mask_from_lengths(torch.tensor(prompts), total, seq_len)
    return input_ids, attention_mask, response_mask


def _plain_sequence_logprobs(model, input_ids, attention_mask, response_mask):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, input_ids[:, 1:, None]).squeeze(2)
    return (logps * response_mask[:, 1:]).sum(dim=1)


def _assert_grads_close(got, ref, names=None):
    """max |got - ref| <= 1e-5 x max(1, max |ref|) per tensor.

    Scaled by the gradient's size because the two paths sum in different orders: LoRA grads of a tiny Llama reach
    ~60 here, where fp32 rounding alone is ~5e-5 (each path is ~5e-6 relative from a float64 run).
    """
    names = names or [str(i) for i in range(len(ref))]
    for name, g, r in zip(names, got, ref):
        assert g is not None and g.shape == r.shape, name
        scale = max(1.0, r.abs().max().item())
        err = (g - r).abs().max().item()
        assert err <= 1e-5 * scale, f"{name}: max abs diff {err:.3g} > 1e-5 x {scale:.3g}"


def _trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------- chunked vs reference


@pytest.mark.parametrize(
    "n,v,h,chunk",
    [
        (37, 1000, 24, 8),  # N not a multiple of the chunk
        (64, 1000, 24, 16),  # exact multiple
        (5, 1001, 24, 64),  # chunk larger than N, odd V
        (1, 1000, 16, 4),
        (0, 1000, 16, 8),
        (3, 151_936, 16, 2),  # Qwen2.5 vocabulary
    ],
)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_chunked_matches_reference_fp32(n, v, h, chunk, bias, weight_grad):
    args = _head_inputs(n, v, h, bias=bias, weight_grad=weight_grad)
    ref, ref_grads = _values_and_grads(reference_token_logprobs, *args)
    got, got_grads = _values_and_grads(chunked_token_logprobs, *args, chunk_size=chunk)
    assert got.dtype == torch.float32 and got.shape == (n,)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(got_grads, ref_grads):
        if n == 0:
            continue
        assert g is not None and g.dtype == r.dtype
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_chunked_empty_input_backward_gives_zero_grads():
    hidden, weight, bias, targets, _ = _head_inputs(0, 50, 8)
    out = chunked_token_logprobs(hidden, weight, targets, bias, chunk_size=4)
    (out.sum() + 0 * hidden.sum()).backward()
    assert out.shape == (0,)
    assert hidden.grad.shape == (0, 8)
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(bias.grad, torch.zeros_like(bias))


def test_frozen_head_gets_no_grad():
    hidden, weight, bias, targets, _ = _head_inputs(9, 100, 8, weight_grad=False)
    chunked_token_logprobs(hidden, weight, targets, bias, chunk_size=4).sum().backward()
    assert hidden.grad is not None and weight.grad is None and bias.grad is None


@pytest.mark.parametrize(
    "dtype,weight_dtype,atol",
    [
        # Half heads round each logit once to the head dtype (as the model's own .logits do): a few ulps at |z| ~ 5.
        (torch.float16, torch.float16, 4e-3),
        (torch.bfloat16, torch.bfloat16, 2e-2),
        # fp32 head with half activations: logits are exact fp32 products, so fp32-level agreement on values.
        (torch.bfloat16, torch.float32, 1e-5),
    ],
)
def test_chunked_half_precision(dtype, weight_dtype, atol):
    args = _head_inputs(29, 1000, 32, dtype=dtype, weight_dtype=weight_dtype)
    ref, ref_grads = _values_and_grads(reference_token_logprobs, *args)
    got, got_grads = _values_and_grads(chunked_token_logprobs, *args, chunk_size=8)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=atol, rtol=0)
    for g, r, t in zip(got_grads, ref_grads, (args[0], args[1], args[2])):
        assert g.dtype == t.dtype  # gradients come back in the input dtypes
        # Within two units of the returned dtype's precision, relative to the gradient's scale.
        eps = torch.finfo(g.dtype).eps
        torch.testing.assert_close(g.float(), r.float(), rtol=2 * eps, atol=2 * eps * r.float().abs().max().item())


def test_chunked_rejects_bad_arguments():
    hidden, weight, bias, targets, _ = _head_inputs(4, 10, 8)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_logprobs(hidden, weight, targets, bias, chunk_size=0)
    with pytest.raises(ValueError, match="hidden"):
        chunked_token_logprobs(hidden, weight[:, :7], targets)
    with pytest.raises(ValueError, match="targets"):
        chunked_token_logprobs(hidden, weight, targets.int())


# ---------------------------------------------------------------- memory


def _saved_shapes(fn, *args, **kw):
    shapes = []

    def pack(t):
        shapes.append((tuple(t.shape), t.data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args, **kw)
    return shapes


@pytest.mark.parametrize("weight_grad", [False, True])
def test_no_logits_saved_for_backward(weight_grad):
    n, v, h = 40, 1000, 16
    hidden, weight, bias, targets, _ = _head_inputs(n, v, h, weight_grad=weight_grad)
    chunked = _saved_shapes(chunked_token_logprobs, hidden, weight, targets, bias, chunk_size=8)
    reference = _saved_shapes(reference_token_logprobs, hidden, weight, targets, bias)

    head = {weight.data_ptr(), bias.data_ptr()}

    def has_logits(shapes):  # any saved tensor with a vocabulary axis, other than the head's own parameters
        return any(v in shape and ptr not in head for shape, ptr in shapes)

    assert has_logits(reference)  # the check does see [N, V] logits when they are kept
    assert not has_logits(chunked)
    assert sum(torch.Size(s).numel() for s, p in chunked if p not in head) <= n * h + 2 * n


def _track_fwd_bwd(fn, n, v=1000, h=32, weight_grad=False, grad=True, **kw):
    hidden, weight, bias, targets, upstream = _head_inputs(n, v, h, weight_grad=weight_grad)
    with _LargestAllocation() as tracker, torch.set_grad_enabled(grad):
        out = fn(hidden, weight, targets, bias, **kw)
        if grad:
            torch.autograd.grad(out, [t for t in (hidden, weight, bias) if t.requires_grad], upstream)
    return tracker


@pytest.mark.parametrize("weight_grad", [False, True])
def test_transient_memory_does_not_grow_with_n(weight_grad):
    chunk, v, h = 16, 1000, 32
    small = _track_fwd_bwd(chunked_token_logprobs, 4 * chunk, v, h, weight_grad, chunk_size=chunk).max_numel()
    large = _track_fwd_bwd(chunked_token_logprobs, 16 * chunk + 3, v, h, weight_grad, chunk_size=chunk).max_numel()
    # A trainable head's gradient [V, H] is the one allocation allowed to exceed a chunk of logits.
    assert small == large == (max(chunk * v, v * h) if weight_grad else chunk * v)
    # The tracker sees the reference's full logits, so the equality above is not vacuous.
    assert _track_fwd_bwd(reference_token_logprobs, 16 * chunk + 3, v, h).max_numel() >= (16 * chunk + 3) * v


@pytest.mark.parametrize(
    "weight_grad,grad,expected",
    [
        (False, False, 1),  # scoring under no_grad: forward only
        (False, True, 2),  # frozen head: forward + eager d hidden, nothing recomputed in backward
        (True, True, 4),  # trainable head: forward, then recompute + d hidden + d weight
    ],
)
def test_head_matmuls_per_chunk(weight_grad, grad, expected):
    chunk, n = 16, 16 * 3 + 5
    ops = _track_fwd_bwd(chunked_token_logprobs, n, weight_grad=weight_grad, grad=grad, chunk_size=chunk).ops
    assert sum(op in ("mm", "addmm", "addmm_") for op in ops) == expected * 4


# ---------------------------------------------------------------- masks and batch contract


def test_response_mask_from_lengths_by_hand():
    mask = response_mask_from_lengths(torch.tensor([2, 1, 3]), torch.tensor([4, 5, 3]), 5)
    expected = torch.tensor(
        [
            [0, 0, 1, 1, 0],
            [0, 1, 1, 1, 1],
            [0, 0, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    with pytest.raises(ValueError):
        response_mask_from_lengths(torch.tensor([0]), torch.tensor([3]), 5)
    with pytest.raises(ValueError):
        response_mask_from_lengths(torch.tensor([2]), torch.tensor([6]), 5)


def test_response_logprobs_from_hidden_by_hand():
    # V = 2, H = 1, weight = [[1], [-1]]: logits at hidden x are (x, -x), log p(0) = -log(1 + e^(-2x)).
    hidden = torch.tensor([[[0.5], [1.0], [2.0], [9.0]]])
    weight = torch.tensor([[1.0], [-1.0]])
    input_ids = torch.tensor([[1, 0, 1, 0]])
    response_mask = torch.tensor([[False, False, True, True]])
    sums, counts = response_logprobs_from_hidden(hidden, weight, None, input_ids, response_mask, chunk_size=1)
    # token 1 at t=2 from hidden 1.0: log p(1) = -log(1 + e^2); token 0 at t=3 from hidden 2.0: -log(1 + e^-4)
    expected = -torch.log1p(torch.exp(torch.tensor(2.0))) - torch.log1p(torch.exp(torch.tensor(-4.0)))
    torch.testing.assert_close(sums, expected[None])
    assert counts.tolist() == [2]


@pytest.mark.parametrize(
    "case,match",
    [("left_pad", "right-padded"), ("gap", "right-padded"), ("position0", "position 0"), ("on_pad", "inside")],
)
def test_batch_contract_violations_raise(case, match):
    model = _tiny_llama()
    input_ids, attention_mask, response_mask = _right_padded_batch()
    if case == "left_pad":
        attention_mask = attention_mask.flip(1)
    elif case == "gap":
        attention_mask[0, 3] = 0
    elif case == "position0":
        response_mask[0, 0] = True
    else:
        response_mask[1, -1] = True
    with pytest.raises(ValueError, match=match):
        sequence_logprobs(model, input_ids, attention_mask, response_mask)


# ---------------------------------------------------------------- whole model


@pytest.mark.parametrize("tie", [False, True])
def test_sequence_logprobs_matches_full_logits(tie):
    model = _tiny_llama(tie=tie)
    batch = _right_padded_batch()
    ref = _plain_sequence_logprobs(model, *batch)
    ref_grads = torch.autograd.grad(ref.sum(), [p for _, p in _trainable(model)])
    got, counts = sequence_logprobs_and_counts(model, *batch, chunk_size=7)
    got_grads = torch.autograd.grad(got.sum(), [p for _, p in _trainable(model)])
    assert got.dtype == torch.float32 and counts.tolist() == [12, 6, 11]
    assert ref.abs().min() > 1.0  # non-trivial numbers
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    _assert_grads_close(got_grads, ref_grads, [name for name, _ in _trainable(model)])


def _lora(model, **kw):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, **kw)
    return get_peft_model(model, config)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_sequence_logprobs_through_lora(checkpointing):
    model = _lora(_tiny_llama())
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    batch = _right_padded_batch()
    params = [p for _, p in _trainable(model)]
    assert params and all("lora_" in n for n, _ in _trainable(model))

    got = _assert_parity_with_plain(model, batch, params, chunk_size=5)
    with torch.no_grad(), model.disable_adapter():
        without_lora = sequence_logprobs(model, *batch)
    assert (without_lora - got).abs().max() > 1e-2  # the adapter changes the numbers, so it was applied


def test_model_path_never_allocates_full_logits():
    model = _lora(_tiny_llama())
    input_ids, attention_mask, response_mask = _right_padded_batch()
    chunk = 4
    with _LargestAllocation() as ours:
        sequence_logprobs(model, input_ids, attention_mask, response_mask, chunk_size=chunk).sum().backward()
    with _LargestAllocation() as plain:
        _plain_sequence_logprobs(model, input_ids, attention_mask, response_mask).sum().backward()
    assert ours.max_numel(last_dim=VOCAB) == chunk * VOCAB
    assert plain.max_numel(last_dim=VOCAB) >= input_ids.numel() * VOCAB


# ---------------------------------------------------------------- unsupported heads


def test_softcapped_head_is_refused():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, final_logit_softcapping=30.0,
    )
    with pytest.raises(UserError, match="final_logit_softcapping"):
        decoder_and_head(Gemma2ForCausalLM(config))


def test_scaled_head_is_refused():
    from transformers import CohereConfig, CohereForCausalLM

    config = CohereConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1,
    )
    with pytest.raises(UserError, match="logit_scale"):
        decoder_and_head(CohereForCausalLM(config))


def test_lora_on_lm_head_is_refused():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(UserError, match="plain torch.nn.Linear"):
        decoder_and_head(model)


# ---------------------------------------------------------------- 4-bit base


def test_four_bit_base_with_lora(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    _tiny_llama().save_pretrained(tmp_path)
    model = LlamaForCausalLM.from_pretrained(
        tmp_path,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
        device_map="cpu",
        dtype=torch.float32,
    )
    # See DESIGN.md: on AVX512-BF16 CPUs an eval forward repacks Linear4bit weights and later backward passes drop
    # gradients unless this is off.
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    assert type(model.lm_head) is torch.nn.Linear  # bitsandbytes leaves the head unquantized
    model = _lora(model)
    batch = _right_padded_batch()
    params = [p for _, p in _trainable(model)]

    _assert_parity_with_plain(model, batch, params, chunk_size=6)


def test_peak_live_memory_holds_one_chunk_of_logits():
    """Not just the largest single allocation: the bytes alive at once. Two [chunk, V] buffers alive together
    (an alias kept across chunks) once doubled the head's transient memory."""
    from frugal_spin.profiler import peak_live_tensor_bytes

    chunk, v, h, n = 64, 20_000, 32, 64 * 4 + 5
    hidden, weight, bias, targets, upstream = _head_inputs(n, v, h, weight_grad=False)

    def forward_backward():
        out = chunked_token_logprobs(hidden, weight, targets, None, chunk_size=chunk)
        torch.autograd.grad(out, [hidden], upstream)

    one_buffer = chunk * v * 4
    peak = peak_live_tensor_bytes(forward_backward)
    assert one_buffer <= peak < 1.5 * one_buffer, (peak, one_buffer)


def _assert_parity_with_plain(model, batch, params, chunk_size):
    """sequence_logprobs and its gradients on `params` equal the plain full-logits path; returns its values."""
    ref = _plain_sequence_logprobs(model, *batch)
    ref_grads = torch.autograd.grad(ref.sum(), params)
    got = sequence_logprobs(model, *batch, chunk_size=chunk_size)
    got_grads = torch.autograd.grad(got.sum(), params)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    _assert_grads_close(got_grads, ref_grads)
    return got
