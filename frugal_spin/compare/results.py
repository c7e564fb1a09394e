"""The results of `compare`: comparison.json, comparison.md and two charts, from the sub-runs' stage records.

Inputs: `<compare dir>/seed_<s>/metrics.jsonl` (the SPIN arm with `spin.loss` and the shared SFT stage of seed s),
`seed_<s>/spin_<loss>/metrics.jsonl` (the SPIN arms of the other losses of `compare.spin_losses`) and
`seed_<s>/sft_equal_steps|sft_equal_time/metrics.jsonl` (the continued-SFT arms). Nothing is recomputed: every
number is read from the records the stages wrote, so the comparison can be re-rendered at any time.

Points. Every arm is evaluated at `sft` (the shared SFT adapter: the seed's `sft.eval`) and after each SPIN
iteration or SFT block t, called `iter_<t>` for all arms (for an SFT arm: after block t, the same number of
optimizer steps as SPIN iteration t in the equal-steps arm).

Statistics. Over seeds: the mean and the *sample* standard deviation (n - 1; undefined, reported as null, for one
seed). A difference "exceeds the spread" when |mean difference| is larger than the larger of the two standard
deviations. That is deliberately conservative; the per-seed (paired) differences are reported beside it, with how
many seeds agree in sign, because both arms of a seed share the SFT adapter and the held-out prompts.

The hypothesis of the research brief, "the loss of the model trained by SPIN is lower than at the SFT stage", is
checked for two losses: the held-out NLL of real answers and the SPIN loss on the held-out anchor pairs, comparing
every SPIN arm (one per SPIN loss) after its last iteration with the SFT stage. The anchor SPIN loss is always the
paper's sigmoid member, whatever loss an arm trained with, so every arm is measured with the same yardstick. It
holds when the mean is lower; the statement says by how much and whether that exceeds the spread. The same check on the continued-SFT arm says whether a gain is due
to SPIN or just to more training.

The tables and charts are rendered as report.md's are (render.py); the budgets and the arms' names are
compare/budgets.py's.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from frugal_spin.compare.budgets import EQUAL_STEPS, EQUAL_TIME, equal_time_budget, loss_arms, seeds_of
from frugal_spin.config import Recipe
from frugal_spin.errors import UserError
from frugal_spin.io import write_json, write_text
from frugal_spin.plan import TRAIN_KINDS, iteration_folder
from frugal_spin.render import ROLE_COLOURS, markdown_table, save_png
from frugal_spin.report import (DIAGNOSTIC_KEYS, DIAGNOSTIC_LABELS, EVAL_KEYS, LOG2, build_report,
                                iteration_diagnostics, logp_direction, read_records)

SFT_ARM_LABELS = {EQUAL_STEPS: "LoRA-SFT, equal steps", EQUAL_TIME: "LoRA-SFT, equal wall time"}
METRIC_LABELS = {"heldout_nll": "held-out NLL of real answers", "spin_loss": "SPIN loss on held-out anchor pairs",
                 "reward_margin": "reward margin on anchor pairs", "reward_accuracy": "reward accuracy on anchor pairs",
                 "exact_match": "exact match (greedy)", "train_loss": "training loss of the block"}
LOWER_IS_BETTER = {"heldout_nll": True, "spin_loss": True, "reward_margin": False, "reward_accuracy": False,
                   "exact_match": False}
HYPOTHESIS_LOSSES = ("heldout_nll", "spin_loss")


# ------------------------------------------------------------------------------------------------- statistics

def mean_std(values: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (None for fewer than two values) with the values themselves."""
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None, "values": list(values)}


def difference(after: list[float], before: list[float]) -> dict[str, Any]:
    """`after` minus `before`, per seed (paired) and of the means, and whether it exceeds the spread."""
    a, b = mean_std(after), mean_std(before)
    diff = a["mean"] - b["mean"]
    spread = None if a["std"] is None or b["std"] is None else max(a["std"], b["std"])
    paired = [x - y for x, y in zip(after, before)]
    return {"after": a, "before": b, "difference": diff,
            "relative": diff / abs(b["mean"]) if b["mean"] else None,
            "spread": spread, "exceeds_spread": None if spread is None else abs(diff) > spread,
            "paired_differences": paired, "paired_std": mean_std(paired)["std"],
            "seeds_lower": sum(d < 0 for d in paired), "seeds_higher": sum(d > 0 for d in paired)}


