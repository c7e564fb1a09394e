"""Run report: per-stage cost, metrics after each evaluation, and the research brief's timeline, as files.

`render_report(run_dir)` reads a run directory and writes, each atomically (temp file in the same directory, then
rename), into that directory:

- `report.json` - the numbers (returned as the same dict): `stages` (wall time, tokens, tokens/s, peak memory per
  stage), `evaluations` (held-out NLL, SPIN loss, reward margin/accuracy, exact match after SFT and every SPIN
  iteration), `training` (per training stage: steps, final loss, the SPIN reward figures), `phases` (the timeline),
  `totals`, `device`, `data` (the setup counts), `complete` (whether the recipe's last evaluation is
  there; None without a readable recipe) and `curves` (the per-step training losses the chart draws);
- `report.md` - the same for a reader, with the two charts linked relatively so the directory can be moved;
- `timeline.png` - the brief's "SFT | iter0 generate | iter0 | iter1 generate | ..." as a Gantt chart (one row per
  phase, wall time on x) beside a panel of each phase's peak memory;
- `metrics.png` - the evaluation metrics across SFT, iter0, iter1, ... and the training loss curves (SFT, then each
  SPIN iteration, concatenated along optimizer steps with a line at every stage boundary).

Inputs: `metrics.jsonl` (one object per finished stage, in pipeline order: `stage`, `kind`, `iteration`,
`metrics`, `wall_time_s`; records written before `iteration` existed get both from their name, plan.py) and, when present, `recipe.yaml` (only `spin.iterations` is read, to tell a finished run from a
partial one). Missing later stages are fine: the report covers what is there, so it can be rendered while a run is
going on or after it stopped. A missing directory or `metrics.jsonl`, or a line that is not a stage record, is a
`UserError` naming the file and line.

Phases. The brief's timeline has `SFT`, `iter<t> generate` (the opponent generating *and* being scored: both only
prepare the opponent's data for iteration t) and `iter<t>` (SPIN training). Setup and evaluation are drawn as
their own phases (`setup`, `SFT eval` = the anchor answers plus `sft.eval`, `iter<t> eval`) instead of being
folded into a neighbour: folding would charge evaluation time to training and so distort the brief's comparison
of SPIN and SFT training time, while dropping them would make the timeline disagree with the total. Every stage
lands in exactly one phase, so the phases sum to the total wall time. A phase follows from a record's `kind` and
`iteration` (`_phase_of`), never from its name; a kind this module does not know becomes a phase of its own, named
after the stage.

Assumptions: stages ran one after another, so a phase starts where the previous one ended. The wall times are the
ones recorded when each stage ran; a resumed run keeps the times of the stages it skipped, so the timeline is the
work a run cost, not the calendar time between its first and last stage. Memory is the stage's peak as the
profiler recorded it: `peak_mem_gib` is CUDA allocated memory (`peak_reserved_gib` also reported), `peak_rss_gib`
the process's resident set on the CPU; the report carries the figure as `peak_mem_gib` with `memory_kind` saying
which one it is, and a phase's peak is the maximum over its stages.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from frugal_spin.errors import UserError
from frugal_spin.io import write_json, write_text
from frugal_spin.plan import OPPONENT_KINDS, TRAIN_KINDS, with_kind_and_iteration
from frugal_spin.render import ROLE_COLOURS, markdown_table, save_png

EVAL_KEYS = ("heldout_nll", "spin_loss", "reward_margin", "reward_accuracy", "exact_match")
TRAIN_KEYS = ("optimizer_steps", "train_loss", "train_reward_margin", "train_reward_accuracy")
# Keys that are per-stage cost (reported in their own columns) or bulky lists: not repeated under "metrics".
_COST_KEYS = {"tokens", "tokens_per_s", "peak_mem_gib", "peak_reserved_gib", "peak_rss_gib"}
LOG2 = math.log(2.0)

# Diagnostics per SPIN iteration: where SPIN's margin comes from (the player's log-prob change on real and on
# generated answers) and what the opponent's answers look like (diagnostics.py), by the kind of stage that records
# them.
DIAGNOSTIC_KEYS = {"generate": ("identical_share", "near_share", "mean_answer_tokens", "end_token_rate"),
                   "spin": ("real_logp_change", "generated_logp_change"),
                   "eval": ("anchor_real_logp_change", "anchor_generated_logp_change")}
DIAGNOSTIC_LABELS = {
    "identical_share": "opponent answers = real", "near_share": "opponent answers near real (sim >= 0.9)",
    "mean_answer_tokens": "opponent answer tokens (mean)", "end_token_rate": "opponent answers that end",
    "real_logp_change": "Δ log p real vs opponent (train pairs)",
    "generated_logp_change": "Δ log p generated vs opponent (train pairs)",
    "anchor_real_logp_change": "Δ log p real vs SFT (held-out anchors)",
    "anchor_generated_logp_change": "Δ log p SFT sample vs SFT (held-out anchors)"}

# ----------------------------------------------------------------------------------------------------- reading

def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The stage records of `run_dir/metrics.jsonl`, checked line by line (`_check_record`): a line that is not
    UTF-8, not JSON, nested too deeply or not a stage record is one `UserError` naming the file and line."""
    from frugal_spin.config import check_path_text

    check_path_text("run directory", str(run_dir))
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a run directory (give the recipe's output_dir)")
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} does not exist: no stage of this run has finished yet")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    records = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path}:{lineno}: not UTF-8 text (byte 0x{line[e.start]:02x} at column "
                            f"{e.start + 1})") from None
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        except ValueError:  # an integer of more than 4,300 digits (Python's int parsing limit)
            raise UserError(f"{path}:{lineno}: not a stage record (a number too long to read)") from None
        except RecursionError:
            raise UserError(f"{path}:{lineno}: nested too deeply to be a stage record") from None
        records.append(with_kind_and_iteration(_check_record(record, path, lineno)))
    if not records:
        raise UserError(f"{path} holds no stage records")
    return records


