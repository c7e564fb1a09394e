"""The built-in CPU task: short digit puzzles whose answers can be checked exactly.

What it does: generates chat rows in the ultrachat_200k schema from a seed, mixing five operations of graded
difficulty (for the built-in tiny base: sorting 4-6 digits and reversing a 3-5 digit number < 2-digit subtraction
and addition < 2-digit-by-1-digit multiplication), each asked in four phrasings.
Inputs: a seed and row counts. Outputs: lists of rows
`{"prompt", "prompt_id", "messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`; `is_correct` checks a
generated answer exactly.
Assumptions:
- A *problem* is the operation and its operands, phrasing excluded. Every problem belongs to the held-out slice or
  not by a hash of the problem alone, independent of the seed, so no seed's held-out problem is ever seen in
  any seed's training rows or in the pretraining of the cached tiny base (built once, with its own seed).
- Train and pretraining rows come from the same non-held-out pool and may overlap: the tiny base stands in for a
  pretrained model that has seen the domain, and SFT's gain is then measured where it matters, on held-out problems.
- Within one split a problem appears at most once; pretraining rows are a stream and may repeat problems.
- Pretraining rows answer half of the phrasings in a habitual other style ("85", "The answer is 85.") most of the
  time; train and held-out rows always use the task's style ("47 + 38 = 85"). See `_PHRASINGS` for why.
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Callable

from frugal_spin.errors import UserError

TASK_NAME = "builtin:arithmetic"

# HELDOUT_PER_MILLE problems in a thousand are held out. The smallest operation space, multiplication (720
# problems), keeps ~72 held-out ones, of which 200 held-out rows use ~50; the others keep hundreds or more.
HELDOUT_PER_MILLE = 100

# Sampling weights lean towards the operations the tiny base finds hard, so exact-match has room to move.
OPERATION_WEIGHTS = {"sort": 1, "reverse": 1, "add": 2, "sub": 2, "mul": 2}

# Each phrasing comes with the answer style that follows it in pretraining text ("the web"): the task's own style
# (None) or a habitual alternative. Train and held-out rows always use the task's style, so the base model's greedy
# answer is in the wrong style for about half of the prompts, a habit LoRA SFT can unlearn from few examples, while
# the arithmetic itself is what few examples cannot teach. Exact-match thus has room both to grow and to stay short.
_PHRASINGS: dict[str, list[tuple[str, str | None]]] = {
    "add": [("What is {a} + {b}?", None), ("Compute {a} + {b}.", None),
            ("Add {a} and {b}.", "bare"), ("What is the sum of {a} and {b}?", "sentence")],
    "sub": [("What is {a} - {b}?", None), ("Compute {a} - {b}.", None),
            ("Subtract {b} from {a}.", "bare"), ("What is {a} minus {b}?", "sentence")],
    "mul": [("What is {a} * {b}?", None), ("Compute {a} * {b}.", None),
            ("Multiply {a} by {b}.", "bare"), ("What is {a} times {b}?", "sentence")],
    "sort": [("Sort the digits {d}.", None), ("Sort these digits: {d}.", None),
             ("Put these digits in order: {d}.", "commas"), ("Sort from smallest to largest: {d}.", "joined")],
    "reverse": [("Reverse the digits of {n}.", None), ("Reverse {n}.", None),
                ("Write {n} backwards.", "spaced"), ("What is {n} reversed?", "sentence")],
}
# In pretraining, a phrasing with a habitual style still gets the task's style this often.
PRETRAIN_TASK_STYLE_RATE = 0.2


def _sample_add(rng: random.Random) -> tuple:
    return ("add", rng.randint(10, 99), rng.randint(10, 99))


def _sample_sub(rng: random.Random) -> tuple:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return ("sub", max(a, b), min(a, b))


def _sample_mul(rng: random.Random) -> tuple:
    return ("mul", rng.randint(10, 99), rng.randint(2, 9))


def _sample_sort(rng: random.Random) -> tuple:
    return ("sort", "".join(rng.choice("0123456789") for _ in range(rng.randint(4, 6))))


def _sample_reverse(rng: random.Random) -> tuple:
    return ("reverse", str(rng.randint(100, 99999)))


_SAMPLERS: dict[str, Callable[[random.Random], tuple]] = {
    "add": _sample_add, "sub": _sample_sub, "mul": _sample_mul, "sort": _sample_sort, "reverse": _sample_reverse,
}


def _answer(problem: tuple, style: str | None = None) -> str:
    """The answer in the task's style (None) or in one of the pretraining text's habitual styles."""
    op = problem[0]
    if op in ("add", "sub", "mul"):
        symbol = {"add": "+", "sub": "-", "mul": "*"}[op]
        result = {"add": problem[1] + problem[2], "sub": problem[1] - problem[2], "mul": problem[1] * problem[2]}[op]
        return {None: f"{problem[1]} {symbol} {problem[2]} = {result}", "bare": str(result),
                "sentence": f"The answer is {result}."}[style]
    if op == "sort":
        digits = sorted(problem[1])
        return {None: " ".join(digits), "commas": ", ".join(digits), "joined": "".join(digits)}[style]
    reversed_number = problem[1][::-1]
    return {None: reversed_number, "spaced": " ".join(reversed_number),
            "sentence": f"The reversed number is {reversed_number}."}[style]


def _prompt(problem: tuple, template: str) -> str:
    op = problem[0]
    if op in ("add", "sub", "mul"):
        return template.format(a=problem[1], b=problem[2])
    if op == "sort":
        return template.format(d=" ".join(problem[1]))
    return template.format(n=problem[1])


def is_heldout_problem(problem: tuple) -> bool:
    """True for the fixed slice of problem space reserved for evaluation (sha256, so stable across processes)."""
    digest = hashlib.sha256(repr(problem).encode()).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < HELDOUT_PER_MILLE


def _row(problem: tuple, rng: random.Random, pretraining: bool = False) -> dict:
    template, habit = rng.choice(_PHRASINGS[problem[0]])
    style = habit if pretraining and rng.random() >= PRETRAIN_TASK_STYLE_RATE else None
    prompt = _prompt(problem, template)
    return {
        "prompt": prompt,
        "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(),
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": _answer(problem, style)}],
    }


def _sample_problem(rng: random.Random, heldout: bool) -> tuple:
    ops, weights = zip(*OPERATION_WEIGHTS.items())
    while True:  # rejection sampling: the held-out slice is ~10% of every operation's space
        problem = _SAMPLERS[rng.choices(ops, weights)[0]](rng)
        if is_heldout_problem(problem) == heldout:
            return problem


def _unique_rows(rng: random.Random, n: int, heldout: bool, split: str) -> list[dict]:
    seen: set[tuple] = set()
    rows = []
    misses_in_a_row = 0
    while len(rows) < n:
        problem = _sample_problem(rng, heldout)
        if problem in seen:
            # Only a nearly exhausted problem space repeats this often (the held-out slice holds ~120k problems).
            misses_in_a_row += 1
            if misses_in_a_row > 2000:
                raise UserError(f"cannot draw {n} distinct {split} problems for {TASK_NAME}: ask for fewer rows")
            continue
        misses_in_a_row = 0
        seen.add(problem)
        rows.append(_row(problem, rng))
    return rows


def build_splits(seed: int, n_train: int = 2000, n_heldout: int = 200) -> dict[str, list[dict]]:
    """Train rows and held-out rows for `seed`; the held-out problems are disjoint from every train/pretrain row."""
    if n_train < 0 or n_heldout < 0:
        raise UserError(f"{TASK_NAME}: row counts must be >= 0, got n_train={n_train}, n_heldout={n_heldout}")
    # String seeds are hashed with sha512 by `random`, so they are stable across processes (unlike hash()).
    return {
        "train": _unique_rows(random.Random(f"{seed}:train"), n_train, heldout=False, split="train"),
        "heldout": _unique_rows(random.Random(f"{seed}:heldout"), n_heldout, heldout=True, split="heldout"),
    }


def pretraining_rows(seed: int, n: int) -> list[dict]:
    """A stream of `n` non-held-out rows (problems may repeat; answers in the phrasings' habitual styles, see
    `_PHRASINGS`) used only to pretrain the tiny base."""
    if n < 0:
        raise UserError(f"{TASK_NAME}: pretraining row count must be >= 0, got {n}")
    rng = random.Random(f"{seed}:pretrain")
    return [_row(_sample_problem(rng, heldout=False), rng, pretraining=True) for _ in range(n)]


def reference_answer(row_or_answer: dict | str) -> str:
    """The real answer of a row (its first assistant turn), or the string itself."""
    if isinstance(row_or_answer, str):
        return row_or_answer
    try:
        return next(m["content"] for m in row_or_answer["messages"] if m["role"] == "assistant")
    except (KeyError, TypeError, StopIteration):
        raise UserError(f"{TASK_NAME}: expected a row with an assistant message or an answer string, "
                        f"got {str(row_or_answer)[:80]!r}") from None


def is_correct(generated: str, row_or_answer: dict | str) -> bool:
    """Exact match after stripping surrounding whitespace."""
    return generated.strip() == reference_answer(row_or_answer).strip()


def problem_of(prompt: str) -> tuple:
    """The problem a task prompt asks, e.g. ("add", 47, 38): for per-operation metrics and disjointness checks."""
    for op, phrasings in _PHRASINGS.items():
        for template, _ in phrasings:
            pattern = re.escape(template)
            for field, group in (("a", r"(?P<a>\d+)"), ("b", r"(?P<b>\d+)"), ("d", r"(?P<d>\d( \d)*)"),
                                 ("n", r"(?P<n>\d+)")):
                pattern = pattern.replace(re.escape("{" + field + "}"), group)
            match = re.fullmatch(pattern, prompt)
            if match is None:
                continue
            if op in ("add", "sub", "mul"):
                return (op, int(match["a"]), int(match["b"]))
            return (op, match["d"].replace(" ", "")) if op == "sort" else (op, match["n"])
    raise UserError(f"not a {TASK_NAME} prompt: {prompt[:80]!r}")
