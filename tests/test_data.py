import json
from collections import Counter

import pytest

from frugal_spin.config import DataConfig
from frugal_spin.data import (Encoded, collate_sequences, example_from_row, length_grouped_batches, load_splits,
                              truncate)
from frugal_spin.errors import UserError


def _row(user, assistant):
    return {"prompt": user, "prompt_id": "x", "messages": [{"role": "user", "content": user},
                                                           {"role": "assistant", "content": assistant}]}


def test_first_user_and_first_assistant_turn():
    counts = Counter()
    row = {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "q1"},
                        {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                        {"role": "assistant", "content": "a2"}]}
    ex = example_from_row(row, counts)
    assert (ex.prompt, ex.answer) == ("q1", "a1") and not counts


@pytest.mark.parametrize("row, reason", [
    ({"messages": [{"role": "user", "content": "q"}]}, "skipped_no_answer"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}, "skipped_no_answer"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "skipped_no_prompt"),
    ({"messages": "not a list"}, "skipped_malformed"),
    ({"prompt": "no messages"}, "skipped_malformed"),
])
def test_bad_rows_are_skipped_and_counted(row, reason):
    counts = Counter()
    assert example_from_row(row, counts) is None
    assert counts == Counter({reason: 1})


def test_local_jsonl_with_bad_rows(tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [_row(f"q{i}", f"a{i}") for i in range(30)] + [{"messages": [{"role": "user", "content": "q"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = load_splits(DataConfig(dataset=str(path), eval_size=5), seed=1)
    assert len(splits.heldout) + len(splits.train) == 30 and splits.counts["skipped_no_answer"] == 1
    assert not {e.prompt for e in splits.heldout} & {e.prompt for e in splits.train}
    half = load_splits(DataConfig(dataset=str(path), eval_size=5, fraction=0.5), seed=1)
    assert len(half.train) in (12, 13)


def test_empty_after_filtering_is_an_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n" for _ in range(9)))
    with pytest.raises(UserError, match="no usable training rows"):
        load_splits(DataConfig(dataset=str(path), eval_size=2), seed=0)


def test_unparsable_lines_are_skipped_and_counted_not_fatal(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = [json.dumps(_row(f"q{i}", f"a{i}")) for i in range(12)]
    mistyped = json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]})
    path.write_bytes(("\n".join(good[:6] + ["{not json", mistyped, ""] + good[6:]) + "\n").encode()
                     + b"\xff\xfe broken bytes\n")
    splits = load_splits(DataConfig(dataset=str(path), eval_size=2), seed=0)
    assert len(splits.train) + len(splits.heldout) == 12
    assert splits.counts == Counter({"skipped_unparsable": 2, "skipped_malformed": 1})


@pytest.mark.parametrize("content, message", [("{not json", "cannot read"), ('{"messages": []}', "JSON list")])
def test_unreadable_json_file_is_an_error(tmp_path, content, message):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_splits(DataConfig(dataset=str(path)), seed=0)


def test_only_unparsable_lines_is_an_empty_dataset_error(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text("{not json\n")
    with pytest.raises(UserError, match="no usable training rows.*skipped_unparsable"):
        load_splits(DataConfig(dataset=str(path)), seed=0)


def test_collate_marks_only_response_tokens():
    batch = collate_sequences([([1, 2], [3, 4, 5]), ([6], [7])], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch.response_mask.tolist() == [[False, False, True, True, True], [False, True, False, False, False]]


@pytest.mark.parametrize("seed", [None, 3])
def test_length_grouped_batches_cover_every_index_once(seed):
    lengths = [(i * 37) % 23 for i in range(101)]
    batches = length_grouped_batches(lengths, 8, seed)
    assert sorted(i for b in batches for i in b) == list(range(101))
    assert all(len(b) <= 8 for b in batches)
    if seed is None:
        flat = [lengths[i] for b in batches for i in b]
        assert flat == sorted(flat)


def test_truncation_keeps_prompt_end_and_answer_start():
    counts = Counter()
    out = truncate(Encoded(list(range(10)), list(range(10))), DataConfig(max_prompt_tokens=4, max_answer_tokens=3),
                   counts)
    assert out.prompt_ids == [6, 7, 8, 9] and out.answer_ids == [0, 1, 2]
    assert counts == Counter({"truncated_prompts": 1, "truncated_answers": 1})


def _ultrachat_rows(n, start=0):
    """Rows in ultrachat_200k's schema: prompt, prompt_id, messages (multi-turn conversations)."""
    rows = []
    for i in range(start, start + n):
        messages = [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"},
                    {"role": "user", "content": f"follow-up {i}"}, {"role": "assistant", "content": f"second {i}"}]
        rows.append({"prompt": f"question {i}", "prompt_id": f"{i:064x}", "messages": messages})
    return rows


BAD_ROWS = [
    {"prompt": "q", "prompt_id": "a", "messages": [{"role": "user", "content": "q"},
                                                   {"role": "assistant", "content": ""}]},
    {"prompt": "q", "prompt_id": "b", "messages": [{"role": "user", "content": "q"}]},
    {"prompt": "q", "prompt_id": "c", "messages": None},
    {"prompt": "q", "prompt_id": "d", "messages": [{"role": "system", "content": "s"},
                                                   {"role": "assistant", "content": "a"}]},
]


def test_ultrachat_hub_layout_directory_with_bad_rows(tmp_path):
    """A local copy of ultrachat_200k (data/<split>-*.parquet) is read through the same code as the hub."""
    import datasets

    data = tmp_path / "ultrachat_200k" / "data"
    data.mkdir(parents=True)
    datasets.Dataset.from_list(_ultrachat_rows(40) + BAD_ROWS).to_parquet(
        str(data / "train_sft-00000-of-00001.parquet"))
    datasets.Dataset.from_list(_ultrachat_rows(10, start=1000)).to_parquet(
        str(data / "test_sft-00000-of-00001.parquet"))
    cfg = DataConfig(dataset=str(tmp_path / "ultrachat_200k"), eval_size=6, fraction=1.0)
    splits = load_splits(cfg, seed=0)
    assert len(splits.train) == 40 and len(splits.heldout) == 6
    assert splits.counts == Counter({"skipped_no_answer": 2, "skipped_malformed": 1, "skipped_no_prompt": 1})
    assert all(e.prompt.startswith("question 1") and e.answer.startswith("answer 1") for e in splits.heldout)
    assert {e.prompt for e in splits.train} == {f"question {i}" for i in range(40)}
    assert all(not e.context for e in splits.train)  # SPIN: first exchange only
    sampled = load_splits(DataConfig(dataset=cfg.dataset, eval_size=6, fraction=0.25), seed=3)
    # round(0.25 * 44) rows are sampled before filtering; the bad ones among them are counted, not replaced
    assert len(sampled.train) + sum(sampled.counts.values()) == 11
    assert sampled.train != load_splits(DataConfig(dataset=cfg.dataset, eval_size=6, fraction=0.25), seed=4).train


def test_missing_split_of_a_dataset_directory_is_one_line(tmp_path):
    import datasets

    (tmp_path / "ds" / "data").mkdir(parents=True)
    datasets.Dataset.from_list(_ultrachat_rows(5)).to_parquet(str(tmp_path / "ds" / "data" / "train-0.parquet"))
    with pytest.raises(UserError, match="split 'train_sft'") as info:
        load_splits(DataConfig(dataset=str(tmp_path / "ds")), seed=0)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_multi_turn_switch_keeps_earlier_turns_as_context(tmp_path, suffix):
    import datasets

    path = tmp_path / f"chat{suffix}"
    rows = _ultrachat_rows(12)
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    single = load_splits(DataConfig(dataset=str(path), eval_size=2), seed=0)
    multi = load_splits(DataConfig(dataset=str(path), eval_size=2, multi_turn=True), seed=0)
    by_id = {e.prompt.split()[-1]: e for e in multi.train}
    assert {e.prompt.split()[0] for e in multi.train} == {"follow-up"}
    i = next(iter(by_id))
    assert by_id[i].answer == f"second {i}"
    assert by_id[i].context == [{"role": "user", "content": f"question {i}"},
                                {"role": "assistant", "content": f"answer {i}"}]
    assert {e.prompt.split()[0] for e in single.train} == {"question"}


def test_multi_turn_prompt_ids_are_the_template_of_the_whole_conversation():
    from frugal_spin.data import Example, encode_example
    from frugal_spin.tiny_base import TinyBaseSpec, build_tokenizer

    tokenizer = build_tokenizer(TinyBaseSpec())
    context = [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]
    example = Example("2+2", "4", context)
    encoded = encode_example(tokenizer, example, DataConfig(max_prompt_tokens=512, max_answer_tokens=512))
    messages = context + [{"role": "user", "content": "2+2"}]
    assert encoded.prompt_ids == list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                    tokenize=True, return_dict=False))
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": "4"}], tokenize=True,
                                         return_dict=False)
    assert encoded.prompt_ids + encoded.answer_ids == list(full)


def test_multi_turn_skips_conversations_without_an_answered_user_turn():
    counts = Counter()
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}
    assert example_from_row(row, counts, multi_turn=True) is None
    assert counts == Counter({"skipped_no_answer": 1})


def test_sampling_a_dataset_gives_the_rows_sampling_the_list_gives():
    import datasets

    from frugal_spin.data import _sample

    rows = _ultrachat_rows(50)
    assert _sample(datasets.Dataset.from_list(rows), 7, seed=5) == _sample(rows, 7, seed=5)
    assert len({r["prompt_id"] for r in _sample(rows, 7, seed=5)}) == 7


def test_heldout_of_a_local_file_is_a_seeded_sample_not_its_first_rows(tmp_path):
    """Issue #11, defect 7: `_sample` returned rows unshuffled when asked for all of them, so the held-out split
    of a single file was its first eval_size rows for every seed."""
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(_row(f"q{i}", f"a{i}")) + "\n" for i in range(40)))
    heldouts = []
    for seed in range(4):
        splits = load_splits(DataConfig(dataset=str(path), eval_size=6), seed=seed)
        heldout, train = {e.prompt for e in splits.heldout}, {e.prompt for e in splits.train}
        assert len(heldout) == 6 and len(train) == 34 and not heldout & train
        assert heldout == {e.prompt for e in load_splits(DataConfig(dataset=str(path), eval_size=6),
                                                         seed=seed).heldout}  # the same seed, the same split
        heldouts.append(heldout)
    assert len({frozenset(h) for h in heldouts}) == 4  # every seed holds out other rows
    assert {f"q{i}" for i in range(6)} not in heldouts
