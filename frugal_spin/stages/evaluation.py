"""Evaluation of an adapter after SFT, each SPIN iteration and each continued-SFT block (evaluate.py's metrics).

`eval`: the adapter (input `adapter`) on the held-out examples and the anchor pairs (input `anchor`: the SFT
model's answers and log-probs, the fixed opponent), with spin.beta_at(0), so every evaluation of every arm is
measured alike: held-out NLL, SPIN loss, reward margin and accuracy, the anchor log-prob changes; exact match when
the task can check answers (tasks/__init__.py); and the first `eval.samples` held-out prompts answered greedily.

`lm_eval` (compare.lm_eval_tasks): the adapter scored by lm-evaluation-harness (lm_eval_hook.py).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from frugal_spin import ui
from frugal_spin.evaluate import anchor_spin_metrics, exact_match, heldout_nll
from frugal_spin.faults import crash_point
from frugal_spin.fingerprints import fingerprint
from frugal_spin.generate import generate_answers
from frugal_spin.io import read_jsonl, read_safetensors
from frugal_spin.lm_eval_hook import run_lm_eval
from frugal_spin.model import inference_mode, load_adapter_weights
from frugal_spin.runner import Job, Outcome, Work, out_of_memory_in
from frugal_spin.tasks import task_of


def _fingerprint(job: Job) -> str:
    r = job.ctx.recipe
    return fingerprint("eval", job.inputs["adapter"].fp, job.inputs["anchor"].fp, asdict(r.eval), r.spin.beta_at(0))


def _evaluate(job: Job) -> Outcome:
    ctx, r = job.ctx, job.ctx.recipe
    load_adapter_weights(ctx.model, job.inputs["adapter"].path())
    metrics: dict[str, Any] = {}
    with out_of_memory_in(f"evaluation for {job.label} (eval.batch_size {r.eval.batch_size})"), \
            ui.stage_bar(job.label, 3, "parts") as advance:
        metrics["heldout_nll"] = heldout_nll(ctx.model, ctx.heldout, pad_id=ctx.pad_id, batch_size=r.eval.batch_size,
                                             chunk_size=ctx.chunk, autocast=ctx.runtime.autocast)
        crash_point(job.spec.point("nll"))
        tokens = sum(len(e.prompt_ids) + len(e.answer_ids) for e in ctx.heldout)
        advance()
        anchor = read_jsonl(job.inputs["anchor"].path(0))
        tokens += ctx.scored_tokens(anchor)
        anchor_logps = read_safetensors(job.inputs["anchor"].path(1))
        real, generated = ctx.scored(anchor)
        metrics.update(anchor_spin_metrics(
            ctx.model, [a["prompt_ids"] for a in anchor], real, generated, anchor_logps["real"],
            anchor_logps["generated"], beta=r.spin.beta_at(0), pad_id=ctx.pad_id, batch_size=r.generation.batch_size,
            chunk_size=ctx.chunk, autocast=ctx.runtime.autocast))
        advance()
        sampling_merged, texts, sampled_tokens = _greedy_answers(job, metrics)
        tokens += sampled_tokens
        advance()
    n_samples = min(r.eval.samples, len(ctx.heldout))
    # The same first held-out prompts after every stage, with the real and the greedy answer, so a reader sees what
    # SFT and each SPIN iteration did to the answers (report.md, "Sample answers").
    metrics["samples"] = [{"prompt": e.prompt, "real": a, "greedy": t} for e, a, t in
                          list(zip(ctx.heldout_examples, ctx.heldout_answers, texts))[:n_samples]]
    ctx.live.evaluation(metrics, job.steps_done())
    return Outcome({**ctx.weights(sampling_merged), **metrics, "tokens": tokens})


def _greedy_answers(job: Job, metrics: dict[str, Any]) -> tuple[bool | None, list[str], int]:
    """Greedy answers: to every held-out prompt with exact match when the task checks answers, else to the first
    `eval.samples` prompts only (chat data has no exact answer). Returns whether they were sampled from merged
    weights (None: none sampled), the texts, and the tokens generated."""
    ctx, r = job.ctx, job.ctx.recipe
    task = task_of(r.data.dataset)
    n_samples = min(r.eval.samples, len(ctx.heldout))
    if task is not None and task.is_correct is not None:
        with inference_mode(ctx.model, ctx.runtime) as merged:
            metrics["exact_match"], texts, tokens = exact_match(
                ctx.model, ctx.tokenizer, ctx.heldout, ctx.heldout_answers, task.is_correct,
                max_new_tokens=r.eval.max_new_tokens, batch_size=r.eval.batch_size)
        return merged, texts, tokens
    if not n_samples:
        return None, [], 0
    with inference_mode(ctx.model, ctx.runtime) as merged:
        answers = generate_answers(ctx.model, ctx.tokenizer, [e.prompt_ids for e in ctx.heldout[:n_samples]],
                                   max_new_tokens=r.eval.max_new_tokens, batch_size=r.eval.batch_size, temperature=0.0)
    return merged, [ctx.tokenizer.decode(ids, skip_special_tokens=True) for ids in answers], sum(map(len, answers))


def _lm_eval_fingerprint(job: Job) -> str:
    r = job.ctx.recipe
    c = r.compare
    # The task files' contents, not just their directory's name, decide whether an earlier score still holds.
    include = _include_path(job)
    task_files = {str(p.relative_to(include)): p.read_text(encoding="utf-8")
                  for p in sorted(include.rglob("*.yaml"))} if include else {}
    return fingerprint("lm-eval", job.inputs["adapter"].fp, c.lm_eval_tasks, c.lm_eval_limit, task_files,
                       r.eval.batch_size)


def _lm_eval(job: Job) -> Outcome:
    ctx, r = job.ctx, job.ctx.recipe
    c, include = r.compare, _include_path(job)
    load_adapter_weights(ctx.model, job.inputs["adapter"].path())
    ui.note(f"{job.label}: lm-evaluation-harness on {ui.escape(', '.join(c.lm_eval_tasks))}")
    return Outcome(run_lm_eval(ctx.model, ctx.tokenizer, c.lm_eval_tasks, limit=c.lm_eval_limit,
                               include_path=str(include or ""), batch_size=r.eval.batch_size, seed=r.seed))


def _include_path(job: Job) -> Path | None:
    path = job.ctx.recipe.compare.lm_eval_include_path
    return Path(path).expanduser() if path else None


EVAL = Work(_fingerprint, _evaluate)
LM_EVAL = Work(_lm_eval_fingerprint, _lm_eval)
