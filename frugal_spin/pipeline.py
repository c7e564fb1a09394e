"""The stage loop: base -> LoRA SFT -> evaluation -> SPIN iterations (generate, score, train, evaluate).

Input: a validated `Recipe`. Output: the run directory (see README, "What a run directory holds").
Finished stages are skipped on a rerun (see `stages.py`); their outputs are read back from disk, and every
adapter the pipeline uses (as opponent or for evaluation) is loaded from its saved files, so what is on disk is
exactly what was used.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from frugal_spin import ui
from frugal_spin.base_weights import note_base_files
from frugal_spin.checkpoint import remove_checkpoint
from frugal_spin.config import BUILTIN_DATASET, Recipe, TrainConfig, dump_recipe
from frugal_spin.data import Encoded
from frugal_spin.distributed import current as current_world
from frugal_spin.errors import UserError
from frugal_spin.evaluate import anchor_spin_metrics, exact_match, heldout_nll
from frugal_spin.diagnostics import answer_diagnostics, end_token_rate
from frugal_spin.faults import crash_point
from frugal_spin.generate import AnswerLog, generate_answers
from frugal_spin.io import (DiskFullError, copy_file, disk_full_message, is_disk_full, read_jsonl, read_safetensors,
                            write_json, write_jsonl, write_safetensors, write_text)
from frugal_spin.live_log import LiveLog
from frugal_spin.plan import TRAIN_KINDS
from frugal_spin.model import GENERATION_MERGED, GENERATION_UNMERGED, inference_mode, load_adapter_weights, \
    load_model, resolve_runtime, save_adapter
from frugal_spin.model_source import base_location, model_source
from frugal_spin.preflight import Checked, preflight
from frugal_spin.profiler import StageMeter
from frugal_spin.rundir import check_output_dir, open_run_dir, run_entries
from frugal_spin.report import render_report
from frugal_spin.scoring import score_pairs
from frugal_spin.shared_prompt import packs_pairs, pair_tokens, probe_packing, probe_triple
from frugal_spin.fingerprints import file_digest, fingerprint
from frugal_spin.stages import StageStore
from frugal_spin.threads import apply_threads
from frugal_spin.turns import end_of_turn_id, scored_pair, stop_token_ids, truncation_counts
from frugal_spin.train import (NonFiniteStreak, StepFn, TrainResult, sft_step_fn, spin_step_fn,
                               total_optimizer_steps, train_adapter, train_with_oom_retry)


@contextmanager
def prepared_run_dir(recipe: Recipe, restart: bool = False, allow_existing: bool = False):
    """The run directory, locked for the block (rundir.py): an earlier run's outputs removed with `restart`, and
    `recipe.yaml` written. Call it only once every check has passed (preflight.py): this is where writing starts."""
    with open_run_dir(Path(recipe.output_dir), restart, allow_existing, run_entries(recipe)) as run_dir:
        try:
            write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
        except OSError as exc:
            raise UserError(f"output_dir {run_dir} is not writable: {exc.strerror or exc}") from None
        yield run_dir


class Run:
    """One pipeline execution over a run directory. Holds the single model every stage shares."""

    def __init__(self, recipe: Recipe, run_dir: Path, checked: Checked | None = None):
        self.recipe = recipe
        self.run_dir = run_dir
        self.checked = checked
        self.store = StageStore(run_dir)
        # Several ranks (torchrun) run every stage together; the world shards the work and `write` runs a stage's
        # writes on one rank, then a barrier. One process: `write(fn)` is `fn()`.
        self.world = current_world()
        # Where the SPIN iterations live (iter_<t>/): the run directory itself, except for the extra loss arms of
        # `compare` (compare.SpinLossArm), which keep their iterations in a subdirectory and take finished stages
        # with the same fingerprint (iteration 0's generation and scoring) from `shared`, the seed run's store.
        self.iter_root = run_dir
        self.shared: StageStore | None = None
        self.runtime = resolve_runtime(recipe.model)
        self.chunk = recipe.model.logprob_chunk_size
        self.model = None
        self.tokenizer = None
        self.activity = "setup"  # what the run is doing, for the out-of-memory message
        self.live = LiveLog(recipe.log, run_dir, config=recipe.to_dict())  # no-op unless log.* asks for it

    # ------------------------------------------------------------ setup

    def setup(self) -> None:
        """Base (built or taken from the cache), tokenizer, data, 4-bit model with its one adapter."""
        r = self.recipe
        with StageMeter(self.runtime.device) as meter:
            checked = self.checked or preflight(r)
            # Rank 0 copies (and, if damaged, copies again) the base first; the other ranks then find it intact.
            base_path = self.world.first(self._verified_base_path, checked.base_source)
            # A hub model's commit, pinned by preflight (rank 0's, on every rank): the weights load exactly that
            # snapshot and the base is identified by it.
            revision = None if Path(base_path).is_dir() else self.world.agree(checked.model_revision)
            if revision is None and not Path(base_path).is_dir():
                ui.warn(f"model.name {base_path}: its hub commit could not be resolved (offline, not cached?); "
                        f"finished stages are matched by the name alone")
            self.tokenizer = checked.tokenizer
            self.pad_id = self.tokenizer.pad_token_id
            splits = checked.splits
            self.train, self.heldout = checked.train, checked.heldout
            self.train_examples, self.heldout_examples = splits.train, splits.heldout
            self.heldout_answers = [e.answer for e in splits.heldout]
            longest = r.data.max_prompt_tokens + max(r.data.max_answer_tokens, r.generation.max_new_tokens,
                                                     r.eval.max_new_tokens)
            # The adapter's random init depends only on the seed, not on what ran before in this process (building
            # the base draws from the same generator): a first run and a resumed one start from the same weights.
            torch.manual_seed(r.seed)
            self.model = load_model(base_path, r.model, r.lora, self.runtime, max_seq_length=longest, seed=r.seed,
                                    revision=revision)
            # The weights every stage runs on (packed or dequantised 4-bit) are part of the base's identity: the
            # two give the same model up to float rounding, but cached log-probs must come from exactly these.
            # Pairs are packed x+y+y' only where that is exact on this model (allowlist, then one real pair scored
            # both ways); the verdict stays on the model, so scoring, training and evaluation all follow it.
            self.packing = probe_packing(self.model, probe_triple([(e.prompt_ids, e.answer_ids) for e in self.train]),
                                         self.pad_id, self.chunk, self.runtime.autocast)
            self.base_fp = fingerprint(r.model.name, _base_identity(Path(base_path), self.run_dir, revision),
                                       r.model.load_in_4bit, asdict(r.lora), self.runtime.base_weights,
                                       *_packing_identity(self.packing))
            if revision is None and Path(base_path).is_dir():  # what export/sample check the base against
                self.world.write(note_base_files, Path(base_path), self.run_dir, f"model.name {r.model.name}")
            # The token ids themselves identify the data (a hub dataset's new commit or an edited local file
            # changes them); the dataset commit is recorded and fingerprinted too.
            self.data_fp = fingerprint(asdict(r.data), r.seed, self.base_fp, splits.revision,
                                       _examples_digest(self.train), _examples_digest(self.heldout))
            # Where answers end (turns.py): generation stops at these ids, and a pair whose two answers differ in
            # ending with one of them is scored without its end token (the truncation asymmetry).
            owner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            self.stop_ids = stop_token_ids(self.tokenizer, owner.generation_config)
            self.base_path, self.longest = base_path, longest
            crash_point("setup")
        self.world.write(self.store.complete, "setup", self.data_fp, "setup", {
            "train_examples": len(self.train), "heldout_examples": len(self.heldout), **dict(splits.counts),
            "device": str(self.runtime.device), "backend": self.runtime.backend,
            "compute_dtype": str(self.runtime.compute_dtype).replace("torch.", ""),
            "gradient_checkpointing": self.runtime.gradient_checkpointing, "torch_threads": torch.get_num_threads(),
            "base_weights": self.runtime.base_weights,
            "end_of_turn_token": self.tokenizer.convert_ids_to_tokens(end_of_turn_id(self.tokenizer)),
            "stop_token_ids": self.stop_ids, "model_revision": revision, "dataset_revision": splits.revision,
            "pair_packing": self.packing.record(), **meter.memory}, meter.wall_s)

    def _weights(self, sampling_merged: bool | None = None) -> dict[str, str]:
        """Which weights a stage ran on, for its record: the base as loaded (runtime.base_weights) plus the LoRA
        adapter, unmerged. Training, scoring and evaluation's log-probs share the one model, so the cached
        log-probs are exactly those of the weights the player trains against. A stage that samples also says
        whether it sampled from merged weights (`model.adapter_merged_for_generation`, the CPU's fast path)."""
        out = {"weights": f"{self.runtime.base_weights} + {GENERATION_UNMERGED}"}
        if sampling_merged is not None:
            out["generation_weights"] = (f"{self.runtime.base_weights} + "
                                         f"{GENERATION_MERGED if sampling_merged else GENERATION_UNMERGED}")
        return out

    def _verified_base_path(self, source: str) -> str:
        """Where the base is loaded from: the run's copy of the built-in base, checked against `source`."""
        r = self.recipe
        base_path = base_location(r.model, self.run_dir)
        if model_source(r.model).is_tiny_builtin:
            base_path = verified_base_copy(Path(base_path), Path(source), self.run_dir,
                                           lambda: base_location(r.model, self.run_dir))
        return base_path

    # ------------------------------------------------------------ stages

    def run_sft(self) -> str:
        r = self.recipe
        fp = fingerprint("sft", self.data_fp, asdict(r.sft), r.seed)
        adapter_dir = self.run_dir / "sft" / "adapter"
        if self.store.completed("sft", fp):
            ui.note("[dim]sft: complete, skipped[/dim]")
            return fp
        step = sft_step_fn(self.model, self.train, self.pad_id, self.chunk, self.runtime.device)
        lengths = [len(e.prompt_ids) + len(e.answer_ids) for e in self.train]
        with StageMeter(self.runtime.device) as meter:
            result, used = self._train("sft", r.sft, "sft", fp, lengths, step, r.seed, self.run_dir / "sft")

        def finish() -> None:
            save_adapter(self.model, adapter_dir)
            crash_point("sft.saved")
            self.store.complete("sft", fp, "sft", {**self._weights(), **result.summary(), **_batching(used),
                                                      "tokens_per_s": result.tokens / meter.wall_s,
                                                      **meter.memory, "loss_curve": result.losses}, meter.wall_s,
                                outputs=[adapter_dir], iteration=None)
            remove_checkpoint(self.run_dir / "sft" / "checkpoint")
            (self.run_dir / "sft" / "oom_batching.json").unlink(missing_ok=True)

        self.world.write(finish)
        return fp

    def _train(self, stage: str, cfg: TrainConfig, section: str, fp: str, lengths: list[int], step: StepFn,
               seed: int, stage_dir: Path) -> tuple[TrainResult, TrainConfig]:
        """One training stage with checkpoints in `stage_dir/checkpoint`, OOM handling and the NaN-streak stop.

        A micro-batch halved after an out-of-memory error is remembered in `stage_dir/oom_batching.json` (with the
        stage fingerprint), so a resumed stage starts at the size that fit and can use its checkpoints."""
        checkpoint_dir, batching_file = stage_dir / "checkpoint", stage_dir / "oom_batching.json"
        remembered = _read_json(batching_file)
        if remembered.get("fingerprint") == fp:
            cfg = replace(cfg, micro_batch_size=remembered["micro_batch_size"],
                          grad_accum_steps=remembered["grad_accum_steps"])

        def on_retry(smaller: TrainConfig) -> None:
            remove_checkpoint(checkpoint_dir)
            write_json(batching_file, {"fingerprint": fp, **_batching(smaller)})

        offset, kind = self._steps_done(), "sft" if section == "sft" else "spin"

        def on_log(steps: int, values: dict[str, float]) -> None:
            self.live.train_step(kind, offset + steps, values)

        def attempt(c: TrainConfig) -> TrainResult:
            with ui.stage_bar(stage.replace(".", " "), total_optimizer_steps(len(lengths), c), "steps") as advance:
                # SPIN trains without dropout: the cached opponent log-probs were scored without it.
                return train_adapter(self.model, self.runtime, c, lengths, step, seed=seed,
                                     on_step=absolute_progress(advance), checkpoint_dir=checkpoint_dir,
                                     fingerprint=fp, stage=stage, on_log=on_log if self.live.enabled else None,
                                     disable_dropout=section == "spin",
                                     **self._trace("sft" if section == "sft" else "spin", stage.split(".")[0]))

        try:
            return train_with_oom_retry(attempt, self.model, cfg, allow_halving=cfg.oom_halving, stage=stage,
                                        advice=lambda: self._oom_advice(section),
                                        on_retry=on_retry)
        except NonFiniteStreak as exc:
            if all(torch.isfinite(p).all() for p in self.model.parameters() if p.requires_grad):
                last_good = stage_dir / "last_good_adapter"
                self.world.write(save_adapter, self.model, last_good)  # skipped steps never touched these weights
                raise UserError(f"{exc}; the last good adapter is in {last_good}") from None
            raise UserError(f"{exc}; the weights are not finite, the last checkpoint is in {checkpoint_dir}") from None

    def _steps_done(self) -> int:
        """Optimizer steps of the run's finished training stages: the live curves' step offset (from the markers, so
        a resumed run logs at the same steps as an uninterrupted one)."""
        return sum(int(r["metrics"].get("optimizer_steps", 0)) for r in self.store.records() if r["kind"] in TRAIN_KINDS)

    def _oom_advice(self, section: str) -> str:
        """What the planner says fits this GPU, or how to ask it."""
        how = (f"Lower {section}.micro_batch_size (raising {section}.grad_accum_steps keeps the effective batch), "
               f"or set {section}.oom_halving=true; `python -m frugal_spin plan RECIPE --gpu ...` estimates what fits")
        try:
            from frugal_spin.planner import GPUS, estimate, resolve_model_shape

            total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
            gpu = min(GPUS, key=lambda g: abs(GPUS[g] - total_gib))
            shape = resolve_model_shape(self.recipe.model.name, allow_network=False,
                                        gguf_file=self.recipe.model.gguf_file)
            largest = estimate(self.recipe, shape, gpu).max_micro_batch[f"{section}_train"]
        except Exception:  # the advice is best effort; the error itself must still be shown
            return how + "."
        return f"{how}; for a {gpu.upper()}-sized GPU it suggests {section}.micro_batch_size <= {largest}."

    def make_anchor(self, sft_fp: str) -> str:
        """Held-out prompts answered by the SFT model and scored by it: the fixed opponent of every evaluation."""
        r = self.recipe
        # One answer per held-out prompt whatever answers_per_prompt says, so that knob leaves the anchor alone.
        generation = {k: v for k, v in asdict(r.generation).items() if k != "answers_per_prompt"}
        fp = fingerprint("anchor", sft_fp, generation, self._answer_rules())
        pairs_path = self.run_dir / "eval" / "anchor_pairs.jsonl"
        logps_path = self.run_dir / "eval" / "anchor_logps.safetensors"
        if self.store.completed("anchor", fp):
            return fp
        load_adapter_weights(self.model, self.run_dir / "sft" / "adapter")
        rows, gen, merged = self._generate("anchor", self.heldout, self.heldout_examples, seed=r.seed + 7919,
                                           fp=fp, log_path=self.run_dir / "eval" / "anchor_answers.partial.jsonl",
                                           adapter_dir=self.run_dir / "sft" / "adapter")
        logps, score = self._score("anchor", rows)

        def finish() -> None:
            write_jsonl(pairs_path, rows)
            write_safetensors(logps_path, logps, metadata={"fingerprint": fp,
                                                           "pairs_sha256": file_digest(pairs_path)["sha256"]})
            tokens = self._scored_tokens(rows) + sum(len(x["generated_ids"]) for x in rows)
            self.store.complete("anchor", fp, "anchor", {**self._weights(merged),  # tokens: generated, then scored
                "pairs": len(rows), "tokens": tokens, "tokens_per_s": tokens / (gen.wall_s + score.wall_s),
                "mean_answer_tokens": sum(len(x["generated_ids"]) for x in rows) / max(1, len(rows)),
                **self._answer_diagnostics(rows), **_max_memory(gen, score)}, gen.wall_s + score.wall_s,
                outputs=[pairs_path, logps_path])
            AnswerLog.remove(self.run_dir / "eval" / "anchor_answers.partial.jsonl")

        self.world.write(finish)
        return fp

    def evaluate(self, name: str, adapter_dir: Path, adapter_fp: str, anchor_fp: str,
                 iteration: int | None = None) -> None:
        r = self.recipe
        fp = fingerprint("eval", adapter_fp, anchor_fp, asdict(r.eval), r.spin.beta_at(0))
        if self.store.completed(name, fp):
            return
        load_adapter_weights(self.model, adapter_dir)
        self.activity = f"{name} (eval.batch_size {r.eval.batch_size})"
        metrics: dict[str, Any] = {}
        with StageMeter(self.runtime.device) as meter, ui.stage_bar(name, 3, "parts") as advance:
            metrics["heldout_nll"] = heldout_nll(self.model, self.heldout, pad_id=self.pad_id,
                                                 batch_size=r.eval.batch_size, chunk_size=self.chunk,
                                                 autocast=self.runtime.autocast)
            crash_point(f"{name}.nll")
            tokens = sum(len(e.prompt_ids) + len(e.answer_ids) for e in self.heldout)
            advance()
            anchor = read_jsonl(self.run_dir / "eval" / "anchor_pairs.jsonl")
            tokens += self._scored_tokens(anchor)
            anchor_logps = read_safetensors(self.run_dir / "eval" / "anchor_logps.safetensors")
            real, generated = self._scored(anchor)
            metrics.update(anchor_spin_metrics(
                self.model, [a["prompt_ids"] for a in anchor], real, generated,
                anchor_logps["real"], anchor_logps["generated"],
                beta=r.spin.beta_at(0), pad_id=self.pad_id, batch_size=r.generation.batch_size, chunk_size=self.chunk,
                autocast=self.runtime.autocast))
            advance()
            n_samples = min(r.eval.samples, len(self.heldout))
            sampling_merged = None
            if r.data.dataset == BUILTIN_DATASET:
                from frugal_spin.tasks.arithmetic import is_correct

                with inference_mode(self.model, self.runtime) as sampling_merged:
                    metrics["exact_match"], texts, generated_tokens = exact_match(
                        self.model, self.tokenizer, self.heldout, self.heldout_answers, is_correct,
                        max_new_tokens=r.eval.max_new_tokens, batch_size=r.eval.batch_size)
                tokens += generated_tokens
            elif n_samples:
                # Chat data has no exact answer: only the few sample prompts are answered, greedily.
                with inference_mode(self.model, self.runtime) as sampling_merged:
                    answers = generate_answers(self.model, self.tokenizer,
                                               [e.prompt_ids for e in self.heldout[:n_samples]],
                                               max_new_tokens=r.eval.max_new_tokens, batch_size=r.eval.batch_size,
                                               temperature=0.0)
                texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in answers]
                tokens += sum(len(ids) for ids in answers)
            # The same first held-out prompts after every stage, with the real and the greedy answer, so a reader
            # sees what SFT and each SPIN iteration did to the answers (report.md, "Sample answers").
            metrics["samples"] = [{"prompt": e.prompt, "real": a, "greedy": t} for e, a, t in
                                  list(zip(self.heldout_examples, self.heldout_answers, texts))[:n_samples]] \
                if n_samples else []
            advance()
        self.world.write(self.store.complete, name, fp, "eval", {**self._weights(sampling_merged), **metrics,
                                                                 "tokens": tokens, "tokens_per_s": tokens / meter.wall_s,
                                                                 **meter.memory}, meter.wall_s,
                         iteration=iteration)
        self.live.evaluation(metrics, self._steps_done())

    def spin_iteration(self, t: int, opponent_dir: Path, opponent_fp: str) -> str:
        r = self.recipe
        it_dir = self.iter_root / f"iter_{t}"
        pairs_path, logps_path = it_dir / "pairs.jsonl", it_dir / "opponent_logps.safetensors"
        # The opponent is base + the previous stage's adapter, read back from disk (never the bare base); its
        # identity includes the adapter files' hash, so pairs and log-probs always name what produced them.
        load_adapter_weights(self.model, opponent_dir)
        opponent = fingerprint(opponent_fp, file_digest(opponent_dir)["sha256"])

        gen_fp = fingerprint("generate", opponent, asdict(r.generation), r.seed, t, self._answer_rules())
        score_fp = fingerprint("score", gen_fp)
        if not self.store.completed(f"iter_{t}.generate", gen_fp) and \
                not self._reuse_shared(f"iter_{t}.generate", gen_fp, [pairs_path]):
            self._generate_iteration(t, pairs_path, gen_fp, opponent_dir)
        if not self.store.completed(f"iter_{t}.score", score_fp) and \
                not self._reuse_shared(f"iter_{t}.score", score_fp, [logps_path]):
            self._score_stage(f"iter_{t}", f"iter_{t}.score", score_fp, pairs_path, logps_path, t)

        previous_fp = self._score_previous_pairs(t, opponent) if r.spin.mix_previous_pairs and t > 0 else None
        beta = r.spin.beta_at(t)
        # Only this iteration's beta and (when mixing) the previous pairs' scores count: changing the beta of a
        # later iteration, or mixing (which starts at iteration 1), leaves iteration 0 alone.
        settings = {k: v for k, v in asdict(r.spin).items() if k not in ("iterations", "beta", "mix_previous_pairs")}
        train_fp = fingerprint("spin-train", score_fp, previous_fp, settings, beta)
        adapter_dir = it_dir / "adapter"
        if self.store.completed(f"iter_{t}.train", train_fp):
            return train_fp
        rows = read_jsonl(pairs_path)
        cache = read_safetensors(logps_path)
        if previous_fp is not None:
            rows += read_jsonl(self.iter_root / f"iter_{t - 1}" / "pairs.jsonl")
            previous = read_safetensors(it_dir / "previous_pairs_logps.safetensors")
            cache = {key: torch.cat([cache[key], previous[key]]) for key in ("real", "generated")}
        real, generated = self._scored(rows)  # exactly the responses the cache was scored on
        step = spin_step_fn(self.model, [x["prompt_ids"] for x in rows], real, generated, cache["real"],
                            cache["generated"], beta, self.pad_id, self.chunk, self.runtime.device, loss=r.spin.loss)
        lengths = [len(x["prompt_ids"]) + len(a) + len(b) for x, a, b in zip(rows, real, generated)]
        with StageMeter(self.runtime.device) as meter:
            result, used = self._train(f"iter_{t}.train", r.spin, "spin", train_fp, lengths, step,
                                       r.seed + 1000 * (t + 1), it_dir)

        def finish() -> None:
            save_adapter(self.model, adapter_dir)
            crash_point(f"iter_{t}.train.saved")
            summary = result.summary()
            self.store.complete(f"iter_{t}.train", train_fp, "spin",
                                {**self._weights(), **summary, **_batching(used), "pairs": len(rows), "beta": beta,
                                 "loss": r.spin.loss, **truncation_counts(rows, self.stop_ids),
                                 # The player's log-prob change against this iteration's opponent, in nats per
                                 # answer (the rewards without beta), over the last optimizer steps: does SPIN raise
                                 # the real answers or only push the generated ones down?
                                 "real_logp_change": summary.get("train_real_reward", math.nan) / beta,
                                 "generated_logp_change": summary.get("train_generated_reward", math.nan) / beta,
                                 "tokens_per_s": result.tokens / meter.wall_s, **meter.memory,
                                 "loss_curve": result.losses,
                                 "margin_curve": result.metrics.get("reward_margin", [])},
                                meter.wall_s, outputs=[adapter_dir], iteration=t)
            remove_checkpoint(it_dir / "checkpoint")
            (it_dir / "oom_batching.json").unlink(missing_ok=True)

        self.world.write(finish)
        return train_fp

    def _score_previous_pairs(self, t: int, opponent: str) -> str:
        """Score iteration t-1's pairs with iteration t's opponent (loaded by the caller) into
        iter_<t>/previous_pairs_logps.safetensors (same layout as opponent_logps), once; return the fingerprint.

        The SPIN paper's loss for iteration t uses the *current* opponent p_theta_t as the reference of every pair
        it trains on, the previous iteration's pairs included; the cache of iteration t-1 holds p_theta_{t-1}'s
        log-probs, which would make those pairs pull the player towards a stale reference."""
        previous_pairs_fp = self.store.expected.get(f"iter_{t - 1}.generate")
        if previous_pairs_fp is None:  # pragma: no cover - execute() runs the iterations in order
            raise RuntimeError(f"iteration {t - 1} has not been generated in this run")
        fp = fingerprint("score-previous", opponent, previous_pairs_fp)
        path = self.iter_root / f"iter_{t}" / "previous_pairs_logps.safetensors"
        if self.store.completed(f"iter_{t}.score_previous", fp):
            return fp
        self._score_stage(f"iter_{t} previous", f"iter_{t}.score_previous", fp,
                          self.iter_root / f"iter_{t - 1}" / "pairs.jsonl", path, t)
        return fp

    def _reuse_shared(self, name: str, fp: str, outputs: list[Path]) -> bool:
        """Take a finished stage with this fingerprint from the shared store (the seed run of a loss arm): copy its
        outputs to the same places under this store and record it with the original metrics and wall time (the
        cost of producing it, which every arm's budget includes), plus where it came from. False when there is
        nothing to take."""
        if self.shared is None:
            return False
        record = self.shared.peek(name, fp)
        if record is None:
            return False
        source = os.path.relpath(self.shared.run_dir / name.split(".")[0], self.store.run_dir)  # "../iter_0"

        def finish() -> None:
            for path in outputs:
                copy_file(self.shared.run_dir / path.relative_to(self.store.run_dir), path)
            self.store.complete(name, fp, record["kind"], {**record["metrics"], "reused_from": source},
                                record["wall_time_s"], outputs=outputs, iteration=record["iteration"])

        self.world.write(finish)
        ui.note(f"[dim]{name}: same as the seed run's (fingerprint {fp}), copied[/dim]")
        return True

    def _trace(self, kind: str, stage: str) -> dict[str, Any]:
        if self.recipe.profile.trace != kind:
            return {}
        return {"trace_dir": self.iter_root / "traces" / stage, "trace_steps": self.recipe.profile.trace_steps}

    def _generate_iteration(self, t: int, pairs_path: Path, gen_fp: str, opponent_dir: Path) -> None:
        log_path = pairs_path.with_name("answers.partial.jsonl")
        k = self.recipe.generation.answers_per_prompt  # k answers per prompt = k pairs, one after another
        rows, gen, merged = self._generate(f"iter_{t}", [e for e in self.train for _ in range(k)],
                                           [e for e in self.train_examples for _ in range(k)],
                                           seed=self.recipe.seed + 1000 * (t + 1), fp=gen_fp, log_path=log_path,
                                           adapter_dir=opponent_dir)

        def finish() -> None:
            write_jsonl(pairs_path, rows)
            crash_point(f"iter_{t}.generate.written")
            gen_tokens = sum(len(x["generated_ids"]) for x in rows)
            self.store.complete(f"iter_{t}.generate", gen_fp, "generate", {**self._weights(merged),
                "answers": len(rows), "tokens": gen_tokens, "tokens_per_s": gen_tokens / gen.wall_s,
                "mean_answer_tokens": gen_tokens / max(1, len(rows)), **self._answer_diagnostics(rows),
                "answers_without_eos": sum(1 for x in rows if not set(x["generated_ids"][-1:]) & set(self.stop_ids)),
                **truncation_counts(rows, self.stop_ids),
                **gen.memory}, gen.wall_s, outputs=[pairs_path], iteration=t)
            AnswerLog.remove(log_path)

        self.world.write(finish)

    def _answer_diagnostics(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """How close the opponent's answers are to the real ones, how long they are and how often they end
        (diagnostics.py); the end token is the tokenizer's eos, the one the generation stops at."""
        eos = self.tokenizer.eos_token_id
        without_end = sum(1 for x in rows if x["generated_ids"][-1:] != [eos])
        return {**answer_diagnostics(rows, self.tokenizer.all_special_ids),
                "end_token_rate": end_token_rate(len(rows), without_end)}

    def _score_stage(self, label: str, stage: str, fp: str, pairs_path: Path, logps_path: Path, t: int) -> None:
        """Score a pairs file with the loaded adapter into `logps_path` (the cache carries the stage fingerprint
        and the pairs' hash in its metadata), then mark the stage complete."""
        rows = read_jsonl(pairs_path)
        logps, meter = self._score(label, rows)

        def finish() -> None:
            write_safetensors(logps_path, logps, metadata={"fingerprint": fp,
                                                           "pairs_sha256": file_digest(pairs_path)["sha256"]})
            tokens = self._scored_tokens(rows)
            self.store.complete(stage, fp, "score", {**self._weights(),
                "sequences": 2 * len(rows), "tokens": tokens, "tokens_per_s": tokens / meter.wall_s,
                "opponent_real_logp_mean": logps["real"].mean().item(),
                "opponent_generated_logp_mean": logps["generated"].mean().item(), **meter.memory}, meter.wall_s,
                outputs=[logps_path], iteration=t)

        self.world.write(finish)

    def _generate(self, label: str, encoded: list[Encoded], examples: list, seed: int, fp: str,
                  log_path: Path, adapter_dir: Path) -> tuple[list[dict[str, Any]], StageMeter, bool]:
        """One answer per prompt from the loaded adapter (saved in `adapter_dir`), as pairs.jsonl rows. Answers are
        appended to `log_path` batch by batch, so a killed run resumes generation at the first batch with an
        unanswered prompt. `generation.engine: vllm` samples with vLLM instead (vllm_engine.py)."""
        g = self.recipe.generation
        self.activity = f"{label} generation (generation.batch_size {g.batch_size})"
        log = AnswerLog(log_path, fingerprint(fp, [e.prompt_ids for e in encoded]))
        answered = log.load()

        def save_batch(indices: list[int], answers: list[list[int]]) -> None:
            log.append(indices, answers)
            crash_point(f"{label}.generate.batch", log.batches_written)

        with StageMeter(self.runtime.device) as meter, inference_mode(self.model, self.runtime) as merged, \
                ui.stage_bar(f"{label} generate", len(encoded), "prompts") as advance:
            prompts = [e.prompt_ids for e in encoded]
            if g.engine == "vllm":
                from frugal_spin.vllm_engine import engine_factory, generate_with_vllm

                generated = generate_with_vllm(
                    engine_factory(self.base_path, self.recipe, self.runtime, self.longest, seed), prompts,
                    str(adapter_dir), max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                    top_k=g.top_k, seed=seed, eos_id=self.stop_ids, answered=answered,
                    on_answers=save_batch, on_batch=advance)
            else:
                generated = generate_answers(self.model, self.tokenizer, prompts,
                                             max_new_tokens=g.max_new_tokens, batch_size=g.batch_size,
                                             temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, seed=seed,
                                             on_batch=advance, answered=answered, on_answers=save_batch,
                                             stop_ids=self.stop_ids)
        rows = [{"prompt": ex.prompt, **({"context": ex.context} if ex.context else {}), "real": ex.answer,
                 "generated": self.tokenizer.decode(gen_ids, skip_special_tokens=True),
                 "prompt_ids": list(e.prompt_ids), "real_ids": list(e.answer_ids), "generated_ids": gen_ids}
                for ex, e, gen_ids in zip(examples, encoded, generated)]
        return rows, meter, merged

    def _score(self, label: str, rows: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], StageMeter]:
        """The loaded adapter's log-probs of each row's real and generated answer (the opponent cache)."""
        batch_size = self.recipe.generation.batch_size
        self.activity = f"{label} scoring (generation.batch_size {batch_size})"
        real_ids, generated_ids = self._scored(rows)
        with StageMeter(self.runtime.device) as meter, \
                ui.stage_bar(f"{label} score", 2 * len(rows), "sequences") as advance:
            # Under the training loop's autocast: the cache must be what the player computes at step 0.
            real, generated = score_pairs(self.model, [(x["prompt_ids"], r, g) for x, r, g in
                                                       zip(rows, real_ids, generated_ids)],
                                          pad_id=self.pad_id, batch_size=batch_size, chunk_size=self.chunk,
                                          on_batch=advance, autocast=self.runtime.autocast)
        crash_point(f"{label}.score")
        return {"real": real, "generated": generated}, meter

    def _scored_tokens(self, rows: list[dict[str, Any]]) -> int:
        """Tokens the scoring forwards of these pairs run over: the prompt once per pair where it is shared (as
        `packs_pairs` decides for all the rows together; scoring decides per batch, so this is approximate)."""
        triples = [(x["prompt_ids"], x["real_ids"], x["generated_ids"]) for x in rows]
        return pair_tokens(triples, bool(triples) and packs_pairs(self.model, triples))

    def _scored(self, rows: list[dict[str, Any]]) -> tuple[list[list[int]], list[list[int]]]:
        """The real and generated response ids each pair is scored on, by the cache, the player and evaluation
        alike: without the end token when only one side ends its turn (turns.scored_pair)."""
        pairs = [scored_pair(x["real_ids"], x["generated_ids"], self.stop_ids) for x in rows]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def _answer_rules(self) -> dict[str, Any]:
        """What decides where answers end and what is scored, beyond the recipe: part of the generation and
        anchor fingerprints, so runs made before these rules existed (eos-only stopping, the model's own
        generation_config, end tokens scored one-sided) are never reused."""
        return {"stop_ids": self.stop_ids, "sampling": "recipe-only", "end_token": "left out when one side is cut"}

    # ------------------------------------------------------------ the whole method

    def spin_iterations(self, sft_fp: str, anchor_fp: str) -> str:
        """Every SPIN iteration with its evaluation, from the SFT adapter; returns the last adapter's fingerprint."""
        opponent_dir, opponent_fp = self.run_dir / "sft" / "adapter", sft_fp
        for t in range(self.recipe.spin.iterations):
            player_fp = self.spin_iteration(t, opponent_dir, opponent_fp)
            opponent_dir, opponent_fp = self.iter_root / f"iter_{t}" / "adapter", player_fp
            self.evaluate(f"iter_{t}.eval", opponent_dir, player_fp, anchor_fp, iteration=t)
        return opponent_fp

    def execute(self) -> list[dict[str, Any]]:
        try:
            return self._execute()
        except torch.cuda.OutOfMemoryError:
            pass
        except DiskFullError:
            raise
        except Exception as exc:
            # A full disk in a write that has no size to report (generation's answer log, a chart, a library's
            # own file): still one line, naming the run directory.
            if is_disk_full(exc):
                raise DiskFullError(disk_full_message(self.run_dir, None)) from None
            raise
        finally:
            self.live.close()
        # Training stages handle their own OOM (train.train_with_oom_retry); this is generation, scoring or eval.
        raise UserError(f"CUDA out of memory in {self.activity}: lower generation.batch_size (generation and "
                        f"scoring) or eval.batch_size; `python -m frugal_spin plan RECIPE --gpu ...` estimates what "
                        f"fits")

    def _execute(self) -> list[dict[str, Any]]:
        r = self.recipe
        random.seed(r.seed)
        torch.manual_seed(r.seed)
        self.setup()
        sft_fp = self.run_sft()
        anchor_fp = self.make_anchor(sft_fp)
        self.evaluate("sft.eval", self.run_dir / "sft" / "adapter", sft_fp, anchor_fp)
        self.spin_iterations(sft_fp, anchor_fp)
        records = self.store.records()

        def finish() -> None:
            ui.console.print(ui.summary_table(records))
            render_report(self.run_dir)
            ui.note(f"run directory: {ui.escape(str(self.run_dir))}  (per-phase cost and charts: "
                    f"{ui.escape(str(self.run_dir / 'report.md'))})")

        self.world.write(finish)
        return records


