"""Run directories: resolved config, metrics log, checkpoints (atomic), summary, resume."""

from tether.runs.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from tether.runs.files import atomic_write_json, atomic_write_text
from tether.runs.metrics import MetricsLog
from tether.runs.rundir import RunDir

__all__ = [
    "Checkpoint",
    "MetricsLog",
    "RunDir",
    "atomic_write_json",
    "atomic_write_text",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]
