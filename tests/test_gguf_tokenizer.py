"""GGUF tokenizer fidelity (gguf_tokenizer.py) and the conversion's self-checks (gguf_import.py), on tiny GGUF files
written here with the gguf package: a 1-layer llama with a 268-token byte-level BPE vocabulary whose merges make the
`smollm` pre-tokenizer (digits split off first) and GPT-2's differ on digits after spaces.

No download: the real SmolLM2 file is checked in test_real_model.py."""

from __future__ import annotations

import json

import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package (extra frugal_spin[gguf]) writes the test files")

from frugal_spin import gguf_import  # noqa: E402
from frugal_spin.errors import UserError  # noqa: E402

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ Ġ", "Ġ t", "h e", "Ġt he", "1 2", "Ġ 1", "a b"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_alphabet() -> list[str]:
    """GPT-2's byte spelling, written out here independently of the module under test."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    out, extra = [], 0
    for b in range(256):
        out.append(chr(b) if b in keep else chr(256 + extra))
        extra += b not in keep
    return out


def tokens() -> list[str]:
    merged = [m.replace(" ", "") for m in MERGES]
    return SPECIAL + byte_alphabet() + [t for t in merged if t not in byte_alphabet()]


def write_tiny_gguf(path, pre="smollm", seed=0, add_bos=False):
    import numpy as np

    vocab = tokens()
    hidden, heads, kv_heads, inter = 16, 2, 1, 32
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(vocab))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(vocab)
    writer.add_token_types([3] * len(SPECIAL) + [1] * (len(vocab) - len(SPECIAL)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    kv = hidden // heads * kv_heads
    tensors = {"token_embd.weight": w(len(vocab), hidden), "output_norm.weight": 1 + w(hidden),
               "blk.0.attn_norm.weight": 1 + w(hidden), "blk.0.ffn_norm.weight": 1 + w(hidden),
               "blk.0.attn_q.weight": w(hidden, hidden), "blk.0.attn_k.weight": w(kv, hidden),
               "blk.0.attn_v.weight": w(kv, hidden), "blk.0.attn_output.weight": w(hidden, hidden),
               "blk.0.ffn_gate.weight": w(inter, hidden), "blk.0.ffn_up.weight": w(inter, hidden),
               "blk.0.ffn_down.weight": w(hidden, inter)}
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory):
    return gguf_import.converted_dir(tiny_gguf, cache_root=tmp_path_factory.mktemp("cache"))


# Worked by hand from MERGES (rank = position) with llama.cpp's `smollm` rules: every digit is its own piece first,
# then GPT-2's regex; inside a piece the lowest-ranked adjacent pair merges first. GPT-2's regex alone (what
# transformers' conversion used) gives the second column where it differs.
CASES = [
    ("a  1", ["a", "ĠĠ", "1"], ["a", "Ġ", "Ġ1"]),  # smollm: "a  " | "1"; GPT-2: "a" | " " | " 1"
    ("x 12", ["x", "Ġ", "1", "2"], ["x", "Ġ", "12"]),  # GPT-2: " 12" is one piece, and "1 2" (rank 4) beats "Ġ 1"
    ("the 12", ["t", "he", "Ġ", "1", "2"], ["t", "he", "Ġ", "12"]),
    (" the", ["Ġthe"], None),  # Ġ t h e -> Ġt h e -> Ġt he -> Ġthe
    ("ab12ab", ["ab", "1", "2", "ab"], ["ab", "12", "ab"]),
    ("é!", ["Ã", "©", "!"], None),  # U+00E9 is the bytes C3 A9
    ("<|im_start|>user\n 1<|im_end|>", ["<|im_start|>", "u", "s", "e", "r", "Ċ", "Ġ", "1", "<|im_end|>"],
     ["<|im_start|>", "u", "s", "e", "r", "Ċ", "Ġ1", "<|im_end|>"]),  # smollm: "\n " stays one piece before "1"
]


@pytest.mark.parametrize("text,want,_gpt2", CASES, ids=[c[0] for c in CASES])
def test_reference_tokenizer_follows_llama_cpp_smollm_rules(tiny_gguf, text, want, _gpt2):
    from frugal_spin.gguf_tokenizer import ReferenceTokenizer, read_vocab

    reference = ReferenceTokenizer(read_vocab(tiny_gguf))
    assert [reference.vocab.tokens[i] for i in reference.encode(text)] == want


@pytest.mark.parametrize("text,want,_gpt2", CASES, ids=[c[0] for c in CASES])
def test_converted_tokenizer_splits_digits_like_the_gguf(converted, text, want, _gpt2):
    """The saved tokenizer encodes as llama.cpp and the original tokenizer.json do (failed before the fix, where
    transformers' GPT-2 fallback gave the `_gpt2` column)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(converted))
    assert tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"]) == want
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_gpt2_column_is_what_transformers_alone_gives(tiny_gguf):
    """The second column above is real: transformers' own GGUF conversion (without the fix) encodes so."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    for text, want, gpt2 in CASES:
        assert tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"]) == (gpt2 or want), text


def test_conversion_records_its_checks(converted):
    from frugal_spin.gguf_tokenizer import PROBE_TEXTS

    info = json.loads((converted / gguf_import.INFO).read_text())
    assert info["conversion_version"] == gguf_import.CONVERSION_VERSION
    assert info["tokenizer_pre"] == "smollm" and info["pre_tokenizer_fixed"] is True
    assert info["tokenizer_check"].startswith(f"{len(PROBE_TEXTS)} probe texts and the probe chat encode as")
    assert info["weights"] == "bitwise equal to the GGUF-loaded model"
    assert info["probe_max_abs_logit_diff"] == 0.0 and info["probe_threads"] == 1


def test_tokenizer_mismatch_fails_the_conversion_naming_the_text(tiny_gguf, tmp_path, monkeypatch):
    """Without the fix the self-check sees the difference (it compares with the file's own rules, not with the
    converted tokenizer itself) and publishes nothing."""
    from frugal_spin import gguf_tokenizer

    monkeypatch.setattr(gguf_tokenizer, "fixed_pre_tokenizer", lambda pre: None)
    with pytest.raises(UserError) as err:
        gguf_import.converted_dir(tiny_gguf, cache_root=tmp_path / "cache", what="model.name x.gguf")
    message = str(err.value)
    assert "\n" not in message and message.startswith("model.name x.gguf: the tokenizer converted from")
    assert "encodes 'a  1' differently" in message and "'ĠĠ 1'" in message and "not cached" in message
    assert not [p for p in (tmp_path / "cache").iterdir()]


def test_unknown_pre_tokenizer_is_converted_with_a_warning(tmp_path, capsys):
    path = write_tiny_gguf(tmp_path / "other.gguf", pre="deepseek-coder")
    target = gguf_import.converted_dir(path, cache_root=tmp_path / "cache")
    info = json.loads((target / gguf_import.INFO).read_text())
    assert info["tokenizer_check"] == "not checked: tokenizer.ggml.pre 'deepseek-coder' has no reference rules here"
    assert "is not checked against the file" in capsys.readouterr().err


def test_a_conversion_by_an_older_version_is_rebuilt(tiny_gguf, converted, tmp_path, monkeypatch):
    """A cached directory without the current `conversion_version` (the tokenizer of the old code) is replaced; a
    current one is reused without converting."""
    import shutil

    cache = tmp_path / "cache"
    target = cache / converted.name
    shutil.copytree(converted, target)
    info = json.loads((target / gguf_import.INFO).read_text())
    del info["conversion_version"]
    (target / gguf_import.INFO).write_text(json.dumps(info))
    (target / "left-by-the-old-code").write_text("x")
    sha = info["sha256"]
    assert gguf_import.converted_dir(tiny_gguf, sha, cache_root=cache) == target
    assert not (target / "left-by-the-old-code").exists() and gguf_import.is_current(target)
    assert [p.name for p in cache.iterdir()] == [target.name]  # no partial or stale directory left
    monkeypatch.setattr(gguf_import, "convert", lambda *a, **k: pytest.fail("a current conversion is reused"))
    assert gguf_import.converted_dir(tiny_gguf, sha, cache_root=cache) == target


def test_weights_must_match_bit_for_bit(converted):
    import torch
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32)
    gguf_import.check_same_weights(a, b, converted, "model.name")
    with torch.no_grad():
        b.model.layers[0].mlp.up_proj.weight[3, 5] += 1e-7
    with pytest.raises(UserError, match=r"does not hold the GGUF model's model\.layers\.0\.mlp\.up_proj\.weight"):
        gguf_import.check_same_weights(a, b, converted, "model.name")
    b = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32)
    b.lm_head.weight = torch.nn.Parameter(b.lm_head.weight.detach().clone())  # same values, no longer tied
    with pytest.raises(UserError, match="ties other weights than the GGUF model"):
        gguf_import.check_same_weights(a, b, converted, "model.name")


def test_probe_logits_run_on_one_thread_and_restore_the_count(converted, monkeypatch):
    """Both sides of the logit check run on `PROBE_THREADS`, whatever `model.threads: auto` chose for the run."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32)
    seen = []
    monkeypatch.setattr(model, "forward", lambda *a, **k: seen.append(torch.get_num_threads()) or
                        type("Out", (), {"logits": torch.zeros(1, 2, 3)})())
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gguf_import.probe_logits(model, torch.tensor([[1, 2]]))
        assert seen == [gguf_import.PROBE_THREADS] == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_a_file_that_asks_for_bos_gets_it_and_passes_the_check(tmp_path):
    """`tokenizer.ggml.add_bos_token` true: llama.cpp puts BOS first, and so do the reference and the converted
    tokenizer (the check compares whole encodings, special tokens included)."""
    from transformers import AutoTokenizer

    target = gguf_import.converted_dir(write_tiny_gguf(tmp_path / "bos.gguf", add_bos=True), cache_root=tmp_path / "c")
    tokenizer = AutoTokenizer.from_pretrained(str(target))
    assert tokenizer.convert_ids_to_tokens(tokenizer("a  1")["input_ids"]) == ["<|im_start|>", "a", "ĠĠ", "1"]
