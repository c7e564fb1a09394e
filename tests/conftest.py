"""One small built-in base for every end-to-end test (in-process and subprocess), built once per session.

The real default pretrains for minutes; what the end-to-end tests check does not depend on how long, so they all
use `SMALL_BASE`, built once into the `small_base_cache` fixture's directory (set it as `FRUGAL_SPIN_CACHE`): in
process by monkeypatching `tiny_base._resolve_spec` to return it, in subprocesses and notebooks by running
`SMALL_BASE_PATCH` before `frugal_spin.__main__.main`."""

import pytest

from frugal_spin import tiny_base

SMALL_BASE = tiny_base.TinyBaseSpec(pretrain_steps=60)
SMALL_BASE_PATCH = ("from frugal_spin import tiny_base; "
                    "tiny_base._resolve_spec = lambda seed, spec: tiny_base.TinyBaseSpec(pretrain_steps=60)")


@pytest.fixture(scope="session")
def small_base_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tiny_base_cache")
    tiny_base.ensure_tiny_base(cache / "first_build" / "base", cache_root=cache, spec=SMALL_BASE, progress=False)
    return cache
