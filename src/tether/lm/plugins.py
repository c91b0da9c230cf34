"""Loop plugins: the parts of a method that live in the training loop, not in one batch of tensors.

Prompt samplers (Knapsack budgets, SPO's prioritised prompts), rollout injections (Scaf-GRPO's
hints), bookkeeping that feeds catalogue inputs (RiskPO bundles, SPO trackers), schedules
(D^3S down-sampling) and extra loss terms (DYPO's SFT route) enter the RL loop through these
hooks. A recipe lists its plugins under ``loop:``; the trainer calls every hook of every plugin
in order and never branches on a plugin's name. Each hook has a do-nothing default.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from tether.errors import TetherError, UnknownNameError
from tether.lm.rollout import RolloutBatch
from tether.lm.tasks.base import Prompt, Score

if TYPE_CHECKING:
    from tether.lm.trainer import RLTrainer


@dataclass
class Rollout:
    """One step's samples: one prompt and one score per row, and the group of each row."""

    prompts: list[Prompt]
    batch: RolloutBatch
    scores: list[Score]
    group_ids: torch.Tensor  # [N] long: rows of the same prompt share an id
    rounds: int = 1
    dropped_groups: int = 0
    extras: dict[str, Any] | None = None  # plugin-owned per-row data

    def __len__(self) -> int:
        return len(self.batch)

    @property
    def scored(self) -> torch.Tensor:
        """[N] bool: rows whose verifier gave a score (a failed verification has no reward)."""
        return torch.tensor([s.error is None for s in self.scores], dtype=torch.bool)


class LoopPlugin:
    """Base class of loop plugins. Override the hooks you need."""

    name = "plugin"
    provides: tuple[str, ...] = ()  # catalogue inputs this plugin adds in extra_inputs
    paper = ""
    arxiv = ""
    status = "exact"

    def plan(self, trainer: RLTrainer, n: int, group_size: int) -> list[tuple[Prompt, int]] | None:
        """Prompts for the next rollout and the number of samples of each (None: the default stream)."""
        return None

    def after_rollout(self, trainer: RLTrainer, rollout: Rollout) -> Rollout:
        """Inspect or rewrite the scored rollout (e.g. inject hinted samples)."""
        return rollout

    def extra_inputs(self, trainer: RLTrainer, rollout: Rollout, inputs: dict[str, Any]) -> None:
        """Add catalogue inputs (by standard or method-specific name) before advantages."""

    def after_advantages(self, trainer: RLTrainer, rollout: Rollout, inputs: dict[str, Any]) -> None:
        """Adjust inputs once advantages are known (e.g. a token-selection mask)."""

    def extra_loss(
        self, trainer: RLTrainer, rollout: Rollout, rows: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]] | None:
        """An extra loss term for the mini-batch ``rows`` (added before backward)."""
        return None

    def after_step(
        self, trainer: RLTrainer, rollout: Rollout, inputs: dict[str, Any], metrics: dict[str, float]
    ) -> None:
        """Update internal state from the finished step; may add metrics."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


P = TypeVar("P", bound=type[LoopPlugin])
_PLUGINS: dict[str, type[LoopPlugin]] = {}


def register_plugin(name: str) -> Callable[[P], P]:
    def deco(cls: P) -> P:
        if name in _PLUGINS:
            raise TetherError(f"loop plugin {name!r} registered twice")
        cls.name = name
        _PLUGINS[name] = cls
        return cls

    return deco


def plugin_names() -> list[str]:
    _load()
    return sorted(_PLUGINS)


def get_plugin_class(name: str) -> type[LoopPlugin]:
    _load()
    if name not in _PLUGINS:
        close = difflib.get_close_matches(name, list(_PLUGINS), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownNameError(f"unknown loop plugin {name!r}.{hint} Plugins: {', '.join(sorted(_PLUGINS))}")
    return _PLUGINS[name]


def build_plugin(name: str, params: dict[str, Any]) -> LoopPlugin:
    cls = get_plugin_class(name)
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise TetherError(
            f"loop plugin {name!r} has no parameter(s) {unknown}; its parameters: {', '.join(allowed)}"
        )
    try:
        return cls(**params)
    except (TypeError, ValueError) as err:
        raise TetherError(f"loop plugin {name!r}: {err}") from None


def _load() -> None:
    import importlib
    import pkgutil

    import tether.lm.loop as package

    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")
