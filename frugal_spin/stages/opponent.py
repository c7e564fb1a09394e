"""The opponent's data: its answers to prompts and its log-probs of both answers of every pair.

The opponent of iteration t is the base plus the previous stage's adapter (the SFT adapter for t = 0), read back
from disk, never the bare base; its identity in a fingerprint includes the adapter files' hash, so pairs and
log-probs always name what produced them.

- `generate` (iteration t): `generation.answers_per_prompt` sampled answers per training prompt, each a pair with
  the prompt's real answer -> `iter_<t>/pairs.jsonl`. Answers are appended batch by batch to an answer log, so a
  killed run resumes at the first unanswered batch; `generation.engine: vllm` samples with vLLM (vllm_engine.py).
- `score`: the opponent's log-probs of each pair's real and generated answer (the cache the player trains
  against: no reference model in memory while training) -> `iter_<t>/opponent_logps.safetensors`, its metadata
  naming the stage's fingerprint and the pairs' hash.
- `score_previous` (spin.mix_previous_pairs, t >= 1): iteration t-1's pairs scored by iteration t's opponent ->
  `iter_<t>/previous_pairs_logps.safetensors`. The SPIN loss of iteration t takes the current opponent as the
  reference of every pair it trains on; iteration t-1's cache holds p_theta_{t-1}'s log-probs, a stale reference.
- `anchor`: the SFT model's answer to each held-out prompt, scored by it -> `eval/anchor_pairs.jsonl`,
  `eval/anchor_logps.safetensors`: the fixed opponent of every evaluation (evaluation.py).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from frugal_spin import ui
from frugal_spin.data import Encoded
from frugal_spin.diagnostics import answer_diagnostics, answer_ends
from frugal_spin.faults import crash_point
from frugal_spin.fingerprints import file_digest, fingerprint
from frugal_spin.generate import AnswerLog, generate_answers
from frugal_spin.io import read_jsonl, write_jsonl, write_safetensors
from frugal_spin.model import inference_mode, load_adapter_weights
from frugal_spin.runner import Job, Outcome, Work, out_of_memory_in
from frugal_spin.scoring import score_pairs
from frugal_spin.turns import truncation_counts


def _opponent(job: Job) -> str:
    """The opponent's identity: its adapter's stage fingerprint and the adapter files' hash."""
    opponent = job.inputs["opponent"]
    return fingerprint(opponent.fp, file_digest(opponent.path())["sha256"])


# ------------------------------------------------------------------------------------------------- generate

def _generate_fingerprint(job: Job) -> str:
    r = job.ctx.recipe
    return fingerprint("generate", _opponent(job), asdict(r.generation), r.seed, job.spec.iteration,
                       job.ctx.answer_rules())


def _generate_pairs(job: Job) -> Outcome:
    ctx, r, t = job.ctx, job.ctx.recipe, job.spec.iteration
    opponent_dir = job.inputs["opponent"].path()
    load_adapter_weights(ctx.model, opponent_dir)
    k = r.generation.answers_per_prompt  # k answers per prompt = k pairs, one after another
    log_path = job.folder / "answers.partial.jsonl"
    rows, merged = sample_pairs(job, [e for e in ctx.train for _ in range(k)],
                                [e for e in ctx.train_examples for _ in range(k)], seed=r.seed + 1000 * (t + 1),
                                log_path=log_path, adapter_dir=opponent_dir)
    tokens = sum(len(x["generated_ids"]) for x in rows)
    metrics = {**ctx.weights(merged), "answers": len(rows), "tokens": tokens,
               "mean_answer_tokens": tokens / max(1, len(rows)), **opponent_answer_metrics(job, rows),
               **truncation_counts(rows, ctx.stop_ids)}
    return Outcome(metrics, write=lambda: write_jsonl(job.output(), rows), cleanup=lambda: AnswerLog.remove(log_path))


# ---------------------------------------------------------------------------------------------------- score

def _score_fingerprint(job: Job) -> str:
    return fingerprint("score", job.inputs["pairs"].fp)


def _score_previous_fingerprint(job: Job) -> str:
    return fingerprint("score-previous", _opponent(job), job.inputs["pairs"].fp)


def _score_pairs_file(job: Job) -> Outcome:
    """The loaded opponent's log-probs of the `pairs` input into this stage's output (with the fingerprint and the
    pairs' hash in its metadata)."""
    ctx = job.ctx
    load_adapter_weights(ctx.model, job.inputs["opponent"].path())
    pairs_path = job.inputs["pairs"].path()
    rows = read_jsonl(pairs_path)
    logps = score_rows(job, rows)

    def write() -> None:
        write_safetensors(job.output(), logps, metadata={"fingerprint": job.fp,
                                                         "pairs_sha256": file_digest(pairs_path)["sha256"]})

    return Outcome({**ctx.weights(), "sequences": 2 * len(rows), "tokens": ctx.scored_tokens(rows),
                    "opponent_real_logp_mean": logps["real"].mean().item(),
                    "opponent_generated_logp_mean": logps["generated"].mean().item()}, write=write)


# --------------------------------------------------------------------------------------------------- anchor

def _anchor_fingerprint(job: Job) -> str:
    r = job.ctx.recipe
    # One answer per held-out prompt whatever answers_per_prompt says, so that knob leaves the anchor alone.
    generation = {k: v for k, v in asdict(r.generation).items() if k != "answers_per_prompt"}
    return fingerprint("anchor", job.inputs["adapter"].fp, generation, job.ctx.answer_rules())


