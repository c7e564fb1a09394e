"""Real chat data: `builtin:chitchat`, the chitchat-dataset 0.9.0 (MIT) conversations as ultrachat-schema rows.

What it does: fetches the pinned PyPI wheel once (pypi_assets.py: SHA-256 checked, cached), reads its
`chitchat_dataset/dataset.json` (7,168 human-to-human conversations; each is a list of message groups, consecutive
groups alternate between the two speakers) and turns every adjacent pair of groups into one exchange: the first
group's messages (joined by newlines) are the user turn, the other speaker's reply group the assistant turn.
Inputs: a seed and the number of held-out rows. Outputs: `{"train": rows, "heldout": rows}`, rows
`{"prompt", "prompt_id", "messages": [{"role": "user", ...}, {"role": "assistant", ...}], "conversation"}`.
Assumptions:
- Exchanges are deduplicated on their (user, reply) text after whitespace normalisation, over the whole dataset,
  keeping the first in conversation-id order ("hi" / "hello" occurs hundreds of times): no exchange is twice in
  training, and none is in both splits.
- The held-out split is disjoint from training *by conversation*: a seeded shuffle of the conversation ids puts
  the first `n_heldout` conversations into the held-out split, one seeded exchange of each (so the held-out
  prompts come from `n_heldout` different conversations, not from a few long ones); the other exchanges of those
  conversations are used nowhere, so no held-out prompt's own conversation (the same people, the same topic) was
  trained on. Same seed, same split.
"""

from __future__ import annotations

import hashlib
import json
import random

from frugal_spin.errors import UserError

TASK_NAME = "builtin:chitchat"


def load_conversations() -> dict:
    from frugal_spin.pypi_assets import CHITCHAT_WHEEL, fetch_member

    path = fetch_member(CHITCHAT_WHEEL, f"data.dataset {TASK_NAME}")
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise UserError(f"data.dataset {TASK_NAME}: cannot read {path}: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(data, dict):
        raise UserError(f"data.dataset {TASK_NAME}: {path} is not a mapping of conversations")
    return data


def _group_text(group) -> str:
    if not isinstance(group, list):
        return ""
    return "\n".join(" ".join(str(m.get("text", "")).split()) for m in group if isinstance(m, dict)).strip()


def exchanges(conversations: dict) -> dict[str, list[tuple[str, str]]]:
    """conversation id -> its deduplicated (user, reply) exchanges, in conversation-id order."""
    seen: set[tuple[str, str]] = set()
    out: dict[str, list[tuple[str, str]]] = {}
    for conv_id in sorted(conversations):
        groups = conversations[conv_id].get("messages") if isinstance(conversations[conv_id], dict) else None
        texts = [_group_text(g) for g in groups] if isinstance(groups, list) else []
        kept = []
        for user, reply in zip(texts, texts[1:]):
            key = (user.lower(), reply.lower())
            if user and reply and key not in seen:
                seen.add(key)
                kept.append((user, reply))
        if kept:
            out[conv_id] = kept
    return out


def row(user: str, reply: str, conversation: str) -> dict:
    return {"prompt": user, "prompt_id": hashlib.sha256(user.encode()).hexdigest(),
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}],
            "conversation": conversation}


def build_splits(seed: int, n_heldout: int = 200, conversations: dict | None = None) -> dict[str, list[dict]]:
    by_conv = exchanges(conversations if conversations is not None else load_conversations())
    order = sorted(by_conv)
    rng = random.Random(f"{seed}:chitchat-heldout")
    rng.shuffle(order)
    if n_heldout >= len(order):
        raise UserError(f"data.dataset {TASK_NAME}: data.eval_size {n_heldout} leaves no training conversations "
                        f"(there are {len(order)})")
    heldout = [row(*rng.choice(by_conv[c]), c) for c in order[:n_heldout]]
    train = [row(u, r, c) for c in order[n_heldout:] for u, r in by_conv[c]]
    return {"train": train, "heldout": heldout}
