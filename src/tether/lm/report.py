"""End-of-run summary tables (rich)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

SHOWN = (
    "reward/mean",
    "reward/accuracy",
    "policy/entropy",
    "policy/kl_ref",
    "policy/clip_frac",
    "policy/ratio_max",
    "grad/norm",
    "response/length_mean",
    "response/truncation_rate",
    "reward/zero_std_frac",
    "rollout/logprob_gap",
)

#: Counts of the summary shown when non-zero (0 is the healthy value, not worth a row).
COUNTS = ("verifier_errors", "nan_skips")


def print_run_summary(summary: dict[str, Any], run_dir: Path | str) -> None:
    console = Console()
    table = Table(title=f"run summary: {run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    final = summary.get("final", {})
    for key in SHOWN:
        if key in final:
            table.add_row(key, _cell(final[key]))
    evaluated = summary.get("eval_step")
    if summary.get("eval") and evaluated is not None and evaluated != summary.get("steps"):
        # the held-out results kept from before a resume that trained further without evaluating
        table.add_row("eval of step", f"{evaluated} (not the final step {summary.get('steps')})")
    for key, value in (summary.get("eval") or {}).items():
        if isinstance(value, int | float):
            table.add_row(f"eval/{key}", _cell(value))
    if "alarm_count" in summary:
        table.add_row("alarms", str(summary["alarm_count"]))
    for key in COUNTS:  # shown when non-zero: samples whose verifier raised, NaN-skipped updates
        if summary.get(key):
            table.add_row(key, str(summary[key]))
    console.print(table)


def _cell(value: Any) -> str:
    """A number to 4 significant digits (nan and inf as such); anything else as written (a log read
    by an older tether may hold "nan" as a string)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:.4g}"
    return str(value)


def print_comparison(rows: dict[str, dict[str, float]], title: str) -> None:
    """Side-by-side table: one column per run, one row per metric."""
    console = Console()
    table = Table(title=title)
    table.add_column("metric")
    names = list(rows)
    for name in names:
        table.add_column(name, justify="right")
    metrics = list(dict.fromkeys(k for r in rows.values() for k in r))
    for m in metrics:
        cells = []
        for n in names:
            v = rows[n].get(m)
            cells.append("-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)))
        table.add_row(m, *cells)
    console.print(table)
