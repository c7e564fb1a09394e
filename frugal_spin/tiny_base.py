"""Build the built-in tiny base model (`builtin:tiny-llama`) once, cache it, and copy it into a run.

What it does: trains a byte-level BPE tokenizer on the arithmetic task's text, builds a tiny `LlamaForCausalLM`,
pretrains it briefly (full weights) on `pretraining_rows`, measures its greedy exact-match on the held-out split,
and saves model + tokenizer with `save_pretrained`.
Inputs: a `TinyBaseSpec` (sizes, pretraining budget, seed). Outputs: a directory that `AutoModelForCausalLM` and
`AutoTokenizer.from_pretrained` load (also in bitsandbytes NF4 on CPU), plus `build_info.json` (spec, fingerprint,
measured held-out greedy exact-match overall and per operation, build time).
Assumptions:
- The chat template is `<|user|>Q<|end|><|assistant|>A<|end|>`: special tokens are atomic, so the tokens of
  `[user]` with a generation prompt are a prefix of the tokens of `[user, assistant]`, and an assistant turn ends
  with eos (`<|end|>`).
- Pretraining puts the loss on answer tokens only (the closing eos included): a prompt's operands are random
  digits whose loss cannot drop, and with a ~2-minute budget every gradient should go to what is measured.
  Measured on 64k rows: whole-sequence loss reached 1.5% held-out exact-match where answer-only reached 2-6%.
- Large batches (128) learn far more per row here than small ones (21% against 12% exact-match after the same
  64k rows), and a step's cost grows linearly with its batch on 2 cores, so the budget buys few large steps.
- A cache entry is trusted only if complete: builds happen in a temporary sibling directory that is renamed into
  place after `build_info.json` (written last) exists, so an interrupted build never looks finished.

Shipped base. The build of the default spec is part of the package (`frugal_spin/assets/tiny-llama/`, ~3.6 MB:
safetensors weights, tokenizer json, `build_info.json`): a run of the default spec copies it instead of building,
so the CPU default starts at once and every machine starts from the same weights (a build on another CPU gives
other weights: float sums in another order). `build_info.json` records the SHA-256 of every shipped file; a copy
is used only when the spec's fingerprint and every hash match, else the spec is built into the cache as before.
`python -m frugal_spin build-base` rebuilds the shipped directory after the spec was changed; with the spec
unchanged it refuses (one line) unless `--force`: a rebuild is another model, not a refresh (on another CPU the
float sums run in another order: a rebuild here scored 0.145 held-out exact match against the shipped 0.275).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from frugal_spin.errors import UserError
from frugal_spin.io import apply_umask, mkdtemp
from frugal_spin.tasks import arithmetic

BUILD_INFO = "build_info.json"
SHIPPED_DIR = Path(__file__).resolve().parent / "assets" / "tiny-llama"
SPECIAL_TOKENS = {"pad": "<|pad|>", "eos": "<|end|>", "system": "<|system|>", "user": "<|user|>",
                  "assistant": "<|assistant|>"}
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyBaseSpec:
    """Everything that determines the built model; its fingerprint keys the cache."""

    # Bump when the build code changes what it produces for the same numbers below.
    version: str = "1"
    seed: int = 0
    vocab_size: int = 384  # BPE target, special tokens included; the corpus may stop merging earlier
    hidden_size: int = 128  # a multiple of 64, bitsandbytes' NF4 block size
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 128
    tokenizer_rows: int = 5000  # task rows the BPE is trained on
    pretrain_steps: int = 900
    batch_size: int = 128
    lr: float = 3e-3  # 6e-3 and 1e-2 stall at 0% exact-match for 1,500 steps; 3e-3 does not
    warmup_steps: int = 45
    weight_decay: float = 0.01
    eval_rows: int = 200  # held-out rows for the exact-match quoted in build_info.json

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def build_tokenizer(spec: TinyBaseSpec):
    """A byte-level BPE (digits always single tokens, so arithmetic works digit by digit) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [m["content"] for row in arithmetic.pretraining_rows(spec.seed, spec.tokenizer_rows)
              for m in row["messages"]]
    bpe.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=SPECIAL_TOKENS["eos"], pad_token=SPECIAL_TOKENS["pad"],
        additional_special_tokens=[SPECIAL_TOKENS[k] for k in ("system", "user", "assistant")],
        model_max_length=spec.max_position_embeddings)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(spec: TinyBaseSpec, tokenizer):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False)
    return model


