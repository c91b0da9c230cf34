"""Errors a user can cause. Each message says what went wrong and what to do about it."""

from __future__ import annotations


class TetherError(Exception):
    """Base class for every error caused by user input (config, names, data)."""


class UnknownNameError(TetherError, KeyError):
    """A name that is not registered was looked up."""

    def __str__(self) -> str:  # KeyError would otherwise wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class InvalidInputError(TetherError, ValueError):
    """Tensors or values passed to a catalogue entry do not satisfy its contract."""


class RunInterrupted(TetherError):
    """The run stopped at a step boundary on Ctrl-C, with that step's checkpoint saved
    (:mod:`tether.runs.interrupt`); the command line exits with status 130."""