def _anchor(job: Job) -> Outcome:
    ctx = job.ctx
    adapter_dir = job.inputs["adapter"].path()
    load_adapter_weights(ctx.model, adapter_dir)
    log_path = job.folder / "anchor_answers.partial.jsonl"
    rows, merged = sample_pairs(job, ctx.heldout, ctx.heldout_examples, seed=ctx.recipe.seed + 7919,
                                log_path=log_path, adapter_dir=adapter_dir)
    logps = score_rows(job, rows)
    generated = sum(len(x["generated_ids"]) for x in rows)

    def write() -> None:
        write_jsonl(job.output(0), rows)
        write_safetensors(job.output(1), logps, metadata={"fingerprint": job.fp,
                                                          "pairs_sha256": file_digest(job.output(0))["sha256"]})

    return Outcome({**ctx.weights(merged), "pairs": len(rows),  # tokens: generated, then scored
                    "tokens": ctx.scored_tokens(rows) + generated, "mean_answer_tokens": generated / max(1, len(rows)),
                    **opponent_answer_metrics(job, rows)}, write=write, cleanup=lambda: AnswerLog.remove(log_path))


# ------------------------------------------------------------------------------------------------- the parts

def sample_pairs(job: Job, encoded: list[Encoded], examples: list, *, seed: int, log_path: Path,
                 adapter_dir: Path) -> tuple[list[dict[str, Any]], bool]:
    """One answer per prompt from the loaded adapter (saved in `adapter_dir`), as pairs.jsonl rows, and whether
    it sampled from merged weights. Answers are appended to `log_path` batch by batch, so a killed run resumes
    generation at the first batch with an unanswered prompt."""
    ctx, g = job.ctx, job.ctx.recipe.generation
    log = AnswerLog(log_path, fingerprint(job.fp, [e.prompt_ids for e in encoded]))
    answered = log.load()

    def save_batch(indices: list[int], answers: list[list[int]]) -> None:
        log.append(indices, answers)
        crash_point(job.spec.point("batch"), log.batches_written)

    prompts = [e.prompt_ids for e in encoded]
    with out_of_memory_in(f"generation for {job.label} (generation.batch_size {g.batch_size})"), \
            inference_mode(ctx.model, ctx.runtime) as merged, \
            ui.stage_bar(f"{job.label} generate", len(encoded), "prompts") as advance:
        if g.engine == "vllm":
            from frugal_spin.vllm_engine import engine_factory, generate_with_vllm

            generated = generate_with_vllm(
                engine_factory(ctx.base_path, ctx.recipe, ctx.runtime, ctx.longest, seed), prompts, str(adapter_dir),
                max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, seed=seed,
                eos_id=ctx.stop_ids, answered=answered, on_answers=save_batch, on_batch=advance)
        else:
            generated = generate_answers(ctx.model, ctx.tokenizer, prompts, max_new_tokens=g.max_new_tokens,
                                         batch_size=g.batch_size, temperature=g.temperature, top_p=g.top_p,
                                         top_k=g.top_k, seed=seed, on_batch=advance, answered=answered,
                                         on_answers=save_batch, stop_ids=ctx.stop_ids)
    rows = [{"prompt": ex.prompt, **({"context": ex.context} if ex.context else {}), "real": ex.answer,
             "generated": ctx.tokenizer.decode(gen_ids, skip_special_tokens=True),
             "prompt_ids": list(e.prompt_ids), "real_ids": list(e.answer_ids), "generated_ids": gen_ids}
            for ex, e, gen_ids in zip(examples, encoded, generated)]
    return rows, merged


def score_rows(job: Job, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The loaded adapter's log-probs of each row's real and generated answer (the opponent cache)."""
    ctx, batch_size = job.ctx, job.ctx.recipe.generation.batch_size
    real_ids, generated_ids = ctx.scored(rows)
    with out_of_memory_in(f"scoring for {job.label} (generation.batch_size {batch_size})"), \
            ui.stage_bar(f"{job.label} score", 2 * len(rows), "sequences") as advance:
        # Under the training loop's autocast: the cache must be what the player computes at step 0.
        real, generated = score_pairs(ctx.model, [(x["prompt_ids"], r, g) for x, r, g in
                                                  zip(rows, real_ids, generated_ids)],
                                      pad_id=ctx.pad_id, batch_size=batch_size, chunk_size=ctx.chunk,
                                      on_batch=advance, autocast=ctx.runtime.autocast)
    crash_point(job.spec.point("scored"))
    return {"real": real, "generated": generated}


def opponent_answer_metrics(job: Job, rows: list[dict[str, Any]]) -> dict[str, float]:
    """How close the opponent's answers are to the real ones and how often they end (diagnostics.py). An answer
    ended when its last token is one of the ids generation stops at (the template's end of turn, every eos:
    turns.stop_token_ids): one rule for `end_token_rate` and `answers_without_eos`."""
    ctx = job.ctx
    return {**answer_diagnostics(rows, ctx.tokenizer.all_special_ids), **answer_ends(rows, ctx.stop_ids)}


GENERATE = Work(_generate_fingerprint, _generate_pairs)
SCORE = Work(_score_fingerprint, _score_pairs_file)
SCORE_PREVIOUS = Work(_score_previous_fingerprint, _score_pairs_file)
ANCHOR = Work(_anchor_fingerprint, _anchor)
