"""Data parallelism over torch.distributed: the one module that knows about ranks.

`torchrun --nproc_per_node N -m frugal_spin RECIPE.yaml` (or `accelerate launch`, which runs torchrun) starts N
copies of the pipeline; each reads RANK / WORLD_SIZE / LOCAL_RANK from the environment, joins one process group
(gloo on the CPU, NCCL with one GPU per rank) and runs every stage. What each stage does with the ranks:

- generation and scoring (`generate.py`, `scoring.py`) cut their prompts into the same length-sorted batches as
  one process would, and rank r takes the batches whose global index i has i % N == r (`owns`). A batch is seeded
  by its global index, so it gets the same answers on any rank; `merge` puts every rank's share back in order.
  Evaluation scores and answers through the same two functions, so it is sharded the same way.
- training (`train.py`) keeps the recipe's global batch: each optimizer step's window of `grad_accum_steps`
  micro-batches (of `micro_batch_size` items each) is dealt round robin, window position j to rank j % N, so a rank
  runs ceil(grad_accum_steps / N) micro-batches per step; the LoRA gradients are then summed over ranks
  (`all_reduce_grads`, one flat all-reduce: what DDP does, without its forward wrapper, which the chunked log-prob
  forward in logprobs.py bypasses), so every rank applies the same step to the same weights.
- files: `write(fn)` runs fn on rank 0 only, then every rank waits at a barrier, so each file has one writer and a
  stage's marker is written after its outputs and read by the other ranks only after that barrier. An error in fn
  is sent to every rank, which all stop with it. Resumable per-batch logs are one file per rank (`rank_file`).
- failures: collectives time out after `distributed.timeout_s`; an error on any rank ends every rank (torchrun stops
  the others when one exits) with one `error: ...` line (`error_line`), never a hang.

In one process (no launcher) `current()` is a World of size 1 whose methods do nothing, so this costs nothing.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import torch

from frugal_spin.errors import UserError

T = TypeVar("T")


class PeerFailed(UserError):
    """A collective failed because another rank stopped: that rank prints the reason, this one stays quiet."""


class World:
    """This process's place among the ranks: a size-1 World is one plain process."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0, timeout_s: float = 1800.0,
                 local_size: int = 1, backend: str | None = None):
        self.rank, self.size, self.local_rank, self.timeout_s = rank, size, local_rank, timeout_s
        self.local_size = local_size  # ranks on this machine: they share its cores (threads.py)
        self.backend = backend  # the process group's ("gloo" for CPU ranks, "nccl" for GPUs); None in one process

    # ------------------------------------------------------------ sharding

    def owns(self, index: int) -> bool:
        """Whether batch (or accumulation-window position) `index` is this rank's: whole batches, round robin."""
        return index % self.size == self.rank

    def merge(self, values: T) -> T:
        """Every rank's share of a per-item result, in order: a list whose unowned slots are None, or a float
        tensor whose unowned rows are NaN. Each slot is taken from the rank that filled it."""
        if self.size == 1:
            return values
        shares = self._collective("gather results", lambda: _all_gather(values, self.size))
        if isinstance(values, torch.Tensor):
            out = shares[0].clone()
            for share in shares[1:]:
                out = torch.where(torch.isnan(out), share, out)
            return out  # type: ignore[return-value]
        return [next((s[i] for s in shares if s[i] is not None), None) for i in range(len(values))]  # type: ignore

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order."""
        if self.size == 1:
            return [obj]
        return self._collective("gather", lambda: _all_gather(obj, self.size))

    def all_reduce_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum the gradients of `params` over ranks, in place (a rank that ran no micro-batch adds zeros)."""
        if self.size == 1:
            return
        import torch.distributed as dist

        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                          for p in params])
        self._collective("gradient all-reduce", lambda: dist.all_reduce(flat))
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset: offset + n].view_as(p).to(p.dtype)
            offset += n

    def broadcast_params(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Rank 0's values of `params` on every rank (they start equal; this makes sure, as DDP does)."""
        if self.size == 1:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for p in params:
                self._collective("parameter broadcast", lambda p=p: dist.broadcast(p.data, src=0))

    # ------------------------------------------------------------ files

    def write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on rank 0 only, then a barrier; returns rank 0's result on every rank. A UserError
        there stops every rank with it (the others quietly: rank 0 prints it)."""
        if self.size == 1:
            return fn(*args, **kwargs)
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn(*args, **kwargs)
            except UserError as exc:
                error = str(exc)
        result, error = self._collective("write barrier", lambda: _broadcast((result, error)))
        if error is not None:
            raise (UserError if self.rank == 0 else PeerFailed)(error)
        return result  # type: ignore[return-value]

    def first(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn` on rank 0, then on the others: for work that fills a shared cache (building the tiny base)."""
        result = self.write(fn, *args, **kwargs)
        return result if self.rank == 0 else fn(*args, **kwargs)

    def agree(self, value: T) -> T:
        """Rank 0's `value` on every rank: for a choice made from the machine's state (free memory) that every rank
        must make alike."""
        if self.size == 1:
            return value
        return self._collective("agreeing on a setting", lambda: _broadcast(value))

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            self._collective("barrier", dist.barrier)

    def rank_file(self, path: Path) -> Path:
        """This rank's own copy of a per-rank file: `path` on rank 0, `name.rank<r>.suffix` beside it otherwise."""
        path = Path(path)
        return path if self.rank == 0 else path.with_name(f"{path.stem}.rank{self.rank}{path.suffix}")

    @staticmethod
    def rank_files(path: Path) -> list[Path]:
        """Every rank's copy of `path` that exists (of any earlier world size), rank 0's first."""
        path = Path(path)
        others = sorted(path.parent.glob(f"{path.stem}.rank*{path.suffix}")) if path.parent.is_dir() else []
        return [p for p in [path, *others] if p.is_file()]

    # ------------------------------------------------------------ devices and errors

    def cuda_device(self) -> torch.device:
        """One GPU per rank: the LOCAL_RANK-th visible one."""
        return torch.device("cuda", self.local_rank) if self.size > 1 else torch.device("cuda")

    @property
    def writes_here(self) -> bool:
        """Whether this process writes shared files and the terminal (rank 0): for bookkeeping outside `write`."""
        return self.rank == 0

    def error_line(self, exc: UserError) -> str | None:
        """The line to print for an error that ends this rank, or None when another rank already says it: the same
        error on several ranks is printed once, and a rank that only lost its peers stays quiet when a peer has
        reported why it stopped."""
        if self.size == 1:
            # Before the ranks have joined, every rank fails alike (a recipe mistake): rank 0 says it.
            return None if launched() and os.environ.get("RANK", "0") != "0" else f"error: {exc}"
        if isinstance(exc, PeerFailed):
            time.sleep(1.0)  # the failing rank reports before its exit closes the connections we saw fail
            return None if _reported_errors() else f"error: {exc}"
        return f"error: {exc}" if _first_report(str(exc)) else None

    def _collective(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except Exception as exc:  # gloo and NCCL raise RuntimeError subclasses: a timeout or a closed peer
            if isinstance(exc, UserError):
                raise
            raise PeerFailed(f"rank {self.rank}: {what} failed after another rank stopped or did not answer "
                             f"within distributed.timeout_s={self.timeout_s:g} s "
                             f"({' '.join(str(exc).split())[:160]})") from None


_WORLD = World()


def current() -> World:
    """The World of this process (size 1 until `init_from_env` joins a launched group)."""
    return _WORLD


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(timeout_s: float, device_type: str) -> World:
    """Join the process group the launcher describes (env://): gloo for CPU ranks, NCCL for GPU ranks, each rank on
    its own GPU. One process without a launcher stays a size-1 World."""
    global _WORLD
    if not launched():
        _WORLD = World(timeout_s=timeout_s)
        return _WORLD
    import torch.distributed as dist

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "gloo"
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"rank {rank}: LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are "
                            f"visible; launch one rank per GPU (--nproc_per_node <= GPUs)")
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    world = World(rank, size, local_rank, timeout_s, int(os.environ.get("LOCAL_WORLD_SIZE", size)), backend)
    if not dist.is_initialized():
        world._collective("joining the process group", lambda: dist.init_process_group(
            backend, timeout=timedelta(seconds=timeout_s), rank=rank, world_size=size))
    _WORLD = world
    if rank != 0:
        from frugal_spin import ui

        ui.silence()  # one terminal: rank 0 shows the progress and the summary
    return world


def shutdown() -> None:
    global _WORLD
    if _WORLD.size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _WORLD = World(timeout_s=_WORLD.timeout_s)


# ---------------------------------------------------------------- plumbing


def _all_gather(obj: Any, size: int) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * size
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any) -> Any:
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _store():
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # pragma: no cover - private API; without it every rank prints its line
        return None


def _first_report(line: str) -> bool:
    """Count the error in the launcher's key-value store; True for the first rank to report this line (and when
    the store cannot be reached: better twice than never)."""
    import hashlib

    store = _store()
    if store is None:
        return True
    try:
        store.add("frugal_spin/errors", 1)
        return store.add("frugal_spin/error/" + hashlib.sha256(line.encode()).hexdigest()[:16], 1) == 1
    except Exception:
        return True


def _reported_errors() -> bool:
    store = _store()
    try:
        return store is not None and store.add("frugal_spin/errors", 0) > 0
    except Exception:
        return False
