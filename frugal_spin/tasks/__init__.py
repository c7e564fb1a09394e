"""The built-in tasks, as a small registry: what `data.dataset: builtin:<name>` names.

A `Task` says how to draw its rows (`build_splits(seed, n_heldout)` -> {"train": rows, "heldout": rows}, rows in
the ultrachat_200k schema), how many held-out rows it can draw (`max_eval_size`, checked with the recipe), and,
when its answers can be checked exactly, `is_correct(generated, real)` (evaluation then reports exact match).
Adding a task: its module beside these, and one entry in `TASKS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from frugal_spin.tasks import arithmetic, chitchat


@dataclass(frozen=True)
class Task:
    name: str
    build_splits: Callable[..., dict[str, list[dict]]]
    is_correct: Callable[[str, str], bool] | None = None
    max_eval_size: int | None = None


TASKS = {task.name: task for task in (
    # Its rejection sampler slows down as distinct held-out problems run out (5,000 took 8 s on 2 busy cores,
    # 20,000 took 73 s, 10^6 would never finish).
    Task(arithmetic.TASK_NAME, arithmetic.build_splits, arithmetic.is_correct, max_eval_size=5000),
    Task(chitchat.TASK_NAME, chitchat.build_splits),
)}


def task_of(dataset: str) -> Task | None:
    """The built-in task `data.dataset` names, or None for any other dataset."""
    return TASKS.get(dataset)
