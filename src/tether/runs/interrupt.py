"""Ctrl-C during a run: stop at the next step boundary with a checkpoint, not in the middle of one.

Inside :class:`StopRequest`, the first SIGINT only sets ``requested`` (and says so on stderr);
the training loop checks it after each step, saves a checkpoint of that step and raises
:class:`RunInterrupted`, which the command line reports with the command that continues the run
(exit status 130, as for a shell's Ctrl-C). A second SIGINT raises ``KeyboardInterrupt`` at once,
which loses only the steps since the last checkpoint: checkpoints are written atomically, so
none is ever left half-written. Outside the main thread (where signal handlers cannot be set),
Ctrl-C keeps Python's default behaviour.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import Any

from tether.errors import RunInterrupted, TetherError


class NonFiniteError(TetherError):
    """Training produced NaN or inf repeatedly (``train.max_nan_skips`` steps in a row, each with an
    optimizer update skipped); the run stopped with the last good checkpoint intact. Raised by the
    language-model and the control trainers alike."""


class StopRequest:
    """Context manager: the first Ctrl-C asks the loop to stop after the current step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\ntether: stopping after this step and saving a checkpoint (Ctrl-C again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False


def interrupted(what: str, step: int, total: int, run_dir: str, command: str) -> RunInterrupted:
    """The error a loop raises after saving the checkpoint of ``step`` on a stop request."""
    return RunInterrupted(
        f"{what} interrupted after step {step} of {total}; the checkpoint of step {step} is saved in "
        f"{run_dir!r}. Continue it with `{command} --out {run_dir} --resume` (a demo continues when "
        "`tether demo` is run again)"
    )
