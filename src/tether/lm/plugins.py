"""Loop plugins: the parts of a method that live in the training loop, not in one batch of tensors.

Prompt samplers (Knapsack budgets, SPO's prioritised prompts), rollout injections (Scaf-GRPO's
hints), bookkeeping that feeds catalogue inputs (RiskPO bundles, SPO trackers), schedules
(D^3S down-sampling) and extra loss terms (DYPO's SFT route) enter the RL loop through these
hooks. A recipe lists its plugins under ``loop:``; the trainer calls every hook of every plugin
in order and never branches on a plugin's name. Each hook has a do-nothing default.

A plugin's parameters are its constructor's; ``method.<plugin>.<param>=value`` overrides them like
those of any component. A constructor checks them with :func:`check_param`, so a bad value stops
the run at load (``tether train --dry-run`` included), naming the setting and its allowed range.
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
    from tether.lm.config import LMConfig
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

    def prompt_count(self, rows: torch.Tensor) -> float:
        """Prompts (groups) among ``rows`` with at least one scored sample, at least 1: the count E_q
        averages over in a mini-batch (the trainer's ``num_prompts`` input)."""
        scored = self.scored[rows]
        return float(max(self.group_ids[rows][scored].unique().numel(), 1))


class PluginParameterError(ValueError):
    """A loop plugin's parameter is out of its range (raised by :func:`check_param`)."""

    def __init__(self, param: str, value: Any, allowed: str) -> None:
        super().__init__(f"{param}={value!r}: {allowed}")
        self.param, self.value, self.allowed = param, value, allowed


def check_param(ok: bool, param: str, value: Any, allowed: str) -> None:
    """Refuse ``param=value`` unless ``ok``; ``allowed`` says what is (e.g. "must be in (0, 1]")."""
    if not ok:
        raise PluginParameterError(param, value, allowed)


class LoopPlugin:
    """Base class of loop plugins. Override the hooks you need.

    Class attributes the trainer reads (all checked or used before any work):

    - ``provides``: catalogue inputs this plugin adds in ``extra_inputs``; ``per_row``: those of them
      that hold one value per rollout row (the trainer slices exactly these, with the standard per-row
      inputs, to the scored rows and to each micro-batch; every other input passes whole).
    - ``whole_groups``: the plugin's math needs every row of a group in the same mini-batch and
      micro-batch (as does any policy loss or regularizer that takes ``group_ids``); the trainer then
      shuffles and splits at group boundaries.
    - ``dynamic_sampling_conflict``: why the plugin cannot run with ``train.dynamic_sampling`` (which
      drops equal-reward groups before the plugin sees them); empty when it can.
    - ``shared_params``: parameter -> names of components that have a parameter of the same name and
      meaning; a recipe or override that gives them different values is refused at load.
    """

    name = "plugin"
    provides: tuple[str, ...] = ()  # catalogue inputs this plugin adds in extra_inputs
    per_row: tuple[str, ...] = ()  # those of them with one value per row
    whole_groups: bool = False
    dynamic_sampling_conflict: str = ""
    shared_params: dict[str, tuple[str, ...]] = {}  # noqa: RUF012 (read-only class data)
    paper = ""
    arxiv = ""
    status = "exact"

    def check_config(self, config: LMConfig) -> None:
        """Refuse (with a TetherError) settings of the run this plugin cannot work with; called at load."""

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
        self, trainer: RLTrainer, rollout: Rollout, rows: torch.Tensor, minibatch: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]] | None:
        """An extra loss term: the part of the mini-batch ``minibatch``'s term that comes from its
        micro-batch ``rows``, normalised with counts of the whole mini-batch (like a catalogue loss
        under a global Aggregation), so the parts of the micro-batches add up to the mini-batch's term
        whatever the split. The trainer adds it to the micro-batch's loss as it is, before backward."""
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


def plugin_parameters(name: str) -> list[str]:
    """The parameters of loop plugin ``name`` (its constructor's)."""
    return [p for p in inspect.signature(get_plugin_class(name).__init__).parameters if p != "self"]


def build_plugin(name: str, params: dict[str, Any]) -> LoopPlugin:
    cls = get_plugin_class(name)
    allowed = plugin_parameters(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise TetherError(
            f"loop plugin {name!r} has no parameter(s) {unknown}; its parameters: {', '.join(allowed)}"
        )
    try:
        return cls(**params)
    except PluginParameterError as err:
        raise TetherError(
            f"loop plugin {name!r}: method.{name}.{err.param}={err.value!r} {err.allowed} "
            f"(set it in the recipe's loop entry {name!r} or with method.{name}.{err.param}=...)"
        ) from None
    except (TypeError, ValueError) as err:
        raise TetherError(f"loop plugin {name!r}: {err}") from None


def _load() -> None:
    import importlib
    import pkgutil

    import tether.lm.loop as package

    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")
