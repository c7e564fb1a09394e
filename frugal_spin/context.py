"""The run context: everything the stages of a run share, built once (the `setup` stage) and frozen.

`build_context(recipe, run_dir, checked)` loads the base (the run's verified copy of the built-in base, or what
`model.name` names), the tokenizer and data preflight.py checked, and the one 4-bit model with its one adapter that
every stage uses; it fingerprints the base and the data (`base_fp`, `data_fp`: the roots of every stage's
fingerprint) and says where answers end (`stop_ids`, turns.py). It returns the context and the setup record's
metrics, which name how the run ran (device, backend, dtype, the weights, the world size and process-group
backend, what setup's checks found).

A context never changes once built: the model's weights do (each stage loads the adapter it needs), but no stage
reassigns what the context holds. `ctx.rerooted(dir, recipe)` is the same context writing under another root with
another recipe: how `compare` runs an arm (another SPIN loss, continued SFT) over the seed run's model and data.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from frugal_spin import ui
from frugal_spin.base_weights import note_base_files
from frugal_spin.config import Recipe
from frugal_spin.data import Encoded, Example
from frugal_spin.distributed import World
from frugal_spin.distributed import current as current_world
from frugal_spin.fingerprints import fingerprint
from frugal_spin.live_log import LiveLog
from frugal_spin.model import GENERATION_MERGED, GENERATION_UNMERGED, Runtime, load_model, resolve_runtime
from frugal_spin.model_source import base_location, model_source
from frugal_spin.preflight import Checked
from frugal_spin.shared_prompt import packs_pairs, pair_tokens, probe_packing, probe_triple
from frugal_spin.turns import end_of_turn_id, scored_pair, stop_token_ids


@dataclass(frozen=True)
class RunContext:
    recipe: Recipe
    run_dir: Path  # the run directory: base/, setup, SFT and the anchor pairs live here
    root: Path  # where the stages of the plan being run write: run_dir, or a compare arm's directory
    world: World  # several ranks run every stage together; `world.write` runs a stage's writes on rank 0
    runtime: Runtime
    model: Any  # the one peft model every stage shares (player and opponent: see model.py)
    tokenizer: Any
    base_path: str
    train: list[Encoded]
    heldout: list[Encoded]
    train_examples: list[Example]
    heldout_examples: list[Example]
    stop_ids: list[int]  # where answers end (turns.stop_token_ids): generation stops at these
    longest: int  # the longest sequence a stage forms (prompt + the longest answer)
    base_fp: str
    data_fp: str
    live: LiveLog  # no-op unless log.* asks for curves
    packing: Any  # whether SPIN pairs are packed x+y+y' on this model, and why (shared_prompt.probe_packing)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def chunk(self) -> int:
        return self.recipe.model.logprob_chunk_size

    @property
    def heldout_answers(self) -> list[str]:
        return [e.answer for e in self.heldout_examples]

    def rerooted(self, root: Path, recipe: Recipe | None = None) -> RunContext:
        """This context writing under `root` (with `recipe`, e.g. another spin.loss): a compare arm."""
        return replace(self, root=Path(root), recipe=recipe or self.recipe)

    def weights(self, sampling_merged: bool | None = None) -> dict[str, str]:
        """Which weights a stage ran on, for its record: the base as loaded (runtime.base_weights) plus the LoRA
        adapter, unmerged. Training, scoring and evaluation's log-probs share the one model, so the cached
        log-probs are exactly those of the weights the player trains against. A stage that samples also says
        whether it sampled from merged weights (`model.adapter_merged_for_generation`, the CPU's fast path)."""
        out = {"weights": f"{self.runtime.base_weights} + {GENERATION_UNMERGED}"}
        if sampling_merged is not None:
            out["generation_weights"] = (f"{self.runtime.base_weights} + "
                                         f"{GENERATION_MERGED if sampling_merged else GENERATION_UNMERGED}")
        return out

    def answer_rules(self) -> dict[str, Any]:
        """What decides where answers end and what is scored, beyond the recipe: part of the generation and
        anchor fingerprints, so runs made before these rules existed (eos-only stopping, the model's own
        generation_config, end tokens scored one-sided) are never reused."""
        return {"stop_ids": self.stop_ids, "sampling": "recipe-only", "end_token": "left out when one side is cut"}

    def scored(self, rows: list[dict[str, Any]]) -> tuple[list[list[int]], list[list[int]]]:
        """The real and generated response ids each pair is scored on, by the cache, the player and evaluation
        alike: without the end token when only one side ends its turn (turns.scored_pair)."""
        pairs = [scored_pair(x["real_ids"], x["generated_ids"], self.stop_ids) for x in rows]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def scored_tokens(self, rows: list[dict[str, Any]]) -> int:
        """Tokens the scoring forwards of these pairs run over: the prompt once per pair where it is shared (as
        `packs_pairs` decides for all the rows together; scoring decides per batch, so this is approximate)."""
        triples = [(x["prompt_ids"], x["real_ids"], x["generated_ids"]) for x in rows]
        return pair_tokens(triples, bool(triples) and packs_pairs(self.model, triples))


def build_context(recipe: Recipe, run_dir: Path, checked: Checked) -> tuple[RunContext, dict[str, Any]]:
    """The run's context and its setup record's metrics (module docstring). `checked` is preflight's result: the
    base's source, tokenizer and data, checked before the run directory was touched."""
    r, world = recipe, current_world()
    runtime = resolve_runtime(r.model)
    # Rank 0 copies (and, if damaged, copies again) the base first; the other ranks then find it intact.
    base_path = world.first(_verified_base_path, r, run_dir, checked.base_source)
    # A hub model's commit, pinned by preflight (rank 0's, on every rank): the weights load exactly that snapshot
    # and the base is identified by it.
    revision = None if Path(base_path).is_dir() else world.agree(checked.model_revision)
    if revision is None and not Path(base_path).is_dir():
        ui.warn(f"model.name {base_path}: its hub commit could not be resolved (offline, not cached?); finished "
                f"stages are matched by the name alone")
    splits = checked.splits
    longest = r.data.max_prompt_tokens + max(r.data.max_answer_tokens, r.generation.max_new_tokens,
                                             r.eval.max_new_tokens)
    # The adapter's random init depends only on the seed, not on what ran before in this process (building the
    # base draws from the same generator): a first run and a resumed one start from the same weights.
    torch.manual_seed(r.seed)
    model = load_model(base_path, r.model, r.lora, runtime, max_seq_length=longest, seed=r.seed, revision=revision)
    # Pairs are packed x+y+y' only where that is exact on this model (allowlist, then one real pair scored both
    # ways); the verdict stays on the model, so scoring, training and evaluation all follow it.
    packing = probe_packing(model, probe_triple([(e.prompt_ids, e.answer_ids) for e in checked.train]),
                            checked.tokenizer.pad_token_id, r.model.logprob_chunk_size, runtime.autocast)
    # The weights every stage runs on (packed or dequantised 4-bit) are part of the base's identity: the two give
    # the same model up to float rounding, but cached log-probs must come from exactly these.
    base_fp = fingerprint(r.model.name, base_identity(Path(base_path), run_dir, revision), r.model.load_in_4bit,
                          asdict(r.lora), runtime.base_weights, *packing_identity(packing))
    if revision is None and Path(base_path).is_dir():  # what export/sample check the base against
        world.write(note_base_files, Path(base_path), run_dir, f"model.name {r.model.name}")
    # The token ids themselves identify the data (a hub dataset's new commit or an edited local file changes
    # them); the dataset commit is recorded and fingerprinted too.
    data_fp = fingerprint(asdict(r.data), r.seed, base_fp, splits.revision, examples_digest(checked.train),
                          examples_digest(checked.heldout))
    # Where answers end (turns.py): generation stops at these ids, and a pair whose two answers differ in ending
    # with one of them is scored without its end token (the truncation asymmetry).
    owner = model.get_base_model() if hasattr(model, "get_base_model") else model
    stop_ids = stop_token_ids(checked.tokenizer, owner.generation_config)
    ctx = RunContext(
        recipe=r, run_dir=run_dir, root=run_dir, world=world, runtime=runtime, model=model,
        tokenizer=checked.tokenizer, base_path=base_path, train=checked.train, heldout=checked.heldout,
        train_examples=splits.train, heldout_examples=splits.heldout, stop_ids=stop_ids, longest=longest,
        base_fp=base_fp, data_fp=data_fp, live=LiveLog(r.log, run_dir, config=r.to_dict()), packing=packing)
    return ctx, setup_metrics(ctx, checked, revision)


def setup_metrics(ctx: RunContext, checked: Checked, revision: str | None) -> dict[str, Any]:
    """The setup record: the data's counts and how the run ran (the device, backend and weights; the ranks and
    their process-group backend; where answers end). A check made at setup records its finding here."""
    runtime, splits = ctx.runtime, checked.splits
    return {"train_examples": len(ctx.train), "heldout_examples": len(ctx.heldout), **dict(splits.counts),
            "device": str(runtime.device), "backend": runtime.backend,
            "compute_dtype": str(runtime.compute_dtype).replace("torch.", ""),
            "gradient_checkpointing": runtime.gradient_checkpointing, "torch_threads": torch.get_num_threads(),
            "world_size": ctx.world.size, "process_group_backend": ctx.world.backend,
            "base_weights": runtime.base_weights,
            "end_of_turn_token": ctx.tokenizer.convert_ids_to_tokens(end_of_turn_id(ctx.tokenizer)),
            "stop_token_ids": ctx.stop_ids, "model_revision": revision, "dataset_revision": splits.revision,
            "pair_packing": ctx.packing.record()}


def _verified_base_path(recipe: Recipe, run_dir: Path, source: str) -> str:
    """Where the base is loaded from: for the built-in base, the run's copy, checked against `source`."""
    base_path = base_location(recipe.model, run_dir)
    if model_source(recipe.model).is_tiny_builtin:
        base_path = verified_base_copy(Path(base_path), Path(source), run_dir,
                                       lambda: base_location(recipe.model, run_dir))
    return base_path


def base_identity(path: Path, run_dir: Path, revision: str | None = None) -> str:
    """What identifies the base. A hub model: its resolved commit. A local directory: its config, the built-in
    builder's info when there is one, the tokenizer, and the SHA-256 of its weight files (hashed once, then
    remembered by size and mtime: base_weights.py), so stages computed from other weights are never reused."""
    from frugal_spin.base_weights import weights_digest

    if revision is not None:
        return fingerprint(str(path), revision)

    parts = [(path / name).read_text(encoding="utf-8")
             for name in ("config.json", "build_info.json", "tokenizer.json", "tokenizer_config.json")
             if (path / name).is_file()]
    digest = weights_digest(path, run_dir / "stages" / "weights_digest.json") if path.is_dir() else None
    return fingerprint(parts or [str(path)], digest)


def packing_identity(decision) -> tuple[str, ...]:
    """The pair layout's part of the base's identity: empty where pairs are laid out as before the packing guard
    (packed on an allowed architecture, or two sequences off the CPU), so those runs keep their fingerprints; the
    refusal where the guard now keeps two sequences on a model earlier versions packed (ALiBi, local windows,
    recurrent layers, a failed probe): caches scored packed on such a model were wrong and must not be reused."""
    if decision.packed or not decision.reason.startswith(("allowlist miss", "probe")):
        return ()
    return ("pairs as two sequences: " + decision.reason.split(":")[0],)


def examples_digest(examples: list[Encoded]) -> str:
    return fingerprint([[e.prompt_ids, e.answer_ids] for e in examples])


def verified_base_copy(copy: Path, source: Path, run_dir: Path, recopy) -> str:
    """The run's copy of the built-in base, checked against the cache build it was copied from; a truncated or
    altered copy is replaced (with a warning), never loaded or mixed with stages computed from the original."""
    from frugal_spin.base_weights import copy_differences

    # Every file that decides the model (config, tokenizer, chat template, weights), not only the weights.
    changed = copy_differences(copy, source, run_dir / "stages" / "weights_digest.json")
    if not changed:
        return str(copy)
    ui.warn(f"{copy.name}/ differs from the built base it was copied from ({', '.join(changed[:4])} changed, "
            f"added or cut short); copying it again")
    shutil.rmtree(copy)
    return str(recopy())
