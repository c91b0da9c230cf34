"""One directory per run: resolved config, metrics, alarms, samples, checkpoints, summary."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import yaml

from tether.errors import TetherError
from tether.runs.checkpoint import latest_checkpoint
from tether.runs.files import atomic_write_json, atomic_write_text, restore_nonfinite
from tether.runs.metrics import MetricsLog
from tether.runs.resume import check_resume_config

RUN_MARKER = ".tether-run"
"""Written into every run directory when it is prepared: tether writes only into its own runs."""
RUN_LOCK = ".tether-lock"
"""Locked (``flock``) by the process that trains in the run, for as long as it lives."""

SUMMARY_NUMBERS = ("final", "eval")
"""The sections of ``summary.json`` whose "nan" / "inf" / "-inf" strings are numbers (read back as floats)."""

_HELD: dict[Path, int] = {}  # run directories this process has locked, and the lock's fd


def _lock(directory: Path) -> None:
    """Take the run's lock for this process (again is a no-op); another live process holding it
    (a second trainer, a comparison re-run beside a run still going) is refused."""
    key = directory.resolve()
    if key in _HELD:
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock on this platform: no lock
        return
    fd = os.open(key / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise TetherError(
            f"run directory {str(directory)!r} is in use by another tether process; wait for it to finish "
            "(or stop it: it resumes from its checkpoint), or choose another --out"
        ) from None
    _HELD[key] = fd


class RunDir:
    """Paths and writers of a run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.metrics = MetricsLog(self.path / "metrics.jsonl")
        self.alarms = MetricsLog(self.path / "alarms.jsonl", numbers=("value",))
        self.samples = MetricsLog(self.path / "samples.jsonl", numbers=("reward",))

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    def is_run(self) -> bool:
        """Whether the directory holds a tether run (its marker, a checkpoint or a metrics log)."""
        return (
            (self.path / RUN_MARKER).is_file()
            or latest_checkpoint(self.path) is not None
            or self.metrics.path.exists()
        )

    def check(self, resume: bool) -> None:
        """Read-only checks of ``--out``, before any work: not a file, not a directory of other
        files (tether never writes into one), and no finished or started run unless resuming."""
        where = str(self.path)
        check_directory_path(self.path)
        if self.path.is_dir() and not self.is_run():
            names = sorted(p.name for p in self.path.iterdir())
            if names:
                shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
                raise TetherError(
                    f"--out {where!r} already exists and is not a tether run (it holds {shown}); tether "
                    "writes a run only into a new or empty directory, or continues its own with --resume: "
                    "choose another --out"
                )
        if not resume and (latest_checkpoint(self.path) is not None or self.metrics.path.exists()):
            raise TetherError(
                f"run directory {where!r} already holds a run; pass --resume to continue it, or choose another --out"
            )

    def prepare(self, resume: bool) -> None:
        """Create the directory and mark it as a run, after :meth:`check`."""
        self.check(resume)
        if resume and latest_checkpoint(self.path) is None and self.metrics.path.exists():
            raise TetherError(
                f"cannot resume {str(self.path)!r}: it has no complete checkpoint; start again with another --out"
            )
        self.hold()

    def hold(self) -> None:
        """Create the directory, lock it for this process (a second process is refused) and mark it as
        a run. After the caller's checks; :meth:`prepare` for a trainer, directly for a run that has
        no checkpoint to resume (an evidence run, trained again from the start)."""
        self.path.mkdir(parents=True, exist_ok=True)
        _lock(self.path)
        self._mark()

    def _mark(self) -> None:
        marker = self.path / RUN_MARKER
        if not marker.is_file():
            atomic_write_text(marker, "a tether run directory\n")

    def resumable(self) -> bool:
        """Whether there is a checkpoint to resume from. Without one, the logs of a run killed
        before its first checkpoint are removed, so that it starts again cleanly (nothing is lost:
        nothing had been saved). A directory that is not a run is refused first (:meth:`check`)."""
        if latest_checkpoint(self.path) is not None:
            _lock(self.path)  # before the checkpoint is read (and the logs truncated) to resume
            return True
        self.check(resume=True)
        if self.path.is_dir():
            _lock(self.path)  # ours (checked): before its logs are removed
        if self.is_run():  # still ours once its logs are gone
            self._mark()
        for log in (self.metrics, self.alarms, self.samples):
            log.path.unlink(missing_ok=True)
        self.summary_path.unlink(missing_ok=True)
        return False

    def write_config(self, config: Mapping[str, Any]) -> None:
        atomic_write_text(self.config_path, yaml.safe_dump(dict(config), sort_keys=False))

    @property
    def restart_path(self) -> Path:
        return self.path / "restart.yaml"

    def write_restart_config(self, config: Mapping[str, Any]) -> Path:
        """Settings for a new run that takes over from this one (``tether train --config`` reads
        them): written when repeated NaN stops a run, whose resume would refuse changed settings."""
        atomic_write_text(self.restart_path, yaml.safe_dump(dict(config), sort_keys=False))
        return self.restart_path

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """``summary.json``, strict JSON: a non-finite value is written as "nan" / "inf" / "-inf"
        (:func:`tether.runs.files.json_ready`), as in ``metrics.jsonl``."""
        atomic_write_json(self.summary_path, dict(summary))

    def read_summary(self) -> dict[str, Any] | None:
        """``summary.json``, or None without one; the numbers of its ``final`` metrics and ``eval``
        results that were written as "nan" / "inf" / "-inf" are floats again."""
        if not self.summary_path.exists():
            return None
        data = json.loads(self.summary_path.read_text())
        if not isinstance(data, dict):
            return None
        for section in SUMMARY_NUMBERS:
            if isinstance(data.get(section), dict):
                data[section] = restore_nonfinite(data[section])
        return data

    def metrics_at(self, step: int) -> dict[str, Any]:
        """The metrics logged for ``step`` (without ``step`` and ``alarms``), or {} when there are none:
        what a resumed run that has nothing left to train reports as its final metrics."""
        if step <= 0:
            return {}
        for record in reversed(self.metrics.read()):
            if record.get("step") == step:
                return {k: v for k, v in record.items() if k not in ("step", "alarms")}
        return {}

    def truncate_logs(self, step: int) -> None:
        """On resume: drop log records written after the checkpoint's step."""
        for log in (self.metrics, self.alarms, self.samples):
            if log.path.exists():
                log.truncate_after(step)


