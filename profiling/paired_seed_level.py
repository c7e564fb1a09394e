"""Paired, seed-level re-analysis of a finished `compare`: results/<name>/paired.md and paired.json.

    python profiling/paired_seed_level.py results/compare_smollm2_small results/compare_cpu_tiny

Input: `<dir>/comparison.json` as `compare` wrote it before issue 23: per arm, point and metric, one value per seed
(`values`, in the order of `seeds`). Per-prompt values were never recorded, so the two-stage bootstrap of
`frugal_spin.paired_stats` (seeds, then prompts) cannot be applied; what can be computed is the paired difference
per seed, d_s = (arm A at its point) - (arm B or the SFT stage), and statistics over those S numbers:
- mean and sample standard deviation of d_s;
- a 95% t interval, mean -/+ t_{0.975, S-1} sd / sqrt(S) (assumes d_s normal: not checkable with 3 values);
- a bootstrap over seeds (`paired_comparison` with one value per seed: 10,000 resamples, bootstrap seed 0); with
  3 seeds the chance that all 3 draws are the same seed is 1/27 > 2.5%, so this interval is [min d_s, max d_s];
- the signs per seed and a two-sided exact sign test (3 of 3 agreeing: p = 0.25).
Every d_s is recomputed from `values` and checked against the `paired_differences` comparison.json recorded.

Output: paired.json (every number) and paired.md (tables and what they can and cannot claim), written atomically.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: import the package from this checkout
    sys.path.insert(0, str(REPO))

from frugal_spin.errors import UserError  # noqa: E402
from frugal_spin.io import write_json, write_text  # noqa: E402
from frugal_spin.paired_stats import (DEFAULT_RESAMPLES, paired_comparison, sign_test_p, t_interval,  # noqa: E402
                                      verdict_from_interval)

CONFIDENCE = 0.95
METRICS = {  # key: (label, lower is better)
    "heldout_nll": ("held-out NLL of real answers (nats/token)", True),
    "spin_loss": ("SPIN loss on held-out anchor pairs", True),
    "reward_margin": ("reward margin on anchor pairs", False),
    "reward_accuracy": ("reward accuracy on anchor pairs", False),
    "exact_match": ("exact match (greedy)", False),
}
HYPOTHESIS_METRICS = ("heldout_nll", "spin_loss")  # "the loss ... is lower than at the SFT stage"
SFT_POINT = "sft"


def _load(directory: Path) -> dict:
    path = directory / "comparison.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found (run `compare` first, or name a results directory)") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not JSON ({exc.msg}, line {exc.lineno})") from None


def _shown(path: Path) -> str:
    """A path inside this checkout relative to it (the committed files do not name the machine they were made on)."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _values(comparison: dict, arm: str, point: str, metric: str, where: str) -> list[float]:
    try:
        values = comparison["arms"][arm]["metrics"][point][metric]["values"]
    except (KeyError, TypeError):
        raise UserError(f"{where}: no values for arm {arm}, point {point}, metric {metric}") from None
    if len(values) != len(comparison["seeds"]):
        raise UserError(f"{where}: arm {arm}, point {point}, metric {metric} has {len(values)} values for "
                        f"{len(comparison['seeds'])} seeds")
    return [math.nan if v is None else float(v) for v in values]


