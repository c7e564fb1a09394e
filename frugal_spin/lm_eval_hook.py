"""Optional hook: score the loaded adapter with EleutherAI's lm-evaluation-harness (`pip install lm_eval`).

Used by `compare` when `compare.lm_eval_tasks` names tasks: the SFT adapter and every arm's final adapter are
evaluated on them, as stages of their own (`sft.lm_eval`, `iter_<T-1>.lm_eval`, `block_<T-1>.lm_eval`), and the
numeric results land in comparison.json/md beside the built-in metrics. Only the first and last points are scored:
harness tasks are usually much larger than the held-out set, and the question is what the whole SPIN run or SFT
continuation changed.

Input: the pipeline's model (base + the loaded LoRA adapter, in memory: nothing is saved or reloaded, so what is
scored is exactly what the built-in evaluation scored) and its tokenizer. Output: `{"<task>/<metric>": value}` for
every numeric result. Tasks come from the harness's registry or from `compare.lm_eval_include_path`, a directory of
task YAML files (how to evaluate on local data offline: `dataset_path: json` with `data_files`).
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

from frugal_spin.errors import UserError


def check_lm_eval_available(tasks: list[str]) -> None:
    """A UserError before any work when tasks are asked for but the harness is not installed."""
    if tasks and importlib.util.find_spec("lm_eval") is None:
        raise UserError(f"compare.lm_eval_tasks {tasks} needs lm-evaluation-harness: pip install lm_eval "
                        "(or set compare.lm_eval_tasks=[])")


def run_lm_eval(model, tokenizer, tasks: list[str], *, limit: int, include_path: str, batch_size: int,
                seed: int) -> dict[str, float]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    was_training = model.training
    model.eval()
    # An already-built model: HFLM takes it as it is (device, dtype and the adapter included).
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=include_path or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"compare.lm_eval_tasks: unknown task(s) {unknown} (compare.lm_eval_include_path: "
                        f"{include_path or 'not set'})")
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit or None, task_manager=manager,
                                  log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed)
    model.train(was_training)
    return flatten_results(out["results"])


def flatten_results(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """{"task": {"acc,none": 0.5, "alias": "task", "sample_len": 8}} -> {"task/acc,none": 0.5}: metrics only
    (numbers, NaN dropped; the harness's sample count is not a metric)."""
    flat = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if key == "sample_len":
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                flat[f"{task}/{key}"] = float(value)
    return flat
