"""The built-in arithmetic task and the tiny base: determinism, held-out disjointness, the tokenizer's chat-template
contract, packing, and the build cache (with a 5-step pretraining budget, never the full build)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from frugal_spin import tiny_base
from frugal_spin.errors import UserError
from frugal_spin.tasks import arithmetic

TINY_SPEC = tiny_base.TinyBaseSpec(tokenizer_rows=500, pretrain_steps=5, batch_size=16, warmup_steps=1, eval_rows=20)


@pytest.fixture(autouse=True)
def one_torch_thread():
    # The test machine's cores are shared; contended torch threads made these tiny models several times slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------- task


def test_splits_are_deterministic_sized_and_seed_dependent():
    first = arithmetic.build_splits(3, n_train=300, n_heldout=50)
    assert first == arithmetic.build_splits(3, n_train=300, n_heldout=50)
    assert len(first["train"]) == 300 and len(first["heldout"]) == 50
    other = arithmetic.build_splits(4, n_train=300, n_heldout=50)
    assert [r["prompt"] for r in first["train"]] != [r["prompt"] for r in other["train"]]
    assert arithmetic.pretraining_rows(3, 40) == arithmetic.pretraining_rows(3, 40)
    assert arithmetic.pretraining_rows(3, 40) != arithmetic.pretraining_rows(4, 40)


def test_rows_follow_the_ultrachat_schema():
    row = arithmetic.build_splits(0, n_train=1, n_heldout=0)["train"][0]
    assert set(row) == {"prompt", "prompt_id", "messages"}
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    assert row["messages"][0]["content"] == row["prompt"]


def test_heldout_problems_never_appear_in_train_or_pretraining_of_any_seed():
    heldout = {arithmetic.problem_of(r["prompt"]) for r in arithmetic.build_splits(0, 0, 200)["heldout"]}
    assert len(heldout) == 200  # distinct problems, not just distinct phrasings
    for seed in (0, 1):
        train = {arithmetic.problem_of(r["prompt"]) for r in arithmetic.build_splits(seed, 2000, 0)["train"]}
        pretraining = {arithmetic.problem_of(r["prompt"]) for r in arithmetic.pretraining_rows(seed, 5000)}
        assert len(train) == 2000
        assert not heldout & train and not heldout & pretraining


def test_problem_of_recovers_what_the_answer_was_built_from():
    rows = arithmetic.build_splits(0, 400, 100)
    for row in rows["train"] + rows["heldout"]:
        assert arithmetic._answer(arithmetic.problem_of(row["prompt"])) == row["messages"][1]["content"]
    with pytest.raises(UserError):
        arithmetic.problem_of("What is the capital of France?")


def test_operations_and_styles_are_mixed():
    train = arithmetic.build_splits(0, 1000, 0)["train"]
    assert {arithmetic.problem_of(r["prompt"])[0] for r in train} == set(arithmetic.OPERATION_WEIGHTS)
    pretraining = arithmetic.pretraining_rows(0, 1000)
    off_style = [r for r in pretraining
                 if r["messages"][1]["content"] != arithmetic._answer(arithmetic.problem_of(r["prompt"]))]
    assert 0.25 < len(off_style) / len(pretraining) < 0.6  # half the phrasings, 80% of the time


def test_is_correct():
    row = arithmetic.build_splits(0, 5, 0)["train"][0]
    answer = row["messages"][1]["content"]
    assert arithmetic.is_correct(answer, row)
    assert arithmetic.is_correct(f"  {answer}\n", answer)
    assert not arithmetic.is_correct(answer + "0", row)
    assert not arithmetic.is_correct("", row)
    with pytest.raises(UserError):
        arithmetic.is_correct("1", {"prompt": "no messages"})


def test_asking_for_more_distinct_problems_than_exist_is_a_user_error(monkeypatch):
    # Multiplication alone has 720 problems, about 72 of them held out.
    monkeypatch.setattr(arithmetic, "OPERATION_WEIGHTS", {"mul": 1})
    assert len(arithmetic.build_splits(0, n_train=0, n_heldout=50)["heldout"]) == 50
    with pytest.raises(UserError, match="fewer"):
        arithmetic.build_splits(0, n_train=0, n_heldout=100)


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_base.build_tokenizer(TINY_SPEC)


def test_generation_prompt_is_a_token_prefix_and_the_answer_ends_with_eos(tokenizer):
    splits = arithmetic.build_splits(0, 300, 50)
    for row in splits["train"] + splits["heldout"]:
        prompt = tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True, return_dict=False)
        full = tokenizer.apply_chat_template(row["messages"], return_dict=False)
        assert full[:len(prompt)] == prompt
        assert full[-1] == tokenizer.eos_token_id and full.count(tokenizer.eos_token_id) == 2
        assert tokenizer.decode(full[len(prompt):], skip_special_tokens=True) == row["messages"][1]["content"]
        assert len(prompt) <= 24 and len(full) - len(prompt) <= 16


def test_digits_are_single_tokens_and_round_trip(tokenizer):
    text = "9081726354 + 12 = 9081726366"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    for digit in "0123456789":
        assert len(tokenizer(digit, add_special_tokens=False)["input_ids"]) == 1
    assert len(tokenizer("4444", add_special_tokens=False)["input_ids"]) == 4


def test_chat_template_accepts_a_system_turn_and_rejects_unknown_roles(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "system", "content": "Be exact."},
                                          {"role": "user", "content": "Reverse 12."}],
                                         tokenize=False, add_generation_prompt=True)
    assert text == "<|system|>Be exact.<|end|><|user|>Reverse 12.<|end|><|assistant|>"
    with pytest.raises(Exception, match="unknown chat role"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "hi"}], tokenize=False)


def test_packed_rows_compute_exactly_as_separate_rows(tokenizer):
    model = tiny_base.build_model(TINY_SPEC, tokenizer).eval()
    encoded = tiny_base._encode_rows(tokenizer, arithmetic.pretraining_rows(0, 12))
    ids, mask, positions, labels = tiny_base._packed_batch(encoded, tokenizer.pad_token_id, width=64)
    assert ids.shape[0] > 1  # the 12 rows do not fit one 64-token sequence: packing spills over
    with torch.no_grad():
        packed_loss = model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels).loss
        total, count = 0.0, 0
        for full, n_prompt in encoded:
            row_labels = torch.tensor([[-100] * n_prompt + full[n_prompt:]])
            loss = model(input_ids=torch.tensor([full]), labels=row_labels).loss
            total, count = total + loss * (len(full) - n_prompt), count + len(full) - n_prompt
    assert torch.allclose(packed_loss, total / count, atol=1e-5)


# ---------------------------------------------------------------- build and cache


@pytest.fixture(scope="module")
def shared_build(tmp_path_factory):
    """One real (5-step) build through `ensure_tiny_base`, counting calls to `build_tiny_base`."""
    root = tmp_path_factory.mktemp("tiny")
    calls = []
    real_build = tiny_base.build_tiny_base
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiny_base, "build_tiny_base", lambda *a, **k: calls.append(a) or real_build(*a, **k))
        # One thread: these cores are shared, and contended threads slow a tiny build several-fold.
        base = tiny_base.ensure_tiny_base(root / "run1" / "base", cache_root=root / "cache", spec=TINY_SPEC,
                                          progress=False, num_threads=1)
        yield {"cache": root / "cache", "base": base, "root": root, "calls": calls}


def test_ensure_builds_once_then_reuses_the_cache(shared_build):
    cache, calls = shared_build["cache"], shared_build["calls"]
    cached_info = cache / f"tiny-llama-{TINY_SPEC.fingerprint()}" / tiny_base.BUILD_INFO
    built_at = cached_info.stat().st_mtime_ns
    second = tiny_base.ensure_tiny_base(shared_build["root"] / "run2" / "base", cache_root=cache, spec=TINY_SPEC,
                                        progress=False)
    again = tiny_base.ensure_tiny_base(shared_build["base"], cache_root=cache, spec=TINY_SPEC, progress=False)
    assert len(calls) == 1 and cached_info.stat().st_mtime_ns == built_at and again == shared_build["base"]
    assert tiny_base.is_complete_build(second, TINY_SPEC)
    assert not [p for p in cache.iterdir() if ".partial-" in p.name]  # temporary build dirs are cleaned up
    info = json.loads((second / tiny_base.BUILD_INFO).read_text())
    assert info["spec"] == dataclasses.asdict(TINY_SPEC)
    assert info["heldout_greedy"]["rows"] == TINY_SPEC.eval_rows and 0.0 <= info["heldout_greedy"]["exact_match"] <= 1


def test_exact_match_report_counts_per_operation():
    rows = arithmetic.build_splits(0, 0, 40)["heldout"]
    answers = [row["messages"][1]["content"] if i % 2 == 0 else "wrong" for i, row in enumerate(rows)]
    report = tiny_base.exact_match_report(answers, rows)
    assert report["exact_match"] == 0.5 and report["rows"] == 40
    assert set(report["by_operation"]) <= set(arithmetic.OPERATION_WEIGHTS)


def test_build_loads_with_auto_classes(shared_build):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(shared_build["base"])
    tokenizer = AutoTokenizer.from_pretrained(shared_build["base"])
    assert model.config.hidden_size == TINY_SPEC.hidden_size and model.config.vocab_size == len(tokenizer)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|end|>")
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.chat_template == tiny_base.CHAT_TEMPLATE


def test_build_loads_in_nf4_on_cpu(shared_build):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(shared_build["base"], quantization_config=quantization,
                                                 device_map="cpu")
    tokenizer = AutoTokenizer.from_pretrained(shared_build["base"])
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 7 * TINY_SPEC.num_layers  # q, k, v, o, gate, up, down in every layer
    row = arithmetic.build_splits(0, 0, 1)["heldout"][0]
    prompt = tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_a_half_written_cache_entry_is_rebuilt(tmp_path, shared_build, monkeypatch):
    calls = []

    def build_by_copying(out_dir, *args, **kwargs):  # stands in for a real build: only the cache logic is tested
        calls.append(out_dir)
        shutil.copytree(shared_build["base"], out_dir, dirs_exist_ok=True)

    monkeypatch.setattr(tiny_base, "build_tiny_base", build_by_copying)
    cache = tmp_path / "cache"
    entry = cache / f"tiny-llama-{TINY_SPEC.fingerprint()}"
    entry.mkdir(parents=True)
    (entry / "config.json").write_text("{}")  # what an interrupted copy could leave: no build_info.json
    (cache / f".{entry.name}.partial-stale").mkdir()  # an interrupted build's temp dir is never looked at
    base = tiny_base.ensure_tiny_base(tmp_path / "base", cache_root=cache, spec=TINY_SPEC, progress=False)
    assert len(calls) == 1
    assert tiny_base.is_complete_build(entry, TINY_SPEC) and tiny_base.is_complete_build(base, TINY_SPEC)
    assert json.loads((entry / "config.json").read_text())  # the leftover was replaced, not merged into


def test_a_run_dir_holding_another_base_is_refused(shared_build):
    other = dataclasses.replace(TINY_SPEC, pretrain_steps=6)
    with pytest.raises(UserError, match="different tiny base"):
        tiny_base.ensure_tiny_base(shared_build["base"], cache_root=shared_build["cache"], spec=other,
                                   progress=False)


def test_seed_and_spec_must_agree(tmp_path):
    with pytest.raises(UserError, match="seed"):
        tiny_base.ensure_tiny_base(tmp_path / "base", seed=1, cache_root=tmp_path, spec=TINY_SPEC)


def test_default_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FRUGAL_SPIN_CACHE", str(tmp_path))
    assert tiny_base.default_cache_root() == tmp_path


def test_the_built_in_tasks_are_a_registry_with_their_own_bounds_and_checkers():
    """data.dataset builtin:<name> is a task of tasks.TASKS: its splits, its held-out bound (checked with the
    recipe) and, only where answers can be checked exactly, its is_correct (evaluation's exact match)."""
    from frugal_spin.config import recipe_from_dict
    from frugal_spin.errors import UserError
    from frugal_spin.tasks import TASKS, task_of

    assert set(TASKS) == {"builtin:arithmetic", "builtin:chitchat"} and task_of("org/data") is None
    assert task_of("builtin:arithmetic").is_correct is arithmetic.is_correct
    assert task_of("builtin:chitchat").is_correct is None and task_of("builtin:chitchat").max_eval_size is None
    recipe_from_dict({"data": {"eval_size": 5000}})
    with pytest.raises(UserError, match="more than the built-in task builtin:arithmetic draws \\(5,000"):
        recipe_from_dict({"data": {"eval_size": 5001}})
