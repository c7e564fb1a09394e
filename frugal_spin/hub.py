"""Which commit of a Hugging Face Hub repository (model or dataset) a run uses.

Input: a hub id (`org/name`). Output: the commit hash its default branch points at: asked of the hub when online
(`HfApi.repo_info`), read from the local hub cache (`<cache>/<type>s--org--name/refs/main`, what transformers and
datasets downloaded) when offline or when the hub cannot be reached; None when neither knows it.

Why: a hub id names a branch, not weights. The run loads exactly the resolved commit (`revision=`), records it in
the setup stage's record, and puts it in the fingerprints, so when the weights or the data on the hub change,
every stage built on the old ones is redone instead of being reused.
"""

from __future__ import annotations

import re
from pathlib import Path

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def resolve_revision(repo_id: str, repo_type: str = "model") -> str | None:
    """The commit hash of `repo_id`'s default branch (see the module docstring), or None."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        try:
            from huggingface_hub import HfApi

            sha = HfApi().repo_info(repo_id, repo_type=repo_type).sha
            if sha:
                return str(sha)
        except Exception:  # no network, a private repo without a token: the cache may still know
            pass
    return cached_revision(repo_id, repo_type)


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