def seed_level(a: list[float], b: list[float], seeds: list, lower_is_better: bool) -> dict:
    """Statistics over the per-seed paired differences d_s = a_s - b_s (NaN seeds left out)."""
    d = [x - y for x, y in zip(a, b)]
    kept = [(s, v) for s, v in zip(seeds, d) if not math.isnan(v)]
    values = [v for _, v in kept]
    mean, low, high = t_interval(values, CONFIDENCE)
    boot = paired_comparison({s: [v] for s, v in kept}, {s: [0.0] for s, _ in kept}, confidence=CONFIDENCE,
                             resamples=DEFAULT_RESAMPLES, bootstrap_seed=0) if kept else None
    lower, higher = sum(v < 0 for v in values), sum(v > 0 for v in values)
    sd = statistics.stdev(values) if len(values) > 1 else math.nan
    t_verdict = verdict_from_interval(low, high)
    return {
        "per_seed": {str(s): v for s, v in zip(seeds, d)},
        "seeds_used": len(values), "mean": mean, "sd": sd,
        "t_interval": [low, high], "t_verdict": t_verdict,
        "bootstrap_over_seeds": [boot.low, boot.high] if boot else [math.nan, math.nan],
        "bootstrap_verdict": boot.verdict if boot else verdict_from_interval(math.nan, math.nan),
        "seeds_lower": lower, "seeds_higher": higher, "sign_test_p": sign_test_p(lower, higher),
        "better": _better(t_verdict, lower_is_better),
    }


def _better(verdict: str, lower_is_better: bool) -> str:
    if verdict == "not established":
        return "not established"
    return "first" if (verdict == "lower") == lower_is_better else "second"


def _recorded_differences(comparison: dict) -> dict[tuple, list[float]]:
    """The paired differences compare recorded: (arm, against, metric) -> per seed, at the last point."""
    out = {}
    for h in comparison.get("hypothesis", []):
        out[(h["arm"], SFT_POINT, h["loss"])] = h["paired_differences"]
    for control, rows in comparison.get("spin_vs_sft", {}).items():  # the "spin" arm, in every version
        for row in rows:
            out[("spin", control, row["metric"])] = row["paired_differences"]
    for arm, controls in comparison.get("spin_arms_vs_sft", {}).items():
        for control, rows in controls.items():
            for row in rows:
                out[(arm, control, row["metric"])] = row["paired_differences"]
    return out


def analyse(directory: Path) -> dict:
    """Every seed-level comparison of one comparison.json: each arm at each point against the SFT stage
    (the hypothesis metrics), and each SPIN arm against each continued-SFT arm at the same point (every metric)."""
    comparison = _load(directory)
    where = _shown(directory / "comparison.json")
    seeds, points = comparison["seeds"], comparison["points"]
    arms = comparison["arms"]
    # By name, as compare names them: older files (before compare.spin_losses) carry no "loss" key per arm.
    spin_arms = [a for a in arms if a == "spin" or a.startswith("spin_")]
    sft_arms = [a for a in arms if a.startswith("sft_")]
    later = [p for p in points if p != SFT_POINT]
    recorded = _recorded_differences(comparison)
    rows = []

    def add(kind, arm, against, point, metric):
        label, lower_is_better = METRICS[metric]
        first = _values(comparison, arm, point, metric, where)
        second = _values(comparison, arm if against == SFT_POINT else against,
                         SFT_POINT if against == SFT_POINT else point, metric, where)
        row = {"kind": kind, "arm": arm, "arm_label": arms[arm]["label"], "against": against,
               "against_label": "SFT stage" if against == SFT_POINT else arms[against]["label"], "point": point,
               "metric": metric, "metric_label": label, "lower_is_better": lower_is_better,
               **seed_level(first, second, seeds, lower_is_better)}
        if point == later[-1] and (arm, against, metric) in recorded:
            mine = list(row["per_seed"].values())
            row["matches_recorded"] = all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)
                                          for x, y in zip(mine, recorded[(arm, against, metric)]))
        rows.append(row)

    for arm in spin_arms + sft_arms:
        for point in later:
            for metric in HYPOTHESIS_METRICS:
                add("against the SFT stage", arm, SFT_POINT, point, metric)
    for arm in spin_arms:
        for control in sft_arms:
            for point in later:
                for metric in METRICS:
                    if metric in arms[arm]["metrics"][point] and metric in arms[control]["metrics"][point]:
                        add("SPIN against continued SFT", arm, control, point, metric)
    if any(r.get("matches_recorded") is False for r in rows):
        bad = next(r for r in rows if r.get("matches_recorded") is False)
        raise UserError(f"{where}: recomputed paired differences of {bad['arm']} vs {bad['against']} "
                        f"({bad['metric']}) differ from the recorded ones")
    return {"source": where, "seeds": seeds, "points": points, "command": comparison.get("command"),
            "confidence": CONFIDENCE, "bootstrap_resamples": DEFAULT_RESAMPLES, "bootstrap_seed": 0,
            "level": "seed (one number per seed and model; no per-prompt values were recorded)",
            "comparisons": rows}