def absolute_progress(advance):
    """train_adapter reports optimizer steps done so far (a resumed stage starts past 0); the bar advances by deltas."""
    done = [0]

    def on_step(steps: int, loss: float) -> None:
        advance(steps - done[0], loss=loss)
        done[0] = steps

    return on_step


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _batching(cfg: TrainConfig) -> dict[str, int]:
    """The micro-batching a stage really used (an OOM retry halves the recipe's)."""
    return {"micro_batch_size": cfg.micro_batch_size, "grad_accum_steps": cfg.grad_accum_steps}


def _max_memory(*meters: StageMeter) -> dict[str, float]:
    return {k: max(m.memory[k] for m in meters) for k in meters[0].memory}


def _base_identity(path: Path, run_dir: Path, revision: str | None = None) -> str:
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


def _packing_identity(decision) -> tuple[str, ...]:
    """The pair layout's part of the base's identity: empty where pairs are laid out as before the packing guard
    (packed on an allowed architecture, or two sequences off the CPU), so those runs keep their fingerprints; the
    refusal where the guard now keeps two sequences on a model earlier versions packed (ALiBi, local windows,
    recurrent layers, a failed probe): caches scored packed on such a model were wrong and must not be reused."""
    if decision.packed or not decision.reason.startswith(("allowlist miss", "probe")):
        return ()
    return ("pairs as two sequences: " + decision.reason.split(":")[0],)


