"""`python -m frugal_spin sample`: each stage's answer to the same prompts, from one base with adapters swapped;
greedy answers equal the ones the run's own evaluation produced; mistakes are one line."""

import json

import pytest

from frugal_spin import model as model_module
from frugal_spin.__main__ import main
from frugal_spin.errors import UserError
from frugal_spin.sample import read_prompts, sample_answers


def test_greedy_answers_are_the_evaluations_own_and_one_base_is_loaded(finished_run, monkeypatch):
    loads = []
    real_load = model_module.load_model
    monkeypatch.setattr(model_module, "load_model", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    records = {r["stage"]: r for r in map(json.loads, (finished_run / "metrics.jsonl").read_text().splitlines())}
    samples = records["sft.eval"]["metrics"]["samples"]
    answers = sample_answers(finished_run, [s["prompt"] for s in samples], max_new_tokens=12)
    assert list(answers) == ["base", "sft", "iter_0"]  # default: the bare base, then every finished stage
    assert len(loads) == 1
    assert answers["sft"] == [s["greedy"] for s in samples]
    assert answers["iter_0"] == [s["greedy"] for s in records["iter_0.eval"]["metrics"]["samples"]]


def test_sampling_uses_one_seed_for_every_stage_and_is_repeatable(finished_run):
    prompts = ["What is 31 + 44?", "Sort the digits of 9132."]
    first = sample_answers(finished_run, prompts, "sft", max_new_tokens=12, temperature=1.0, seed=5)
    again = sample_answers(finished_run, prompts, "sft", max_new_tokens=12, temperature=1.0, seed=5)
    assert first["sft"] == again["sft"]


def test_cli_prints_the_stages_side_by_side(finished_run, capsys):
    assert main(["sample", str(finished_run), "--prompt", "What is 2 + 3?", "--stages", "sft,last",
                 "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "What is 2 + 3?" in out
    header = next(line for line in out.splitlines() if "sft" in line)
    assert "iter_0" in header  # one row of columns: the stages side by side


@pytest.mark.parametrize("args, message", [
    (["--stages", "sft,iter_9", "--prompt", "x"], "error: stage iter_9 has not finished in"),
    (["--stages", "sft,final", "--prompt", "x"], "error: unknown stage 'final'"),
    ([], "error: no prompt given"),
    (["--prompt", "x", "--max-new-tokens", "0"], "error: --max-new-tokens must be > 0"),
    (["--prompts", "/nonexistent/prompts.txt"], "error: --prompts /nonexistent/prompts.txt: cannot read it"),
    (["--prompt", "x", "--temperature", "nan"], "error: --temperature must be a finite number >= 0"),
    (["--prompt", "x", "--temperature", "inf"], "error: --temperature must be a finite number >= 0"),
    (["--prompt", "x", "--temperature=-inf"], "error: --temperature must be a finite number >= 0"),
    (["--prompt", "x", "--temperature", "1", "--top-p", "nan"], "error: --top-p must be in (0, 1]"),
])
def test_mistakes_are_one_line(finished_run, capsys, args, message):
    assert main(["sample", str(finished_run), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_prompt_files_text_and_jsonl(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("What is 1 + 1?\n\n  Reverse 123.  \n")
    assert read_prompts(["first"], str(text)) == ["first", "What is 1 + 1?", "Reverse 123."]
    rows = tmp_path / "p.jsonl"
    rows.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert read_prompts([], str(rows)) == ["a", "b"]
    rows.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(UserError, match=r"p.jsonl:2: not a JSON object with a \"prompt\" key"):
        read_prompts([], str(rows))


def test_rich_markup_in_a_prompt_is_printed_as_written(finished_run, capsys):
    prompt = "[bold]What[/bold] is [red]2 + 3[/]? [/oops] [link=x]"
    assert main(["sample", str(finished_run), "--prompt", prompt, "--stages", "sft", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "".join(prompt.split()) in "".join(out.split())  # the title wraps to the table's width


@pytest.mark.parametrize("source", ["dev_zero", "long_prompt_argument", "long_line_in_file"])
def test_reads_are_bounded_and_what_was_cut_is_said_in_one_line(finished_run, tmp_path, capsys, source):
    """/dev/zero never ends and a 120,000-character prompt is far past the run's prompt limit: both are cut (the
    file read up to 4 MiB, a prompt to its last characters, then to data.max_prompt_tokens tokens, as the run's
    prompts were) and counted in one warning line; the answers are still printed."""
    long = "What is 2 + 3? " * 8000  # 120,000 characters
    args = {"dev_zero": ["--prompts", "/dev/zero"],
            "long_prompt_argument": ["--prompt", long, "--prompt", "What is 1 + 1?"],
            "long_line_in_file": ["--prompts", str(tmp_path / "p.txt")]}[source]
    (tmp_path / "p.txt").write_text(long + "\nWhat is 1 + 1?\n")
    assert main(["sample", str(finished_run), *args, "--stages", "sft", "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, captured.err[-2000:]
    assert "1 prompt(s) longer than 32,768 characters kept their last ones" in warnings[0]
    assert "1 prompt(s) longer than data.max_prompt_tokens=" in warnings[0]
    assert ("only its first 4 MiB were read" in warnings[0]) == (source == "dev_zero")
    assert "sft" in captured.out


def test_prompt_files_are_read_with_a_bound(tmp_path):
    from collections import Counter

    from frugal_spin import sample

    big = tmp_path / "big.txt"
    big.write_bytes(b"What is 1 + 1?\n" * (sample.MAX_FILE_BYTES // 15 + 10))
    cut = Counter()
    prompts = read_prompts([], str(big), cut)
    assert cut["file"] == 1 and len(prompts) == sample.MAX_FILE_BYTES // 15  # whole lines only
    assert set(prompts) == {"What is 1 + 1?"}