def _pm(stats: dict[str, Any], digits: int = 4) -> str:
    if stats["mean"] is None:
        return "–"
    return f"{stats['mean']:.{digits}f}" + ("" if stats["std"] is None else f" ± {stats['std']:.{digits}f}")


def _spread_clause(d: dict[str, Any]) -> str:
    n = len(d["paired_differences"])
    if d["exceeds_spread"] is None:
        return "one seed only, so the spread over seeds is unknown"
    agree = (f"lower in {d['seeds_lower']} of {n} seeds" if d["difference"] < 0
             else f"higher in {d['seeds_higher']} of {n} seeds")
    if d["exceeds_spread"]:
        return f"this exceeds the spread over seeds ({d['spread']:.4f}; {agree})"
    return f"this is within the spread over seeds ({d['spread']:.4f}; {agree}), so it is not established"


def hypothesis_verdict(loss: str, sft_stage: list[float], after_training: list[float],
                       arm: str = "spin") -> dict[str, Any]:
    """Whether `arm` lowered `loss` below the SFT stage (per-seed values, same seed order), in words and numbers.

    holds: the mean after training is lower than at the SFT stage; `exceeds_spread` qualifies it (see module doc).
    A higher or equal mean is reported as a negative result."""
    d = difference(after_training, sft_stage)
    who = arm_label(arm) if arm in SFT_ARM_LABELS else "SPIN" if arm == "spin" else f"SPIN ({arm[len('spin_'):]})"
    holds = d["difference"] < 0
    what = METRIC_LABELS.get(loss, loss)
    numbers = f"{_pm(d['after'])} after {who} vs {_pm(d['before'])} at the SFT stage"
    if d["difference"] == 0:
        change = "unchanged"
    else:
        rel = f" ({abs(d['relative']) * 100:.2f}%)" if d["relative"] is not None else ""
        change = f"{'lower' if holds else 'higher'} by {abs(d['difference']):.4f}{rel}"
    if holds:
        verdict = "holds" + ("" if d["exceeds_spread"] is None
                             else " and exceeds the spread" if d["exceeds_spread"] else " but within the spread")
        statement = f"{what}: {numbers}: {change}; {_spread_clause(d)}."
    else:
        # A negative result gets the same spread test: "higher beyond the spread" is a finding of its own.
        qualifier = ("" if d["exceeds_spread"] is None or d["difference"] == 0
                     else ", beyond the spread" if d["exceeds_spread"] else ", within the spread")
        verdict = f"does not hold (negative result{qualifier})"
        statement = (f"{what}: {numbers}: {change}"
                     + ("" if d["difference"] == 0 else f"; {_spread_clause(d)}")
                     + f". Negative result: {who} did not lower this loss.")
    return {"loss": loss, "arm": arm, "holds": holds, "exceeds_spread": d["exceeds_spread"], "verdict": verdict,
            "statement": statement, **{k: d[k] for k in ("difference", "relative", "spread", "paired_differences",
                                                          "seeds_lower", "seeds_higher")},
            "sft_stage": d["before"], "after": d["after"]}


def arm_difference(metric: str, spin: list[float], sft: list[float]) -> dict[str, Any]:
    """SPIN minus an SFT arm on one metric at the same point: which is better and whether beyond the spread."""
    d = difference(spin, sft)
    lower_better = LOWER_IS_BETTER.get(metric, _lm_eval_lower_is_better(metric))
    if d["difference"] == 0:
        better = "equal"
    else:
        better = "spin" if (d["difference"] < 0) == lower_better else "sft"
    seeds_spin_better = d["seeds_lower"] if lower_better else d["seeds_higher"]
    return {"metric": metric, "better": better, "lower_is_better": lower_better,
            "seeds_spin_better": seeds_spin_better,
            **{k: d[k] for k in ("difference", "spread", "exceeds_spread", "paired_differences", "paired_std")},
            "spin": d["after"], "sft": d["before"]}


# ---------------------------------------------------------------------------------------------------- reading

def is_spin_arm(arm: str) -> bool:
    return arm == "spin" or arm.startswith("spin_")


