"""The run report from synthetic run directories: no model, only metrics.jsonl (and recipe.yaml) written by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from frugal_spin.errors import UserError
from frugal_spin.report import render_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _mem(cuda: bool, gib: float) -> dict:
    return {"peak_mem_gib": gib, "peak_reserved_gib": gib + 0.25} if cuda else {"peak_rss_gib": gib}


def _records(iterations: int, cuda: bool = False) -> list[dict]:
    """A run's stage records in pipeline order; wall times and memory differ per stage so sums and maxima show."""
    recs = [
        {"stage": "setup", "kind": "setup", "wall_time_s": 4.0,
         "metrics": {"train_examples": 100, "heldout_examples": 20, "skipped_no_answer": 3,
                     "truncated_answers": 1, "device": "cuda" if cuda else "cpu", "compute_dtype": "float32",
                     **_mem(cuda, 0.40)}},
        {"stage": "sft", "kind": "train", "wall_time_s": 10.0,
         "metrics": {"train_loss": 2.5, "optimizer_steps": 4, "tokens": 4000, "tokens_per_s": 400.0,
                     "loss_curve": [3.0, 2.8, 2.6, 2.5], **_mem(cuda, 0.60)}},
        {"stage": "anchor", "kind": "generate", "wall_time_s": 0.5, "metrics": {"pairs": 20, **_mem(cuda, 0.50)}},
        {"stage": "sft.eval", "kind": "eval", "wall_time_s": 0.25,
         "metrics": {"heldout_nll": 2.4, "spin_loss": math.log(2), "reward_margin": 0.0, "reward_accuracy": 0.0,
                     "exact_match": 0.1, "samples": [{"prompt": "p", "real": "a", "greedy": "g"}], **_mem(cuda, 0.51)}},
    ]
    for t in range(iterations):
        recs += [
            {"stage": f"iter_{t}.generate", "kind": "generate", "wall_time_s": 3.0 + t,
             "metrics": {"answers": 100, "tokens": 1000, "tokens_per_s": 1000 / (3.0 + t), **_mem(cuda, 0.55)}},
            {"stage": f"iter_{t}.score", "kind": "score", "wall_time_s": 1.5,
             "metrics": {"sequences": 200, "tokens": 5000, "tokens_per_s": 5000 / 1.5, **_mem(cuda, 0.56)}},
            {"stage": f"iter_{t}.train", "kind": "train", "wall_time_s": 6.0 + 2 * t,
             "metrics": {"train_loss": 0.69 - 0.05 * (t + 1), "optimizer_steps": 3, "tokens": 5000,
                         "tokens_per_s": 5000 / (6.0 + 2 * t), "train_reward_margin": 0.1 * (t + 1),
                         "train_reward_accuracy": 0.6 + 0.1 * t, "loss_curve": [0.69, 0.66, 0.64],
                         "margin_curve": [0.0, 0.05, 0.1], **_mem(cuda, 0.70 + 0.1 * t)}},
            {"stage": f"iter_{t}.eval", "kind": "eval", "wall_time_s": 0.75,
             "metrics": {"heldout_nll": 2.3 - 0.1 * t, "spin_loss": 0.6 - 0.1 * t, "reward_margin": 0.2 * (t + 1),
                         "reward_accuracy": 0.7 + 0.1 * t, "exact_match": 0.2 + 0.1 * t,
                         "samples": [], **_mem(cuda, 0.52)}},
        ]
    return recs


def _as_written_now(records: list[dict]) -> list[dict]:
    """The records as this version writes them: every training stage's kind says what it trains, and every record
    carries its iteration (the records above are as runs wrote them before)."""
    from frugal_spin.plan import describe

    return [{**r, "kind": describe(r["stage"])[0], "iteration": describe(r["stage"])[1]} for r in records]


def _run_dir(tmp_path: Path, records: list[dict], iterations: int | None = None) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if iterations is not None:
        (run / "recipe.yaml").write_text(f"output_dir: {run}\nspin:\n  iterations: {iterations}\n  beta: 0.1\n")
    return run


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert len(data) > 1000  # a real chart, not an empty image


def _phase_summary(report: dict) -> list[tuple[str, list[str], float]]:
    return [(p["phase"], p["stages"], p["wall_time_s"]) for p in report["phases"]]