# Metrics the report computes with or draws: a number (or null) each. Memory peaks and wall times must also be
# finite (they are summed, compared and set chart limits); a NaN loss or rate is a result and is shown as such.
_NUMERIC_KEYS = set(EVAL_KEYS) | set(TRAIN_KEYS) | {k for keys in DIAGNOSTIC_KEYS.values() for k in keys} | \
    {"tokens", "tokens_per_s"}
_FINITE_KEYS = {"peak_mem_gib", "peak_reserved_gib", "peak_rss_gib"}


def _number(value: Any, finite: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value)) or not finite  # float() of a 400-digit int overflows
    except OverflowError:
        return False


def _check_record(record: Any, path: Path, lineno: int) -> dict[str, Any]:
    where = f"{path}:{lineno}"
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key, types in (("stage", str), ("kind", str), ("metrics", dict), ("wall_time_s", (int, float))):
        if key not in record:
            raise UserError(f"{where}: stage record has no {key!r}")
        # bool is an int subclass; a true/false wall time is a broken record, not a duration.
        if not isinstance(record[key], types) or isinstance(record[key], bool):
            raise UserError(f"{where}: {key!r} has the wrong type ({type(record[key]).__name__})")
    if not _number(record["wall_time_s"], finite=True) or record["wall_time_s"] < 0:
        raise UserError(f"{where}: wall_time_s must be a finite number >= 0, got {str(record['wall_time_s'])[:40]}")
    iteration = record.get("iteration")
    if iteration is not None and (not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0):
        raise UserError(f"{where}: 'iteration' must be null or a count >= 0, got {str(iteration)[:40]}")
    for key, value in record["metrics"].items():
        if value is None:
            continue
        if key in _FINITE_KEYS and not _number(value, finite=True):
            raise UserError(f"{where}: metrics.{key} must be a finite number, got {str(value)[:40]} "
                            f"({type(value).__name__})")
        if key in _NUMERIC_KEYS and not _number(value, finite=False):
            raise UserError(f"{where}: metrics.{key} must be a number, got {str(value)[:40]} "
                            f"({type(value).__name__})")
        if key in ("loss_curve", "margin_curve") and not isinstance(value, list):
            raise UserError(f"{where}: metrics.{key} must be a list, got {type(value).__name__}")
    samples = record["metrics"].get("samples")
    if samples is not None and not (isinstance(samples, list) and all(
            isinstance(s, dict) and {"prompt", "real", "greedy"} <= s.keys() for s in samples)):
        raise UserError(f"{where}: metrics.samples must be a list of {{prompt, real, greedy}} objects")
    return record


