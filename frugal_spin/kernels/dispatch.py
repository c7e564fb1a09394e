"""When to run a Triton kernel instead of its torch reference.

Rule: Triton when every tensor is on CUDA and `import triton` works; the torch reference otherwise.

Test hook: `FRUGAL_SPIN_TRITON=force` takes the Triton path for CPU tensors too. Triton has no CPU driver, so
that only works under its interpreter (`TRITON_INTERPRET=1`), which numpy-executes the same kernel source.
Triton reads `TRITON_INTERPRET` when a kernel is *decorated* (`triton.jit` checks `knobs.runtime.interpret`
then), not when triton is imported. Our kernels are decorated lazily, on the first call that needs them (the
`*_triton.py` modules are imported inside the dispatching function), so setting both variables at the top of a
test module, before any kernel is used, is enough for our kernels even if something else imported triton earlier;
but triton's own @jit functions (tl.max, tl.sum) are decorated when triton is imported, and the interpreter cannot
call them if that happened with it off, so tests/conftest.py sets it before anything imports triton. A forced
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

Speed: a variant that matches its reference on a CUDA device is also timed there against the path that runs
without it, on one representative shape (`register_timer`; the timers are in `frugal_spin/kernel_timing.py`,
registered by `model.use_kernels`), and the faster of the two is kept for that device and variant. Triton
supports NVIDIA compute capability >= 8.0 officially (below, e.g. a T4's 7.5, `tl.dot` has no tensor cores), so
where no timing is available (no timer registered, or it failed) a variant is used from 8.0 up and not below:
off by default below 8.0 unless measured faster (`decide`).

Every decision is kept with its numbers (`variant_reports`: error and tolerance, or the exception; both times;
what is used and why), per process, device and variant, for reports and the GPU check.

This module imports no kernel: each kernel module passes its own self-check to `kernel_verified`, and the timers
are handed in by `register_timer`, so the import graph stays one-way (kernel -> dispatch, kernel_timing -> kernel, dispatch).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Any, Callable, Iterator

import torch

MODE_ENV = "FRUGAL_SPIN_TRITON"  # auto (default) | force | off
# CUDA always; tests add "cpu" to run the Triton path on CPU tensors under the interpreter exactly as a GPU run
# would take it (auto mode, self-checks included).
TRITON_DEVICE_TYPES: tuple[str, ...] = ("cuda",)
# Where a variant's speed is measured: only on real GPUs (the interpreter's times mean nothing); tests add "cpu"
# with stand-in timers to exercise the decision.
TIMED_DEVICE_TYPES: tuple[str, ...] = ("cuda",)
# Triton's officially supported NVIDIA GPUs; below, a variant is used only where it was measured faster.
MIN_CAPABILITY = (8, 0)

# A mode set by `mode()` for the current thread / task; it wins over the environment variable.
_MODE_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar("frugal_spin_triton_mode", default=None)

Timer = Callable[[torch.device, Any], tuple[float, float]]  # (device, variant) -> (kernel s, reference s)
_TIMERS: dict[str, Timer] = {}


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails while loading its driver
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def current_mode() -> str:
    """auto, force or off: `mode()`'s override if one is active, else FRUGAL_SPIN_TRITON (default auto)."""
    return (_MODE_OVERRIDE.get() or os.environ.get(MODE_ENV, "auto")).lower()


@contextlib.contextmanager
def mode(value: str) -> Iterator[None]:
    """Run a block with the kernels forced (`force`) or off (`off`) whatever the environment says: how the timers
    call the kernel and the path that runs without it through their public entry points."""
    if value not in ("auto", "force", "off"):
        raise ValueError(f"mode must be auto, force or off, got {value!r}")
    token = _MODE_OVERRIDE.set(value)
    try:
        yield
    finally:
        _MODE_OVERRIDE.reset(token)


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """True if the Triton kernel should run on these tensors (None entries are ignored)."""
    current = current_mode()
    if current == "off":
        return False
    present = [t for t in tensors if t is not None]
    if current == "force":
        if not triton_importable():
            raise RuntimeError(f"{MODE_ENV}=force but triton cannot be imported (pip install triton)")
        if any(t.device.type != "cuda" for t in present) and not interpreting():
            raise RuntimeError(f"{MODE_ENV}=force on CPU tensors needs TRITON_INTERPRET=1 (Triton has no CPU driver)")
        return True
    if current != "auto":
        raise ValueError(f"{MODE_ENV} must be auto, force or off, got {current!r}")
    return bool(present) and all(t.device.type in TRITON_DEVICE_TYPES for t in present) and triton_importable()


def register_timer(name: str, timer: Timer) -> None:
    """`timer(device, variant)` -> (seconds of the kernel, seconds of the path without it) for kernel `name`."""
    _TIMERS[name] = timer


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device; None for any other device."""
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))


def device_label(device: torch.device) -> str:
    """What a report names the device by: the GPU's name where there is one."""
    if device.type == "cuda":
        try:
            return torch.cuda.get_device_name(device)
        except Exception:  # a mocked or broken CUDA: the device string still says which
            return str(device)
    return str(device)