def arm_label(arm: str, loss: str | None = None) -> str:
    """"LoRA-SPIN (<loss>)" for a SPIN arm (the "spin" arm's loss must be given), the SFT arms' own labels."""
    if arm in SFT_ARM_LABELS:
        return SFT_ARM_LABELS[arm]
    return f"LoRA-SPIN ({loss or arm[len('spin_'):]})"


def _arm_records(compare_dir: Path, seed: int, arm: str) -> list[dict[str, Any]] | None:
    """The stage records of one arm of one seed: the seed's own records for the "spin" arm; the seed's setup/SFT/
    anchor/sft.eval followed by the arm's own stages for a loss arm (iterations) or an SFT arm (blocks). None when
    that arm did not run for the seed."""
    seed_dir = compare_dir / f"seed_{seed}"
    seed_records = read_records(seed_dir)
    if arm == "spin":
        return seed_records
    if not (seed_dir / arm / "metrics.jsonl").is_file():
        return None
    shared = [r for r in seed_records if r["iteration"] is None and r["kind"] != "lm_eval"]
    return shared + read_records(seed_dir / arm)


def _point(iteration: int | None) -> str:
    """The evaluation point of a record's iteration: "sft" before the first, else `iter_<t>` for every arm (an SFT
    arm's block t sits at SPIN's iteration t), named like the SPIN iteration's folder."""
    return "sft" if iteration is None else iteration_folder(iteration)


LM_EVAL_PREFIX = "lm_eval:"
_MEMORY_KEYS = {"peak_mem_gib", "peak_reserved_gib", "peak_rss_gib"}


def _lm_eval_lower_is_better(key: str) -> bool:
    """Direction of a harness metric from its name: perplexities, bits per byte and losses go down, the rest up."""
    return any(word in key for word in ("perplexity", "bits_per_byte", "loss", "nll"))


def collect(compare_dir: Path, seeds: list[int], iterations: int,
            spin_arms: dict[str, str] | None = None) -> dict[str, Any]:
    """Per arm: metrics per point and cost per phase, each a list over seeds (same order as `seeds`).
    `spin_arms` is {arm: loss} for the SPIN arms (compare.loss_arms); default: the one "spin" arm, loss sigmoid."""
    points = [_point(None)] + [_point(t) for t in range(iterations)]
    spin_arms = spin_arms or {"spin": "sigmoid"}
    arms: dict[str, Any] = {}
    for arm in [*spin_arms, *SFT_ARM_LABELS]:
        per_seed = [_arm_records(compare_dir, seed, arm) for seed in seeds]
        if all(r is None for r in per_seed):
            continue
        if any(r is None for r in per_seed):
            missing = [s for s, r in zip(seeds, per_seed) if r is None]
            raise UserError(f"compare: arm {arm} is missing for seeds {missing}: rerun the compare command")
        metrics: dict[str, dict[str, list[float]]] = {p: {} for p in points}
        steps: dict[str, list[int]] = {p: [] for p in points[1:]}
        phases: dict[str, dict[str, Any]] = {}
        diagnostics: dict[str, dict[str, list[float]]] = {p: {} for p in points[1:]}
        for records in per_seed:
            if is_spin_arm(arm):
                for row in iteration_diagnostics(records):
                    for key, value in row.items():
                        if key != "iteration" and value is not None and _point(row["iteration"]) in diagnostics:
                            diagnostics[_point(row["iteration"])].setdefault(key, []).append(value)
            for r in records:
                point = _point(r["iteration"])
                if r["kind"] == "eval" and point in metrics:
                    for key in EVAL_KEYS:
                        if r["metrics"].get(key) is not None:
                            metrics[point].setdefault(key, []).append(r["metrics"][key])
                if r["kind"] == "lm_eval" and point in metrics:  # standard errors left out: the seeds give the spread
                    for key, value in r["metrics"].items():
                        if key not in _MEMORY_KEYS and "_stderr" not in key:
                            metrics[point].setdefault(LM_EVAL_PREFIX + key, []).append(value)
                if r["kind"] in TRAIN_KINDS and point in steps:
                    steps[point].append(r["metrics"]["optimizer_steps"])
                    metrics[point].setdefault("train_loss", []).append(r["metrics"]["train_loss"])
            # Setup (loading the base and data) is left out: it is not part of either method's budget, and every
            # resume measures it again, so it would make a rerun's comparison differ with nothing redone.
            for phase in build_report([r for r in records if r["kind"] != "setup"])["phases"]:
                entry = phases.setdefault(phase["phase"], {"role": phase["role"], "wall_time_s": [],
                                                           "peak_mem_gib": [], "memory_kind": phase["memory_kind"]})
                entry["wall_time_s"].append(phase["wall_time_s"])
                if phase["peak_mem_gib"] is not None:
                    entry["peak_mem_gib"].append(phase["peak_mem_gib"])
        for point in points:
            for key, values in metrics[point].items():
                if len(values) != len(seeds):
                    raise UserError(f"compare: {arm} has {key} at {point} for {len(values)} of {len(seeds)} seeds: "
                                    "rerun the compare command to finish it")
        arms[arm] = {
            "label": arm_label(arm, spin_arms.get(arm)),
            "loss": spin_arms.get(arm),
            "metrics": {p: {k: mean_std(v) for k, v in metrics[p].items()} for p in points},
            "optimizer_steps": {p: v for p, v in steps.items()},
            # SPIN arms: per iteration, the diagnostics of report.iteration_diagnostics over seeds (a key only when
            # every seed recorded it: runs made before the diagnostics existed have none)
            "diagnostics": {p: {k: mean_std(v) for k, v in d.items() if len(v) == len(seeds)}
                            for p, d in diagnostics.items()} if is_spin_arm(arm) else {},
            "phases": {name: {"role": e["role"], "memory_kind": e["memory_kind"],
                              "wall_time_s": mean_std(e["wall_time_s"]), "peak_mem_gib": mean_std(e["peak_mem_gib"])}
                       for name, e in phases.items()},
            "device": next((r["metrics"].get("device") for r in per_seed[0] if r["kind"] == "setup"), None),
        }
    return {"points": points, "arms": arms}


