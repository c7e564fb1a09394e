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


def test_unreadable_file_is_an_error(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text("{not json\n")
    with pytest.raises(UserError, match="cannot read"):
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
