"""Data: load prompt/answer pairs, format them with the tokenizer's chat template, tokenise, batch.

Inputs: `data.dataset` is the built-in task (`builtin:arithmetic`), a local `.jsonl`/`.json`/`.parquet` file, or a
hub dataset id; rows are chat data in the ultrachat_200k schema (`messages`: a list of `{role, content}`).
Outputs: `Example`s (prompt text, real answer text) and `Encoded` token ids, and padded tensor batches.

As in SPIN, the prompt is the first user turn and the real answer the first assistant turn. One chat format is
used everywhere: the prompt ids come from `apply_chat_template(..., add_generation_prompt=True)` and are the exact
ids generation starts from and scoring conditions on, so training, generation and scoring can never disagree.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from frugal_spin.config import BUILTIN_DATASET, DataConfig
from frugal_spin.errors import UserError

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class Example:
    prompt: str
    answer: str


@dataclass
class Encoded:
    prompt_ids: list[int]
    answer_ids: list[int]


@dataclass
class DataSplits:
    train: list[Example]
    heldout: list[Example]
    counts: Counter = field(default_factory=Counter)  # skipped/truncated rows, reported in metrics


# ---------------------------------------------------------------- loading


def is_local_path(name: str) -> bool:
    return Path(name).suffix in LOCAL_SUFFIXES or name.startswith((".", "/", "~"))


def check_dataset_reference(cfg: DataConfig) -> None:
    """Fail fast, before any model is loaded, on a dataset path that does not exist."""
    if cfg.dataset.startswith("builtin:"):
        if cfg.dataset != BUILTIN_DATASET:
            raise UserError(f"data.dataset: unknown built-in task {cfg.dataset!r} (available: {BUILTIN_DATASET})")
    elif is_local_path(cfg.dataset):
        path = Path(cfg.dataset).expanduser()
        if not path.is_file():
            raise UserError(f"data.dataset: file not found: {path}")
        if path.suffix not in LOCAL_SUFFIXES:
            raise UserError(f"data.dataset: {path} must be .jsonl, .json or .parquet")


def example_from_row(row: dict[str, Any], counts: Counter) -> Example | None:
    """First user turn -> prompt, first assistant turn -> answer; None (counted) for a row that has neither."""
    messages = row.get("messages")
    if not isinstance(messages, list):
        counts["skipped_malformed"] += 1
        return None
    prompt = answer = None
    for message in messages:
        if not isinstance(message, dict):
            continue
        role, content = message.get("role"), message.get("content")
        if role == "user" and prompt is None:
            prompt = content
        elif role == "assistant" and prompt is not None:
            answer = content
            break
    if not isinstance(prompt, str) or not prompt.strip():
        counts["skipped_no_prompt"] += 1
        return None
    if not isinstance(answer, str) or not answer.strip():
        counts["skipped_no_answer"] += 1
        return None
    return Example(prompt, answer)


def _examples(rows: Iterable[dict[str, Any]], counts: Counter) -> list[Example]:
    out = []
    for row in rows:
        if not isinstance(row, dict):
            counts["skipped_malformed"] += 1
            continue
        example = example_from_row(row, counts)
        if example is not None:
            out.append(example)
    return out


def _sample(rows: list[Any], n: int, seed: int) -> list[Any]:
    if n >= len(rows):
        return list(rows)
    return random.Random(seed).sample(rows, n)


def load_splits(cfg: DataConfig, seed: int) -> DataSplits:
    """Training examples (a seeded `fraction` of the train split) and `eval_size` held-out examples."""
    check_dataset_reference(cfg)
    counts: Counter = Counter()
    if cfg.dataset == BUILTIN_DATASET:
        from frugal_spin.tasks import arithmetic

        splits = arithmetic.build_splits(seed=seed, n_heldout=cfg.eval_size)
        train_rows, heldout_rows = splits["train"], splits["heldout"]
    elif is_local_path(cfg.dataset):
        rows = _load_local(Path(cfg.dataset).expanduser())
        # A single local file has no test split: hold out a seeded sample so evaluation never sees training rows.
        shuffled = _sample(rows, len(rows), seed)
        heldout_rows, train_rows = shuffled[: cfg.eval_size], shuffled[cfg.eval_size:]
    else:
        train_rows = _load_hub(cfg.dataset, cfg.split)
        heldout_rows = _sample(_load_hub(cfg.dataset, cfg.eval_split), cfg.eval_size, seed)
    train_rows = _sample(train_rows, max(1, round(cfg.fraction * len(train_rows))), seed)
    train = _examples(train_rows, counts)
    heldout = _examples(heldout_rows, counts)
    if not train:
        raise UserError(f"data.dataset {cfg.dataset}: no usable training rows after filtering ({dict(counts)})")
    if not heldout:
        raise UserError(f"data.dataset {cfg.dataset}: no usable held-out rows after filtering ({dict(counts)})")
    return DataSplits(train, heldout, counts)


def _load_local(path: Path) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(LOCAL_SUFFIXES[path.suffix], data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for unreadable files; all mean "this file is bad"
        raise UserError(f"data.dataset: cannot read {path}: {' '.join(str(exc).split())[:300]}") from None
    return list(ds)


def _load_hub(name: str, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # offline, unknown id or split: the user must fix the recipe or the network
        raise UserError(f"data.dataset: cannot load {name!r} split {split!r}: {' '.join(str(exc).split())[:300]}")
    return list(ds)


# ---------------------------------------------------------------- tokenising


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


def encode_example(tokenizer, example: Example, cfg: DataConfig, counts: Counter | None = None) -> Encoded:
    """Prompt ids exactly as generation sees them; answer ids are what the template appends for the assistant turn,
    cut after the first end-of-turn token so that real and generated answers end the same way."""
    prompt_ids = encode_prompt(tokenizer, example.prompt)
    full = list(tokenizer.apply_chat_template(
        [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.answer}],
        tokenize=True, return_dict=False))
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        answer_ids = full[len(prompt_ids):]
    else:  # templates that rewrite earlier turns: fall back to the plain answer followed by end-of-turn
        answer_ids = tokenizer(example.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    answer_ids = cut_after_eos(answer_ids, tokenizer.eos_token_id)
    return truncate(Encoded(prompt_ids, answer_ids), cfg, counts)


def cut_after_eos(ids: Sequence[int], eos_id: int) -> list[int]:
    ids = list(ids)
    return ids[: ids.index(eos_id) + 1] if eos_id in ids else ids


def truncate(encoded: Encoded, cfg: DataConfig, counts: Counter | None) -> Encoded:
    """Prompts lose their beginning (the question usually ends the turn), answers their end; both are counted."""
    prompt_ids, answer_ids = encoded.prompt_ids, encoded.answer_ids
    if len(prompt_ids) > cfg.max_prompt_tokens:
        prompt_ids = prompt_ids[-cfg.max_prompt_tokens:]
        if counts is not None:
            counts["truncated_prompts"] += 1
    if len(answer_ids) > cfg.max_answer_tokens:
        answer_ids = answer_ids[: cfg.max_answer_tokens]
        if counts is not None:
            counts["truncated_answers"] += 1
    return Encoded(prompt_ids, answer_ids)


# ---------------------------------------------------------------- batching


@dataclass
class SequenceBatch:
    """Right-padded prompt+response sequences; `response_mask` marks the response tokens that are scored."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor

    def to(self, device: torch.device | str) -> "SequenceBatch":
        return SequenceBatch(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device))