# ----------------------------------------------------------------------------------------------------- summary

def summarize(compare_dir: Path, recipe: Recipe) -> dict[str, Any]:
    """comparison.json's content: the collected numbers, the hypothesis verdicts and SPIN-vs-SFT differences."""
    seeds = seeds_of(recipe)
    iterations = recipe.spin.iterations
    spin_arms = loss_arms(recipe)
    data = collect(compare_dir, seeds, iterations, spin_arms)
    arms, last = data["arms"], data["points"][-1]
    missing = [arm for arm in [*spin_arms, EQUAL_STEPS] if arm not in arms]
    if missing:
        raise UserError(f"compare: {compare_dir} has no finished {', '.join(missing)} arm yet: rerun the compare "
                        "command")
    values = lambda arm, point, key: arms[arm]["metrics"][point][key]["values"]  # noqa: E731
    hypothesis = [hypothesis_verdict(loss, values(arm, "sft", loss), values(arm, last, loss), arm)
                  for arm in arms for loss in HYPOTHESIS_LOSSES]
    compared = [k for k in EVAL_KEYS if k in arms["spin"]["metrics"][last]]
    compared += sorted(k for k in arms["spin"]["metrics"][last] if k.startswith(LM_EVAL_PREFIX))
    sft_arms = [arm for arm in arms if not is_spin_arm(arm)]

    def versus(spin_arm: str) -> dict[str, list[dict[str, Any]]]:
        return {arm: [arm_difference(key, values(spin_arm, last, key), values(arm, last, key)) for key in compared
                      if key in arms[arm]["metrics"][last] and key in arms[spin_arm]["metrics"][last]]
                for arm in sft_arms}

    return {
        "compare_dir": str(compare_dir),
        "seeds": seeds,
        "spin_iterations": iterations,
        "device": arms["spin"]["device"],
        "budget": equal_time_budget(compare_dir / f"seed_{seeds[0]}", iterations,
                                    recipe.compare.equal_time_threshold),
        "criterion": "exceeds the spread = |mean difference| > max(sample std of the two groups over seeds)",
        "points": data["points"],
        "arms": arms,
        "hypothesis": hypothesis,
        "spin_vs_sft": versus("spin"),  # the "spin" arm (spin.loss) against each SFT arm
        # every SPIN arm (one per loss, "spin" included) against each SFT arm: {spin arm: {sft arm: [...]}}
        "spin_arms_vs_sft": {arm: versus(arm) for arm in spin_arms},
    }


