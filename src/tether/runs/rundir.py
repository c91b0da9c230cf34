"""One directory per run: resolved config, metrics, alarms, samples, checkpoints, summary."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from tether.errors import TetherError
from tether.runs.checkpoint import latest_checkpoint
from tether.runs.files import atomic_write_json, atomic_write_text
from tether.runs.metrics import MetricsLog


class RunDir:
    """Paths and writers of a run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.metrics = MetricsLog(self.path / "metrics.jsonl")
        self.alarms = MetricsLog(self.path / "alarms.jsonl")
        self.samples = MetricsLog(self.path / "samples.jsonl")

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    def prepare(self, resume: bool) -> None:
        """Create the directory; refuse to overwrite an existing run unless resuming."""
        has_run = latest_checkpoint(self.path) is not None or self.metrics.path.exists()
        if has_run and not resume:
            raise TetherError(
                f"run directory {str(self.path)!r} already holds a run; pass --resume to continue it, "
                "or choose another --out"
            )
        if resume and latest_checkpoint(self.path) is None and self.metrics.path.exists():
            raise TetherError(
                f"cannot resume {str(self.path)!r}: it has no complete checkpoint; start again with another --out"
            )
        self.path.mkdir(parents=True, exist_ok=True)

    def resumable(self) -> bool:
        """Whether there is a checkpoint to resume from. Without one, the logs of a run killed
        before its first checkpoint are removed, so that it starts again cleanly (nothing is lost:
        nothing had been saved)."""
        if latest_checkpoint(self.path) is not None:
            return True
        for log in (self.metrics, self.alarms, self.samples):
            log.path.unlink(missing_ok=True)
        self.summary_path.unlink(missing_ok=True)
        return False

    def write_config(self, config: Mapping[str, Any]) -> None:
        atomic_write_text(self.config_path, yaml.safe_dump(dict(config), sort_keys=False))

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        atomic_write_json(self.summary_path, dict(summary))

    def read_summary(self) -> dict[str, Any] | None:
        if not self.summary_path.exists():
            return None
        data: dict[str, Any] = json.loads(self.summary_path.read_text())
        return data

    def truncate_logs(self, step: int) -> None:
        """On resume: drop log records written after the checkpoint's step."""
        for log in (self.metrics, self.alarms, self.samples):
            if log.path.exists():
                log.truncate_after(step)
