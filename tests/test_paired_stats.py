"""frugal_spin.paired_stats: the two-stage bootstrap against distributions enumerated by hand, the verdict, missing
values, bad input, determinism, and the seed-level helpers (t interval, sign test) against tabulated values."""

import itertools
import json
import math
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

from frugal_spin.errors import UserError
from frugal_spin.paired_stats import (HIGHER, LOWER, NOT_ESTABLISHED, bootstrap_distribution, paired_comparison,
                                      paired_differences, percentile_interval, sign_test_p, student_t_critical,
                                      student_t_two_sided, t_interval, verdict_from_interval)


def _zeros_like(values):
    return {seed: [0.0] * len(v) for seed, v in values.items()}


def _frequencies(samples):
    counts = Counter(np.round(samples, 9).tolist())
    return {value: n / len(samples) for value, n in counts.items()}


def _exact_distribution(diffs, weights):
    """Every outcome of the two-stage bootstrap, enumerated: S^S ordered seed draws, then n_s^n_s ordered prompt
    draws per drawn slot; each outcome equally likely within its stage. {statistic: exact probability}."""
    n_seeds = len(diffs)
    per_seed = []  # per seed: {weighted mean of one prompt resample: probability}
    for d, w in zip(diffs, weights):
        dist = Counter()
        for picks in itertools.product(range(len(d)), repeat=len(d)):
            m = sum(Fraction(w[i]) * Fraction(d[i]) for i in picks) / sum(Fraction(w[i]) for i in picks)
            dist[m] += Fraction(1, len(d) ** len(d))
        per_seed.append(dist)
    out = Counter()
    for drawn in itertools.product(range(n_seeds), repeat=n_seeds):
        for means in itertools.product(*(per_seed[s].items() for s in drawn)):
            value = sum(m for m, _ in means) / n_seeds
            out[value] += Fraction(1, n_seeds ** n_seeds) * math.prod(p for _, p in means)
    return out


def _exact_quantile(dist, q):
    """Smallest v with F(v) >= q (the inverted CDF the module uses)."""
    total = Fraction(0)
    for value in sorted(dist):
        total += dist[value]
        if total >= q:
            return value
    raise AssertionError("no quantile")


# ---------------------------------------------------------------- the bootstrap against hand-worked examples

def test_one_seed_two_prompts_by_hand():
    # d = [0, 1]: the mean of two draws with replacement is 0 (1/4), 0.5 (1/2) or 1 (1/4).
    # F(0) = 0.25 >= 0.025 -> low 0; F(0.5) = 0.75 < 0.975, F(1) = 1 -> high 1; the interval holds 0.
    samples = bootstrap_distribution([np.array([0.0, 1.0])], [np.ones(2)], resamples=20_000)
    freq = _frequencies(samples)
    assert set(freq) == {0.0, 0.5, 1.0}
    for value, p in {0.0: 0.25, 0.5: 0.5, 1.0: 0.25}.items():
        assert abs(freq[value] - p) < 5 * math.sqrt(p * (1 - p) / 20_000)
    result = paired_comparison({7: [0.0, 1.0]}, {7: [0.0, 0.0]}, resamples=20_000)
    assert (result.mean, result.low, result.high) == (0.5, 0.0, 1.0)
    assert result.verdict == NOT_ESTABLISHED
    assert result.scope.startswith("the prompts of one seed")
    assert [(s.seed, s.pairs, s.mean, s.sign) for s in result.seeds] == [(7, 2, 0.5, 1)]