# ---------------------------------------------------------------------------------------------------- markdown

def _markdown(summary: dict[str, Any], command: str) -> str:
    arms, points, last = summary["arms"], summary["points"], summary["points"][-1]
    budget = summary["budget"]
    spin_arms = [a for a in arms if is_spin_arm(a)]
    losses = ", ".join(arms[a]["loss"] for a in spin_arms)
    lines = [f"# LoRA-SPIN vs LoRA-SFT: {len(summary['seeds'])} seeds ({', '.join(map(str, summary['seeds']))}), "
             f"{summary['spin_iterations']} SPIN iterations, SPIN loss{'es' if len(spin_arms) > 1 else ''} "
             f"{losses}, device {summary['device']}", "",
             f"Reproduce: `{command}`. Values are mean ± sample std over seeds; each seed is its own data sample, "
             "SFT run and SPIN/SFT sampling and batch order, with every arm of a seed starting from that seed's SFT "
             "adapter. The SPIN loss on the anchor pairs is the paper's (sigmoid) for every arm, whatever loss the "
             "arm trained with.", "", "## The hypothesis: \"the loss of the model trained by SPIN is lower than at "
             "the SFT stage\"", ""]
    for h in summary["hypothesis"]:
        label = arms[h["arm"]]["label"]
        tag = f"**{label}**" if is_spin_arm(h["arm"]) else f"control, {label}"
        lines.append(f"- {tag}: {h['verdict']}. {h['statement']}")
    lines += ["", "## Verdict per SPIN loss", ""]
    by_arm = {}
    for h in summary["hypothesis"]:
        by_arm.setdefault(h["arm"], {})[h["loss"]] = h
    for arm in spin_arms:
        parts = [f"{METRIC_LABELS[loss]} {by_arm[arm][loss]['verdict']}" for loss in HYPOTHESIS_LOSSES]
        for sft_arm, diffs in summary["spin_arms_vs_sft"][arm].items():
            better = [d["metric"] for d in diffs if d["better"] == "spin"]
            beyond = [d["metric"] for d in diffs if d["exceeds_spread"]]
            beyond_spin = [m for m in beyond if m in better]
            parts.append(f"against {arm_label(sft_arm)}: SPIN better on {len(better)} of {len(diffs)} metrics"
                         + (f" ({', '.join(better)})" if better else "")
                         + f", beyond the spread on {len(beyond)}"
                         + (f" (SPIN better on {', '.join(beyond_spin)})" if beyond_spin else
                            " (none in SPIN's favour)" if beyond else ""))
        lines.append(f"- **{arms[arm]['label']}**: " + "; ".join(parts) + ".")
    for arm in spin_arms:
        lines += ["", f"## {arms[arm]['label']} against continued SFT after the last iteration ({last})", "",
                  f"Difference = SPIN − SFT arm; {summary['criterion']}.", ""]
        lines.append(_versus_table(arms, arm, summary["spin_arms_vs_sft"][arm], last))
    lines += _diagnostics_markdown(arms, spin_arms)
    lines += ["", "## Budgets", "",
              "Optimizer steps per iteration/block: " + "; ".join(
                  f"{a['label']} {[round(statistics.fmean(v)) for v in a['optimizer_steps'].values()]}"
                  for a in arms.values()) + ".",
              f"On seed {summary['seeds'][0]}: a SPIN iteration (generate + score + train) took "
              f"{', '.join(f'{s:.1f}' for s in budget['spin_iteration_s'])} s, the equal-steps SFT blocks "
              f"{budget['sft_equal_steps_s']:.1f} s in all ({budget['sft_step_s'] * 1000:.1f} ms per step): relative "
              f"difference {budget['relative_difference']:+.0%} against a threshold of {budget['threshold']:.0%}, so "
              + ("an equal-wall-time SFT arm ran with " + str(budget["equal_time_steps"]) + " steps per block."
                 if budget["equal_time_arm"] else "no equal-wall-time arm was needed."), "",
              "## Metrics at every point", ""]
    lm_keys = sorted({k for a in arms for p in points for k in arms[a]["metrics"][p] if k.startswith(LM_EVAL_PREFIX)})
    metric_keys = [k for k in (*EVAL_KEYS, "train_loss", *lm_keys)
                   if any(k in arms[a]["metrics"][p] for a in arms for p in points)]
    header = ["arm", "point", *[METRIC_LABELS.get(k, k) for k in metric_keys]]
    rows = [[a["label"], p, *[_pm(a["metrics"][p][k]) if k in a["metrics"][p] else "–" for k in metric_keys]]
            for a in arms.values() for p in points]
    lines.append(markdown_table(header, rows))
    lines += ["", "Training loss: the arm's own SPIN loss on the iteration's pairs for SPIN (so the losses' scales "
              "differ: log 2, 1 and 2 log 2 at the start for sigmoid, hinge and space), the NLL per answer token for "
              "SFT (mean of the block's last 20 optimizer steps).", "", "## Wall time and peak memory per phase", ""]
    rows = []
    for a in arms.values():
        for name, ph in a["phases"].items():
            rows.append([a["label"], name, _pm(ph["wall_time_s"], 2), _pm(ph["peak_mem_gib"], 3)])
    kind = next((ph["memory_kind"] for a in arms.values() for ph in a["phases"].values() if ph["memory_kind"]), None)
    mem = {"cpu_rss": "peak RSS (GiB)", "cuda_allocated": "peak CUDA allocated (GiB)"}.get(kind, "peak memory (GiB)")
    lines.append(markdown_table(["arm", "phase", "wall time (s)", mem], rows))
    lines += ["", "Every arm shares the seed's SFT and SFT-eval phases (run once). The SPIN arms of other losses "
              "copy iteration 0's generation and scoring from the seed run (same opponent) and are charged its "
              "recorded time, so each arm's row is what it would cost alone. Setup (loading the base and data) is not "
              "counted: it is the same for every arm and measured again on every resume.", "",
              "![metrics per iteration](comparison_metrics.png)", "", "![timeline](comparison_timeline.png)", ""]
    return "\n".join(lines)


