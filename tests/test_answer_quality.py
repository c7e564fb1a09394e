"""frugal_spin.answer_quality: every measure on answers small enough to count by hand, and the length-limit helper."""

import json
import math

import pytest

from frugal_spin.answer_quality import (AnswerQuality, answer_length, answer_quality, choose_length_limits,
                                        chrf_scores, content_ids, distinct_n, ended, repeated_ngram_counts,
                                        repeated_ngram_share)
from frugal_spin.errors import UserError

STOP = [2, 7]  # e.g. the template's end-of-turn token and eos


@pytest.mark.parametrize("ids, content, stopped, length", [
    ([5, 6, 2], [5, 6], True, 3),            # ended on the end-of-turn token
    ([5, 6, 8], [5, 6, 8], False, 3),        # ran into the limit
    ([5, 7, 9, 9], [5], True, 2),            # the second stop id (eos); anything after it is not the answer
    ([2], [], True, 1),                      # an empty answer that ended at once
    ([], [], False, 0),
    ([5, 2, 7], [5], True, 2),               # cut at the first stop token
])
def test_end_length_and_content(ids, content, stopped, length):
    assert content_ids(ids, STOP) == content
    assert ended(ids, STOP) is stopped
    assert answer_length(ids, STOP) == length


@pytest.mark.parametrize("tokens, n, counts, share", [
    # 4-grams at 0..6: 1234 2341 3412 4123 1234* 2341* 3412* -> 3 repeats of 7
    ([1, 2, 3, 4, 1, 2, 3, 4, 1, 2], 4, (3, 7), 3 / 7),
    ([7, 7, 7, 7, 7, 7], 4, (2, 3), 2 / 3),   # 7777 three times: the first is new
    ([1, 2, 3, 4, 5], 4, (0, 2), 0.0),
    ([1, 2, 3], 4, (0, 0), math.nan),         # too short for a 4-gram
    ([1, 1, 2, 1, 1], 2, (1, 4), 1 / 4),      # bigrams 11 12 21 11*
])
def test_repeated_ngrams_by_hand(tokens, n, counts, share):
    assert repeated_ngram_counts(tokens, n) == counts
    got = repeated_ngram_share(tokens, n)
    assert (math.isnan(got) and math.isnan(share)) or got == share


def test_distinct_2_pools_answers_without_crossing_them():
    # bigrams: 12 23 | 12 | none -> 2 distinct of 3; (3, 1) across the first two answers is not a bigram
    assert distinct_n([[1, 2, 3], [1, 2], [4]], 2) == 2 / 3
    assert math.isnan(distinct_n([[4], []], 2))


def test_chrf_by_hand():
    # "ab" vs "abc" (sacrebleu >= 2: precision and recall averaged over the orders both texts have, then F_beta=2):
    # 1-grams P = 2/2, R = 2/3; 2-grams P = 1/1, R = 1/2; 3-grams: none in "ab" -> not counted.
    # P = 1, R = 7/12 -> F2 = 5 P R / (4 P + R) = (35/12) / (55/12) = 7/11.
    # Corpus with ("abc", "abc"): pooled 1-grams 5/5, 5/6; 2-grams 3/3, 3/4; 3-grams 1/1, 1/2 (hyp "ab" has none,
    # the reference "abc" has one) -> P = 1, R = (5/6 + 3/4 + 1/2) / 3 = 25/36 -> F2 = (125/36) / (169/36) = 125/169.
    per_answer, corpus = chrf_scores(["ab", "abc"], ["abc", "abc"])
    assert per_answer == pytest.approx([700 / 11, 100.0], abs=1e-9)
    assert corpus == pytest.approx(12500 / 169, abs=1e-9)
    assert chrf_scores(["xyz"], ["abc"])[0] == [0.0]
    assert chrf_scores(["a b"], ["ab"])[0] == [pytest.approx(100.0)]  # whitespace is ignored
    with pytest.raises(UserError, match="2 answers and 1 real answers"):
        chrf_scores(["a", "b"], ["a"])


