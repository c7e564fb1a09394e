"""When to run a Triton kernel instead of its torch reference.

Rule: Triton when every tensor is on CUDA and `import triton` works; the torch reference otherwise.

Test hook: `FRUGAL_SPIN_TRITON=force` takes the Triton path for CPU tensors too. Triton has no CPU driver, so
that only works under its interpreter (`TRITON_INTERPRET=1`), which numpy-executes the same kernel source.
Triton reads `TRITON_INTERPRET` when a kernel is *decorated* (`triton.jit` checks `knobs.runtime.interpret`
then), not when triton is imported. Our kernels are decorated lazily, on the first call that needs them (the
`*_triton.py` modules are imported inside the dispatching function), so setting both variables at the top of a
test module, before any kernel is used, is enough even if something else imported triton earlier. A forced
run on CPU tensors without the interpreter raises instead of failing somewhere inside triton's driver.
`FRUGAL_SPIN_TRITON=off` disables the kernels everywhere (a switch for debugging a suspected kernel bug).

Self-check: in `auto` mode a kernel is used on a device only after it has matched its torch reference there once
(`kernel_verified`: a small forward + backward per kernel and device, once per process). The parity tests run in
Triton's interpreter on the CPU; a compiler or driver difference on a real GPU must not silently change training,
so a kernel that fails its check (or raises) is not used on that device, with one warning, and the reference runs.
`force` skips the check: the tests that force a kernel are checking that kernel itself.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import torch

MODE_ENV = "FRUGAL_SPIN_TRITON"  # auto (default) | force | off


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails while loading its driver
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """True if the Triton kernel should run on these tensors (None entries are ignored)."""
    mode = os.environ.get(MODE_ENV, "auto").lower()
    if mode == "off":
        return False
    present = [t for t in tensors if t is not None]
    if mode == "force":
        if not triton_importable():
            raise RuntimeError(f"{MODE_ENV}=force but triton cannot be imported (pip install triton)")
        if any(t.device.type != "cuda" for t in present) and not interpreting():
            raise RuntimeError(f"{MODE_ENV}=force on CPU tensors needs TRITON_INTERPRET=1 (Triton has no CPU driver)")
        return True
    if mode != "auto":
        raise ValueError(f"{MODE_ENV} must be auto, force or off, got {mode!r}")
    return bool(present) and all(t.device.type == "cuda" for t in present) and triton_importable()


@functools.lru_cache(maxsize=None)
def _verified(name: str, device: str) -> bool:
    from frugal_spin.ui import warn

    target = torch.device(device)
    try:
        # The first use may come under no_grad (scoring) or autocast (fp16 training): check as plain fp32 autograd.
        with torch.enable_grad(), torch.autocast(target.type, enabled=False):
            error, tolerance = _self_check(name)(target)
    except Exception as exc:  # a kernel that cannot even run here must not take the run down with it
        warn(f"Triton kernel {name} failed its self-check on {device} ({type(exc).__name__}: "
             f"{' '.join(str(exc).split())[:200]}); using the torch reference")
        return False
    if not error <= tolerance:  # also catches NaN
        warn(f"Triton kernel {name} differs from its torch reference on {device} (error {error:.2e} > "
             f"{tolerance:.0e}); using the torch reference")
        return False
    return True


def _self_check(name: str) -> Callable[[torch.device], tuple[float, float]]:
    if name == "logprob":
        from frugal_spin.kernels.logprob import self_check
    elif name == "nf4_lora":
        from frugal_spin.kernels.nf4_lora import self_check
    else:
        raise ValueError(f"unknown kernel {name!r}")
    return self_check


def kernel_verified(name: str, device: torch.device) -> bool:
    """Whether kernel `name` ("logprob" or "nf4_lora") matched its torch reference on `device` (checked once per
    process and device; always true under FRUGAL_SPIN_TRITON=force)."""
    if os.environ.get(MODE_ENV, "auto").lower() == "force":
        return True
    return _verified(name, str(device))