def test_two_seeds_two_prompts_by_hand():
    # seed 0: d = [-1, -3] (its prompt resample mean is -1: 1/4, -2: 1/2, -3: 1/4); seed 1: d = [-2, -2] (always -2).
    # Seed draws (0,0), (0,1), (1,0), (1,1), each 1/4; the statistic is the mean of the two drawn seed means:
    #   (1,1): -2.
    #   (0,1), (1,0): (m0 - 2)/2 -> -1.5: 1/4, -2: 1/2, -2.5: 1/4 (weight 1/2 in all).
    #   (0,0): (m0 + m0')/2 with two independent m0 -> -1: 1/16, -1.5: 4/16, -2: 6/16, -2.5: 4/16, -3: 1/16.
    # Total (in 64ths): -3: 1, -2.5: 8 + 4 = 12, -2: 16 + 16 + 6 = 38, -1.5: 12, -1: 1.
    # F(-3) = 1/64 < 0.025 <= F(-2.5) = 13/64 -> low -2.5; F(-2) = 51/64 < 0.975 <= F(-1.5) = 63/64 -> high -1.5.
    hand = {-3.0: 1 / 64, -2.5: 12 / 64, -2.0: 38 / 64, -1.5: 12 / 64, -1.0: 1 / 64}
    a = {0: [-1.0, -3.0], 1: [-2.0, -2.0]}
    assert {float(v): float(p) for v, p in _exact_distribution([[-1, -3], [-2, -2]], [[1, 1], [1, 1]]).items()} \
        == hand  # the enumerator agrees with the hand count
    samples = bootstrap_distribution([np.array(v) for v in a.values()], [np.ones(2)] * 2, resamples=40_000)
    freq = _frequencies(samples)
    assert set(freq) == set(hand)
    for value, p in hand.items():
        assert abs(freq[value] - p) < 5 * math.sqrt(p * (1 - p) / 40_000), value
    result = paired_comparison(a, _zeros_like(a), resamples=40_000)
    assert (result.mean, result.low, result.high, result.verdict) == (-2.0, -2.5, -1.5, LOWER)
    assert (result.seeds_lower, result.seeds_higher, result.seeds_equal, result.pairs) == (2, 0, 0, 4)
    assert result.scope == "seeds and prompts"


def test_unequal_seeds_and_weights_match_the_enumerated_distribution():
    # 3 seeds with 1, 2 and 3 prompts and integer weights: 27 seed draws x prompt draws, enumerated exactly.
    diffs = [[0.5], [-1.0, 2.0], [0.0, -2.0, 1.0]]
    weights = [[1], [1, 3], [2, 1, 1]]
    exact = _exact_distribution(diffs, weights)
    assert sum(exact.values()) == 1
    samples = np.sort(bootstrap_distribution([np.array(d) for d in diffs], [np.array(w, float) for w in weights],
                                              resamples=20_000, bootstrap_seed=3))
    values = sorted(exact)
    cdf = np.cumsum([float(exact[v]) for v in values])
    empirical = np.searchsorted(samples, np.array([float(v) for v in values]) + 1e-9, side="right") / len(samples)
    # Dvoretzky-Kiefer-Wolfowitz: P(sup |F_n - F| > 0.02) <= 2 exp(-2 n 0.02^2) = 2e-7 at n = 20,000
    assert np.abs(empirical - cdf).max() < 0.02
    assert set(np.round(samples, 9)) <= {round(float(v), 9) for v in values}  # only values that can occur
    low, high = percentile_interval(samples)
    # The exact quantiles are atoms with room around 0.025 and 0.975, so the Monte Carlo reads the same values.
    assert math.isclose(low, float(_exact_quantile(exact, Fraction(1, 40))), abs_tol=1e-12)
    assert math.isclose(high, float(_exact_quantile(exact, Fraction(39, 40))), abs_tol=1e-12)


def test_the_estimate_weights_every_seed_equally():
    # seed 0: 1 prompt, d = 3; seed 1: 3 prompts, d = 0 -> D = (3 + 0) / 2 = 1.5, not the grand mean 0.75
    a = {0: [3.0], 1: [0.0, 0.0, 0.0]}
    assert paired_comparison(a, _zeros_like(a), resamples=100).mean == 1.5


def test_token_weights_give_the_corpus_level_nll_difference():
    # per-prompt NLL per token and token counts: the weighted seed mean is (sum NLL_a - sum NLL_b) / sum tokens,
    # the difference of evaluate.heldout_nll's numbers
    tokens = [4, 10, 1]
    nll_a_total, nll_b_total = [8.0, 12.0, 3.0], [6.0, 14.0, 2.0]
    a = {0: [t / n for t, n in zip(nll_a_total, tokens)]}
    b = {0: [t / n for t, n in zip(nll_b_total, tokens)]}
    result = paired_comparison(a, b, weights={0: tokens}, resamples=100)
    assert math.isclose(result.mean, (sum(nll_a_total) - sum(nll_b_total)) / sum(tokens), rel_tol=1e-12)  # 1/15
    unweighted = paired_comparison(a, b, resamples=100).mean
    assert not math.isclose(unweighted, result.mean)  # the weights do change the statistic


# ---------------------------------------------------------------- degenerate cases