def decide(passed: bool, kernel_s: float | None, reference_s: float | None,
           capability: tuple[int, int] | None) -> tuple[bool, str]:
    """(use the kernel, why). It must match its reference; then the faster of the two where both were timed;
    untimed, the kernel from compute capability 8.0 up (and on non-CUDA devices, which only tests use) and the
    reference below."""
    if not passed:
        return False, "failed its self-check"
    if kernel_s is not None and reference_s is not None:
        ratio = kernel_s / reference_s if reference_s > 0 else float("inf")
        if kernel_s < reference_s:
            return True, f"faster than the reference ({ratio:.2f}x its time)"
        return False, f"not faster than the reference ({ratio:.2f}x its time)"
    if capability is not None and capability < MIN_CAPABILITY:
        return False, (f"not timed; compute capability {capability[0]}.{capability[1]} < "
                       f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}: off unless measured faster")
    return True, "not timed; matched its reference"


_VERIFIED: dict[tuple, bool] = {}  # (kernel, device, variant) -> the kernel is used
_REPORTS: dict[tuple, dict[str, Any]] = {}  # the same keys -> what was measured and decided


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def _run_check(name: str, target: torch.device, variant, check: Callable[[torch.device], tuple[float, float]]
               ) -> dict[str, Any]:
    from frugal_spin.ui import warn

    label = f"{name} {variant}" if variant is not None else name
    capability = device_capability(target)
    report: dict[str, Any] = {
        "kernel": name, "variant": str(variant) if variant is not None else "", "device": str(target),
        "device_name": device_label(target), "capability": ".".join(map(str, capability)) if capability else None,
        "passed": False, "error": None, "tolerance": None, "exception": None,
        "kernel_ms": None, "reference_ms": None, "timing_exception": None}
    # The first use may come under no_grad (scoring), autocast (mixed precision training) or a checkpointed
    # forward: the check runs plain autograd, with identity saved-tensor hooks that shadow any enclosing ones.
    with torch.enable_grad(), torch.autocast(target.type, enabled=False), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        try:
            error, tolerance = check(target)
            report.update(error=float(error), tolerance=float(tolerance), passed=bool(error <= tolerance))  # NaN fails
        except Exception as exc:  # a kernel that cannot even run here must not take the run down with it
            report["exception"] = _one_line(exc)
        timer = _TIMERS.get(name)
        if report["passed"] and timer is not None and target.type in TIMED_DEVICE_TYPES:
            try:
                kernel_s, reference_s = timer(target, variant)
                report.update(kernel_ms=1e3 * float(kernel_s), reference_ms=1e3 * float(reference_s))
            except Exception as exc:  # no timing: decided as untimed (by compute capability)
                report["timing_exception"] = _one_line(exc)
    timed = report["kernel_ms"] is not None
    use, reason = decide(report["passed"], report["kernel_ms"] if timed else None,
                         report["reference_ms"] if timed else None, capability)
    report.update(used="triton" if use else "reference", reason=reason)
    if report["exception"] is not None:
        warn(f"Triton kernel {label} failed its self-check on {target} ({report['exception']}); "
             f"using the torch reference")
    elif not report["passed"]:
        warn(f"Triton kernel {label} differs from its torch reference on {target} (error {report['error']:.2e} > "
             f"{report['tolerance']:.0e}); using the torch reference")
    elif not use:
        warn(f"Triton kernel {label} is not used on {target}: {reason}; using the torch reference")
    return report


def kernel_verified(name: str, device: torch.device, variant, check: Callable[[torch.device], tuple[float, float]]
                    ) -> bool:
    """Whether variant `variant` (hashable) of kernel `name` is used on `device`: `check(device)` returns (error,
    tolerance) against the torch reference, and the variant must pass it; where a timer is registered for `name`
    and the device is a GPU, it must also be the faster (`decide`). Runs once per process, kernel, device and
    variant. Always true under FRUGAL_SPIN_TRITON=force."""
    if current_mode() == "force":
        return True
    key = (name, str(device), variant)
    if key not in _VERIFIED:
        report = _run_check(name, torch.device(device), variant, check)
        _REPORTS[key] = report
        _VERIFIED[key] = report["used"] == "triton"
    return _VERIFIED[key]


def verified_variants() -> dict[tuple, bool]:
    """Every (kernel, device, variant) decided in this process and whether the kernel is used (for reports, tests)."""
    return dict(_VERIFIED)


def variant_reports() -> list[dict[str, Any]]:
    """One dict per (kernel, device, variant) decided in this process: kernel, variant, device, device_name,
    capability, passed, error, tolerance, exception, kernel_ms, reference_ms, timing_exception, used
    (triton | reference), reason."""
    return [dict(r) for r in _REPORTS.values()]


def forget_verifications() -> None:
    """Drop every recorded self-check result (tests)."""
    _VERIFIED.clear()
    _REPORTS.clear()