def collate_sequences(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> SequenceBatch:
    """(prompt_ids, response_ids) pairs -> one right-padded batch."""
    width = max(len(p) + len(r) for p, r in pairs)
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), width), dtype=torch.long)
    response_mask = torch.zeros((len(pairs), width), dtype=torch.bool)
    for i, (prompt, response) in enumerate(pairs):
        n_prompt, n = len(prompt), len(prompt) + len(response)
        input_ids[i, :n] = torch.tensor(list(prompt) + list(response), dtype=torch.long)
        attention_mask[i, :n] = 1
        response_mask[i, n_prompt:n] = True
    return SequenceBatch(input_ids, attention_mask, response_mask)


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int | None) -> list[list[int]]:
    """Indices grouped into batches of similar length, to minimise padding.

    Without a seed (generation, scoring): a plain sort by length. With a seed (training): shuffle, sort within
    windows of 50 batches, then shuffle the batches, so that each epoch sees different batch compositions and no
    short-to-long curriculum, while most of the padding saving remains.
    """
    order = list(range(len(lengths)))
    if seed is None:
        order.sort(key=lambda i: lengths[i])
        return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    rng = random.Random(seed)
    rng.shuffle(order)
    window = 50 * batch_size
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start: start + window], key=lambda i: lengths[i])
        batches += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