def test_identical_arms_are_not_established():
    a = {0: [1.0, 2.0, 3.0], 1: [4.0, 5.0], 2: [0.5]}
    result = paired_comparison(a, a, resamples=500)
    assert (result.mean, result.low, result.high) == (0.0, 0.0, 0.0)
    assert result.verdict == NOT_ESTABLISHED
    assert (result.seeds_lower, result.seeds_higher, result.seeds_equal) == (0, 0, 3)
    assert [s.sign for s in result.seeds] == [0, 0, 0]


def test_one_prompt_per_seed_is_a_bootstrap_over_seeds():
    # 3 seeds, one value each: 27 equally likely ordered seed draws; all three the lowest seed has p = 1/27 > 0.025
    # (and so for the highest), so the 95% interval is exactly [min, max] of the seed values
    result = paired_comparison({0: [-0.04], 1: [-0.05], 2: [-0.03]}, {0: [0.0], 1: [0.0], 2: [0.0]},
                               resamples=10_000)
    assert (result.low, result.high) == pytest.approx((-0.05, -0.03), abs=1e-15)
    assert result.verdict == LOWER


def test_nan_leaves_the_pair_out_of_both_models():
    a = {0: [1.0, math.nan, 3.0, 0.0], 1: [2.0, 2.0]}
    b = {0: [0.0, 5.0, 1.0, math.nan], 1: [1.0, 3.0]}
    with_nan = paired_comparison(a, b, resamples=2_000, bootstrap_seed=5)
    cleaned = paired_comparison({0: [1.0, 3.0], 1: [2.0, 2.0]}, {0: [0.0, 1.0], 1: [1.0, 3.0]}, resamples=2_000,
                                bootstrap_seed=5)
    assert (with_nan.mean, with_nan.low, with_nan.high) == (cleaned.mean, cleaned.low, cleaned.high)
    assert [(s.pairs, s.dropped) for s in with_nan.seeds] == [(2, 2), (2, 0)]
    assert with_nan.dropped == 2 and with_nan.pairs == 4


def test_a_seed_without_values_is_reported_and_left_out():
    a = {0: [math.nan, math.nan], 1: [-1.0, -2.0], 2: [-1.5]}
    b = {0: [0.0, 0.0], 1: [0.0, 0.0], 2: [0.0]}
    result = paired_comparison(a, b, resamples=1_000)
    assert result.seeds[0].pairs == 0 and result.seeds[0].sign is None and math.isnan(result.seeds[0].mean)
    assert result.mean == (-1.5 + -1.5) / 2
    assert (result.seeds_lower, result.seeds_equal) == (2, 0)
    assert json.loads(json.dumps(result.to_dict()))["seeds"][0]["mean"] is None  # strict JSON, no NaN


def test_no_values_at_all_is_not_established():
    result = paired_comparison({0: [math.nan]}, {0: [1.0]}, resamples=10)
    assert result.verdict == NOT_ESTABLISHED and math.isnan(result.mean) and result.pairs == 0
    as_json = result.to_dict()
    assert as_json["mean"] is None and as_json["low"] is None and as_json["dropped"] == 1


BAD_INPUT = [
    ("seeds differ", {0: [1.0], 1: [2.0]}, {0: [1.0], 2: [2.0]}, None, "different seeds"),
    ("prompt counts differ", {0: [1.0, 2.0]}, {0: [1.0]}, None, "seed 0: 2 and 1 prompts"),
    ("weight count differs", {0: [1.0, 2.0]}, {0: [1.0, 1.0]}, {0: [1.0]}, "2 and 2 prompts, 1 weights"),
    ("weights for other seeds", {0: [1.0]}, {0: [1.0]}, {1: [1.0]}, "the weights have seeds"),
    ("infinite value", {3: [1.0, math.inf]}, {3: [1.0, 1.0]}, None, "seed 3: first model is infinite at prompt 1"),
    ("infinite in b", {3: [1.0, 1.0]}, {3: [-math.inf, 1.0]}, None, "second model is infinite at prompt 0"),
    ("zero weight", {0: [1.0, 2.0]}, {0: [1.0, 1.0]}, {0: [1.0, 0.0]}, "weight 0.0 at prompt 1"),
    ("text instead of numbers", {0: ["x"]}, {0: [1.0]}, None, "seed 0: expected numbers"),
]


