"""Diagnostics of the opponent's answers: how close they are to the real ones, how long, how often they end.

Pure functions over token-id lists, no model. They explain a SPIN result: when the opponent's samples already are
the real answers (identical or near), SPIN's pairs teach nothing, or teach the player to push a right answer down.

"Near" is token-level edit similarity at least `NEAR_SIMILARITY`:

    similarity(a, b) = 1 − levenshtein(a, b) / max(|a|, |b|)      (1 for two empty answers)

levenshtein being the fewest single-token insertions, deletions and substitutions turning a into b. 0.9 allows one
edit per ten tokens: a changed word or punctuation mark in a sentence, not a different answer. Special tokens (the
end-of-turn token) are removed first, so an answer cut off just before its end token still counts as identical.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from frugal_spin.turns import ends_turn

NEAR_SIMILARITY = 0.9


def bounded_edit_distance(a: Sequence[int], b: Sequence[int], k: int) -> int:
    """Levenshtein distance of `a` and `b` if it is at most `k`, else k + 1.

    Only cells with |i − j| <= k of the dynamic-programming table can lie on an edit path of cost <= k (Ukkonen
    1985), so each row is computed on that band and the loop stops once a whole band exceeds k: O(len · k), which
    keeps a near-match test over thousands of 256-token answers to seconds in plain Python."""
    n, m = len(a), len(b)
    if abs(n - m) > k:
        return k + 1
    over = k + 1
    previous = [j if j <= k else over for j in range(m + 1)]
    for i in range(1, n + 1):
        low, high = max(1, i - k), min(m, i + k)
        current = [over] * (m + 1)
        current[0] = i if i <= k else over
        for j in range(low, high + 1):
            substitution = previous[j - 1] + (a[i - 1] != b[j - 1])
            current[j] = min(previous[j] + 1, current[j - 1] + 1, substitution, over)
        if min(current[low - 1:high + 1]) > k:  # every path crosses row i: none can come back under k
            return over
        previous = current
    return min(previous[m], over)


def is_near(a: Sequence[int], b: Sequence[int], threshold: float = NEAR_SIMILARITY) -> bool:
    """similarity(a, b) >= threshold (module docstring), without computing distances past the threshold."""
    longest = max(len(a), len(b))
    if longest == 0:
        return True
    k = int((1.0 - threshold) * longest + 1e-9)  # the most edits that keep the similarity at or above threshold
    return bounded_edit_distance(a, b, k) <= k


def _content(ids: Iterable[int], special: set[int]) -> list[int]:
    return [i for i in ids if i not in special]


def answer_diagnostics(pairs: Sequence[dict[str, Any]], special_ids: Iterable[int],
                       threshold: float = NEAR_SIMILARITY) -> dict[str, float]:
    """Over pairs.jsonl rows (`real_ids`, `generated_ids`): the share of generated answers identical to the real
    one and the share at least `threshold` similar (identical ones included), special tokens removed first."""
    special = set(special_ids)
    identical = near = 0
    for row in pairs:
        real, generated = _content(row["real_ids"], special), _content(row["generated_ids"], special)
        identical += real == generated
        near += real == generated or is_near(real, generated, threshold)
    n = max(1, len(pairs))
    return {"identical_share": identical / n, "near_share": near / n, "near_threshold": threshold}


def end_token_rate(answers: int, answers_without_end: int) -> float:
    """Share of generated answers that ended with an end token (the rest ran into generation.max_new_tokens)."""
    return (answers - answers_without_end) / max(1, answers)


def answer_ends(pairs: Sequence[dict[str, Any]], stop_ids: Sequence[int]) -> dict[str, float]:
    """How many generated answers did not end (`answers_without_eos`) and the share that did (`end_token_rate`), by
    one rule: an answer ended when its last token is one of `stop_ids`, the ids generation stops at (the template's
    end-of-turn token and every eos id: turns.stop_token_ids). Counting only the tokenizer's eos would call every
    answer of a template whose turn ends on another token unfinished."""
    without_end = sum(1 for row in pairs if not ends_turn(row["generated_ids"], stop_ids))
    return {"answers_without_eos": without_end, "end_token_rate": end_token_rate(len(pairs), without_end)}
