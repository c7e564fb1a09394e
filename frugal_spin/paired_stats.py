"""Paired statistics for comparing two models (two arms, or an arm and the SFT stage) over seeds and test prompts.

Inputs: for every seed s, one value per test prompt for each model, aligned by position (prompt i of seed s is the
same prompt for both models: per-prompt NLL, chrF, answer length, ...); optionally one positive weight per prompt.
Outputs: a `PairedResult`: the mean paired difference, its bootstrap confidence interval, the sign per seed, and a
verdict read from the interval. Pure functions over numbers; nothing here knows where the values come from.

The statistic. Per prompt the paired difference is `d_si = a_si - b_si`; pairing within seed removes what both
models of a seed share (the seed's data sample, its SFT adapter, how hard its prompts are). Per seed

    m_s = sum_i w_si d_si / sum_i w_si            (w = 1 unless weights are given)

and the estimate is the mean over seeds, `D = (1/S) sum_s m_s`: every seed counts once, whatever its prompt count.
With token counts as weights and per-token NLLs as values, `m_s` is exactly the difference of the two models'
corpus-level NLL per token on that seed's prompts (sum of NLL / sum of tokens, as `evaluate.heldout_nll`).

The interval: a two-stage (cluster) bootstrap. One resample draws S seeds with replacement; for every drawn seed it
draws that seed's n_s prompts with replacement and recomputes `m_s` on them; the resampled statistic is the mean of
the S drawn `m_s`. The `confidence` interval is read off `resamples` such statistics (default 10,000, from
`numpy.random.default_rng(bootstrap_seed)`, so the same inputs give the same interval) by the inverted empirical
CDF: the low end is the smallest resampled value v with F(v) >= (1 - confidence) / 2, the high end the smallest v
with F(v) >= (1 + confidence) / 2 (`numpy.quantile(method="inverted_cdf")`: always a value that occurred).

Why resample both stages: seeds are the replications that carry training randomness, prompts the sample of the
task. Resampling seeds alone would treat each seed's prompts as the whole task; prompts alone would treat one
training run as every training run. Resampling both slightly over-states the variance (the within-seed part is
counted at both stages; Davison & Hinkley 1997, section 3.8), which errs on the conservative side. With few seeds
the seed stage is coarse (3 seeds give 10 distinct seed multisets, and the bootstrap cannot show a spread between
runs it never saw): read an interval from S < 5 seeds as describing those seeds, and `t_interval`/`sign_test_p`
over the seed means beside it.

The verdict: "lower" when the whole interval is below 0 (a < b), "higher" when it is above 0, else
"not established". With one seed the interval covers prompt sampling only (`scope` says so).

Missing values: a NaN in either model's value (or weight) leaves that prompt's pair out of both (pairing is kept)
and is counted per seed; a seed left with no pair is reported and left out. An infinite value is an error: it is a
real, extreme value (a model that gives the real answer probability 0), and dropping it would favour that model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Hashable, Mapping, Sequence

import numpy as np

from frugal_spin.errors import UserError

DEFAULT_RESAMPLES = 10_000
DEFAULT_CONFIDENCE = 0.95
LOWER, HIGHER, NOT_ESTABLISHED = "lower", "higher", "not established"
# Resamples drawn per block: bounds memory at block x (largest seed's prompt count) indices. Part of the random
# stream's definition: changing it changes the intervals (not their distribution), so it is a constant.
_BLOCK = 1_000


@dataclass(frozen=True)
class SeedDifference:
    seed: Hashable
    pairs: int            # pairs used (both values finite)
    dropped: int          # pairs left out for a NaN
    mean: float           # m_s, the (weighted) mean difference on this seed; NaN when no pair is left
    sign: int | None      # -1, 0 or +1: the sign of m_s (None when no pair is left)


@dataclass(frozen=True)
class PairedResult:
    mean: float                   # D, the mean over seeds of the per-seed mean differences
    low: float                    # the bootstrap interval's ends
    high: float
    confidence: float
    verdict: str                  # "lower" | "higher" | "not established"
    scope: str                    # what the interval covers: "seeds and prompts", or one seed's prompts
    seeds: tuple[SeedDifference, ...]
    seeds_lower: int
    seeds_higher: int
    seeds_equal: int
    pairs: int
    dropped: int
    resamples: int
    bootstrap_seed: int

    def to_dict(self) -> dict:
        """JSON-ready: NaN becomes null (strict JSON has no NaN)."""
        return _json_safe(asdict(self))


def _json_safe(obj):
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _as_array(values, what: str) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise UserError(f"{what}: expected numbers, got {values!r:.80}") from None


def paired_differences(a: Mapping[Hashable, Sequence[float]], b: Mapping[Hashable, Sequence[float]],
                       weights: Mapping[Hashable, Sequence[float]] | None = None
                       ) -> dict[Hashable, tuple[np.ndarray, np.ndarray, int]]:
    """Per seed (in `a`'s order): (d = a - b over the pairs with no NaN, their weights, how many pairs were
    dropped). Raises `UserError` naming the seed when the two models (or the weights) do not have the same seeds
    and prompt counts, for an infinite value, or for a weight that is not positive."""
    if set(a) != set(b):
        raise UserError(f"paired values: the two models have different seeds ({sorted(map(str, a))} and "
                        f"{sorted(map(str, b))})")
    if weights is not None and set(weights) != set(a):
        raise UserError(f"paired values: the weights have seeds {sorted(map(str, weights))}, the values "
                        f"{sorted(map(str, a))}")
    out = {}
    for seed in a:
        va, vb = _as_array(a[seed], f"seed {seed}"), _as_array(b[seed], f"seed {seed}")
        w = np.ones_like(va) if weights is None else _as_array(weights[seed], f"weights of seed {seed}")
        if not len(va) == len(vb) == len(w):
            raise UserError(f"paired values of seed {seed}: {len(va)} and {len(vb)} prompts"
                            + ("" if weights is None else f", {len(w)} weights") + ": they must be the same prompts")
        for name, v in (("first model", va), ("second model", vb), ("weights", w)):
            bad = np.flatnonzero(np.isinf(v))
            if len(bad):
                raise UserError(f"paired values of seed {seed}: {name} is infinite at prompt {int(bad[0])}")
        bad = np.flatnonzero(~np.isnan(w) & (w <= 0))
        if len(bad):
            raise UserError(f"paired values of seed {seed}: weight {w[bad[0]]} at prompt {int(bad[0])}: weights "
                            f"must be positive")
        keep = ~(np.isnan(va) | np.isnan(vb) | np.isnan(w))
        out[seed] = ((va - vb)[keep], w[keep], int((~keep).sum()))
    return out


def seed_mean(d: np.ndarray, w: np.ndarray) -> float:
    """m_s = sum w d / sum w (NaN for no pair)."""
    return float(np.dot(w, d) / w.sum()) if len(d) else math.nan


def bootstrap_distribution(diffs: Sequence[np.ndarray], weights: Sequence[np.ndarray], *,
                           resamples: int = DEFAULT_RESAMPLES, bootstrap_seed: int = 0) -> np.ndarray:
    """`resamples` values of the two-stage bootstrap statistic (see the module docstring): seeds with replacement,
    then each drawn seed's prompts with replacement, then the mean of the drawn seeds' weighted means. Every seed
    must have at least one pair."""
    if resamples < 1:
        raise UserError(f"bootstrap: resamples must be at least 1, got {resamples}")
    n_seeds = len(diffs)
    if n_seeds == 0 or any(len(d) == 0 for d in diffs):
        raise UserError("bootstrap: every seed needs at least one pair")
    rng = np.random.default_rng(bootstrap_seed)
    out = np.empty(resamples)
    for start in range(0, resamples, _BLOCK):
        block = min(_BLOCK, resamples - start)
        drawn = rng.integers(0, n_seeds, size=(block, n_seeds))       # stage 1: which seeds fill the S slots
        slot_means = np.empty((block, n_seeds))
        for s, (d, w) in enumerate(zip(diffs, weights)):
            slots = drawn == s
            k = int(slots.sum())
            if k == 0:
                continue
            picks = rng.integers(0, len(d), size=(k, len(d)))           # stage 2: that seed's prompts, n_s draws
            ww = w[picks]
            slot_means[slots] = (ww * d[picks]).sum(axis=1) / ww.sum(axis=1)
        out[start:start + block] = slot_means.mean(axis=1)
    return out


def percentile_interval(samples: np.ndarray, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """The inverted-CDF percentile interval: (smallest v with F(v) >= (1-c)/2, smallest v with F(v) >= (1+c)/2)."""
    if not 0 < confidence < 1:
        raise UserError(f"confidence must be between 0 and 1, got {confidence}")
    low, high = np.quantile(samples, [(1 - confidence) / 2, (1 + confidence) / 2], method="inverted_cdf")
    return float(low), float(high)


def verdict_from_interval(low: float, high: float) -> str:
    """"lower" when the interval lies below 0, "higher" above 0, else "not established" (NaN included)."""
    if high < 0:
        return LOWER
    if low > 0:
        return HIGHER
    return NOT_ESTABLISHED


def _sign(x: float) -> int | None:
    return None if math.isnan(x) else (x > 0) - (x < 0)


def paired_comparison(a: Mapping[Hashable, Sequence[float]], b: Mapping[Hashable, Sequence[float]], *,
                      weights: Mapping[Hashable, Sequence[float]] | None = None,
                      confidence: float = DEFAULT_CONFIDENCE, resamples: int = DEFAULT_RESAMPLES,
                      bootstrap_seed: int = 0) -> PairedResult:
    """Compare model `a` with model `b` (difference a - b) over seeds and prompts; see the module docstring for
    the statistic, the interval and the verdict. `a`, `b` (and `weights`): {seed: per-prompt values}."""
    per_seed = paired_differences(a, b, weights)
    seeds = tuple(SeedDifference(seed, len(d), dropped, m := seed_mean(d, w), _sign(m))
                  for seed, (d, w, dropped) in per_seed.items())
    usable = [(d, w) for d, w, _ in per_seed.values() if len(d)]
    signs = [s.sign for s in seeds if s.sign is not None]
    common = dict(confidence=confidence, seeds=seeds, seeds_lower=signs.count(-1), seeds_higher=signs.count(1),
                  seeds_equal=signs.count(0), pairs=sum(s.pairs for s in seeds),
                  dropped=sum(s.dropped for s in seeds), resamples=resamples, bootstrap_seed=bootstrap_seed)
    if not usable:
        return PairedResult(mean=math.nan, low=math.nan, high=math.nan, verdict=NOT_ESTABLISHED,
                            scope="no pair with values", **common)
    samples = bootstrap_distribution([d for d, _ in usable], [w for _, w in usable], resamples=resamples,
                                     bootstrap_seed=bootstrap_seed)
    low, high = percentile_interval(samples, confidence)
    mean = float(np.mean([seed_mean(d, w) for d, w in usable]))
    scope = "seeds and prompts" if len(usable) > 1 else "the prompts of one seed (no spread over seeds)"
    return PairedResult(mean=mean, low=low, high=high, verdict=verdict_from_interval(low, high), scope=scope,
                        **common)


# ---------------------------------------------------------------- seed level: when only one number per seed exists

def student_t_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with an integer number of degrees of freedom, in closed form
    (Abramowitz & Stegun 26.7.3-26.7.4), with theta = atan(t / sqrt(df)):
    df odd:  (2/pi) [theta + sin(theta) (cos(theta) + (2/3) cos^3(theta) + ... + (2*4*...*(df-3))/(3*5*...*(df-2))
             cos^(df-2)(theta))]   (the bracketed sum is empty for df = 1)
    df even: sin(theta) [1 + (1/2) cos^2(theta) + (1*3)/(2*4) cos^4(theta) + ... + (1*3*...*(df-3))/(2*4*...*(df-2))
             cos^(df-2)(theta)]."""
    if df < 1 or int(df) != df:
        raise UserError(f"t distribution: degrees of freedom must be a positive integer, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    c, s = math.cos(theta), math.sin(theta)
    if df % 2:
        series, term = 0.0, c
        for k in range(1, (df - 1) // 2 + 1):   # terms cos^1, cos^3, ..., cos^(df-2)
            series += term
            term *= c * c * (2 * k) / (2 * k + 1)
        return (2 / math.pi) * (theta + s * series)
    series, term = 0.0, 1.0
    for k in range(1, df // 2 + 1):             # terms cos^0, cos^2, ..., cos^(df-2)
        series += term
        term *= c * c * (2 * k - 1) / (2 * k)
    return s * series


def student_t_critical(confidence: float, df: int) -> float:
    """t with P(|T| <= t) = confidence (df integer): bisection on `student_t_two_sided` to 1e-12 relative."""
    if not 0 < confidence < 1:
        raise UserError(f"confidence must be between 0 and 1, got {confidence}")
    low, high = 0.0, 1.0
    while student_t_two_sided(high, df) < confidence:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        if student_t_two_sided(mid, df) < confidence:
            low = mid
        else:
            high = mid
        if high - low <= 1e-12 * high:
            break
    return (low + high) / 2


def t_interval(values: Sequence[float], confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high) = mean -/+ t_{df=n-1} * sd / sqrt(n), sd the sample standard deviation (n - 1). Assumes
    the values are independent draws of a normal variable: with 3 values that cannot be checked. NaN ends for
    fewer than 2 values."""
    x = _as_array(values, "t interval")
    if np.isinf(x).any() or np.isnan(x).any():
        raise UserError(f"t interval: values must be finite, got {list(x)}")
    mean = float(x.mean()) if len(x) else math.nan
    if len(x) < 2:
        return mean, math.nan, math.nan
    half = student_t_critical(confidence, len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, mean - half, mean + half


def sign_test_p(lower: int, higher: int) -> float:
    """Two-sided exact sign test: P(a split at least as uneven as `lower`:`higher` | each side has probability 1/2),
    ties left out beforehand. 3 of 3 seeds agreeing gives 0.25: three seeds can never reach 0.05 by this test."""
    n, k = lower + higher, min(lower, higher)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)
