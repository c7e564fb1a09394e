"""End-of-turn tokens: which token closes an assistant turn, where answers stop, and how pairs are scored when one
side of a pair was cut before its end.

Inputs: a tokenizer with a chat template (and, for generation, the model's generation_config).
Outputs: token ids and small pure functions over answer ids.

Why not `tokenizer.eos_token`: for many chat models the token that ends an assistant turn is another one (Phi-3
`<|end|>`, Llama-3 `<|eot_id|>`, Gemma `<end_of_turn>`; the tokenizer's eos is `<|endoftext|>`, `<|end_of_text|>`,
`<eos>`). Cutting real answers at eos would keep the turn token *and* whatever the template puts after it, while
generation stopping only at eos runs past the end of the turn. So the end of a turn is read off the template
itself: the first special token the template writes right after an assistant message's content. Real answers
end with it (`data.encode_example`), and generation stops at it and at every eos id of the model's
generation_config (`stop_token_ids`).

Truncation asymmetry: a real answer cut at `data.max_answer_tokens`, or a generated one cut at
`generation.max_new_tokens`, has no end token while the other side of its pair may have one; that end token would
then only ever get a one-sided push (down when only the generated answer ends, a push towards never stopping).
`scored_pair` leaves the end token out of both sides' sums whenever one side of a pair ends and the other does
not; the opponent cache, the player's training loss and the anchor evaluation all score pairs through it, so
their numbers are computed identically.
"""

from __future__ import annotations

from typing import Sequence

# An assistant message whose content cannot merge with the template's own text: what follows it is the template's.
_SENTINEL = "frugalspinsentinel7c1f"


def special_token_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens (eos/pad/... and added tokens marked special, e.g. `<|eot_id|>`)."""
    ids = set(tokenizer.all_special_ids)
    for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return ids


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn in the tokenizer's chat template: the first special token the
    template writes after an assistant message's content. Falls back to eos for templates that write none (or
    that cannot render a conversation ending on an assistant turn)."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that refuses this conversation: eos is the only candidate left
        return tokenizer.eos_token_id
    if not isinstance(text, str) or _SENTINEL not in text:
        return tokenizer.eos_token_id
    suffix = text[text.rindex(_SENTINEL) + len(_SENTINEL):]
    special = special_token_ids(tokenizer)
    for token_id in tokenizer(suffix, add_special_tokens=False)["input_ids"]:
        if token_id in special:
            return int(token_id)
    return tokenizer.eos_token_id


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Where generation stops: the template's end-of-turn token first, then every eos id of the model's
    generation_config (an int or a list; e.g. Llama-3 lists both `<|eot_id|>` and `<|end_of_text|>`) and the
    tokenizer's eos. No duplicates, stable order."""
    ids = [end_of_turn_id(tokenizer)]
    configured = getattr(generation_config, "eos_token_id", None)
    if configured is not None:
        ids += list(configured) if isinstance(configured, (list, tuple)) else [configured]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    out: list[int] = []
    for token_id in ids:
        if int(token_id) not in out:
            out.append(int(token_id))
    return out


def cut_after_first(ids: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """`ids` up to and including the first token in `stop_ids` (all of `ids` if none is there)."""
    ids = list(ids)
    stops = set(stop_ids)
    for position, token_id in enumerate(ids):
        if token_id in stops:
            return ids[: position + 1]
    return ids


def ends_turn(ids: Sequence[int], stop_ids: Sequence[int]) -> bool:
    return bool(ids) and ids[-1] in set(stop_ids)


def scored_pair(real: Sequence[int], generated: Sequence[int], stop_ids: Sequence[int]
                ) -> tuple[list[int], list[int]]:
    """The response ids whose log-probs enter the SPIN sums of one pair.

    Both answers as they are when both end their turn or neither does. When exactly one ends (the other was cut
    at its length limit), that one's final end token is left out, so neither side's sum holds an end token: the
    decision to stop gets no one-sided signal from a pair in which only one side could stop. Dropping the last
    token of a causal sequence changes no other token's log-prob, so this is the same as masking it."""
    real, generated = list(real), list(generated)
    real_ends, generated_ends = ends_turn(real, stop_ids), ends_turn(generated, stop_ids)
    if real_ends and not generated_ends:
        real = real[:-1]
    elif generated_ends and not real_ends:
        generated = generated[:-1]
    return real, generated


def truncation_counts(rows: Sequence[dict], stop_ids: Sequence[int]) -> dict[str, int]:
    """Per pairs file: how many real answers were cut (no end token), how many generated ones, and in how many
    pairs `scored_pair` left an end token out."""
    real_cut = sum(1 for r in rows if not ends_turn(r["real_ids"], stop_ids))
    generated_cut = sum(1 for r in rows if not ends_turn(r["generated_ids"], stop_ids))
    asymmetric = sum(1 for r in rows
                     if ends_turn(r["real_ids"], stop_ids) != ends_turn(r["generated_ids"], stop_ids))
    return {"pairs_real_truncated": real_cut, "pairs_generated_truncated": generated_cut,
            "pairs_end_token_left_out": asymmetric}