def _diagnostics_markdown(arms: dict[str, Any], spin_arms: list[str]) -> list[str]:
    keys = [k for part in DIAGNOSTIC_KEYS.values() for k in part
            if any(k in d for a in spin_arms for d in arms[a]["diagnostics"].values())]
    if not keys:
        return []
    rows = [[arms[a]["label"], p, *[_pm(d[k], 3) if k in d else "–" for k in keys]]
            for a in spin_arms for p, d in arms[a]["diagnostics"].items()]
    lines = ["", "## Diagnostics per SPIN iteration", "",
             "Iteration t's pairs are sampled by its opponent (the SFT model for iter_0, else the arm's own model "
             "after iteration t−1). \"Near\": token-level edit similarity >= 0.9 to the real answer, special tokens "
             "removed. Δ log p: the player's change in nats per answer, on the iteration's training pairs against "
             "its opponent (mean of the last optimizer steps) and on the held-out anchor pairs against the SFT "
             "model.", "", markdown_table(["arm", "iteration", *[DIAGNOSTIC_LABELS[k] for k in keys]], rows), ""]
    for a in spin_arms:
        for p, d in arms[a]["diagnostics"].items():
            if "real_logp_change" in d and "generated_logp_change" in d:
                lines.append(f"- {arms[a]['label']}, {p}: on its training pairs SPIN "
                             f"{logp_direction(d['real_logp_change']['mean'], d['generated_logp_change']['mean'])}"
                             " (means over seeds).")
    return lines


def _versus_table(arms: dict[str, Any], spin_arm: str, versus: dict[str, list[dict[str, Any]]],
                  last: str) -> str:
    header = ["metric", arms[spin_arm]["label"]]
    for arm in versus:
        header += [arms[arm]["label"], "difference", "better", "beyond spread", "seeds where SPIN is better"]
    rows = []
    keys = [d["metric"] for d in next(iter(versus.values()))]
    for key in keys:
        row = [METRIC_LABELS.get(key, key), _pm(arms[spin_arm]["metrics"][last][key])]
        for diffs in versus.values():
            d = next((d for d in diffs if d["metric"] == key), None)
            if d is None:
                row += ["–"] * 5
                continue
            row += [_pm(d["sft"]), f"{d['difference']:+.4f}", d["better"],
                    "–" if d["exceeds_spread"] is None else "yes" if d["exceeds_spread"] else "no",
                    f"{d['seeds_spin_better']} of {len(d['paired_differences'])}"]
        rows.append(row)
    return markdown_table(header, rows)


