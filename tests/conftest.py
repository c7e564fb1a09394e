"""One small built-in base for every end-to-end test (in-process and subprocess), built once per session.

The real default pretrains for minutes; what the end-to-end tests check does not depend on how long, so they all
use `SMALL_BASE`, built once into the `small_base_cache` fixture's directory (set it as `FRUGAL_SPIN_CACHE`): in
process by monkeypatching `tiny_base._resolve_spec` to return it, in subprocesses and notebooks by running
`SMALL_BASE_PATCH` before `frugal_spin.__main__.main`."""

import os
from pathlib import Path

# Before anything imports triton (bitsandbytes does): triton's own @jit library functions (tl.max, tl.sum,
# tl.zeros) are decorated when triton is imported, and the interpreter (3.6 and 3.9 alike) cannot call ones
# decorated with it off ("Cannot call @triton.jit'd outside of the scope of a kernel"); without this the kernel
# tests failed whenever a module importing bitsandbytes (tests/test_resume.py) was collected before them.
# Only the kernel tests use it (CPU tensors go to Triton only where a test forces it); the compile and CUDA tests
# drop it in their subprocesses.
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from frugal_spin import tiny_base  # noqa: E402

SMALL_BASE = tiny_base.TinyBaseSpec(pretrain_steps=60)
SMALL_BASE_PATCH = ("from frugal_spin import tiny_base; "
                    "tiny_base._resolve_spec = lambda seed, spec: tiny_base.TinyBaseSpec(pretrain_steps=60)")


@pytest.fixture(scope="session")
def small_base_cache(tmp_path_factory):
    # FRUGAL_SPIN_TEST_CACHE names a directory kept across sessions, to skip the minute-long build when developing
    # on busy cores; unset (CI), every session builds the small base itself.
    kept = os.environ.get("FRUGAL_SPIN_TEST_CACHE")
    cache = Path(kept) if kept else tmp_path_factory.mktemp("tiny_base_cache")
    tiny_base.ensure_tiny_base(cache / "first_build" / "base", cache_root=cache, spec=SMALL_BASE, progress=False)
    return cache


FINISHED_RUN_OVERRIDES = ["data.fraction=0.02", "data.eval_size=8", "spin.iterations=1", "sft.epochs=1",
                          "generation.max_new_tokens=12", "generation.batch_size=20", "eval.max_new_tokens=12",
                          "eval.batch_size=20", "log.tensorboard=true"]


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, small_base_cache):
    """A small finished run (SFT, one SPIN iteration, their evaluations) on SMALL_BASE with TensorBoard logging
    on, for what works on a run afterwards (export, sample, the event files). Tests must not change it."""
    from frugal_spin.__main__ import main

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "cpu_tiny.yaml"
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FRUGAL_SPIN_CACHE", str(small_base_cache))
        mp.setattr(tiny_base, "_resolve_spec", lambda seed, spec: SMALL_BASE)
        assert main([str(recipe), f"output_dir={run_dir}", *FINISHED_RUN_OVERRIDES]) == 0
    return run_dir


class CallCounter:
    """Counts calls of a module-level function (so a test can prove the Triton path ran)."""

    def __init__(self, monkeypatch, module, name):
        self.count = 0
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)