def test_records_of_this_version_and_of_the_earlier_one_give_the_same_report(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old = render_report(_run_dir(tmp_path / "old", _records(iterations=2), iterations=2))
    new = render_report(_run_dir(tmp_path / "new", _as_written_now(_records(iterations=2)), iterations=2))
    assert [r["kind"] for r in new["stages"]][:4] == ["setup", "sft", "anchor", "eval"]
    assert old == new
    assert (tmp_path / "old" / "run" / "report.md").read_text() == (tmp_path / "new" / "run" / "report.md").read_text()


def test_phases_follow_from_kind_and_iteration_not_from_the_name(tmp_path):
    renamed = [{**r, "stage": f"stage_{i}"} for i, r in enumerate(_as_written_now(_records(iterations=1)))]
    report = render_report(_run_dir(tmp_path, renamed, iterations=1))
    assert [p["phase"] for p in report["phases"]] == ["setup", "SFT", "SFT eval", "iter0 generate", "iter0",
                                                      "iter0 eval"]
    assert report["complete"] and [e["label"] for e in report["evaluations"]] == ["SFT", "iter0"]


def test_full_run_writes_files_with_the_input_numbers(tmp_path):
    records = _records(iterations=2)
    run = _run_dir(tmp_path, records, iterations=2)
    report = render_report(run)

    for name in ("report.json", "report.md", "timeline.png", "metrics.png"):
        assert (run / name).is_file()
    _assert_png(run / "timeline.png")
    _assert_png(run / "metrics.png")
    # Every write went through a temp file that was renamed: none is left behind.
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert json.loads((run / "report.json").read_text()) == report

    walls = [r["wall_time_s"] for r in records]
    assert report["totals"]["wall_time_s"] == pytest.approx(sum(walls))
    assert report["totals"]["peak_mem_gib"] == pytest.approx(0.80)  # iter_1.train's 0.70 + 0.1
    assert report["totals"]["peak_stage"] == "iter_1.train"
    assert report["totals"]["memory_kind"] == "cpu_rss"
    assert report["device"] == "cpu"
    assert report["complete"] is True
    assert report["data"] == {"train_examples": 100, "heldout_examples": 20, "skipped_no_answer": 3,
                              "truncated_answers": 1}

    by_stage = {s["stage"]: s for s in report["stages"]}
    assert [s["stage"] for s in report["stages"]] == [r["stage"] for r in records]
    assert by_stage["sft"]["tokens"] == 4000 and by_stage["sft"]["tokens_per_s"] == 400.0
    assert by_stage["iter_0.score"]["peak_mem_gib"] == 0.56
    assert by_stage["anchor"]["tokens"] is None
    assert "samples" not in by_stage["sft.eval"]["metrics"] and "loss_curve" not in by_stage["sft"]["metrics"]

    assert [e["label"] for e in report["evaluations"]] == ["SFT", "iter0", "iter1"]
    last_eval = records[-1]["metrics"]
    assert report["evaluations"][2] == {"stage": "iter_1.eval", "label": "iter1",
                                        **{k: last_eval[k] for k in ("heldout_nll", "spin_loss", "reward_margin",
                                                                     "reward_accuracy", "exact_match")},
                                        "samples": []}
    assert [c["loss_curve"] for c in report["curves"]] == [[3.0, 2.8, 2.6, 2.5], [0.69, 0.66, 0.64]] + [
        [0.69, 0.66, 0.64]]

    # The brief's order, generate+score folded into "iter<t> generate", evaluations as their own phases.
    assert [(n, s) for n, s, _ in _phase_summary(report)] == [
        ("setup", ["setup"]), ("SFT", ["sft"]), ("SFT eval", ["anchor", "sft.eval"]),
        ("iter0 generate", ["iter_0.generate", "iter_0.score"]), ("iter0", ["iter_0.train"]),
        ("iter0 eval", ["iter_0.eval"]),
        ("iter1 generate", ["iter_1.generate", "iter_1.score"]), ("iter1", ["iter_1.train"]),
        ("iter1 eval", ["iter_1.eval"])]
    durations = {n: w for n, _, w in _phase_summary(report)}
    assert durations["SFT eval"] == pytest.approx(0.75)
    assert durations["iter0 generate"] == pytest.approx(4.5)
    assert durations["iter1 generate"] == pytest.approx(5.5)
    assert durations["iter1"] == pytest.approx(8.0)
    phases = report["phases"]
    for before, after in zip(phases, phases[1:]):
        assert after["start_s"] == pytest.approx(before["start_s"] + before["wall_time_s"])
    assert phases[4]["peak_mem_gib"] == pytest.approx(0.70)
    assert report["totals"]["wall_time_by_role_s"]["spin"] == pytest.approx(14.0)

    md = (run / "report.md").read_text()
    assert "![timeline](timeline.png)" in md and "![metrics](metrics.png)" in md
    assert "`SFT 10.0s | iter0 generate 4.5s | iter0 6.0s | iter1 generate 5.5s | iter1 8.0s`" in md
    assert "| iter_1.train | spin | 8.00 | 5,000 | 625 | 0.8 |" in md  # these records' "train", as plan.py names it
    assert "| iter1 | 2.2 | 0.5 | 0.4 | 0.8 | 0.3 |" in md
    assert "| train_examples | 100 |" in md
    assert "Partial run" not in md and "reserved" not in md


def test_zero_iterations(tmp_path):
    run = _run_dir(tmp_path, _records(iterations=0), iterations=0)
    report = render_report(run)
    assert [p["phase"] for p in report["phases"]] == ["setup", "SFT", "SFT eval"]
    assert [e["label"] for e in report["evaluations"]] == ["SFT"]
    assert report["complete"] is True
    assert report["totals"]["wall_time_s"] == pytest.approx(14.75)
    _assert_png(run / "timeline.png")
    _assert_png(run / "metrics.png")


def test_partial_run_reports_what_is_there(tmp_path):
    records = _records(iterations=2)[:-3]  # stopped after iter_1.generate
    run = _run_dir(tmp_path, records, iterations=2)
    report = render_report(run)
    assert report["complete"] is False and report["last_stage"] == "iter_1.generate"
    assert _phase_summary(report)[-1] == ("iter1 generate", ["iter_1.generate"], 4.0)
    assert [e["label"] for e in report["evaluations"]] == ["SFT", "iter0"]
    assert report["totals"]["wall_time_s"] == pytest.approx(sum(r["wall_time_s"] for r in records))
    assert "Partial run" in (run / "report.md").read_text()
    _assert_png(run / "metrics.png")


def test_run_stopped_before_any_evaluation(tmp_path):
    # No recipe.yaml either: completeness is then unknown rather than guessed.
    run = _run_dir(tmp_path, _records(iterations=0)[:1])
    report = render_report(run)
    assert report["evaluations"] == [] and report["complete"] is None
    assert "No evaluation has finished yet." in (run / "report.md").read_text()
    _assert_png(run / "timeline.png")
    _assert_png(run / "metrics.png")


def test_cuda_memory_keys(tmp_path):
    run = _run_dir(tmp_path, _records(iterations=1, cuda=True), iterations=1)
    report = render_report(run)
    assert {s["memory_kind"] for s in report["stages"]} == {"cuda_allocated"}
    train = next(s for s in report["stages"] if s["stage"] == "iter_0.train")
    assert train["peak_mem_gib"] == 0.70 and train["peak_reserved_gib"] == 0.95
    assert report["totals"]["peak_mem_gib"] == 0.70 and report["totals"]["memory_kind"] == "cuda_allocated"
    md = (run / "report.md").read_text()
    assert "reserved GiB" in md and "CUDA memory allocated" in md


def test_stage_without_memory_and_unknown_stage(tmp_path):
    records = _records(iterations=0)
    records.append({"stage": "export", "kind": "other", "wall_time_s": 2.0, "metrics": {}})
    run = _run_dir(tmp_path, records)
    report = render_report(run)
    assert _phase_summary(report)[-1] == ("export", ["export"], 2.0)
    assert report["stages"][-1]["peak_mem_gib"] is None and report["stages"][-1]["memory_kind"] is None
    assert report["totals"]["peak_mem_gib"] == pytest.approx(0.60)


def test_missing_run_dir(tmp_path):
    with pytest.raises(UserError, match="does not exist") as e:
        render_report(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)


def test_missing_metrics_file(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match=r"metrics\.jsonl does not exist"):
        render_report(tmp_path / "run")


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"stage": "sft", "kind": "train", "metrics": {}}', "no 'wall_time_s'"),
    ('{"stage": "sft", "kind": "train", "metrics": [], "wall_time_s": 1.0}', "'metrics' has the wrong type"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad_line, message):
    run = tmp_path / "run"
    run.mkdir()
    good = json.dumps(_records(iterations=0)[0])
    (run / "metrics.jsonl").write_text(good + "\n\n" + bad_line + "\n")
    with pytest.raises(UserError) as e:
        render_report(run)
    assert f"{run / 'metrics.jsonl'}:3:" in str(e.value) and message in str(e.value)
    assert "\n" not in str(e.value)
    assert not (run / "report.json").exists()