def _num(x: float, digits: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.{digits}f}"


def _interval(pair) -> str:
    return f"[{_num(pair[0])}, {_num(pair[1])}]"


def _table(rows: list[dict]) -> list[str]:
    lines = ["| first | second | point | metric | d per seed | mean ± sd | 95% t interval | t verdict | "
             "bootstrap over seeds | seeds lower / higher | sign test p | better |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per_seed = ", ".join(_num(v) for v in r["per_seed"].values())
        better = {"first": r["arm_label"], "second": r["against_label"]}.get(r["better"], r["better"])
        lines.append(f"| {r['arm_label']} | {r['against_label']} | {r['point']} | {r['metric_label']} | "
                     f"{per_seed} | {_num(r['mean'])} ± {r['sd']:.4f} | {_interval(r['t_interval'])} | "
                     f"{r['t_verdict']} | {_interval(r['bootstrap_over_seeds'])} | "
                     f"{r['seeds_lower']} / {r['seeds_higher']} | {r['sign_test_p']:.3f} | {better} |")
    return lines


def render(analysis: dict, name: str) -> str:
    rows = analysis["comparisons"]
    seeds = analysis["seeds"]
    n = len(seeds)
    h1 = [r for r in rows if r["kind"] == "against the SFT stage" and r["arm"] == "spin"
          and r["metric"] == "heldout_nll" and r["point"] == analysis["points"][-1]]
    lines = [
        f"# Paired, seed-level re-analysis of {name}",
        "",
        f"Source: `{analysis['source']}` (from `{analysis['command']}`), {n} seeds ({', '.join(map(str, seeds))}). "
        "Rendered by `python profiling/paired_seed_level.py` from that file alone; every number is in "
        "`paired.json`.",
        "",
        "## What was recorded, and what this can compute",
        "",
        "comparison.json holds one number per seed, arm, point and metric (held-out NLL is the corpus-level "
        "NLL per token of the seed's held-out answers). No per-prompt value was recorded, and the run "
        "directories are not in the repository, so the two-stage bootstrap over seeds and prompts "
        "(`frugal_spin/paired_stats.py`) cannot be applied here. What is computed is **seed level only**: per seed "
        "the paired difference d_s = first − second (both models of a seed share its data sample, held-out prompts "
        "and SFT adapter), then over the seeds: mean ± sample sd, a 95% t interval (t with S − 1 degrees of "
        "freedom; assumes normal d_s), a bootstrap over seeds (10,000 resamples, seed 0), the sign per seed and a "
        "two-sided exact sign test. The verdict is read from the t interval: \"lower\"/\"higher\" when it "
        "excludes 0, else \"not established\"; \"better\" is that verdict with the metric's direction. The "
        "bootstrap over seeds is shown but gives no verdict: with 3 seeds or fewer it is the range of d_s (all S "
        "draws are the lowest seed with probability S^-S >= 2.5%), narrower than "
        "any honest 95% interval (paired.json keeps what it would read). Each d_s is recomputed from "
        "the recorded values; where comparison.json also recorded `paired_differences` (at the last point) they "
        "match.",
        "",
    ]
    if h1:
        r = h1[0]
        lines += [
            "## Held-out NLL after SPIN against the SFT stage, read paired",
            "",
            f"Held-out NLL, {r['arm_label']} at {r['point']} minus the SFT stage, per seed: "
            f"{', '.join(_num(v) for v in r['per_seed'].values())} nats/token; mean {_num(r['mean'])}, sample sd "
            f"{r['sd']:.4f}; lower in {r['seeds_lower']} and higher in {r['seeds_higher']} of {r['seeds_used']} seeds. "
            f"The 95% t interval is "
            f"{_interval(r['t_interval'])} ({r['t_verdict']}); the bootstrap over seeds gives "
            f"{_interval(r['bootstrap_over_seeds'])}{' (their range)' if n <= 3 else ''}; the sign test gives "
            f"p = {r['sign_test_p']:.3f}. comparison.md's verdict compares the mean paired difference with the "
            "spread of the *unpaired* values over seeds (the larger sample sd of the two models), which includes "
            "how much the seeds differ from each other at the SFT stage already"
            + (f"; read paired, all {r['seeds_used']} seeds agree in sign." if r["seeds_used"] > 1 and
               max(r["seeds_lower"], r["seeds_higher"]) == r["seeds_used"] else "."),
            "",
        ]
    lines += [
        "## What these numbers can and cannot claim",
        "",
        f"- They describe {n} reruns of one recipe. The held-out prompts are drawn anew with each seed, so the "
        "spread of d_s already holds prompt sampling as well as training randomness: the t interval is an "
        "interval for a rerun of this recipe, not for these particular prompts. Prompt and training variance "
        "cannot be told apart, and nothing can be said per prompt.",
        f"- With {n} seeds the t interval rests on an assumption (normal d_s) that {n} values cannot check; "
        f"the bootstrap over {n} seeds can only span the values it saw{' (here exactly [min, max])' if n <= 3 else ''}; "
        f"the distribution-free sign test cannot go below p = {sign_test_p(n, 0):.3f} with {n} seeds. An "
        "interval that excludes 0 here is consistent evidence across seeds, not a significant result "
        "by a test that assumes nothing.",
        "- \"Against the SFT stage\" compares a model trained further with its starting point: any further training "
        "on the same data can lower these losses (the continued-SFT rows show how much it does). Whether SPIN helps "
        f"is the SPIN-against-continued-SFT comparison. The continued-SFT arms ran at {_sft_arm_rate(analysis)}; "
        "the equal-steps arm is issue 23's control C2 (does SPIN's negative term help?) only where that equals "
        "spin.learning_rate. The SFT stage ran a fixed number of epochs with no convergence check (issue 23, "
        "items 1-2).",
        "- The SPIN loss on the anchor pairs is log 2 at the SFT stage by construction, and every arm is scored "
        "with the sigmoid loss and the SFT model as opponent, whatever loss it trained with.",
        "",
    ]
    for kind in ("against the SFT stage", "SPIN against continued SFT"):
        part = [r for r in rows if r["kind"] == kind]
        if part:
            title = ("Each arm against the SFT stage (the brief's hypothesis: the loss is lower than at the SFT stage)"
                     if kind == "against the SFT stage" else
                     "Each SPIN arm against each continued-SFT arm at the same point")
            lines += [f"## {title}", "", *_table(part), ""]
    return "\n".join(lines)


def _sft_arm_rate(analysis: dict) -> str:
    """The continued-SFT arms' learning rate as the command set it (an override), else the shipped recipes' rule."""
    match = re.search(r"compare\.sft_arm_learning_rate=(\S+)", analysis.get("command") or "")
    if match:
        return f"compare.sft_arm_learning_rate={match.group(1)} (set in the command)"
    return "sft.learning_rate (the shipped recipes set compare.sft_arm_learning_rate: 0, which means that)"


def _jsonable(obj):
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    return obj


def write(directory: Path) -> tuple[Path, Path]:
    directory = Path(directory)
    analysis = analyse(directory)
    md_path, json_path = directory / "paired.md", directory / "paired.json"
    write_json(json_path, _jsonable(analysis))
    write_text(md_path, render(analysis, directory.name))
    return md_path, json_path


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python profiling/paired_seed_level.py RESULTS_DIR [RESULTS_DIR ...]", file=sys.stderr)
        return 2
    try:
        for directory in argv:
            for path in write(Path(directory)):
                print(f"wrote {path}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
