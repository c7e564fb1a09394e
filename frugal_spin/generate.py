"""Opponent sampling: one answer per prompt, batched by length, with the KV cache.

Inputs: a model (base + the opponent's adapter), its tokenizer, prompt token ids (from `data.encode_prompt`, so
generation starts from exactly the ids that scoring later conditions on), sampling settings.
Outputs: per prompt, the generated token ids after the prompt, cut after the first eos (inclusive); no padding.

Prompts are sorted by length and left-padded, so a batch wastes little compute on padding and every sequence's
new tokens start at the same column. Each batch seeds the sampler from (seed, batch index), so a rerun with the
same prompts, seed and batch size gives the same answers, and an interrupted generation can resume with the
first batch that has an unanswered prompt (`answered`) and still give exactly the uninterrupted answers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from frugal_spin.data import cut_after_eos, length_grouped_batches
from frugal_spin.distributed import current as current_world


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    on_batch: Callable[[int], None] | None = None,
    answered: dict[int, list[int]] | None = None,
    on_answers: Callable[[list[int], list[list[int]]], None] | None = None,
) -> list[list[int]]:
    """Sample (or, at temperature 0, greedily decode) one answer per prompt; `on_batch(n)` reports progress.

    `answered` holds answers saved by an interrupted earlier call (prompt index -> ids); batches whose prompts
    are all answered are skipped. `on_answers(indices, answers)` receives each new batch, to save it."""
    answered = answered or {}
    world = current_world()  # with several ranks, each answers its own batches; `merge` gathers them all
    device = next(model.parameters()).device
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    answers: list[list[int] | None] = [None] * len(prompts)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if temperature > 0 \
        else dict(do_sample=False)
    for batch_index, batch in enumerate(length_grouped_batches([len(p) for p in prompts], batch_size, seed=None)):
        if all(i in answered for i in batch):
            for i in batch:
                answers[i] = list(answered[i])
            if on_batch is not None:
                on_batch(len(batch))
            continue
        if not world.owns(batch_index):
            if on_batch is not None:
                on_batch(len(batch))  # the ranks advance together: the bar shows the whole stage's progress
            continue
        width = max(len(prompts[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids = list(prompts[i])
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids):] = 1
        torch.manual_seed(seed * 1_000_003 + batch_index)
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id, use_cache=True, **sampling)
        for row, i in enumerate(batch):
            answers[i] = strip_answer(output[row, width:].tolist(), eos_id, pad_id)
        if on_answers is not None:
            on_answers(list(batch), [answers[i] for i in batch])
        if on_batch is not None:
            on_batch(len(batch))
    model.train(was_training)
    return world.merge(answers)  # type: ignore[return-value]


def strip_answer(ids: list[int], eos_id: int, pad_id: int) -> list[int]:
    """Keep tokens up to and including the first eos; drop the padding `generate` adds after finished rows."""
    ids = cut_after_eos(ids, eos_id)
    if ids and ids[-1] == eos_id:
        return ids
    while ids and ids[-1] == pad_id:
        ids.pop()
    return ids


class AnswerLog:
    """Answers of an unfinished generation, appended batch by batch to a jsonl file, so a killed run resumes at
    the first batch with an unanswered prompt instead of starting over.

    Line 1 is `{"fingerprint": ...}` (the stage's fingerprint and its prompts); then one line per answer,
    `{"i": prompt index, "ids": [...]}`. Every batch is flushed and fsynced before generation goes on. A log with
    another fingerprint is discarded; a line cut short by a crash ends the usable part. The log is deleted once
    the stage's real outputs are written. With several ranks each appends to its own file (`rank_file`), and a
    resumed run reads all of them, whatever the number of ranks was."""

    def __init__(self, path: Path, fingerprint: str):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.batches_written = 0
        self.own = current_world().rank_file(self.path)

    def _read(self, path: Path) -> dict[int, list[int]]:
        answered: dict[int, list[int]] = {}
        lines = path.read_bytes().splitlines()
        try:
            header = json.loads(lines[0]) if lines else {}
        except ValueError:
            header = {}
        if header.get("fingerprint") == self.fingerprint:
            for line in lines[1:]:
                try:
                    row = json.loads(line)
                    answered[int(row["i"])] = [int(x) for x in row["ids"]]
                except (ValueError, KeyError, TypeError):
                    break  # the tail a crash cut short
        return answered

    def load(self) -> dict[int, list[int]]:
        shares = {path: self._read(path) for path in current_world().rank_files(self.path)}
        answered = {i: ids for share in shares.values() for i, ids in share.items()}
        current_world().barrier()  # every rank has read every log before any rewrites its own
        self.own.parent.mkdir(parents=True, exist_ok=True)
        # Rewrite what is kept: drops a torn last line (and a stale log) so appends start on a clean line.
        with open(self.own, "w", encoding="utf-8") as f:
            f.write(json.dumps({"fingerprint": self.fingerprint}) + "\n")
            f.writelines(json.dumps({"i": i, "ids": ids}) + "\n" for i, ids in shares.get(self.own, {}).items())
            f.flush()
            os.fsync(f.fileno())
        return answered

    def append(self, indices: list[int], answers: list[list[int]]) -> None:
        with open(self.own, "a", encoding="utf-8") as f:
            f.writelines(json.dumps({"i": i, "ids": ids}) + "\n" for i, ids in zip(indices, answers))
            f.flush()
            os.fsync(f.fileno())
        self.batches_written += 1

    @staticmethod
    def remove(path: Path) -> None:
        for own in current_world().rank_files(path):
            own.unlink(missing_ok=True)
