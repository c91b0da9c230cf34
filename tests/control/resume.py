"""Shared body of the control resume tests: an unbroken run, and one killed after update 3 and resumed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tether.control.config import ControlConfig
from tether.control.trainer import TIMING_PREFIXES, ControlTrainer
from tether.runs import RunDir

Records = list[dict[str, object]]


def unbroken_and_resumed(
    make_config: Callable[..., ControlConfig], tmp_path: Path, *extra: str
) -> tuple[Records, Records, int]:
    """Metrics (timings stripped) of run ``a`` (unbroken) and run ``b`` (killed, then resumed), and
    the update ``b`` resumed from."""
    ControlTrainer(make_config(tmp_path / "a", *extra)).train()
    stopped = ControlTrainer(make_config(tmp_path / "b", *extra))

    def kill(update: int, _: dict[str, float]) -> None:
        if update == 3:  # after the checkpoint of update 2 and the log record of update 3
            raise KeyboardInterrupt

    stopped.on_update = kill
    with pytest.raises(KeyboardInterrupt):
        stopped.train()
    resumed = ControlTrainer(make_config(tmp_path / "b", *extra), resume=True)
    resumed_at = resumed.update
    resumed.train()

    def strip(records: Records) -> Records:
        return [{k: v for k, v in r.items() if not k.startswith(TIMING_PREFIXES)} for r in records]

    return (
        strip(RunDir(tmp_path / "a").metrics.read()),
        strip(RunDir(tmp_path / "b").metrics.read()),
        resumed_at,
    )