def _encode_rows(tokenizer, rows: list[dict]) -> list[tuple[list[int], int]]:
    """(token ids of the whole chat, number of prompt tokens) per row.

    The prompt ends at the first `<|assistant|>` token: by the template's prefix property that is exactly the
    generation prompt's length, and one batched call is twice as fast as encoding prompts separately.
    """
    assistant_id = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["assistant"])
    chats = tokenizer.apply_chat_template([row["messages"] for row in rows], return_dict=False)
    return [(ids, ids.index(assistant_id) + 1) for ids in chats]


def _packed_batch(encoded: list[tuple[list[int], int]], pad_id: int, width: int):
    """Pack rows into sequences of `width` tokens, each row attending only to itself.

    Rows are 10-40 tokens long; padding each to its batch's longest row wasted ~40% of pretraining compute.
    Returns input ids, a 4-D boolean attention mask (block-diagonal and causal), position ids restarting at every
    row, and labels on answer tokens only (-100 elsewhere), so every row is computed exactly as if it were alone.
    Rows are placed in order; a row that does not fit starts the next sequence.
    """
    sequences: list[list[tuple[list[int], int]]] = [[]]
    for item in encoded:
        if len(item[0]) > width:
            raise ValueError(f"a {len(item[0])}-token row cannot be packed into {width}-token sequences")
        if sum(len(ids) for ids, _ in sequences[-1]) + len(item[0]) > width:
            sequences.append([])
        sequences[-1].append(item)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    positions = torch.zeros((len(sequences), width), dtype=torch.long)
    row_of_token = torch.full((len(sequences), width), -1, dtype=torch.long)  # -1: padding
    for s, rows in enumerate(sequences):
        offset = 0
        for r, (tokens, n_prompt) in enumerate(rows):
            end = offset + len(tokens)
            ids[s, offset:end] = torch.tensor(tokens)
            labels[s, offset + n_prompt:end] = ids[s, offset + n_prompt:end]
            positions[s, offset:end] = torch.arange(len(tokens))
            row_of_token[s, offset:end] = r
            offset = end
    same_row = (row_of_token[:, :, None] == row_of_token[:, None, :]) & (row_of_token[:, :, None] >= 0)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    # Padding queries attend to themselves only, so no softmax row is empty (empty rows give NaN).
    attend = (same_row & causal) | torch.eye(width, dtype=torch.bool)
    return ids, attend[:, None], positions, labels


def pretrain(model, tokenizer, spec: TinyBaseSpec, progress: bool) -> float:
    """Full-weight AdamW on the answer tokens' loss; returns the mean loss of the last 20 steps."""
    from transformers import get_scheduler

    rows = arithmetic.pretraining_rows(spec.seed, spec.pretrain_steps * spec.batch_size)
    encoded = _encode_rows(tokenizer, rows)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=spec.warmup_steps,
                              num_training_steps=spec.pretrain_steps)
    model.train()
    recent_losses: list[float] = []
    with _progress(progress, "pretraining tiny base", spec.pretrain_steps) as advance:
        for step in range(spec.pretrain_steps):
            ids, mask, positions, labels = _packed_batch(
                encoded[step * spec.batch_size:(step + 1) * spec.batch_size], tokenizer.pad_token_id,
                spec.max_position_embeddings)
            loss = model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            recent_losses = (recent_losses + [loss.item()])[-20:]
            advance(f"loss {loss.item():.3f}")
    model.eval()
    return sum(recent_losses) / max(len(recent_losses), 1)


