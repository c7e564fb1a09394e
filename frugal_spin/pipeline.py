"""The stage loop: base -> LoRA SFT -> evaluation -> SPIN iterations (generate, score, train, evaluate).

Input: a validated `Recipe`. Output: the run directory (see README, "What a run directory holds").
Finished stages are skipped on a rerun (see `stages.py`); their outputs are read back from disk, and every
adapter the pipeline uses (as opponent or for evaluation) is loaded from its saved files, so what is on disk is
exactly what was used.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from frugal_spin import ui
from frugal_spin.config import BUILTIN_DATASET, Recipe, dump_recipe
from frugal_spin.data import Encoded, check_dataset_reference, encode_example, load_splits
from frugal_spin.errors import UserError
from frugal_spin.evaluate import anchor_spin_metrics, exact_match, heldout_nll
from frugal_spin.generate import generate_answers
from frugal_spin.io import read_jsonl, read_safetensors, write_jsonl, write_safetensors, write_text
from frugal_spin.model import (attach_lora, check_model_reference, load_adapter_weights, load_base_model,
                               load_tokenizer, resolve_base_path, resolve_runtime, save_adapter)
from frugal_spin.profiler import StageMeter
from frugal_spin.report import render_report
from frugal_spin.scoring import score_responses
from frugal_spin.stages import StageStore, fingerprint
from frugal_spin.train import sft_step_fn, spin_step_fn, total_optimizer_steps, train_adapter


def prepare_run_dir(recipe: Recipe, restart: bool) -> Path:
    """Check the output directory before any long work; `restart` wipes an earlier run (and only a run)."""
    run_dir = Path(recipe.output_dir).expanduser()
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output_dir {run_dir} exists and is not a directory")
    if restart and run_dir.is_dir() and any(run_dir.iterdir()):
        if not (run_dir / "recipe.yaml").is_file():
            raise UserError(f"--restart: {run_dir} is not a frugal_spin run directory (no recipe.yaml); "
                            "not deleting it")
        shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
    except OSError as exc:
        raise UserError(f"output_dir {run_dir} is not writable: {exc.strerror or exc}") from None
    return run_dir


class Run:
    """One pipeline execution over a run directory. Holds the single model every stage shares."""

    def __init__(self, recipe: Recipe, run_dir: Path):
        self.recipe = recipe
        self.run_dir = run_dir
        self.store = StageStore(run_dir)
        self.runtime = resolve_runtime(recipe.model)
        self.chunk = recipe.model.logprob_chunk_size
        self.model = None
        self.tokenizer = None

    # ------------------------------------------------------------ setup

    def setup(self) -> None:
        """Base (built or taken from the cache), tokenizer, data, 4-bit model with its one adapter."""
        r = self.recipe
        with StageMeter(self.runtime.device) as meter:
            base_path = resolve_base_path(r.model, self.run_dir)
            self.base_fp = fingerprint(r.model.name, _base_identity(Path(base_path)), r.model.load_in_4bit,
                                       asdict(r.lora))
            self.tokenizer = load_tokenizer(base_path, r.model.trust_remote_code)
            self.pad_id = self.tokenizer.pad_token_id
            splits = load_splits(r.data, r.seed)
            self.train = [encode_example(self.tokenizer, e, r.data, splits.counts) for e in splits.train]
            self.heldout = [encode_example(self.tokenizer, e, r.data, splits.counts) for e in splits.heldout]
            self.train_examples, self.heldout_examples = splits.train, splits.heldout
            self.heldout_answers = [e.answer for e in splits.heldout]
            self.data_fp = fingerprint(asdict(r.data), r.seed, self.base_fp, len(self.train), len(self.heldout))
            self.model = attach_lora(load_base_model(base_path, r.model, self.runtime), r.lora)
        self.store.complete("setup", self.data_fp, "setup", {
            "train_examples": len(self.train), "heldout_examples": len(self.heldout), **dict(splits.counts),
            "device": str(self.runtime.device), "compute_dtype": str(self.runtime.compute_dtype).replace("torch.", ""),
            "gradient_checkpointing": self.runtime.gradient_checkpointing, **meter.memory}, meter.wall_s)

    # ------------------------------------------------------------ stages

    def run_sft(self) -> str:
        r = self.recipe
        fp = fingerprint("sft", self.data_fp, asdict(r.sft), r.seed)
        adapter_dir = self.run_dir / "sft" / "adapter"
        if self.store.completed("sft", fp) and adapter_dir.is_dir():
            ui.note("[dim]sft: complete, skipped[/dim]")
            return fp
        step = sft_step_fn(self.model, self.train, self.pad_id, self.chunk, self.runtime.device)
        lengths = [len(e.prompt_ids) + len(e.answer_ids) for e in self.train]
        with StageMeter(self.runtime.device) as meter, \
                ui.stage_bar("sft", total_optimizer_steps(len(self.train), r.sft), "steps") as advance:
            result = train_adapter(self.model, self.runtime, r.sft, lengths, step, seed=r.seed,
                                   on_step=lambda s, loss: advance(loss=loss), **self._trace("sft", "sft"))
        save_adapter(self.model, adapter_dir)
        self.store.complete("sft", fp, "train", {**result.summary(), "tokens_per_s": result.tokens / meter.wall_s,
                                                  **meter.memory, "loss_curve": result.losses}, meter.wall_s)
        return fp

    def make_anchor(self, sft_fp: str) -> str:
        """Held-out prompts answered by the SFT model and scored by it: the fixed opponent of every evaluation."""
        r = self.recipe
        # One answer per held-out prompt whatever answers_per_prompt says, so that knob leaves the anchor alone.
        generation = {k: v for k, v in asdict(r.generation).items() if k != "answers_per_prompt"}
        fp = fingerprint("anchor", sft_fp, generation)
        pairs_path = self.run_dir / "eval" / "anchor_pairs.jsonl"
        logps_path = self.run_dir / "eval" / "anchor_logps.safetensors"
        if self.store.completed("anchor", fp) and pairs_path.is_file() and logps_path.is_file():
            return fp
        load_adapter_weights(self.model, self.run_dir / "sft" / "adapter")
        rows, logps, (gen, score) = self._generate_and_score("anchor", self.heldout, self.heldout_examples,
                                                             seed=r.seed + 7919)
        write_jsonl(pairs_path, rows)
        write_safetensors(logps_path, logps)
        tokens = sum(2 * len(x["prompt_ids"]) + len(x["real_ids"]) + 2 * len(x["generated_ids"]) for x in rows)
        self.store.complete("anchor", fp, "generate", {  # tokens: generated, then scored with both answers
            "pairs": len(rows), "tokens": tokens, "tokens_per_s": tokens / (gen.wall_s + score.wall_s),
            **_max_memory(gen, score)}, gen.wall_s + score.wall_s)
        return fp

    def evaluate(self, name: str, adapter_dir: Path, adapter_fp: str, anchor_fp: str) -> None:
        r = self.recipe
        fp = fingerprint("eval", adapter_fp, anchor_fp, asdict(r.eval), r.spin.beta_at(0))
        if self.store.completed(name, fp):
            return
        load_adapter_weights(self.model, adapter_dir)
        metrics: dict[str, Any] = {}
        with StageMeter(self.runtime.device) as meter, ui.stage_bar(name, 3, "parts") as advance:
            metrics["heldout_nll"] = heldout_nll(self.model, self.heldout, pad_id=self.pad_id,
                                                 batch_size=r.eval.batch_size, chunk_size=self.chunk)
            tokens = sum(len(e.prompt_ids) + len(e.answer_ids) for e in self.heldout)
            advance()
            anchor = read_jsonl(self.run_dir / "eval" / "anchor_pairs.jsonl")
            tokens += sum(2 * len(a["prompt_ids"]) + len(a["real_ids"]) + len(a["generated_ids"]) for a in anchor)
            anchor_logps = read_safetensors(self.run_dir / "eval" / "anchor_logps.safetensors")
            metrics.update(anchor_spin_metrics(
                self.model, [a["prompt_ids"] for a in anchor], [a["real_ids"] for a in anchor],
                [a["generated_ids"] for a in anchor], anchor_logps["real"], anchor_logps["generated"],
                beta=r.spin.beta_at(0), pad_id=self.pad_id, batch_size=r.generation.batch_size, chunk_size=self.chunk))
            advance()
            if r.data.dataset == BUILTIN_DATASET:
                from frugal_spin.tasks.arithmetic import is_correct

                metrics["exact_match"], texts, generated_tokens = exact_match(
                    self.model, self.tokenizer, self.heldout, self.heldout_answers, is_correct,
                    max_new_tokens=r.eval.max_new_tokens, batch_size=r.eval.batch_size)
                metrics["samples"] = [{"prompt": e.prompt, "real": a, "greedy": t} for e, a, t in
                                      list(zip(self.heldout_examples, self.heldout_answers, texts))[:5]]
                tokens += generated_tokens
            advance()
        self.store.complete(name, fp, "eval", {**metrics, "tokens": tokens, "tokens_per_s": tokens / meter.wall_s,
                                               **meter.memory}, meter.wall_s)

    def spin_iteration(self, t: int, opponent_dir: Path, opponent_fp: str) -> str:
        r = self.recipe
        it_dir = self.run_dir / f"iter_{t}"
        pairs_path, logps_path = it_dir / "pairs.jsonl", it_dir / "opponent_logps.safetensors"
        # The opponent is base + the previous stage's adapter, read back from disk (never the bare base).
        load_adapter_weights(self.model, opponent_dir)

        gen_fp = fingerprint("generate", opponent_fp, asdict(r.generation), r.seed, t)
        score_fp = fingerprint("score", gen_fp)
        if not (self.store.completed(f"iter_{t}.generate", gen_fp) and self.store.completed(f"iter_{t}.score", score_fp)
                and pairs_path.is_file() and logps_path.is_file()):
            self._generate_iteration(t, pairs_path, logps_path, gen_fp, score_fp)

        previous_fp = self._score_previous_pairs(t, opponent_fp) if r.spin.mix_previous_pairs and t > 0 else None
        beta = r.spin.beta_at(t)
        # Only this iteration's beta and (when mixing) the previous pairs' scores count: changing the beta of a
        # later iteration, or mixing (which starts at iteration 1), leaves iteration 0 alone.
        settings = {k: v for k, v in asdict(r.spin).items() if k not in ("iterations", "beta", "mix_previous_pairs")}
        train_fp = fingerprint("spin-train", score_fp, previous_fp, settings, beta)
        adapter_dir = it_dir / "adapter"
        if self.store.completed(f"iter_{t}.train", train_fp) and adapter_dir.is_dir():
            return train_fp
        rows = read_jsonl(pairs_path)
        cache = read_safetensors(logps_path)
        if previous_fp is not None:
            rows += read_jsonl(self.run_dir / f"iter_{t - 1}" / "pairs.jsonl")
            previous = read_safetensors(it_dir / "previous_pairs_logps.safetensors")
            cache = {key: torch.cat([cache[key], previous[key]]) for key in ("real", "generated")}
        step = spin_step_fn(self.model, [x["prompt_ids"] for x in rows], [x["real_ids"] for x in rows],
                            [x["generated_ids"] for x in rows], cache["real"], cache["generated"], beta,
                            self.pad_id, self.chunk, self.runtime.device)
        lengths = [len(x["prompt_ids"]) + max(len(x["real_ids"]), len(x["generated_ids"])) for x in rows]
        with StageMeter(self.runtime.device) as meter, \
                ui.stage_bar(f"iter_{t} train", total_optimizer_steps(len(rows), r.spin), "steps") as advance:
            result = train_adapter(self.model, self.runtime, r.spin, lengths, step, seed=r.seed + 1000 * (t + 1),
                                   on_step=lambda s, loss: advance(loss=loss), **self._trace("spin", f"iter_{t}"))
        save_adapter(self.model, adapter_dir)
        self.store.complete(f"iter_{t}.train", train_fp, "train",
                            {**result.summary(), "pairs": len(rows), "beta": beta,
                             "tokens_per_s": result.tokens / meter.wall_s, **meter.memory,
                             "loss_curve": result.losses, "margin_curve": result.metrics.get("reward_margin", [])},
                            meter.wall_s)
        return train_fp

    def _score_previous_pairs(self, t: int, opponent_fp: str) -> str:
        """Score iteration t-1's pairs with iteration t's opponent (loaded by the caller) into
        iter_<t>/previous_pairs_logps.safetensors (same layout as opponent_logps), once; return the fingerprint.

        The SPIN paper's loss for iteration t uses the *current* opponent p_theta_t as the reference of every pair
        it trains on, the previous iteration's pairs included; the cache of iteration t-1 holds p_theta_{t-1}'s
        log-probs, which would make those pairs pull the player towards a stale reference."""
        previous_pairs_fp = self.store.expected.get(f"iter_{t - 1}.generate")
        if previous_pairs_fp is None:  # pragma: no cover - execute() runs the iterations in order
            raise RuntimeError(f"iteration {t - 1} has not been generated in this run")
        fp = fingerprint("score-previous", opponent_fp, previous_pairs_fp)
        path = self.run_dir / f"iter_{t}" / "previous_pairs_logps.safetensors"
        if self.store.completed(f"iter_{t}.score_previous", fp) and path.is_file():
            return fp
        rows = read_jsonl(self.run_dir / f"iter_{t - 1}" / "pairs.jsonl")
        g = self.recipe.generation
        with StageMeter(self.runtime.device) as meter, \
                ui.stage_bar(f"iter_{t} score previous", 2 * len(rows), "sequences") as advance:
            logps = {key: score_responses(self.model, [(x["prompt_ids"], x[f"{key}_ids"]) for x in rows],
                                          pad_id=self.pad_id, batch_size=g.batch_size, chunk_size=self.chunk,
                                          on_batch=advance)
                     for key in ("real", "generated")}
        write_safetensors(path, logps)
        tokens = sum(2 * len(x["prompt_ids"]) + len(x["real_ids"]) + len(x["generated_ids"]) for x in rows)
        self.store.complete(f"iter_{t}.score_previous", fp, "score", {
            "sequences": 2 * len(rows), "tokens": tokens, "tokens_per_s": tokens / meter.wall_s,
            "opponent_real_logp_mean": logps["real"].mean().item(),
            "opponent_generated_logp_mean": logps["generated"].mean().item(), **meter.memory}, meter.wall_s)
        return fp

    def _trace(self, kind: str, stage: str) -> dict[str, Any]:
        if self.recipe.profile.trace != kind:
            return {}
        return {"trace_dir": self.run_dir / "traces" / stage, "trace_steps": self.recipe.profile.trace_steps}

    def _generate_iteration(self, t: int, pairs_path: Path, logps_path: Path, gen_fp: str, score_fp: str) -> None:
        k = self.recipe.generation.answers_per_prompt  # k answers per prompt = k pairs, one after another
        rows, logps, (gen, score) = self._generate_and_score(
            f"iter_{t}", [e for e in self.train for _ in range(k)], [e for e in self.train_examples for _ in range(k)],
            seed=self.recipe.seed + 1000 * (t + 1))
        write_jsonl(pairs_path, rows)
        gen_tokens = sum(len(x["generated_ids"]) for x in rows)
        self.store.complete(f"iter_{t}.generate", gen_fp, "generate", {
            "answers": len(rows), "tokens": gen_tokens, "tokens_per_s": gen_tokens / gen.wall_s,
            "mean_answer_tokens": gen_tokens / max(1, len(rows)),
            "answers_without_eos": sum(1 for x in rows if x["generated_ids"][-1:] != [self.tokenizer.eos_token_id]),
            **gen.memory}, gen.wall_s)
        write_safetensors(logps_path, logps)
        scored_tokens = sum(2 * len(x["prompt_ids"]) + len(x["real_ids"]) + len(x["generated_ids"]) for x in rows)
        self.store.complete(f"iter_{t}.score", score_fp, "score", {
            "sequences": 2 * len(rows), "tokens": scored_tokens, "tokens_per_s": scored_tokens / score.wall_s,
            "opponent_real_logp_mean": logps["real"].mean().item(),
            "opponent_generated_logp_mean": logps["generated"].mean().item(), **score.memory}, score.wall_s)

    def _generate_and_score(self, label: str, encoded: list[Encoded], examples: list, seed: int):
        """Sample one answer per prompt with the loaded adapter, then score the real and generated answers.
        Returns the pairs.jsonl rows, the log-prob tensors and the two parts' meters (time, peak memory)."""
        g = self.recipe.generation
        encoded = [(e.prompt_ids, e.answer_ids) for e in encoded]
        with StageMeter(self.runtime.device) as gen, \
                ui.stage_bar(f"{label} generate", len(encoded), "prompts") as advance:
            generated = generate_answers(self.model, self.tokenizer, [p for p, _ in encoded],
                                         max_new_tokens=g.max_new_tokens, batch_size=g.batch_size,
                                         temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, seed=seed,
                                         on_batch=advance)
        with StageMeter(self.runtime.device) as score, \
                ui.stage_bar(f"{label} score", 2 * len(encoded), "sequences") as advance:
            real_logps = score_responses(self.model, encoded, pad_id=self.pad_id, batch_size=g.batch_size,
                                         chunk_size=self.chunk, on_batch=advance)
            gen_logps = score_responses(self.model, [(p, y) for (p, _), y in zip(encoded, generated)],
                                        pad_id=self.pad_id, batch_size=g.batch_size, chunk_size=self.chunk,
                                        on_batch=advance)
        rows = [{"prompt": ex.prompt, "real": ex.answer,
                 "generated": self.tokenizer.decode(gen_ids, skip_special_tokens=True),
                 "prompt_ids": list(p), "real_ids": list(y), "generated_ids": gen_ids}
                for ex, (p, y), gen_ids in zip(examples, encoded, generated)]
        return rows, {"real": real_logps, "generated": gen_logps}, (gen, score)

    # ------------------------------------------------------------ the whole method

    def execute(self) -> list[dict[str, Any]]:
        r = self.recipe
        random.seed(r.seed)
        torch.manual_seed(r.seed)
        self.setup()
        sft_fp = self.run_sft()
        anchor_fp = self.make_anchor(sft_fp)
        self.evaluate("sft.eval", self.run_dir / "sft" / "adapter", sft_fp, anchor_fp)
        opponent_dir, opponent_fp = self.run_dir / "sft" / "adapter", sft_fp
        for t in range(r.spin.iterations):
            player_fp = self.spin_iteration(t, opponent_dir, opponent_fp)
            opponent_dir, opponent_fp = self.run_dir / f"iter_{t}" / "adapter", player_fp
            self.evaluate(f"iter_{t}.eval", opponent_dir, player_fp, anchor_fp)
        records = self.store.records()
        ui.console.print(ui.summary_table(records))
        render_report(self.run_dir)
        ui.note(f"run directory: {self.run_dir}  (per-phase cost and charts: {self.run_dir / 'report.md'})")
        return records


def _max_memory(*meters: StageMeter) -> dict[str, float]:
    return {k: max(m.memory[k] for m in meters) for k in meters[0].memory}


def _base_identity(path: Path) -> str:
    """What identifies the base weights: the config plus the built-in builder's info when there is one."""
    parts = [(path / name).read_text(encoding="utf-8") for name in ("config.json", "build_info.json")
             if (path / name).is_file()]
    return fingerprint(parts or [str(path)])


def run_recipe(recipe: Recipe, restart: bool = False) -> Path:
    # Every check that can fail on a user mistake runs before the run directory is touched.
    check_dataset_reference(recipe.data)
    check_model_reference(recipe.model)
    resolve_runtime(recipe.model)
    run_dir = prepare_run_dir(recipe, restart)
    Run(recipe, run_dir).execute()
    return run_dir
