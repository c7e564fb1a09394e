"""Which commit of a Hugging Face Hub repository (model or dataset) a run uses.

Input: a hub id (`org/name`). Output: the commit hash its default branch points at: asked of the hub when online
(`HfApi.repo_info`), read from the local hub cache (`<cache>/<type>s--org--name/refs/main`, what transformers and
datasets downloaded) when offline or when the hub cannot be reached; None when neither knows it.

Why: a hub id names a branch, not weights. The run loads exactly the resolved commit (`revision=`), records it in
the setup stage's record, and puts it in the fingerprints, so when the weights or the data on the hub change,
every stage built on the old ones is redone instead of being reused.

`repo_access` is the one question asked of the hub before a dataset is loaded: one request with a timeout and no
retries. When the hub is off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) or cannot be reached, the load then runs in
the libraries' offline mode (`offline`), reading only the local cache: an unreachable hub costs a second and one
error line, instead of `datasets`' five retries with backoff per file (25-40 s and a dozen log lines).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from frugal_spin.errors import UserError

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def resolve_revision(repo_id: str, repo_type: str = "model") -> str | None:
    """The commit hash of `repo_id`'s default branch (see the module docstring), or None. When the hub cannot be
    reached, the rest of the process reads the hub cache only (`use_cache_only`): transformers would otherwise
    retry every file it looks for five times with backoff (a cached tiny model's tokenizer took 120 s)."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        try:
            from huggingface_hub import HfApi

            sha = HfApi().repo_info(repo_id, repo_type=repo_type, timeout=10).sha
            if sha:
                return str(sha)
        except Exception as exc:  # no network, a private repo without a token: the cache may still know
            if unreachable(exc):
                use_cache_only(f"the hub cannot be reached ({' '.join(str(exc).split())[:120]})")
    return cached_revision(repo_id, repo_type)


# What httpx (huggingface_hub's client) and the standard library raise when no answer comes at all, by class name
# (httpx's classes are not OSError subclasses).
_UNREACHABLE = ("ConnectError", "ConnectTimeout", "ReadTimeout", "NetworkError", "TimeoutException", "ProxyError",
                "ConnectionError", "TimeoutError", "gaierror")


def unreachable(exc: BaseException | None) -> bool:
    """Whether `exc` (or what caused it) says no server answered, as opposed to an answer that refused."""
    for _ in range(8):
        if exc is None:
            return False
        if any(cls.__name__ in _UNREACHABLE for cls in type(exc).__mro__):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def use_cache_only(reason: str) -> None:
    """From now on huggingface_hub (and transformers and datasets through it) read the local hub cache only, as
    with HF_HUB_OFFLINE=1; said once, as a warning."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return
    constants.HF_HUB_OFFLINE = True
    try:
        import datasets

        datasets.config.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    from frugal_spin.ui import warn

    warn(f"{reason}: reading the local hub cache only for the rest of this run (as with HF_HUB_OFFLINE=1)")


def cached_revision(repo_id: str, repo_type: str = "model", cache_dir: str | Path | None = None) -> str | None:
    """The commit the local hub cache holds for the default branch, or None."""
    from huggingface_hub import constants

    folder = f"{repo_type}s--" + repo_id.replace("/", "--")
    ref = Path(cache_dir or constants.HF_HUB_CACHE) / folder / "refs" / "main"
    try:
        sha = ref.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return sha if _COMMIT.match(sha) else None


@dataclass(frozen=True)
class HubAccess:
    revision: str | None  # the commit to load (None: the cache's latest, or unknown)
    offline: bool  # load from the local cache only
    why_offline: str = ""  # for the error line when the cache does not have it


def offline_mode() -> bool:
    """Whether the user switched the hub off: HF_HUB_OFFLINE, or HF_DATASETS_OFFLINE as `datasets` reads it."""
    from huggingface_hub import constants

    try:
        import datasets

        datasets_offline = bool(datasets.config.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets_offline = False
    return bool(constants.HF_HUB_OFFLINE) or datasets_offline


def repo_access(repo_id: str, repo_type: str, key: str) -> HubAccess:
    """How to load `repo_id`: at the commit the hub names (one request, 10 s timeout, no retries), or from the
    local cache when the hub is off or unreachable. A malformed id, or one the hub does not know, is a UserError
    naming `key`."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UserError(f"{key}: {repo_id[:120]!r} is neither a local path nor a valid hub id "
                        f"({' '.join(str(exc).split()).split(':')[0][:160]})") from None
    if offline_mode():
        return HubAccess(cached_revision(repo_id, repo_type), True, "the hub is off (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)")
    from huggingface_hub import HfApi

    try:
        sha = HfApi().repo_info(repo_id, repo_type=repo_type, timeout=10).sha
    except Exception as exc:  # noqa: BLE001 - sorted by type name below; the rest means "unreachable"
        if type(exc).__name__ in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
            raise UserError(f"{key}: {repo_id[:120]!r} was not found on the hub (or is private or gated); check "
                            f"the id, or use a local path") from None
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        return HubAccess(cached_revision(repo_id, repo_type), True, f"the hub cannot be reached ({reason})")
    return HubAccess(str(sha) if sha else cached_revision(repo_id, repo_type), False)


@contextmanager
def offline(enabled: bool = True) -> Iterator[None]:
    """huggingface_hub's and datasets' offline mode for the block (both read the flag at call time)."""
    if not enabled:
        yield
        return
    import datasets
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved
