"""Answer diagnostics (diagnostics.py) on hand-worked token sequences."""

import random

from frugal_spin.diagnostics import answer_diagnostics, bounded_edit_distance, end_token_rate, is_near


def _levenshtein(a, b):
    """The textbook full table, to check the banded version against."""
    row = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        prev, row[0] = row[0], i
        for j in range(1, len(b) + 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (a[i - 1] != b[j - 1]))
    return row[-1]


def test_edit_distance_hand_worked():
    kitten, sitting = list("kitten"), list("sitting")  # k->s, e->i, +g: 3 edits
    assert bounded_edit_distance(kitten, sitting, 3) == 3
    assert bounded_edit_distance(kitten, sitting, 5) == 3
    assert bounded_edit_distance(kitten, sitting, 2) == 3  # past the bound: k + 1
    assert bounded_edit_distance([], [1, 2], 2) == 2 and bounded_edit_distance([], [1, 2, 3], 2) == 3
    assert bounded_edit_distance([1, 2, 3], [1, 2, 3], 0) == 0
    assert bounded_edit_distance([1, 2, 3], [3, 2, 1], 1) == 2  # two substitutions, bound 1


def test_banded_distance_agrees_with_the_full_table():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.randrange(4) for _ in range(rng.randrange(0, 14))]
        b = [rng.randrange(4) for _ in range(rng.randrange(0, 14))]
        k = rng.randrange(0, 8)
        assert bounded_edit_distance(a, b, k) == min(_levenshtein(a, b), k + 1), (a, b, k)


def test_near_is_similarity_at_least_0_9():
    real = list(range(10))
    one_off = real[:4] + [99] + real[5:]  # 1 substitution in 10 tokens: similarity 0.9 -> near
    two_off = [98] + real[1:4] + [99] + real[5:]  # 2 in 10: 0.8 -> not near
    assert is_near(real, one_off) and not is_near(real, two_off)
    assert is_near(real, real[:9])  # one deletion: 1 - 1/10
    assert not is_near(real, real[:8])
    assert is_near([], [])
    assert not is_near([1], [])  # 1 - 1/1 = 0


def test_answer_diagnostics_strip_special_tokens_and_count_shares():
    eos = 2
    rows = [{"real_ids": [5, 6, 7, eos], "generated_ids": [5, 6, 7, eos]},  # identical
            {"real_ids": [5, 6, 7, eos], "generated_ids": [5, 6, 7]},  # cut before its end token: identical
            {"real_ids": list(range(10, 20)) + [eos], "generated_ids": list(range(10, 19)) + [42, eos]},  # near
            {"real_ids": [5, 6, 7, eos], "generated_ids": [8, 9, eos]}]  # different
    out = answer_diagnostics(rows, special_ids=[eos])
    assert out["identical_share"] == 0.5 and out["near_share"] == 0.75 and out["near_threshold"] == 0.9


def test_end_token_rate():
    assert end_token_rate(8, 2) == 0.75 and end_token_rate(0, 0) == 0.0


def test_one_rule_says_whether_an_answer_ended_for_both_numbers():
    """Issue 20 item 4: end_token_rate counted an answer as ended only on the tokenizer's eos while
    answers_without_eos counted every stop id, so the two disagreed for a template whose turn ends on another token
    (here 5, as Llama-3's <|eot_id|>). Both now come from the ids generation stops at."""
    from types import SimpleNamespace

    from frugal_spin.stages.opponent import opponent_answer_metrics

    end_of_turn, eos = 5, 2
    rows = [{"real_ids": [9, end_of_turn], "generated_ids": ids} for ids in ([9, end_of_turn], [9, eos], [9, 9])]
    ctx = SimpleNamespace(tokenizer=SimpleNamespace(all_special_ids=[eos, end_of_turn]), stop_ids=[end_of_turn, eos])
    metrics = opponent_answer_metrics(SimpleNamespace(ctx=ctx), rows)
    assert metrics["answers_without_eos"] == 1
    assert metrics["end_token_rate"] == end_token_rate(3, 1) == 2 / 3
