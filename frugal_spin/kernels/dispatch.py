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

Self-check: in `auto` mode a kernel variant is used on a device only after it has matched its torch reference
there once (`kernel_verified`: a small forward + backward per kernel, device and variant, once per process). A
*variant* is what makes Triton compile another binary or what changes the numbers: the runtime dtype, the LoRA
rank's tile, a bias, double quantisation, the gradient write. The parity tests run in Triton's interpreter on the
CPU; a compiler or driver difference on a real GPU must not silently change training, so a variant that fails its
check (or raises) is not used on that device, with one warning, and the reference runs. `force` skips the check:
the tests that force a kernel are checking that kernel itself.

When the checks run: `model.use_kernels` runs every variant the model will use right after the adapter is
attached, outside any autograd graph. A variant first met later (a call inside a checkpointed layer's forward,
under `save_on_cpu`) is still checked on first use, but under identity saved-tensor hooks, so the check's own
graph never reaches the enclosing checkpoint's hooks (which would count its tensors and then fail the recompute).

This module imports no kernel: each kernel module passes its own self-check to `kernel_verified`, so the import
graph stays one-way (kernel -> dispatch).
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import torch

MODE_ENV = "FRUGAL_SPIN_TRITON"  # auto (default) | force | off
# CUDA always; tests add "cpu" to run the Triton path on CPU tensors under the interpreter exactly as a GPU run
# would take it (auto mode, self-checks included).
TRITON_DEVICE_TYPES: tuple[str, ...] = ("cuda",)


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
    return bool(present) and all(t.device.type in TRITON_DEVICE_TYPES for t in present) and triton_importable()


_VERIFIED: dict[tuple, bool] = {}  # (kernel, device, variant) -> passed its self-check


def _run_check(name: str, target: torch.device, variant, check: Callable[[torch.device], tuple[float, float]]
               ) -> bool:
    from frugal_spin.ui import warn

    label = f"{name} {variant}" if variant is not None else name
    try:
        # The first use may come under no_grad (scoring), autocast (mixed precision training) or a checkpointed
        # forward: the check runs plain autograd, with identity saved-tensor hooks that shadow any enclosing ones.
        with torch.enable_grad(), torch.autocast(target.type, enabled=False), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            error, tolerance = check(target)
    except Exception as exc:  # a kernel that cannot even run here must not take the run down with it
        warn(f"Triton kernel {label} failed its self-check on {target} ({type(exc).__name__}: "
             f"{' '.join(str(exc).split())[:200]}); using the torch reference")
        return False
    if not error <= tolerance:  # also catches NaN
        warn(f"Triton kernel {label} differs from its torch reference on {target} (error {error:.2e} > "
             f"{tolerance:.0e}); using the torch reference")
        return False
    return True


def kernel_verified(name: str, device: torch.device, variant, check: Callable[[torch.device], tuple[float, float]]
                    ) -> bool:
    """Whether variant `variant` (hashable) of kernel `name` matched its torch reference on `device`: `check(device)`
    returns (error, tolerance); it runs once per process, kernel, device and variant. Always true under
    FRUGAL_SPIN_TRITON=force."""
    if os.environ.get(MODE_ENV, "auto").lower() == "force":
        return True
    key = (name, str(device), variant)
    if key not in _VERIFIED:
        _VERIFIED[key] = _run_check(name, torch.device(device), variant, check)
    return _VERIFIED[key]


def verified_variants() -> dict[tuple, bool]:
    """Every (kernel, device, variant) checked in this process and whether it passed (for reports and tests)."""
    return dict(_VERIFIED)


def forget_verifications() -> None:
    """Drop every recorded self-check result (tests)."""
    _VERIFIED.clear()