@pytest.mark.parametrize("case, a, b, weights, message", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_names_the_seed_and_prompt(case, a, b, weights, message):
    with pytest.raises(UserError, match=message):
        paired_comparison(a, b, weights=weights, resamples=10)


@pytest.mark.parametrize("kwargs, message", [({"resamples": 0}, "resamples"), ({"confidence": 1.0}, "confidence")])
def test_bad_settings(kwargs, message):
    with pytest.raises(UserError, match=message):
        paired_comparison({0: [1.0, 2.0]}, {0: [0.0, 0.0]}, **kwargs)


def test_paired_differences_keep_the_input_order_of_seeds():
    out = paired_differences({2: [1.0], 0: [3.0]}, {0: [1.0], 2: [0.5]})
    assert list(out) == [2, 0]
    assert out[2][0].tolist() == [0.5] and out[0][0].tolist() == [2.0]


# ---------------------------------------------------------------- determinism

def test_same_bootstrap_seed_same_interval_and_another_seed_another():
    rng = np.random.default_rng(11)
    a = {s: rng.normal(size=40).tolist() for s in range(3)}
    b = {s: rng.normal(size=40).tolist() for s in range(3)}
    first = paired_comparison(a, b, resamples=2_500, bootstrap_seed=1)
    assert first.to_dict() == paired_comparison(a, b, resamples=2_500, bootstrap_seed=1).to_dict()
    other = paired_comparison(a, b, resamples=2_500, bootstrap_seed=2)
    assert (other.low, other.high) != (first.low, first.high)
    assert other.mean == first.mean  # the estimate itself is not random
    assert len(bootstrap_distribution([np.array(a[0])], [np.ones(40)], resamples=2_500)) == 2_500  # partial block


# ---------------------------------------------------------------- interval and verdict

def test_percentile_interval_is_the_inverted_cdf():
    samples = np.arange(1.0, 101.0)  # F(v) = v / 100
    assert percentile_interval(samples, 0.90) == (5.0, 95.0)
    assert percentile_interval(samples, 0.95) == (3.0, 98.0)  # F >= 0.025 first at 3, F >= 0.975 first at 98


@pytest.mark.parametrize("low, high, verdict", [
    (-2.0, -1.0, LOWER), (1.0, 2.0, HIGHER), (-1.0, 1.0, NOT_ESTABLISHED), (0.0, 1.0, NOT_ESTABLISHED),
    (-1.0, 0.0, NOT_ESTABLISHED), (0.0, 0.0, NOT_ESTABLISHED), (math.nan, math.nan, NOT_ESTABLISHED)])
def test_verdict_from_interval(low, high, verdict):
    assert verdict_from_interval(low, high) == verdict


# ---------------------------------------------------------------- seed level

@pytest.mark.parametrize("confidence, df, table", [
    (0.95, 1, 12.7062), (0.95, 2, 4.3027), (0.95, 3, 3.1824), (0.95, 4, 2.7764), (0.95, 10, 2.2281),
    (0.95, 30, 2.0423), (0.99, 2, 9.9248), (0.90, 5, 2.0150)])
def test_t_critical_values_match_the_table(confidence, df, table):
    assert abs(student_t_critical(confidence, df) - table) < 6e-5


def test_t_distribution_closed_forms():
    # df = 1 (Cauchy): P(|T| <= t) = 2 atan(t) / pi; df = 2: t / sqrt(t^2 + 2)
    for t in (0.1, 1.0, 3.7):
        assert math.isclose(student_t_two_sided(t, 1), 2 * math.atan(t) / math.pi, rel_tol=1e-12)
        assert math.isclose(student_t_two_sided(t, 2), t / math.sqrt(t * t + 2), rel_tol=1e-12)
    with pytest.raises(UserError, match="degrees of freedom"):
        student_t_two_sided(1.0, 0)


def test_t_interval_by_hand():
    # [1, 2, 3]: mean 2, sd 1, half width t(0.975, 2) / sqrt(3) = 4.302653 / 1.732051 = 2.484138
    mean, low, high = t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert math.isclose(high - mean, 2.484138, rel_tol=1e-6) and math.isclose(mean - low, 2.484138, rel_tol=1e-6)
    mean, low, high = t_interval([0.7])
    assert mean == 0.7 and math.isnan(low) and math.isnan(high)
    with pytest.raises(UserError, match="finite"):
        t_interval([1.0, math.nan])


@pytest.mark.parametrize("lower, higher, p", [
    (3, 0, 0.25), (0, 3, 0.25), (5, 0, 0.0625), (4, 1, 0.375), (2, 2, 1.0), (0, 0, 1.0), (6, 0, 0.03125)])
def test_sign_test_by_hand(lower, higher, p):
    assert sign_test_p(lower, higher) == p
