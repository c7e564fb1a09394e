"""Terminal display: one rich progress bar with ETA per long stage, and the end-of-run summary table."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from frugal_spin.plan import with_kind_and_iteration

console = Console(highlight=False)
_quiet = False  # set on every rank but rank 0 of a multi-process run: one terminal shows the run


def silence() -> None:
    """No progress, notes or warnings from this process (another rank shows the same)."""
    global _quiet
    _quiet = True
    console.quiet = True


def escape(text: str) -> str:
    """A user's string (a path, a model name) shown through rich: "[/x]" in it is text, never markup."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


@contextmanager
def stage_bar(description: str, total: int, unit: str = "") -> Iterator[Callable[..., None]]:
    """Yields `advance(n=1, **fields)`; fields (e.g. loss=0.41) are shown after the bar."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn(unit), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
               TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, info="")

        def advance(n: int = 1, **fields: Any) -> None:
            info = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            progress.update(task, advance=n, **({"info": info} if fields else {}))

        yield advance


def quiet_libraries() -> None:
    """Keep the terminal for our own progress: transformers' per-load progress bars and bitsandbytes' notice about
    an optional hub kernel (which cannot be fetched offline and is not needed) say nothing a user can act on."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="bitsandbytes")
    warnings.filterwarnings("ignore", message=".*gemv_4bit.*")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def note(text: str) -> None:
    console.print(text)


def warn(text: str) -> None:
    """A problem the run handled itself (e.g. a corrupt cache file it recomputes): on stderr, one line."""
    from rich.markup import escape

    Console(stderr=True, quiet=_quiet, highlight=False).print(f"[yellow]warning:[/yellow] {escape(text)}", soft_wrap=True)


SUMMARY_COLUMNS = {"loss": "train_loss", "nll": "heldout_nll", "spin": "spin_loss", "margin": "reward_margin",
                   "acc": "reward_accuracy", "exact": "exact_match"}


def summary_table(records: list[dict[str, Any]]) -> Table:
    """One row per stage: wall time, then the train loss or the evaluation metrics (see README for each)."""
    table = Table(title="frugal_spin run summary")
    for header in ["stage", "wall s", *SUMMARY_COLUMNS]:
        table.add_column(header, justify="left" if header == "stage" else "right", no_wrap=True)
    for record in records:
        metrics = record["metrics"]
        table.add_row(record["stage"], f"{record['wall_time_s']:.1f}",
                      *[_fmt(metrics.get(key)) for key in SUMMARY_COLUMNS.values()])
    setup = next((r["metrics"] for r in records if with_kind_and_iteration(r)["kind"] == "setup"), {})
    table.caption = data_caption(setup)
    return table


def data_caption(setup: dict[str, Any]) -> str:
    """The data the run used, with every skipped or truncated row count (they change what the metrics mean)."""
    if not setup:
        return ""
    counts = [f"{k.replace('_', ' ')} {v}" for k, v in sorted(setup.items())
              if k.startswith(("skipped_", "truncated_")) and v]
    return (f"data: {setup.get('train_examples')} training, {setup.get('heldout_examples')} held-out examples"
            + (f"; {', '.join(counts)}" if counts else "; no row skipped or truncated"))


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)