def _recipe_iterations(run_dir: Path) -> int | None:
    """`spin.iterations` of the resolved recipe, or None when it cannot be read (the report does not need it)."""
    path = run_dir / "recipe.yaml"
    if not path.is_file():
        return None
    import yaml

    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
        iterations = recipe["spin"]["iterations"]
    except (OSError, ValueError, RecursionError, yaml.YAMLError, KeyError, TypeError):  # ValueError: not UTF-8
        return None
    return iterations if isinstance(iterations, int) and not isinstance(iterations, bool) else None


# ---------------------------------------------------------------------------------------------------- building

def _memory(metrics: dict[str, Any]) -> tuple[float | None, str | None]:
    if "peak_mem_gib" in metrics:
        return metrics["peak_mem_gib"], "cuda_allocated"
    if "peak_rss_gib" in metrics:
        return metrics["peak_rss_gib"], "cpu_rss"
    return None, None


def _scalars(metrics: dict[str, Any], skip: set[str]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items()
            if k not in skip and (v is None or isinstance(v, (int, float, str, bool)))}


def _block_iterations(records: list[dict[str, Any]]) -> set[int]:
    """The iterations at which these records train continued-SFT blocks (a `compare` SFT arm) rather than SPIN: their
    evaluations are the blocks' ("block<t> eval")."""
    return {r["iteration"] for r in records if r["kind"] == "sft" and r["iteration"] is not None}


def _phase_of(record: dict[str, Any], blocks: set[int]) -> tuple[str, str]:
    """(phase label, role) of a stage record, from its kind and iteration."""
    kind, t = record["kind"], record["iteration"]
    if kind == "setup":
        return "setup", "setup"
    if kind == "sft":
        return ("SFT", "sft") if t is None else (f"SFT block{t}", "sft")
    if kind == "anchor" or (kind == "eval" and t is None):  # the anchor answers prepare every evaluation
        return "SFT eval", "eval"
    if kind in OPPONENT_KINDS and t is not None:  # generating and scoring both prepare the opponent's data
        return f"iter{t} generate", "generate"
    if kind == "spin" and t is not None:
        return f"iter{t}", "spin"
    if kind == "eval":
        return f"{_point_label(t, blocks)} eval", "eval"
    return record["stage"], "other"


def _point_label(t: int | None, blocks: set[int]) -> str:
    """What an evaluation at iteration t follows: SFT, SPIN iteration t, or continued-SFT block t."""
    return "SFT" if t is None else f"block{t}" if t in blocks else f"iter{t}"


