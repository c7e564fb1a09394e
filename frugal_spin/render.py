"""What report.md and comparison.md are made of: markdown tables, PNG charts written atomically, phase colours.

report.py (one run) and compare/results.py (a comparison) both render through these, so the two documents'
tables and charts look and behave alike. Charts use matplotlib's `Figure` directly (no pyplot): no global figure
state and no GUI backend, so they are safe in any process.
"""

from __future__ import annotations

import os
from pathlib import Path

from frugal_spin.io import mkstemp

# The colour of a phase's bar by its role (report._phase_of): the brief's own phases in colour, the rest grey.
ROLE_COLOURS = {"setup": "#9e9e9e", "sft": "#1f77b4", "generate": "#ff7f0e", "spin": "#2ca02c",
                "eval": "#c7c7c7", "other": "#8c564b"}


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def save_png(fig, path: Path) -> None:
    """The figure as a PNG at `path`, by the temp-then-rename rule of frugal_spin.io (for a binary matplotlib
    writes): a reader never sees half a chart, and the file takes the umask's mode."""
    fd, tmp = mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # the umask's mode, not 0600
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