def test_answer_quality_by_hand():
    generated = [[5, 6, 5, 6, 5, 6, 2],   # ended, 7 tokens; content 565656: 4-grams 5656 6565 5656* -> 1 of 3
                 [8, 9, 8, 9],            # cut at the limit, 4 tokens; 4-grams 8989 -> 0 of 1
                 [3, 7]]                  # ended on eos, 2 tokens; content [3]: no 4-gram, no bigram
    texts, real = ["ab", "abc", "xyz"], ["abc", "abc", "abc"]
    q = answer_quality(generated, texts, real, STOP)
    assert isinstance(q, AnswerQuality)
    assert q.answers == 3 and q.ngram == 4
    assert q.end_of_turn_rate == 2 / 3
    assert q.mean_length == (7 + 4 + 2) / 3
    assert q.repeated_ngram_share == 1 / 4                      # pooled: (1 + 0) / (3 + 1)
    # bigrams: 56 65 56 65 56 | 89 98 89 -> distinct {56, 65, 89, 98} = 4 of 8
    assert q.distinct_2 == 4 / 8
    assert q.chrf_mean == pytest.approx((700 / 11 + 100.0 + 0.0) / 3, abs=1e-9)
    assert q.per_answer["ended"] == [True, False, True]
    assert q.per_answer["length"] == [7, 4, 2]
    assert q.per_answer["repeated_ngram_share"][:2] == [1 / 3, 0.0]
    assert math.isnan(q.per_answer["repeated_ngram_share"][2])
    as_json = json.loads(json.dumps(q.to_dict()))  # strict JSON: NaN -> null
    assert as_json["per_answer"]["repeated_ngram_share"][2] is None


@pytest.mark.parametrize("args, message", [
    (([[1, 2]], ["a", "b"], ["a"], STOP), "1 answers' ids, 2 texts and 1 real answers"),
    (([], [], [], STOP), "no answers"),
    (([[1, 2]], ["a"], ["a"], []), "no stop ids"),
])
def test_answer_quality_bad_input(args, message):
    with pytest.raises(UserError, match=message):
        answer_quality(*args)


# ---------------------------------------------------------------- length limits

def test_length_limits_by_hand():
    # real 1..10: 90% needs 9 answers -> the 9th shortest, 9 tokens, 9/10 within it.
    # generated, 20 sampled with 32 tokens: 18 stopped at 1..18 tokens, 2 cut at 32.
    # 85% of 20 = 17 answers -> the 17th shortest stopped answer, 17 tokens; 17/20 within it.
    limits = choose_length_limits(list(range(1, 11)), list(range(1, 19)) + [32, 32], [True] * 18 + [False] * 2,
                                  sampled_with=32)
    assert (limits.real_limit, limits.real_share) == (9, 0.9)
    assert (limits.generated_limit, limits.generated_share) == (17, 0.85)
    assert limits.reached
    assert limits.summary() == ("90.0% of real answers end within 9 tokens (target 90%); 85.0% of generated "
                                "answers end within 17 (target 85%)")


def test_length_limits_with_ties_report_the_share_reached():
    limits = choose_length_limits([5] * 10, [3, 3, 3, 3], [True] * 4, sampled_with=8)
    assert (limits.real_limit, limits.real_share) == (5, 1.0)
    assert (limits.generated_limit, limits.generated_share) == (3, 1.0)


def test_length_limits_cannot_be_read_from_answers_that_were_cut():
    # 10 generated answers sampled with 32 tokens, 8 stopped: 85% needs 9 -> no limit <= 32 is known to be enough;
    # the answer that stopped at exactly 32 tokens did end within 32
    limits = choose_length_limits([3, 4], [10] * 7 + [32, 32, 32], [True] * 8 + [False] * 2, sampled_with=32)
    assert limits.generated_limit is None and not limits.reached
    assert limits.generated_share == 0.8
    assert "only 80.0% of generated answers ended within the 32 tokens" in limits.summary()


@pytest.mark.parametrize("kwargs, message", [
    (dict(real_lengths=[], generated_lengths=[1], generated_ended=[True]), "at least one real"),
    (dict(real_lengths=[1], generated_lengths=[1, 2], generated_ended=[True]), "2 generated lengths but 1"),
    (dict(real_lengths=[0], generated_lengths=[1], generated_ended=[True]), "token counts"),
    (dict(real_lengths=[1], generated_lengths=[40], generated_ended=[False]), "40 tokens is longer than the 32"),
    (dict(real_lengths=[1], generated_lengths=[1], generated_ended=[True], real_target=0.0), "real_target"),
    (dict(real_lengths=[1], generated_lengths=[1], generated_ended=[True], generated_target=1.5),
     "generated_target"),
])
def test_length_limits_bad_input(kwargs, message):
    with pytest.raises(UserError, match=message):
        choose_length_limits(sampled_with=32, **kwargs)
