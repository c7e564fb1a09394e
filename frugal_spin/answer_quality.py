"""What the models say: text measures of a model's own answers to test prompts, and length limits that let them end.

Inputs: per prompt the generated answer's token ids (as `generate.generate_answers` returns them: cut after the first
stop token, which is kept) and its text (decoded without special tokens), the stop ids (`turns.stop_token_ids`),
and the real answer's text. Outputs: an `AnswerQuality` with corpus numbers and per-answer values (the per-answer
lists pair prompt by prompt with another model's, for `paired_stats`). Pure functions; no model is touched.

Definitions (tokens are the generated ids up to the first stop token, the stop token itself left out, unless said):
- end-of-turn rate: share of answers that contain a stop id, i.e. stopped on their own before the length limit;
- length: tokens generated, the stop token included (what `max_new_tokens` counts); mean over answers;
- repeated n-grams (loops), n = 4 by default: in an answer with tokens t_1..t_L, the n-gram starting at j repeats
  when the same n tokens started at some k < j. Per answer: repeats / (L - n + 1), NaN when L < n. The corpus value
  pools the counts, sum of repeats / sum of n-grams over all answers, so one long loop weighs by its length;
- distinct-2 (Li et al. 2016, arXiv 1510.03055): distinct token bigrams / all token bigrams, pooled over all
  answers (bigrams never cross answers); NaN when no answer has two tokens;
- chrF (Popovic 2015) against the real answer with sacrebleu's defaults (character n-grams up to 6, beta = 2,
  whitespace ignored, sacrebleu >= 2 averaging over the orders both texts have): per answer `sentence_score`, and the
  corpus score from the pooled n-gram statistics (`corpus_score`), both 0..100.

Length limits (`choose_length_limits`): the smallest limit L such that a share >= target of answers end within L
tokens. A real answer (its token ids with the end-of-turn token, before `data.max_answer_tokens` cuts it) ends
within L when its length is <= L. A generated answer ends within L when it stopped and its length is <= L; an
answer that hit the limit it was sampled with (M) has an unknown length > M, so only L <= M can be read from it: when
fewer than the target share stopped within M, no limit is returned and the answers must be sampled again with a
larger M.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Sequence

from frugal_spin.errors import UserError
from frugal_spin.turns import cut_after_first, ends_turn

REAL_TARGET, GENERATED_TARGET = 0.90, 0.85


def content_ids(ids: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """The answer's tokens up to its first stop token, without it."""
    ids = cut_after_first(ids, stop_ids)
    return ids[:-1] if ends_turn(ids, stop_ids) else ids


def ended(ids: Sequence[int], stop_ids: Sequence[int]) -> bool:
    """The answer contains a stop token (it ended its turn rather than running into the length limit)."""
    return ends_turn(cut_after_first(ids, stop_ids), stop_ids)


def answer_length(ids: Sequence[int], stop_ids: Sequence[int]) -> int:
    """Tokens generated up to and including the first stop token."""
    return len(cut_after_first(ids, stop_ids))


def _ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[j:j + n]) for j in range(len(tokens) - n + 1)]


def repeated_ngram_counts(tokens: Sequence[int], n: int = 4) -> tuple[int, int]:
    """(n-grams that repeat an earlier n-gram of the same answer, all n-grams of the answer)."""
    seen, repeats = set(), 0
    grams = _ngrams(tokens, n)
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats, len(grams)


def repeated_ngram_share(tokens: Sequence[int], n: int = 4) -> float:
    """repeats / n-grams of one answer; NaN for an answer shorter than n tokens."""
    repeats, total = repeated_ngram_counts(tokens, n)
    return repeats / total if total else math.nan


def distinct_n(answers: Sequence[Sequence[int]], n: int = 2) -> float:
    """Distinct n-grams / all n-grams, pooled over the answers (an n-gram never spans two answers)."""
    counts = Counter(gram for tokens in answers for gram in _ngrams(tokens, n))
    total = sum(counts.values())
    return len(counts) / total if total else math.nan


def chrf_scores(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[list[float], float]:
    """(per-answer chrF, corpus chrF) with sacrebleu's default CHRF (char order 6, beta 2, whitespace ignored)."""
    from sacrebleu.metrics import CHRF  # imported here: only this measure needs it

    if len(hypotheses) != len(references):
        raise UserError(f"chrF: {len(hypotheses)} answers and {len(references)} real answers")
    metric = CHRF()
    per_answer = [metric.sentence_score(h, [r]).score for h, r in zip(hypotheses, references)]
    corpus = metric.corpus_score(list(hypotheses), [list(references)]).score if hypotheses else math.nan
    return per_answer, corpus


@dataclass(frozen=True)
class AnswerQuality:
    answers: int
    end_of_turn_rate: float
    mean_length: float            # tokens, stop token included
    repeated_ngram_share: float   # pooled over answers
    ngram: int                    # n of the repeated n-grams
    distinct_2: float
    chrf: float                   # corpus chrF, 0..100
    chrf_mean: float              # mean of the per-answer chrF (what a paired comparison of chrF estimates)
    per_answer: dict[str, list]   # ended (bool), length, repeated_ngram_share (NaN when too short), chrf

    def to_dict(self) -> dict:
        """JSON-ready: NaN becomes null."""
        def clean(x):
            if isinstance(x, float) and math.isnan(x):
                return None
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, list):
                return [clean(v) for v in x]
            return x
        return clean(asdict(self))