@torch.no_grad()
def greedy_answers(model, tokenizer, rows: list[dict], max_new_tokens: int = 24, batch_size: int = 100) -> list[str]:
    """The model's greedy answer to each row's prompt, through the pipeline's own prompt encoding and generation."""
    from frugal_spin.data import encode_prompt
    from frugal_spin.generate import generate_answers

    prompts = [encode_prompt(tokenizer, row["prompt"]) for row in rows]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               temperature=0.0)
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in answers]


def exact_match_report(answers: list[str], rows: list[dict]) -> dict:
    """Overall and per-operation exact-match of `answers` against `rows`' real answers."""
    by_operation: dict[str, list[bool]] = {}
    for answer, row in zip(answers, rows, strict=True):
        operation = arithmetic.problem_of(row["prompt"])[0]
        by_operation.setdefault(operation, []).append(arithmetic.is_correct(answer, row))
    hits = [hit for operation_hits in by_operation.values() for hit in operation_hits]
    return {"exact_match": sum(hits) / max(len(hits), 1), "rows": len(hits),
            "by_operation": {op: round(sum(h) / len(h), 3) for op, h in sorted(by_operation.items())}}


def build_tiny_base(out_dir: Path, seed: int = 0, progress: bool = True, spec: TinyBaseSpec | None = None,
                    num_threads: int | None = None) -> Path:
    """Build model + tokenizer + build_info.json into `out_dir` (created; must not hold a model already).

    `num_threads` defaults to every core this process may use; on cores shared with other busy processes, 1 is far
    faster (two contended threads made a 5-step build 8x slower here).
    """
    spec = _resolve_spec(seed, spec)
    out_dir = Path(out_dir)
    if (out_dir / BUILD_INFO).exists():
        raise UserError(f"{out_dir} already holds a built model; remove it or build elsewhere")
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    # Every core this process may run on (torch's default can be the machine's count, not the affinity's).
    threads = num_threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(threads)
    try:
        tokenizer = build_tokenizer(spec)
        model = build_model(spec, tokenizer)
        final_loss = pretrain(model, tokenizer, spec, progress)
        heldout = arithmetic.build_splits(spec.seed, n_train=0, n_heldout=spec.eval_rows)["heldout"]
        heldout_report = exact_match_report(greedy_answers(model, tokenizer, heldout), heldout)
    finally:
        torch.set_num_threads(previous_threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    info = {
        "files": file_hashes(out_dir),
        "spec": dataclasses.asdict(spec),
        "fingerprint": spec.fingerprint(),
        "task": arithmetic.TASK_NAME,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "pretrain_final_loss": round(final_loss, 4),
        "heldout_greedy": heldout_report,
        "build_seconds": round(time.perf_counter() - started, 1),
        "torch_threads": threads,
        "built_on": {"cpu": cpu_name(), "torch": torch.__version__},
    }
    # Written last: its presence is what marks the directory complete.
    (out_dir / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return out_dir


def file_hashes(directory: Path) -> dict[str, str]:
    """SHA-256 of every file of a build but build_info.json itself, by name."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(directory).iterdir())
            if p.is_file() and p.name != BUILD_INFO}


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else the platform's processor string."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def shipped_problem(spec: TinyBaseSpec, directory: Path = SHIPPED_DIR) -> str | None:
    """Why the shipped base cannot stand in for a build of `spec` (None: it can)."""
    try:
        info = json.loads((directory / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return f"{directory / BUILD_INFO} is missing or unreadable"
    if info.get("fingerprint") != spec.fingerprint():
        return (f"it was built from spec {info.get('fingerprint')}, not {spec.fingerprint()} "
                "(rebuild it with `python -m frugal_spin build-base`)")
    recorded, actual = info.get("files") or {}, file_hashes(directory)
    if not recorded or recorded != actual:
        changed = sorted(set(recorded) ^ set(actual) | {n for n in recorded if actual.get(n) != recorded[n]})
        return f"its files differ from the SHA-256 recorded in build_info.json ({', '.join(changed)})"
    return None


def default_cache_root() -> Path:
    from frugal_spin.cache import default_cache_root as root

    return root()


def is_complete_build(directory: Path, spec: TinyBaseSpec) -> bool:
    """True if `directory` holds a finished build of exactly `spec`."""
    try:
        info = json.loads((Path(directory) / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return False
    return info.get("fingerprint") == spec.fingerprint() and (Path(directory) / "config.json").exists()


def ensure_tiny_base(run_base_dir: Path, seed: int = 0, cache_root: Path | None = None,
                     spec: TinyBaseSpec | None = None, progress: bool = True, num_threads: int | None = None) -> Path:
    """Copy the shipped base (the default spec) or a build of `spec` from the cache, built there if it is not
    there yet, into `run_base_dir`; return that.

    The cache lives in `cache_root` (default `$FRUGAL_SPIN_CACHE`, else ~/.cache/frugal_spin), one directory per
    spec fingerprint. A run directory already holding this spec's build is returned as is; one holding another
    spec's build is refused rather than overwritten (the run's adapters were trained on it).
    """
    spec = _resolve_spec(seed, spec)
    run_base_dir = Path(run_base_dir)
    if is_complete_build(run_base_dir, spec):
        return run_base_dir
    if (run_base_dir / BUILD_INFO).exists():
        raise UserError(f"{run_base_dir} holds a different tiny base (another spec); use a new output_dir")
    source = ensure_cached_tiny_base(seed, cache_root, spec, progress, num_threads)
    _publish(run_base_dir, lambda tmp: copy_tree(source, tmp, shown_as=run_base_dir))
    return run_base_dir


def ensure_cached_tiny_base(seed: int = 0, cache_root: Path | None = None, spec: TinyBaseSpec | None = None,
                            progress: bool = True, num_threads: int | None = None) -> Path:
    """Where a run's `base/` is copied from: the shipped base (the default spec), else the cache's build of `spec`
    (built first if missing). Writes only to the cache, so a run can check the base's tokenizer and modules
    before it touches its run directory."""
    spec = _resolve_spec(seed, spec)
    problem = shipped_problem(spec)
    if problem is None:
        return SHIPPED_DIR
    if spec == TinyBaseSpec():  # the default spec should have been shipped; another spec (tests) never is
        from frugal_spin.ui import warn

        warn(f"the shipped tiny base is not used: {problem}; building it instead (minutes)")
    cache_dir = Path(cache_root) if cache_root is not None else default_cache_root()
    cached = cache_dir / f"tiny-llama-{spec.fingerprint()}"
    if not is_complete_build(cached, spec):
        from frugal_spin.cache import writable_dir

        writable_dir(cache_dir, cache_dir, "model.name builtin:tiny-llama", cached.name)
        _publish(cached, lambda tmp: build_tiny_base(tmp, spec.seed, progress, spec, num_threads))
    return cached


def copy_tree(source: Path, target: Path, shown_as: Path | None = None) -> None:
    """copytree, with a full disk reported as one line naming the target (`shown_as`: the final name of a
    temporary target) and the space the copy needs."""
    from frugal_spin.io import raise_if_disk_full

    try:
        shutil.copytree(source, target, dirs_exist_ok=True)
    except (OSError, shutil.Error) as exc:
        needed = sum(p.stat().st_size for p in Path(source).rglob("*") if p.is_file())
        raise_if_disk_full(exc, Path(shown_as or target), needed)
        raise


def _publish(target: Path, fill) -> None:
    """Run `fill(tmp)` in a temporary sibling of `target`, then rename it into place (never half-written)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent)
    try:
        fill(tmp)
        apply_umask(tmp)  # save_pretrained's safetensors (and copies of them) are 0600 whatever the umask
        if (target / BUILD_INFO).exists():
            return  # another process published a complete copy while we were building: keep theirs
        if target.exists():
            shutil.rmtree(target)  # an incomplete leftover is never trusted
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process published a complete copy between our check and the rename: keep theirs.
            if not (target / BUILD_INFO).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def rebuild(out_dir: Path = SHIPPED_DIR, spec: TinyBaseSpec | None = None, num_threads: int | None = None,
            progress: bool = True, force: bool = False) -> dict:
    """Build `spec` (default: the current default spec) and replace `out_dir` with it; return its build_info.

    `out_dir` must be absent, empty or an earlier build (it has build_info.json): nothing else is replaced. An
    earlier build of this very spec is replaced only with `force` (module docstring)."""
    spec = spec or TinyBaseSpec()
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / BUILD_INFO).exists())):
        raise UserError(f"{out_dir} exists and is not a tiny-base build (no {BUILD_INFO}); not replacing it")
    if not force and is_complete_build(out_dir, spec):
        info = json.loads((out_dir / BUILD_INFO).read_text())
        damaged = shipped_problem(spec, out_dir)
        raise UserError(f"{out_dir} already holds a build of this spec ({spec.fingerprint()}, held-out exact match "
                        f"{info.get('heldout_greedy', {}).get('exact_match')}){f', but {damaged}' if damaged else ''}; "
                        "a rebuild gives other weights, not the same ones: not replacing it (change the spec, or "
                        "pass --force to rebuild anyway)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent)
    old = mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent)
    try:
        build_tiny_base(tmp / "new", spec.seed, progress, spec, num_threads)
        apply_umask(tmp / "new")
        if out_dir.exists():
            os.replace(out_dir, old / "previous")
        os.replace(tmp / "new", out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return json.loads((out_dir / BUILD_INFO).read_text())


def build_base_main(argv: list[str]) -> int:
    """`python -m frugal_spin build-base [--out DIR] [--threads N]`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m frugal_spin build-base",
        description="Rebuild the built-in tiny base from TinyBaseSpec (frugal_spin/tiny_base.py) into the package's "
                    "shipped directory (or --out), replacing the earlier build. Needed only after changing the spec "
                    "(a build of the unchanged spec is kept unless --force); "
                    "commit the new files so every machine starts from them.")
    parser.add_argument("--out", default=str(SHIPPED_DIR), help=f"where to write it (default: {SHIPPED_DIR})")
    parser.add_argument("--force", action="store_true",
                        help="rebuild even though the directory already holds a build of the current spec (the "
                             "new weights differ from the old ones)")
    parser.add_argument("--threads", default="auto",
                        help="torch threads: auto (the cores other processes leave free) or a number")
    args = parser.parse_args(argv)
    from frugal_spin.threads import choose_threads

    if args.threads != "auto" and not (args.threads.isdigit() and int(args.threads) > 0):
        raise UserError(f"--threads must be auto or a positive number, got {args.threads!r}")
    info = rebuild(Path(args.out), num_threads=choose_threads(args.threads if args.threads == "auto"
                                                               else int(args.threads)), force=args.force)
    print(f"{args.out}: spec {info['fingerprint']}, {info['parameters']} parameters, held-out greedy exact match "
          f"{info['heldout_greedy']['exact_match']:.3f}, built in {info['build_seconds']} s on {info['built_on']['cpu']}")
    return 0


def _resolve_spec(seed: int, spec: TinyBaseSpec | None) -> TinyBaseSpec:
    if spec is None:
        return TinyBaseSpec(seed=seed)
    if spec.seed != seed:
        raise UserError(f"tiny base seed {seed} disagrees with spec.seed {spec.seed}: pass one of them")
    return spec


class _progress:
    """A rich progress bar when enabled, a no-op otherwise; yields `advance(description_suffix)`."""

    def __init__(self, enabled: bool, description: str, total: int):
        self.enabled, self.description, self.total = enabled, description, total

    def __enter__(self):
        if not self.enabled:
            return lambda note="": None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn())
        self.bar.__enter__()
        task = self.bar.add_task(self.description, total=self.total)
        return lambda note="": self.bar.update(task, advance=1, description=f"{self.description} {note}")

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)
        return False
