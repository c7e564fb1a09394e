"""How many threads torch's CPU thread pool gets (`model.threads`).

`auto` (the default) looks at the machine before the run starts: it samples for a moment how busy the cores this
process may use already are, and gives torch only the cores that are free (at least one). A thread pool larger
than the free cores makes torch's threads wait for each other at every operation while other processes hold the
cores, which is far slower than fewer threads (measured in profiling/bench_threads.md). An integer forces that
many threads. The choice is made once per run, at its start, and recorded in the setup stage's metrics.
"""

from __future__ import annotations

import os

import torch


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers narrow; else the machine's count), shared
    with the other ranks on this machine under torchrun."""
    from frugal_spin.distributed import current as current_world

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // current_world().local_size)


def busy_cores(sample_s: float = 0.5) -> float:
    """How many of the usable cores other processes kept busy over `sample_s` seconds (this process sleeps)."""
    import psutil

    per_cpu = psutil.cpu_percent(interval=sample_s, percpu=True)
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(len(per_cpu))
    return sum(per_cpu[i] for i in allowed if i < len(per_cpu)) / 100.0


def choose_threads(setting: int | str, cores: int | None = None, busy: float | None = None) -> int:
    """`setting` if it is a number; for "auto", the free cores rounded to the nearest whole one, at least 1."""
    if setting != "auto":
        return int(setting)
    cores = usable_cores() if cores is None else cores
    busy = busy_cores() if busy is None else busy
    return max(1, min(cores, round(cores - busy)))


def apply_threads(setting: int | str) -> int:
    """Set torch's intra-op thread count from `model.threads`; return it."""
    threads = choose_threads(setting)
    torch.set_num_threads(threads)
    return threads
