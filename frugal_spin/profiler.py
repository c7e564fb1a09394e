"""Per-stage wall time and peak memory.

Memory: on CUDA the max allocated and reserved bytes (peaks reset at every stage start); on the CPU the peak
resident set size of this process during the stage, sampled by a background thread. The CPU number is what the
operating system charges the process (weights, activations, allocator caches and the Python heap together), the
figure a user compares with their machine's RAM. The sampler wakes every 10 ms; a spike shorter than that can be
missed, so it is at worst a slight underestimate.
"""

from __future__ import annotations

import threading
import time

import torch

GIB = 1024 ** 3


class StageMeter:
    """`with StageMeter(device) as m: ...` then `m.wall_s` and `m.memory` (a dict of GiB figures)."""

    def __init__(self, device: torch.device, interval_s: float = 0.01):
        self.device = device
        self.interval_s = interval_s
        self.wall_s = 0.0
        self.memory: dict[str, float] = {}

    def __enter__(self) -> "StageMeter":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            import psutil

            self._process = psutil.Process()
            self._peak = self._process.memory_info().rss
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._start = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.memory = {"peak_mem_gib": round(torch.cuda.max_memory_allocated(self.device) / GIB, 4),
                           "peak_reserved_gib": round(torch.cuda.max_memory_reserved(self.device) / GIB, 4)}
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._process.memory_info().rss)
            self.memory = {"peak_rss_gib": round(self._peak / GIB, 4)}
        self.wall_s = time.perf_counter() - self._start


def peak_live_tensor_bytes(fn) -> int:
    """Peak bytes of CPU tensors allocated during `fn()` and alive at the same time, from torch.profiler's
    allocator events: what CUDA's `max_memory_allocated` would count for the same work on a GPU, measured on a CPU.
    Used by the planner check and by memory regression tests (deterministic, unlike RSS)."""
    import json
    import os
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path, encoding="utf-8") as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and "Total Allocated" in e.get("args", {})]
    return max([0] + totals)
