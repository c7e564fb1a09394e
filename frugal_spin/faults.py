"""Fault injection for the crash tests: `FRUGAL_SPIN_CRASH_AT=<point>[@<count>]` makes the process kill itself
with SIGKILL (no cleanup, no exception handlers: what a Colab disconnect or the OOM killer does) when it reaches
that point, e.g. `sft.step@3` (after SFT's third optimizer step), `iter_0.generate.batch@1` (after the first batch of
answers is saved), `iter_0.score.written` (the output written, the marker not yet).

Unset (always, outside tests) it costs one dictionary lookup per call. Every stage's points follow from the plan
(plan.crash_points); tests/test_crash_resume.py kills a run at each of them."""

from __future__ import annotations

import os
import signal

CRASH_ENV = "FRUGAL_SPIN_CRASH_AT"


def crash_point(point: str, count: int | None = None) -> None:
    wanted = os.environ.get(CRASH_ENV)
    if not wanted:
        return
    name, _, at = wanted.partition("@")
    if name == point and (not at or count == int(at)):
        os.kill(os.getpid(), signal.SIGKILL)