def test_empty_metrics_file(tmp_path):
    run = _run_dir(tmp_path, [])
    with pytest.raises(UserError, match="no stage records"):
        render_report(run)


def test_diverged_run_with_nan_values_still_renders(tmp_path):
    # A NaN loss is the finding a user needs to see, not a reason for the report to fail.
    records = _records(iterations=1)
    records[1]["metrics"].update(train_loss=float("nan"), tokens_per_s=float("nan"),
                                 loss_curve=[3.0, float("nan"), float("nan"), float("nan")])
    records[-1]["metrics"]["heldout_nll"] = float("nan")
    run = _run_dir(tmp_path, records, iterations=1)
    report = render_report(run)
    assert math.isnan(report["evaluations"][1]["heldout_nll"])
    assert "| sft | sft | 10.00 | 4,000 | nan |" in (run / "report.md").read_text()
    _assert_png(run / "metrics.png")


def test_console_summary_states_skipped_and_truncated_rows():
    from frugal_spin.ui import summary_table

    records = [{"stage": "setup", "wall_time_s": 1.0, "metrics": {
        "train_examples": 90, "heldout_examples": 10, "skipped_no_answer": 3, "truncated_prompts": 2,
        "skipped_malformed": 0}},
        {"stage": "sft", "wall_time_s": 2.0, "metrics": {"train_loss": 0.5}}]
    assert summary_table(records).caption == ("data: 90 training, 10 held-out examples; skipped no answer 3, "
                                              "truncated prompts 2")
    records[0]["metrics"] = {"train_examples": 5, "heldout_examples": 1}
    assert summary_table(records).caption.endswith("no row skipped or truncated")