def answer_quality(generated_ids: Sequence[Sequence[int]], generated_texts: Sequence[str],
                   real_texts: Sequence[str], stop_ids: Sequence[int], *, ngram: int = 4) -> AnswerQuality:
    """All measures of the module docstring for one model's answers, prompt i of each list being the same prompt."""
    if not len(generated_ids) == len(generated_texts) == len(real_texts):
        raise UserError(f"answer quality: {len(generated_ids)} answers' ids, {len(generated_texts)} texts and "
                        f"{len(real_texts)} real answers: one of each per prompt")
    if not generated_ids:
        raise UserError("answer quality: no answers")
    if ngram < 1:
        raise UserError(f"answer quality: ngram must be at least 1, got {ngram}")
    if not stop_ids:
        raise UserError("answer quality: no stop ids (turns.stop_token_ids gives them)")
    tokens = [content_ids(ids, stop_ids) for ids in generated_ids]
    ends = [ended(ids, stop_ids) for ids in generated_ids]
    lengths = [answer_length(ids, stop_ids) for ids in generated_ids]
    counts = [repeated_ngram_counts(t, ngram) for t in tokens]
    all_grams = sum(total for _, total in counts)
    chrf_each, chrf_corpus = chrf_scores(generated_texts, real_texts)
    return AnswerQuality(
        answers=len(tokens),
        end_of_turn_rate=sum(ends) / len(ends),
        mean_length=sum(lengths) / len(lengths),
        repeated_ngram_share=sum(r for r, _ in counts) / all_grams if all_grams else math.nan,
        ngram=ngram,
        distinct_2=distinct_n(tokens, 2),
        chrf=chrf_corpus,
        chrf_mean=sum(chrf_each) / len(chrf_each),
        per_answer={"ended": ends, "length": lengths,
                    "repeated_ngram_share": [r / t if t else math.nan for r, t in counts], "chrf": chrf_each})


# ---------------------------------------------------------------- length limits

@dataclass(frozen=True)
class LengthLimits:
    real_limit: int                # smallest L with share(real answers <= L tokens) >= real_target
    real_share: float              # that share (ties can push it above the target)
    real_target: float
    generated_limit: int | None    # smallest L <= sampled_with with share(stopped within L) >= generated_target
    generated_share: float         # that share; when generated_limit is None, the share that stopped within
                                   # sampled_with (below the target)
    generated_target: float
    sampled_with: int              # the max_new_tokens the generated answers were sampled with

    @property
    def reached(self) -> bool:
        return self.generated_limit is not None

    def summary(self) -> str:
        real = (f"{self.real_share:.1%} of real answers end within {self.real_limit} tokens "
                f"(target {self.real_target:.0%})")
        if self.reached:
            return (f"{real}; {self.generated_share:.1%} of generated answers end within {self.generated_limit} "
                    f"(target {self.generated_target:.0%})")
        return (f"{real}; only {self.generated_share:.1%} of generated answers ended within the "
                f"{self.sampled_with} tokens they were sampled with (target {self.generated_target:.0%}): sample "
                f"again with a larger limit")


def _share_target_index(target: float, n: int) -> int:
    """How many of n answers a share >= target needs: ceil(target * n), robust to 0.9 * 10 = 9.000000000000002."""
    return max(1, math.ceil(round(target * n, 9)))


def choose_length_limits(real_lengths: Sequence[int], generated_lengths: Sequence[int],
                         generated_ended: Sequence[bool], *, sampled_with: int, real_target: float = REAL_TARGET,
                         generated_target: float = GENERATED_TARGET) -> LengthLimits:
    """Length limits from the real answers' full lengths (end token included, before any cut) and from generated
    answers sampled with `max_new_tokens = sampled_with` (lengths with the stop token, whether each stopped);
    see the module docstring."""
    for name, target in (("real_target", real_target), ("generated_target", generated_target)):
        if not 0 < target <= 1:
            raise UserError(f"length limits: {name} must be in (0, 1], got {target}")
    if not real_lengths or not generated_lengths:
        raise UserError("length limits: need at least one real and one generated answer")
    if len(generated_lengths) != len(generated_ended):
        raise UserError(f"length limits: {len(generated_lengths)} generated lengths but {len(generated_ended)} "
                        f"ended flags")
    if any(n < 1 for n in real_lengths) or any(n < 0 for n in generated_lengths):
        raise UserError("length limits: lengths are token counts (real answers hold at least their end token)")
    too_long = [n for n, e in zip(generated_lengths, generated_ended) if n > sampled_with]
    if too_long:
        raise UserError(f"length limits: a generated answer of {too_long[0]} tokens is longer than the "
                        f"{sampled_with} it was sampled with")
    real_sorted = sorted(real_lengths)
    real_limit = real_sorted[_share_target_index(real_target, len(real_sorted)) - 1]
    real_share = sum(n <= real_limit for n in real_lengths) / len(real_lengths)
    stopped = sorted(n for n, e in zip(generated_lengths, generated_ended) if e)
    needed = _share_target_index(generated_target, len(generated_lengths))
    if len(stopped) >= needed:
        generated_limit = stopped[needed - 1]
        generated_share = sum(n <= generated_limit for n in stopped) / len(generated_lengths)
    else:
        generated_limit, generated_share = None, len(stopped) / len(generated_lengths)
    return LengthLimits(real_limit, real_share, real_target, generated_limit, generated_share, generated_target,
                        sampled_with)
