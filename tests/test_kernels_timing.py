"""The kernel dispatch's choice per device and variant (kernels/dispatch.py): a variant must match its torch reference,
then the faster of kernel and reference is kept where both were timed on a GPU; untimed, the kernel is used from
compute capability 8.0 up and not below. Every decision is reported with its numbers, failures included.

The decision runs on the CPU here: the dispatch treats CPU tensors like CUDA ones (`TRITON_DEVICE_TYPES`,
`TIMED_DEVICE_TYPES`), the compute capability is a stand-in, and the timers are stand-ins, except in the last
tests, which run the real timers (kernel_timing.py) on tiny shapes under Triton's interpreter to show that they
call the kernel and the path without it (their times mean nothing there)."""

from __future__ import annotations

import math
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402,F401  (must import: the real timers run the kernels under the interpreter)

from frugal_spin.kernels import dispatch  # noqa: E402
from conftest import CallCounter as _Calls  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture
def gpu_like(monkeypatch):
    """auto mode; CPU tensors taken and timed like CUDA ones; no timers but the test's; results forgotten."""
    monkeypatch.delenv(dispatch.MODE_ENV, raising=False)
    monkeypatch.setattr(dispatch, "TRITON_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(dispatch, "TIMED_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(dispatch, "_TIMERS", {})
    dispatch.forget_verifications()
    yield monkeypatch
    dispatch.forget_verifications()


# (passed, kernel s, reference s, capability) -> (use the kernel, words the reason must hold)
DECISIONS = [
    ((True, 1.0, 2.0, (9, 0)), (True, "faster")),
    ((True, 2.0, 1.0, (9, 0)), (False, "not faster")),
    ((True, 1.0, 1.0, (8, 0)), (False, "not faster")),  # a tie keeps the reference: nothing to gain
    ((True, 1.0, 2.0, (7, 5)), (True, "faster")),  # below 8.0 only where measured faster
    ((True, 2.0, 1.0, (7, 5)), (False, "not faster")),
    ((True, None, None, (9, 0)), (True, "not timed")),
    ((True, None, None, (8, 0)), (True, "not timed")),
    ((True, None, None, (7, 5)), (False, "7.5 < 8.0")),
    ((True, None, None, None), (True, "not timed")),  # not a CUDA device (tests only)
    ((False, 1.0, 2.0, (9, 0)), (False, "failed")),  # never a wrong kernel, however fast
    ((False, None, None, (7, 5)), (False, "failed")),
]


@pytest.mark.parametrize("args,expected", DECISIONS)
def test_decide(args, expected):
    use, reason = dispatch.decide(*args)
    assert use == expected[0] and expected[1] in reason, reason


# (check outcome, timer outcome, capability) -> (used, passed, what the report holds)
CHOICES = [
    ("pass", (0.5, 1.0), (9, 0), "triton", True, {"kernel_ms": 500.0, "reference_ms": 1000.0}),
    ("pass", (2.0, 1.0), (9, 0), "reference", True, {"kernel_ms": 2000.0, "reference_ms": 1000.0}),
    ("pass", (0.5, 1.0), (7, 5), "triton", True, {"kernel_ms": 500.0}),
    ("pass", "raise", (7, 5), "reference", True, {"kernel_ms": None, "timing_exception": "RuntimeError: no clock"}),
    ("pass", "raise", (9, 0), "triton", True, {"kernel_ms": None}),
    ("pass", None, (7, 5), "reference", True, {"kernel_ms": None, "timing_exception": None}),
    ("differs", (0.5, 1.0), (9, 0), "reference", False, {"error": 0.5, "tolerance": 0.01, "kernel_ms": None}),
    ("nan", (0.5, 1.0), (9, 0), "reference", False, {"tolerance": 0.01, "kernel_ms": None}),
    ("raise", (0.5, 1.0), (9, 0), "reference", False, {"exception": "ValueError: no driver", "kernel_ms": None}),
]


@pytest.mark.parametrize("check,timing,capability,used,passed,fields", CHOICES)
def test_kernel_verified_keeps_the_faster_and_reports_it(gpu_like, capsys, check, timing, capability, used, passed,
                                                         fields):
    gpu_like.setattr(dispatch, "device_capability", lambda device: capability)
    timed = []

    def timer(device, variant):
        timed.append((device, variant))
        if timing == "raise":
            raise RuntimeError("no clock")
        return timing

    if timing is not None:
        dispatch.register_timer("k", timer)

    def self_check(device):
        if check == "raise":
            raise ValueError("no driver")
        return {"pass": 1e-6, "differs": 0.5, "nan": math.nan}[check], 0.01

    assert dispatch.kernel_verified("k", CPU, "v1", self_check) is (used == "triton")
    assert dispatch.kernel_verified("k", CPU, "v1", lambda d: 1 / 0) is (used == "triton")  # decided once
    (report,) = dispatch.variant_reports()
    assert report["kernel"] == "k" and report["variant"] == "v1" and report["device"] == "cpu"
    assert report["used"] == used and report["passed"] is passed and report["reason"]
    assert report["capability"] == (".".join(map(str, capability)) if capability else None)
    for key, value in fields.items():
        assert report[key] == value, key
    assert len(timed) == (1 if passed and timing is not None else 0)  # a wrong kernel is never timed
    err = capsys.readouterr().err
    assert (used == "reference") == ("using the torch reference" in err)


def test_every_variant_is_reported_when_every_one_fails(gpu_like):
    """The GPU check's self_checks part reads these reports: a run where every variant failed must say so for each."""
    for variant in ("a", "b", "c"):
        dispatch.kernel_verified("k", CPU, variant, lambda device: (_ for _ in ()).throw(RuntimeError("boom")))
    reports = dispatch.variant_reports()
    assert [r["variant"] for r in reports] == ["a", "b", "c"]
    assert all(r["used"] == "reference" and not r["passed"] and "boom" in r["exception"] for r in reports)
    assert not any(dispatch.verified_variants().values())


def test_force_and_off_modes_override_the_environment(monkeypatch):
    monkeypatch.setenv(dispatch.MODE_ENV, "off")
    with dispatch.mode("force"):
        assert dispatch.current_mode() == "force" and dispatch.kernel_verified("k", CPU, "v", lambda d: 1 / 0)
    assert dispatch.current_mode() == "off" and not dispatch.use_triton(torch.zeros(1))
    monkeypatch.setenv(dispatch.MODE_ENV, "force")
    with dispatch.mode("off"):
        assert not dispatch.use_triton(torch.zeros(1))
    with pytest.raises(ValueError):
        with dispatch.mode("sometimes"):
            pass


# ---------------------------------------------------------------- the real timers, on tiny shapes


def test_nf4_lora_timer_runs_the_kernel_and_peft_s_computation(monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    from frugal_spin import kernel_timing
    from frugal_spin.kernels import nf4_lora_triton
    from frugal_spin.kernels.nf4_lora import Variant

    kernel = _Calls(monkeypatch, nf4_lora_triton, "nf4_matmul")
    reference = _Calls(monkeypatch, bnb, "matmul_4bit")
    runs = kernel_timing.WARMUP + kernel_timing.REPEATS
    fused, peft = kernel_timing.time_nf4_lora(CPU, Variant(torch.float32, 8, True, True), shape=(4, 64, 64))
    assert fused > 0 and peft > 0
    assert kernel.count == 2 * runs  # forward and d x
    assert reference.count == runs


def test_logprob_timer_runs_the_kernel_and_the_torch_chunked_path(monkeypatch):
    from frugal_spin import kernel_timing
    from frugal_spin.kernels import logprob_triton
    from frugal_spin.kernels.logprob import Variant

    monkeypatch.setenv(dispatch.MODE_ENV, "auto")
    calls = _Calls(monkeypatch, logprob_triton, "logprobs_and_grad_in_place")
    kernel_s, reference_s = kernel_timing.time_logprob(CPU, Variant(torch.float32), shape=(6, 16, 300, 4))
    assert kernel_s > 0 and reference_s > 0
    assert calls.count == 2 * (kernel_timing.WARMUP + kernel_timing.REPEATS)  # two chunks of 4 rows per run


def test_use_kernels_registers_the_timers(monkeypatch):
    from frugal_spin import kernel_timing
    from frugal_spin.model import use_kernels

    monkeypatch.setattr(dispatch, "_TIMERS", {})
    assert use_kernels(torch.nn.Linear(2, 2)) == {}  # CPU: no kernel runs, but the timers are in place
    assert dispatch._TIMERS == {"nf4_lora": kernel_timing.time_nf4_lora, "logprob": kernel_timing.time_logprob}