def test_diagnostics_per_iteration_come_from_their_stages(tmp_path):
    records = _records(iterations=2)
    by_stage = {r["stage"]: r for r in records}
    by_stage["anchor"]["metrics"].update(identical_share=0.5, near_share=0.6, mean_answer_tokens=9.0,
                                         end_token_rate=1.0)
    for t, (real, generated) in enumerate([(-0.5, -2.0), (0.25, -1.0)]):
        by_stage[f"iter_{t}.generate"]["metrics"].update(identical_share=0.1 * (t + 1), near_share=0.2 * (t + 1),
                                                          mean_answer_tokens=10.0 + t, end_token_rate=0.9 - 0.1 * t)
        by_stage[f"iter_{t}.train"]["metrics"].update(real_logp_change=real, generated_logp_change=generated)
        by_stage[f"iter_{t}.eval"]["metrics"].update(anchor_real_logp_change=real / 2,
                                                      anchor_generated_logp_change=generated / 2)
    report = render_report(_run_dir(tmp_path, records, iterations=2))
    assert report["anchor_diagnostics"] == {"identical_share": 0.5, "near_share": 0.6, "mean_answer_tokens": 9.0,
                                            "end_token_rate": 1.0}
    assert report["diagnostics"][1] == {"iteration": 1, "identical_share": 0.2, "near_share": 0.4,
                                        "mean_answer_tokens": 11.0, "end_token_rate": 0.8, "real_logp_change": 0.25,
                                        "generated_logp_change": -1.0, "anchor_real_logp_change": 0.125,
                                        "anchor_generated_logp_change": -0.5}
    markdown = (tmp_path / "run" / "report.md").read_text()
    assert "## Diagnostics per SPIN iteration" in markdown
    assert "iter0: on its training pairs SPIN lowered real answers (-0.5 nats), lowered generated ones (-2): both " \
           "log-probs decrease" in markdown
    assert "iter1: on its training pairs SPIN raised real answers (+0.25 nats), lowered generated ones (-1): the " \
           "margin comes from both sides" in markdown


def test_runs_without_diagnostics_still_report(tmp_path):
    report = render_report(_run_dir(tmp_path, _records(iterations=1), iterations=1))
    assert report["diagnostics"][0]["real_logp_change"] is None and report["anchor_diagnostics"] == {}
    assert "not recorded" in (tmp_path / "run" / "report.md").read_text()