# ------------------------------------------------------------------------------------------------------ charts

_ARM_COLOURS = {"spin": "#2ca02c", "sft_equal_steps": "#1f77b4", "sft_equal_time": "#9467bd",
                "spin_sigmoid": "#2ca02c", "spin_hinge": "#d62728", "spin_space": "#ff7f0e"}


def _metrics_png(summary: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    arms, points = summary["arms"], summary["points"]
    keys = [k for k in EVAL_KEYS if k in arms["spin"]["metrics"][points[0]]]
    fig = Figure(figsize=(3.3 * len(keys), 3.6), layout="constrained")
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        for offset, (name, arm) in enumerate(arms.items()):
            stats = [arm["metrics"][p].get(key) for p in points]
            xs = [i + 0.06 * (offset - 1) for i in range(len(points))]  # side by side, so error bars stay legible
            ax.errorbar(xs, [math.nan if s is None else s["mean"] for s in stats],
                        yerr=[0.0 if s is None or s["std"] is None else s["std"] for s in stats],
                        marker="o", capsize=3, color=_ARM_COLOURS.get(name, "#8c564b"), label=arm["label"])
        if key == "spin_loss":
            ax.axhline(LOG2, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(points)), points)
        ax.set_title(METRIC_LABELS[key], fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Mean ± std over {len(summary['seeds'])} seeds (iter_t = after SPIN iteration / SFT block t)",
                 fontsize=10)
    save_png(fig, path)


def _timeline_png(summary: dict[str, Any], path: Path) -> None:
    """The brief's timeline per arm (mean phase wall times, one row per arm) over each phase's peak memory."""
    from matplotlib.figure import Figure

    arms = summary["arms"]
    fig = Figure(figsize=(12, 2.2 + 1.1 * len(arms)), layout="constrained")
    gantt, memax = fig.subplots(2, 1, sharex=True, height_ratios=[len(arms), 2])
    for y, (name, arm) in enumerate(arms.items()):
        start = 0.0
        for phase, ph in arm["phases"].items():
            width = ph["wall_time_s"]["mean"]
            gantt.barh(y, width, left=start, color=ROLE_COLOURS.get(ph["role"], "#8c564b"), edgecolor="black",
                       linewidth=0.5, height=0.6)
            if width > 0.04 * _total_time(arms):
                gantt.text(start + width / 2, y, phase, ha="center", va="center", fontsize=7, rotation=90
                           if width < 0.08 * _total_time(arms) else 0)
            peak = ph["peak_mem_gib"]["mean"]
            if peak is not None:
                memax.hlines(peak, start, start + width, color=_ARM_COLOURS.get(name, "#8c564b"), linewidth=2,
                             label=arm["label"] if start == 0.0 else None)
            start += width
    gantt.set_yticks(range(len(arms)), [a["label"] for a in arms.values()])
    gantt.invert_yaxis()
    gantt.set_title("Timeline per arm (mean wall time over seeds): SFT | SFT eval | iter0 generate | iter0 "
                    "| iter0 eval | ...", fontsize=10)
    memax.set_xlabel("wall time (s)")
    memax.set_ylabel("peak memory (GiB)")
    memax.legend(fontsize=7)
    for ax in (gantt, memax):
        ax.grid(axis="x", alpha=0.3)
    save_png(fig, path)


def _total_time(arms: dict[str, Any]) -> float:
    return max(sum(ph["wall_time_s"]["mean"] for ph in a["phases"].values()) for a in arms.values()) or 1.0


def render_comparison(compare_dir: Path, recipe: Recipe, command: str | None = None) -> dict[str, Any]:
    """Write comparison.json, comparison.md, comparison_metrics.png and comparison_timeline.png; return the JSON."""
    summary = summarize(compare_dir, recipe)
    command = command or "python -m frugal_spin compare RECIPE (see recipe.yaml in each seed directory)"
    summary["command"] = command
    _metrics_png(summary, compare_dir / "comparison_metrics.png")
    _timeline_png(summary, compare_dir / "comparison_timeline.png")
    write_text(compare_dir / "comparison.md", _markdown(summary, command))
    write_json(compare_dir / "comparison.json", summary)  # last: its presence means the whole set was written
    return summary