MODEL_STEP = "tether_step.json"
"""Written into a run's ``model/`` after its weights: ``{"step": N}``, the step whose weights they are
(``tether eval`` reports it). A kill between the weights and this file leaves none: the step is then unknown,
never wrong (the whole directory, this file included, is replaced by each save)."""


def mark_model_step(model_dir: str | Path, step: int) -> None:
    """Record that ``model_dir`` holds the weights of ``step`` (see :data:`MODEL_STEP`)."""
    atomic_write_json(Path(model_dir) / MODEL_STEP, {"step": int(step)})


def model_step(model_dir: str | Path) -> int | None:
    """The step whose weights ``model_dir`` holds, or None when that is not recorded."""
    path = Path(model_dir) / MODEL_STEP
    try:
        step = json.loads(path.read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def free_run_dir(path: str | Path, suffix: str) -> Path:
    """``<path>-<suffix>`` beside the run ``path`` (``-2``, ``-3``, ... appended while that exists):
    where a new run that takes over from ``path`` goes."""
    p = Path(path)
    if not p.name:  # "." or "/"
        p = p.resolve()
    base = p.with_name(f"{p.name}-{suffix}")
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def check_directory_path(path: str | Path, option: str = "--out") -> Path:
    """Read-only: ``path`` can be a directory: it is not a file and does not lie under one."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise TetherError(f"{option} {str(p)!r} is a file, not a directory; choose another {option}")
    blocking = next((a for a in p.parents if a.exists() and not a.is_dir()), None)
    if blocking is not None:
        raise TetherError(
            f"{option} {str(p)!r} lies under {str(blocking)!r}, which is a file; choose another {option}"
        )
    return p


def check_run_dir(
    run_path: str | Path,
    resume: bool,
    config: Mapping[str, Any],
    may_change: Collection[str],
    resolve: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
    recipe: Mapping[str, Any] | None = None,
) -> RunDir:
    """Every read-only check of a run's directory before any work (also for --dry-run): a file or
    another program's directory, a started run without --resume, and on --resume a setting outside
    ``may_change`` or a recipe part that differs from the run's own
    (:func:`~tether.runs.resume.check_resume_config`)."""
    if resume:
        check_resume_config(run_path, config, may_change, resolve, recipe)
    run = RunDir(run_path)
    run.check(resume)
    return run