def _examples_digest(examples: list[Encoded]) -> str:
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


def check_before_loading(recipe: Recipe, restart: bool = False, allow_existing: bool = False) -> None:
    """The checks of a run that load no weights and no data, in the order the run applies them: the output directory
    (read-only: rundir.check_output_dir), then the references to the model, data and loggers, and a local model
    directory's files (headers and config only). `--dry-run` applies exactly these; the run then goes on to
    preflight.py (the tokenizer, LoRA targets and every data row). What this machine lacks (a GPU the recipe asks
    for) is the run's refusal alone: a recipe may be checked on another machine than it runs on."""
    from frugal_spin.data import check_dataset_reference
    from frugal_spin.live_log import check_log_backends
    from frugal_spin.model_source import check_model_reference, local_model_dir
    from frugal_spin.preflight import check_model_dir

    check_output_dir(Path(recipe.output_dir), restart, allow_existing, run_entries(recipe))
    check_dataset_reference(recipe.data)
    check_model_reference(recipe.model)
    check_log_backends(recipe.log)
    local = local_model_dir(recipe.model)
    if local is not None:
        check_model_dir(local, recipe.model.trust_remote_code)


def run_recipe(recipe: Recipe, restart: bool = False, allow_existing: bool = False) -> Path:
    # Every check that can fail on a user mistake runs before the run directory is touched: first those that load
    # nothing (the dry run's), then the model, tokenizer, LoRA targets and data (preflight.py).
    world = current_world()
    check_before_loading(recipe, restart, allow_existing)
    checked = world.first(preflight, recipe)  # rank 0 fills the base's cache, the other ranks then read it
    with ExitStack() as stack:
        # Only rank 0 opens the directory and holds its lock for the whole run; a refusal there (another run
        # holds it) stops every rank with the same line.
        run_dir = world.write(stack.enter_context, prepared_run_dir(recipe, restart, allow_existing))
        apply_threads(recipe.model.threads)
        Run(recipe, run_dir, checked).execute()
    return run_dir
