"""A rich progress bar with ETA and the key metrics, and alarms printed as they fire."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

KEY_METRICS = (
    ("sft/loss", "loss"),
    ("reward/mean", "reward"),
    ("reward/accuracy", "acc"),
    ("policy/entropy", "H"),
    ("policy/clip_frac", "clip"),
    ("grad/norm", "|g|"),
)


class TrainProgress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True, description: str = "train") -> None:
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.total = total
        self.start = start
        self.description = description
        self.progress: Progress | None = None
        self.task: Any = None

    def __enter__(self) -> TrainProgress:
        if self.enabled:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=self.console,
                transient=False,
            )
            self.progress.__enter__()
            self.task = self.progress.add_task(
                self.description, total=self.total, completed=self.start, info=""
            )
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.progress is not None:
            self.progress.__exit__(exc_type, exc, tb)

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if self.progress is None:
            return
        info = "  ".join(f"{label} {metrics[key]:.3g}" for key, label in KEY_METRICS if key in metrics)
        self.progress.update(self.task, completed=step, info=info)

    def alarm(self, kind: str, message: str, step: int | None = None) -> None:
        """Alarms are always shown: above the bar, or as a plain stderr line without one; with the
        step that raised them (``alarm nan at step 3: ...``)."""
        at = f" at step {step}" if step is not None else ""
        if self.enabled:
            self.console.print(f"[bold red]alarm[/] [red]{kind}[/]{at}: {message}", highlight=False)
        else:
            print(f"alarm {kind}{at}: {message}", file=sys.stderr, flush=True)
