"""Opponent sampling: one answer per prompt, batched by length, with the KV cache.

Inputs: a model (base + the opponent's adapter), its tokenizer, prompt token ids (from `data.encode_prompt`, so
generation starts from exactly the ids that scoring later conditions on), sampling settings.
Outputs: per prompt, the generated token ids after the prompt, cut after the first stop token (the template's
end-of-turn token or an eos id, inclusive; see `turns.py`); no padding.

Prompts are sorted by length and left-padded, so a batch wastes little compute on padding and every sequence's
new tokens start at the same column. Each batch seeds the sampler from (seed, batch index), so a rerun with the
same prompts, seed and batch size gives the same answers, and an interrupted generation can resume with the
first batch that has an unanswered prompt (`answered`) and still give exactly the uninterrupted answers.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from frugal_spin.data import length_grouped_batches
from frugal_spin.turns import cut_after_first, ends_turn, stop_token_ids
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
    stop_ids: Sequence[int] | None = None,
) -> list[list[int]]:
    """Sample (or, at temperature 0, greedily decode) one answer per prompt; `on_batch(n)` reports progress.

    Only the arguments decide how tokens are drawn: the model's own generation_config (a repetition penalty,
    top_k, no_repeat_ngram_size, ...) is set aside for the call, see `recipe_generation_config`. Generation stops
    at any of `stop_ids` (default: `turns.stop_token_ids`, the template's end-of-turn token and every eos id).

    `answered` holds answers saved by an interrupted earlier call (prompt index -> ids); batches whose prompts
    are all answered are skipped. `on_answers(indices, answers)` receives each new batch, to save it."""
    answered = answered or {}
    world = current_world()  # with several ranks, each answers its own batches; `merge` gathers them all
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    stop_ids = list(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer, _owner(model).generation_config)
    was_training = model.training
    model.eval()
    answers: list[list[int] | None] = [None] * len(prompts)
    config = recipe_generation_config(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                      top_k=top_k, stop_ids=stop_ids, pad_id=pad_id)
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
        with model_settings_set_aside(model):
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    generation_config=config)
        for row, i in enumerate(batch):
            answers[i] = strip_answer(output[row, width:].tolist(), stop_ids, pad_id)
        if on_answers is not None:
            on_answers(list(batch), [answers[i] for i in batch])
        if on_batch is not None:
            on_batch(len(batch))
    model.train(was_training)
    return world.merge(answers)  # type: ignore[return-value]


def strip_answer(ids: list[int], stop_ids: Sequence[int], pad_id: int) -> list[int]:
    """Keep tokens up to and including the first stop token; drop the padding `generate` adds after finished
    rows (pad may equal a stop token, as in SmolLM2's `<|im_end|>`: the cut then comes first)."""
    ids = cut_after_first(ids, stop_ids)
    if ends_turn(ids, stop_ids):
        return ids
    while ids and ids[-1] == pad_id:
        ids.pop()
    return ids


# Logits processors/warpers that a model's generation_config can switch on, at their neutral values. transformers
# fills every field left None from the model's generation_config (Qwen2.5-Instruct ships repetition_penalty 1.1,
# top_k 20, temperature 0.7), so the recipe's config names them all; `model_settings_set_aside` covers the rest.
_NEUTRAL = dict(repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
                encoder_no_repeat_ngram_size=0, min_new_tokens=0, num_beams=1, num_return_sequences=1,
                length_penalty=1.0, renormalize_logits=False, remove_invalid_values=False, use_cache=True)


def recipe_generation_config(*, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                             stop_ids: Sequence[int], pad_id: int):
    """The one GenerationConfig of the opponent's sampling (temperature > 0) and of greedy evaluation
    (temperature 0): the recipe's fields and nothing of the model's, so y' is drawn from p_θt / temperature
    (restricted by top_p/top_k only when the recipe asks), which is what the SPIN loss assumes."""
    from transformers import GenerationConfig

    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k, typical_p=1.0,
                    epsilon_cutoff=0.0, eta_cutoff=0.0) if temperature > 0 else dict(do_sample=False)
    return GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids), pad_token_id=pad_id,
                            **sampling, **_NEUTRAL)


def _owner(model):
    """The transformers model that holds `generation_config` (under a peft wrapper, the wrapped model)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextmanager
def model_settings_set_aside(model) -> Iterator[None]:
    """Replace the model's generation_config with an empty one for the call: `generate` fills the fields an
    explicit config leaves None from it (suppress_tokens, bad_words_ids, sequence_bias, min_p, ...)."""
    from transformers import GenerationConfig

    owner = _owner(model)
    saved = owner.generation_config
    owner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        owner.generation_config = saved


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