def _phases(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Only consecutive stages merge: a label that came back later would otherwise get one start for two spans.
    phases: list[dict[str, Any]] = []
    start = 0.0
    blocks = _block_iterations(stages)
    for s in stages:
        label, role = _phase_of(s, blocks)
        if not phases or phases[-1]["phase"] != label:
            phases.append({"phase": label, "role": role, "stages": [], "start_s": start, "wall_time_s": 0.0,
                           "peak_mem_gib": None, "memory_kind": None})
        p = phases[-1]
        p["stages"].append(s["stage"])
        p["wall_time_s"] += s["wall_time_s"]
        start += s["wall_time_s"]
        if s["peak_mem_gib"] is not None and (p["peak_mem_gib"] is None or s["peak_mem_gib"] > p["peak_mem_gib"]):
            p["peak_mem_gib"], p["memory_kind"] = s["peak_mem_gib"], s["memory_kind"]
    return phases


def build_report(records: list[dict[str, Any]], expected_iterations: int | None = None) -> dict[str, Any]:
    """The report dict from checked stage records (no files touched)."""
    stages, evaluations, training, curves = [], [], [], []
    records = [with_kind_and_iteration(r) for r in records]
    blocks = _block_iterations(records)
    for r in records:
        m = r["metrics"]
        mem, kind = _memory(m)
        row = {"stage": r["stage"], "kind": r["kind"], "iteration": r["iteration"], "wall_time_s": r["wall_time_s"],
               "tokens": m.get("tokens"),
               "tokens_per_s": m.get("tokens_per_s"), "peak_mem_gib": mem, "memory_kind": kind}
        if "peak_reserved_gib" in m:
            row["peak_reserved_gib"] = m["peak_reserved_gib"]
        row["metrics"] = _scalars(m, _COST_KEYS)
        stages.append(row)
        if r["kind"] == "eval":
            evaluations.append({"stage": r["stage"], "label": _point_label(r["iteration"], blocks),
                                **{k: m.get(k) for k in EVAL_KEYS}, "samples": list(m.get("samples") or [])})
        if r["kind"] in TRAIN_KINDS:
            training.append({"stage": r["stage"], **{k: m.get(k) for k in TRAIN_KEYS}})
            curves.append({"stage": r["stage"], "kind": r["kind"], "iteration": r["iteration"],
                           "loss_curve": list(m.get("loss_curve") or []),
                           "margin_curve": list(m.get("margin_curve") or [])})

    setup = next((r["metrics"] for r in records if r["kind"] == "setup"), {})
    data = {k: v for k, v in setup.items()
            if k in ("train_examples", "heldout_examples") or k.startswith(("skipped_", "truncated_"))}
    mems = [s for s in stages if s["peak_mem_gib"] is not None]
    peak = max(mems, key=lambda s: s["peak_mem_gib"], default=None)
    phases = _phases(stages)
    by_role: dict[str, float] = {}
    for p in phases:
        by_role[p["role"]] = by_role.get(p["role"], 0.0) + p["wall_time_s"]

    last_eval = None if expected_iterations == 0 else (expected_iterations or 0) - 1  # its iteration
    return {
        "stages": stages,
        "evaluations": evaluations,
        "training": training,
        "phases": phases,
        "totals": {"wall_time_s": sum(s["wall_time_s"] for s in stages),
                   "peak_mem_gib": peak["peak_mem_gib"] if peak else None,
                   "memory_kind": peak["memory_kind"] if peak else None,
                   "peak_stage": peak["stage"] if peak else None,
                   "wall_time_by_role_s": by_role},
        "device": setup.get("device"),
        "compute_dtype": setup.get("compute_dtype"),
        "data": data,
        "spin_iterations_planned": expected_iterations,
        "complete": None if expected_iterations is None else any(r["kind"] == "eval" and r["iteration"] == last_eval
                                                                  for r in records),
        "last_stage": stages[-1]["stage"],
        # Curves are for the chart; kept in the JSON so the figure can be redrawn from report.json alone.
        "curves": curves,
        "diagnostics": iteration_diagnostics(records),
        "anchor_diagnostics": {k: v for k, v in next((r["metrics"] for r in records if r["kind"] == "anchor"),
                                                     {}).items() if k in DIAGNOSTIC_KEYS["generate"]},
    }


def iteration_diagnostics(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per SPIN iteration t found in `records`: the diagnostics of its pairs (sampled by its opponent, the
    `generate` stage of iteration t), the player's log-prob change on them against that opponent (its `spin` stage:
    nats per answer over the last optimizer steps) and on the held-out anchor pairs against the SFT model (its
    `eval`). A key a stage did not record (a run made before it existed, a stage not finished) is None."""
    records = [with_kind_and_iteration(r) for r in records]
    if _block_iterations(records):
        return []  # a continued-SFT arm: no opponent, no SPIN
    by_kind = {(r["kind"], r["iteration"]): r["metrics"] for r in records}
    rows = []
    t = 0
    while any((kind, t) in by_kind for kind in DIAGNOSTIC_KEYS):
        row: dict[str, Any] = {"iteration": t}
        for kind, keys in DIAGNOSTIC_KEYS.items():
            metrics = by_kind.get((kind, t), {})
            row.update({k: metrics.get(k) for k in keys})
        rows.append(row)
        t += 1
    return rows


def logp_direction(real: float | None, generated: float | None) -> str:
    """In words: what the player did to the log-probs of the real and of the generated answers."""
    if real is None or generated is None or not (math.isfinite(real) and math.isfinite(generated)):
        return "not recorded"
    verb = lambda x: "raised" if x > 0 else "lowered" if x < 0 else "left"  # noqa: E731
    words = f"{verb(real)} real answers ({real:+.3g} nats), {verb(generated)} generated ones ({generated:+.3g})"
    if real < 0 and generated < 0:
        words += ": both log-probs decrease, the margin comes from pushing generated answers down faster"
    elif real > 0 and generated < 0:
        words += ": the margin comes from both sides"
    return words


# ---------------------------------------------------------------------------------------------------- markdown

def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool) or isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        # digits=0: a rate, shown as a whole number; otherwise `digits` significant figures below 1000.
        return f"{v:,.0f}" if digits == 0 or abs(v) >= 1000 else f"{v:,.{digits}g}"
    return str(v)


_MEMORY_WORDS = {"cuda_allocated": "peak CUDA memory allocated (max_memory_allocated)",
                 "cpu_rss": "peak resident set size of the process (CPU)"}


def _markdown(report: dict[str, Any], run_dir: Path) -> str:
    t = report["totals"]
    out = [f"# Run report: `{run_dir.name}`", ""]
    device = report["device"] or "unknown"
    dtype = f", compute dtype {report['compute_dtype']}" if report["compute_dtype"] else ""
    out.append(f"Device: **{device}**{dtype}. Total wall time **{t['wall_time_s']:.1f} s** over "
               f"{len(report['stages'])} stages; peak memory **{_num(t['peak_mem_gib'])} GiB** "
               f"(in `{t['peak_stage']}`).")
    if t["memory_kind"]:
        out.append(f"Memory figures are the {_MEMORY_WORDS[t['memory_kind']]}.")
    if report["complete"] is False:
        out += ["", f"**Partial run:** the recipe plans {report['spin_iterations_planned']} SPIN iteration(s); "
                    f"the last finished stage is `{report['last_stage']}`."]

    if report["data"]:
        out += ["", "## Data", "", markdown_table(["count", "value"], [[k, _num(v)] for k, v in report["data"].items()])]

    out += ["", "## Timeline", "",
            "The brief's phases (setup and evaluations are their own phases, so the phases add up to the total):", "",
            "`" + " | ".join(f"{p['phase']} {p['wall_time_s']:.1f}s" for p in report["phases"]) + "`", "",
            "The brief's own phases only: `" + " | ".join(
                f"{p['phase']} {p['wall_time_s']:.1f}s" for p in report["phases"]
                if p["role"] in ("sft", "generate", "spin")) + "`", "",
            "![timeline](timeline.png)", "",
            markdown_table(["phase", "stages", "start s", "wall s", "share", "peak GiB"],
                   [[p["phase"], ", ".join(p["stages"]), f"{p['start_s']:.1f}", f"{p['wall_time_s']:.2f}",
                     f"{100 * p['wall_time_s'] / t['wall_time_s']:.0f}%" if t["wall_time_s"] else "–",
                     _num(p["peak_mem_gib"])] for p in report["phases"]])]
    roles = t["wall_time_by_role_s"]
    out += ["", "Wall time by role: " + ", ".join(f"{k} {v:.1f} s" for k, v in roles.items()) + "."]

    cuda = any("peak_reserved_gib" in s for s in report["stages"])
    header = ["stage", "kind", "wall s", "tokens", "tokens/s", "peak GiB"] + (["reserved GiB"] if cuda else [])
    rows = [[s["stage"], s["kind"], f"{s['wall_time_s']:.2f}", _num(s["tokens"]),
             _num(s["tokens_per_s"], digits=0), _num(s["peak_mem_gib"])]
            + ([_num(s.get("peak_reserved_gib"))] if cuda else []) for s in report["stages"]]
    out += ["", "## Cost per stage", "", markdown_table(header, rows)]

    out += ["", "## Metrics after each evaluation", ""]
    if report["evaluations"]:
        has_em = any(e["exact_match"] is not None for e in report["evaluations"])
        header = ["after", "held-out NLL", "SPIN loss", "reward margin", "reward accuracy"]
        header += ["exact match"] if has_em else []
        rows = [[e["label"], _num(e["heldout_nll"]), _num(e["spin_loss"]), _num(e["reward_margin"]),
                 _num(e["reward_accuracy"])] + ([_num(e["exact_match"])] if has_em else [])
                for e in report["evaluations"]]
        out += [markdown_table(header, rows), "",
                f"SPIN metrics use the SFT model as the fixed opponent on held-out anchor pairs, so after SFT they are "
                f"log 2 = {LOG2:.4f}, 0 and 0 by construction; a lower SPIN loss later means the model moved towards "
                f"the real answers and away from SFT-style ones."]
    else:
        out.append("No evaluation has finished yet.")

    out += _samples_markdown(report["evaluations"])
    if report["training"]:
        out += ["", "## Training", "",
                markdown_table(["stage", "optimizer steps", "train loss", "reward margin", "reward accuracy"],
                       [[r["stage"], _num(r["optimizer_steps"]), _num(r["train_loss"]),
                         _num(r["train_reward_margin"]), _num(r["train_reward_accuracy"])]
                        for r in report["training"]])]
    out += _diagnostics_markdown(report)
    out += ["", "![metrics](metrics.png)", ""]
    return "\n".join(out)


def _samples_markdown(evaluations: list[dict[str, Any]]) -> list[str]:
    """Per sample prompt: the real answer, then the greedy answer after each evaluation (same prompts each time)."""
    with_samples = [e for e in evaluations if e.get("samples")]
    if not with_samples:
        return []
    quote = lambda text: " ".join(str(text).split()).replace("|", "\\|") or "(empty)"  # noqa: E731 - one table cell per answer
    out = ["", "## Sample answers", "",
           "The first held-out prompts (never trained on), with the real answer and the greedy answer after each "
           "evaluation:"]
    for i, first in enumerate(with_samples[0]["samples"]):
        rows = [["real answer", quote(first["real"])]]
        rows += [[e["label"], quote(e["samples"][i]["greedy"])] for e in with_samples if i < len(e["samples"])]
        out += ["", f"**Prompt {i + 1}:** {quote(first['prompt'])}", "", markdown_table(["", "answer"], rows)]
    return out


def _diagnostics_markdown(report: dict[str, Any]) -> list[str]:
    rows, anchor = report["diagnostics"], report["anchor_diagnostics"]
    if not rows and not anchor:
        return []
    keys = [k for part in DIAGNOSTIC_KEYS.values() for k in part]
    table = [["SFT samples (held-out anchors)", *[_num(anchor.get(k)) for k in keys]]] if anchor else []
    table += [[f"iter{r['iteration']}", *[_num(r[k]) for k in keys]] for r in rows]
    out = ["", "## Diagnostics per SPIN iteration", "",
           "Iteration t's pairs are sampled by its opponent (the SFT model for t = 0, else iteration t−1's model); "
           "\"near\" is token-level edit similarity >= 0.9 to the real answer (special tokens removed); Δ log p is "
           "the player's change in nats per answer.", "", markdown_table(["", *[DIAGNOSTIC_LABELS[k] for k in keys]], table)]
    for r in rows:
        out.append(f"- iter{r['iteration']}: on its training pairs SPIN "
                   f"{logp_direction(r['real_logp_change'], r['generated_logp_change'])}.")
    return out


# ------------------------------------------------------------------------------------------------------ charts

def _timeline_png(report: dict[str, Any], path: Path) -> None:
    # Figure directly (not pyplot): no global figure state and no GUI backend, so it is safe in any process.
    from matplotlib.figure import Figure

    phases = report["phases"]
    n = len(phases)
    fig = Figure(figsize=(11, 1.2 + 0.38 * n), layout="constrained")
    gantt, memax = fig.subplots(1, 2, sharey=True, width_ratios=[3, 1])
    ys = list(range(n))
    total = report["totals"]["wall_time_s"] or 1.0
    colours = [ROLE_COLOURS[p["role"]] for p in phases]
    gantt.barh(ys, [p["wall_time_s"] for p in phases], left=[p["start_s"] for p in phases], color=colours,
               edgecolor="black", linewidth=0.5, height=0.7)
    for y, p in zip(ys, phases):
        gantt.text(p["start_s"] + p["wall_time_s"] + 0.005 * total, y, f"{p['wall_time_s']:.1f} s",
                   va="center", fontsize=8)
    gantt.set_yticks(ys, [p["phase"] for p in phases])
    gantt.invert_yaxis()  # first phase on top, like reading the brief's timeline left to right
    gantt.set_xlim(0, total * 1.12)
    gantt.set_xlabel("wall time (s)")
    gantt.set_title(f"Timeline ({total:.1f} s total, device {report['device'] or 'unknown'})")
    gantt.grid(axis="x", alpha=0.3)

    mems = [p["peak_mem_gib"] if p["peak_mem_gib"] is not None else 0.0 for p in phases]
    memax.barh(ys, mems, color=colours, edgecolor="black", linewidth=0.5, height=0.7)
    for y, p, v in zip(ys, phases, mems):
        memax.text(v, y, f" {v:.2f}" if p["peak_mem_gib"] is not None else " n/a", va="center", fontsize=8)
    kind = report["totals"]["memory_kind"]
    memax.set_xlabel({"cuda_allocated": "peak CUDA allocated (GiB)", "cpu_rss": "peak RSS (GiB)"}
                     .get(kind, "peak memory (GiB)"))
    memax.set_xlim(0, (max(mems) or 1.0) * 1.3)
    memax.set_title("Peak memory per phase")
    memax.grid(axis="x", alpha=0.3)
    save_png(fig, path)


def _metrics_png(report: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    evals = report["evaluations"]
    panels = [("heldout_nll", "held-out NLL (per token)"), ("spin_loss", "SPIN loss (anchor pairs)"),
              ("reward_accuracy", "reward accuracy (anchor pairs)")]
    if any(e["exact_match"] is not None for e in evals):
        panels.append(("exact_match", "exact match (greedy)"))
    fig = Figure(figsize=(3.2 * len(panels), 7), layout="constrained")
    grid = fig.add_gridspec(2, len(panels))
    labels = [e["label"] for e in evals]
    for i, (key, title) in enumerate(panels):
        ax = fig.add_subplot(grid[0, i])
        # None (a metric a stage did not record) becomes NaN so the line shows a gap instead of failing.
        values = [float("nan") if e[key] is None else e[key] for e in evals]
        ax.plot(range(len(values)), values, marker="o", color="#1f77b4")
        if key == "spin_loss":
            ax.axhline(LOG2, color="grey", linestyle="--", linewidth=1, label="log 2 (SFT, by construction)")
            ax.legend(fontsize=7, loc="best")
        if key in ("reward_accuracy", "exact_match"):
            ax.set_ylim(-0.05, 1.05)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlim(-0.5, max(len(labels) - 0.5, 0.5))
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if not evals:
            ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ax.transAxes)

    # SFT loss (per-token NLL, ~1-10) and SPIN loss (a logistic loss starting at log 2) live on different scales:
    # one shared axis would flatten the SPIN curves, so they get their own axis on the right.
    sft_ax = fig.add_subplot(grid[1, :])
    spin_ax = sft_ax.twinx() if any(c["kind"] != "sft" for c in report["curves"]) else None
    spin_colours = ["#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
    step, handles, spin_i, spin_start = 0, [], 0, None
    for c in report["curves"]:
        curve = c["loss_curve"]
        if step > 0:
            sft_ax.axvline(step + 0.5, color="black", linewidth=0.8, linestyle=":")
        is_sft = c["kind"] == "sft"
        name = _phase_of(c, set())[0]
        ax = sft_ax if is_sft or spin_ax is None else spin_ax
        colour = ROLE_COLOURS["sft"] if is_sft else spin_colours[spin_i % len(spin_colours)]
        spin_i += 0 if is_sft else 1
        if not is_sft and spin_start is None:
            spin_start = step + 0.5
        if curve:
            handles += ax.plot(range(step + 1, step + len(curve) + 1), curve, color=colour, linewidth=1.2,
                               marker="." if len(curve) < 40 else None,
                               label=f"{name} loss" + ("" if is_sft else " (right axis)"))
        sft_ax.text(step + 1, 0.98, f" {name}", transform=sft_ax.get_xaxis_transform(), va="top", fontsize=8)
        step += len(curve)
    if spin_ax is not None:
        # Drawn over the SPIN steps only: on the SFT steps a line on the right axis would read as an SFT value.
        handles.append(spin_ax.hlines(LOG2, spin_start, max(step + 0.5, spin_start + 1), color="grey",
                                      linestyle="--", linewidth=1, label="log 2 (SPIN loss while player = opponent)"))
        spin_ax.set_ylabel("SPIN loss")
    # Headroom at the top for the stage names; steps are whole numbers.
    from matplotlib.ticker import MaxNLocator

    for a in (sft_ax, spin_ax):
        if a is not None:
            a.margins(y=0.15)
    sft_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    sft_ax.set_xlabel("optimizer step (stages concatenated)")
    sft_ax.set_ylabel("SFT loss (per-token NLL)")
    sft_ax.set_title("Training loss per optimizer step", fontsize=10)
    sft_ax.grid(alpha=0.3)
    if handles:
        # Below the axes, so it never hides a curve or a stage label.
        sft_ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16),
                      ncol=min(len(handles), 4), frameon=False)
    else:
        sft_ax.text(0.5, 0.5, "no training stage yet", ha="center", va="center", transform=sft_ax.transAxes)
    save_png(fig, path)


# ---------------------------------------------------------------------------------------------------- entry

def render_report(run_dir: Path) -> dict[str, Any]:
    """Write report.json, report.md, timeline.png and metrics.png into `run_dir`; return the report.json dict."""
    run_dir = Path(run_dir)
    records = read_records(run_dir)
    report = build_report(records, _recipe_iterations(run_dir))
    # Charts first and the JSON last: report.json existing means the whole report was written.
    _timeline_png(report, run_dir / "timeline.png")
    _metrics_png(report, run_dir / "metrics.png")
    write_text(run_dir / "report.md", _markdown(report, run_dir))
    write_json(run_dir / "report.json", report)
    return report
