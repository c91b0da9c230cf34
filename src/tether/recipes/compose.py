"""A method at run time: the recipe's catalogue entries, their parameters and their state.

The trainer hands :class:`Method` a dict of named inputs (the standard names of
DEVELOPERS.md: ``logprobs``, ``old_logprobs``, ``response_mask``, ``rewards``, ``group_ids`` ...);
each entry receives the inputs its signature asks for. Nothing here knows a method's name.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from tether.catalogue import get
from tether.catalogue.aggregate import Aggregation
from tether.catalogue.registry import Entry, Kind
from tether.config import ConfigError, _coerce
from tether.errors import TetherError
from tether.recipes.loader import Recipe

# Inputs produced inside the method pipeline (not by the world): rewards are reshaped by reward
# entries, advantages come from the advantage estimator.
PIPELINE_INPUTS = frozenset({"advantages"})


@dataclass
class StateWiring:
    """How a stateful entry's parameter is advanced after each optimizer step.

    ``param`` is the entry's parameter (or input) that holds the state (e.g. ``lagrange_multiplier``);
    the entry's registered ``state_update(current, **inputs, **params)`` gives its next value, with
    ``inputs`` mapping the update's argument names to metric names of the step.
    """

    param: str
    inputs: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Component:
    kind: Kind
    entry: Entry
    params: dict[str, Any]
    state: StateWiring | None = None

    @property
    def name(self) -> str:
        return self.entry.name


def _validate_params(entry: Entry, params: Mapping[str, Any], where: str) -> dict[str, Any]:
    allowed = entry.hyperparameters
    hints = typing.get_type_hints(entry.fn)
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key not in allowed:
            raise ConfigError(
                f"{where}: {entry.kind} {entry.name!r} has no parameter {key!r}; "
                f"its parameters are: {', '.join(sorted(allowed)) or '(none)'}"
            )
        if key == "aggregation":
            Aggregation(mode=value)  # validates the mode
            out[key] = value
            continue
        hint = hints.get(key, Any)
        out[key] = _coerce(f"{where}.{key}", value, hint) if hint is not Any else value
    return out


def _check_state_arguments(name: str, update: Any, state: StateWiring, where: str) -> None:
    """The state's ``inputs`` and ``params`` name arguments of the update, and give every one it requires."""
    arguments = list(inspect.signature(update).parameters.values())[1:]  # the first is the state itself
    if any(a.kind is a.VAR_KEYWORD for a in arguments):
        return
    names = {a.name for a in arguments}
    for section, given in (("inputs", state.inputs), ("params", state.params)):
        unknown = sorted(set(given) - names)
        if unknown:
            raise ConfigError(
                f"{where}.state.{section}: {', '.join(map(repr, unknown))} is not an argument of {name!r}'s state "
                f"update {update.__name__}; its arguments are: {', '.join(sorted(names))}"
            )
    missing = [
        a.name for a in arguments if a.default is a.empty and a.name not in state.inputs | state.params
    ]
    if missing:
        raise ConfigError(
            f"{where}.state: {name!r}'s state update {update.__name__} needs {', '.join(missing)}; give it in "
            "state.params (a number) or state.inputs (a metric name)"
        )


def build_component(kind: Kind, spec: Mapping[str, Any], where: str) -> Component:
    entry = get(kind, str(spec["name"]))
    params = _validate_params(entry, spec.get("params") or {}, where)
    state = None
    raw = spec.get("state")
    if raw is not None:
        if entry.state_update is None:
            raise ConfigError(f"{where}: {entry.name!r} has no registered state update; remove 'state'")
        if not isinstance(raw, Mapping) or "param" not in raw:
            raise ConfigError(
                f"{where}.state must be a mapping with 'param' (and 'init', 'inputs', 'params')"
            )
        param = str(raw["param"])
        if param not in inspect.signature(entry.fn).parameters:
            raise ConfigError(f"{where}.state.param {param!r} is not a parameter of {entry.name!r}")
        state = StateWiring(param, dict(raw.get("inputs") or {}), dict(raw.get("params") or {}))
        _check_state_arguments(entry.name, entry.state_update, state, where)
        if "init" in raw:
            params[param] = raw["init"]
        elif param in entry.hyperparameters:
            params.setdefault(param, entry.hyperparameters[param])
        else:
            raise ConfigError(f"{where}.state: {param!r} has no default; give its first value as state.init")
    return Component(kind=kind, entry=entry, params=params, state=state)


def call_entry(
    component: Component, inputs: Mapping[str, Any], aggregation: Aggregation | None = None
) -> tuple[Any, dict[str, torch.Tensor]]:
    """Call an entry with the inputs its signature names, its parameters and the aggregation."""
    entry = component.entry
    sig = entry.signature
    kwargs: dict[str, Any] = {}
    missing = [n for n in entry.inputs if n not in inputs and n not in component.params]
    if missing:
        raise TetherError(
            f"{entry.kind} {entry.name!r} needs inputs {missing} that this trainer did not provide"
        )
    for name, p in sig.parameters.items():
        if name in component.params:
            kwargs[name] = component.params[name]
        elif p.default is inspect.Parameter.empty or (p.default is None and name in inputs):
            kwargs[name] = inputs[name]
    if "aggregation" in sig.parameters and aggregation is not None:
        mode = component.params.get("aggregation", sig.parameters["aggregation"].default)
        mode = mode.mode if isinstance(mode, Aggregation) else mode
        kwargs["aggregation"] = Aggregation(
            mode=mode,
            num_tokens=aggregation.num_tokens,
            num_sequences=aggregation.num_sequences,
            norm_length=aggregation.norm_length,
        )
    out = entry.fn(**kwargs)
    return out[0], dict(out[1])


def _state_default_multiplier(entry: Entry, state_input: str) -> float:
    """The multiplier of an update rule's initial state (its state dataclass with no arguments)."""
    hint = typing.get_type_hints(entry.fn).get(state_input)
    for cls in typing.get_args(hint) or (hint,):
        if isinstance(cls, type) and hasattr(cls, "from_dict"):
            return float(cls.from_dict({}).multiplier)
    return 0.0


class Constraint:
    """A recipe's cost constraint J_c <= cost_limit: its multiplier rule, objective and trust region.

    - ``multiplier``: a ``constraint`` entry that is an update rule, ``fn(<state>, mean_cost, ...)
      -> (new state, metrics)`` (``lagrange_update``, ``pid_lagrange_update``,
      ``clipped_lagrange_update``); its JSON state lives here and is checkpointed with the method.
    - ``objective``: how the multiplier enters the policy, ``fn(advantages, cost_advantages,
      lagrange_multiplier, ...) -> (advantages, metrics)`` (``lagrangian_advantage``).
    - ``trust_region``: a constrained trust-region step (``cpo_step``) that the world's trainer
      drives instead of a first-order update.
    ``cost_limit`` (the recipe's, or the world's configuration when set) is written into every
    role whose entry takes a ``cost_limit`` parameter.
    """

    def __init__(self, spec: Mapping[str, Any], where: str, cost_limit: float | None = None) -> None:
        roles = {
            role: build_component("constraint", spec[role], f"{where}.{role}")
            for role in ("multiplier", "objective", "trust_region")
            if spec.get(role)
        }
        self.multiplier = roles.get("multiplier")
        self.objective = roles.get("objective")
        self.trust_region = roles.get("trust_region")
        limit = cost_limit if cost_limit is not None else spec.get("cost_limit")
        if limit is None:
            for c in roles.values():
                if "cost_limit" in c.params:
                    limit = c.params["cost_limit"]
                    break
        if limit is None:
            raise ConfigError(f"{where}: set the constraint's cost_limit (in the recipe or the config)")
        self.cost_limit = float(limit)
        for c in roles.values():
            if "cost_limit" in c.entry.hyperparameters:
                c.params["cost_limit"] = self.cost_limit
        self.state: dict[str, Any] = {}
        self._state_input = ""
        self.value = 0.0
        if self.multiplier is not None:
            others = [n for n in self.multiplier.entry.inputs if n != "mean_cost"]
            if "mean_cost" not in self.multiplier.entry.inputs or len(others) != 1:
                raise ConfigError(
                    f"{where}.multiplier: {self.multiplier.name!r} is not a multiplier update rule "
                    "(one takes its state and mean_cost), e.g. lagrange_update or pid_lagrange_update"
                )
            self._state_input = others[0]
            self.value = _state_default_multiplier(self.multiplier.entry, self._state_input)
        if self.objective is not None:
            needs = {"advantages", "cost_advantages", "lagrange_multiplier"}
            if not needs <= set(self.objective.entry.inputs):
                raise ConfigError(
                    f"{where}.objective: {self.objective.name!r} does not combine advantages, "
                    "cost_advantages and lagrange_multiplier; use lagrangian_advantage"
                )

    @property
    def components(self) -> list[Component]:
        return [c for c in (self.multiplier, self.objective, self.trust_region) if c is not None]

    def update(self, mean_cost: float) -> dict[str, torch.Tensor]:
        """Advance the multiplier with this epoch's mean episode cost J_c; returns the rule's metrics."""
        if self.multiplier is None:
            return {}
        new, metrics = call_entry(self.multiplier, {self._state_input: self.state, "mean_cost": mean_cost})
        self.state = new.as_dict() if hasattr(new, "as_dict") else dict(new)
        self.value = float(self.state["multiplier"])
        return metrics

    def combine(
        self, advantages: torch.Tensor, cost_advantages: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The policy's advantages under the current multiplier (the objective entry)."""
        if self.objective is None:
            return advantages, {}
        return call_entry(
            self.objective,
            {
                "advantages": advantages,
                "cost_advantages": cost_advantages,
                "lagrange_multiplier": self.value,
            },
        )

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.state, "value": self.value}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.state = dict(state.get("state") or {})
        self.value = float(state.get("value", self.value))


def check_shaping_is_read(name: str, rewards: list[Component], advantage: Component) -> None:
    """Refuse reward entries whose shaped ``rewards`` the advantage estimator does not read.

    Reward entries (``kl_in_reward``, ``dapo_overlong`` ...) replace ``rewards`` before the first
    entry of the advantage chain computes from it. An estimator that does not take ``rewards``, or
    takes it only for its metrics (``metric_only``, e.g. ``gdpo``, whose value comes from each
    reward function's ``reward_parts``), would drop the shaping without a word.
    """
    if not rewards or advantage.entry.reads("rewards"):
        return
    shaping = ", ".join(repr(c.name) for c in rewards)
    why = (
        "takes them only for its metrics"
        if "rewards" in advantage.entry.metric_only
        else f"does not take them (its inputs: {', '.join(advantage.entry.inputs)})"
    )
    raise ConfigError(
        f"{name}: the reward entries {shaping} reshape the rewards, but the advantage "
        f"{advantage.name!r} {why}, so the shaping would be silently ignored. Give the shaping as a "
        "reward function of the task instead (language-model world: task.rewards), a KL penalty as a "
        "KL regularizer (regularizers: [kl_k3]), or use an advantage that reads the shaped rewards "
        "(e.g. grpo, rloo)"
    )


def check_sampler_correction(recipe: Recipe, mode: str) -> None:
    """Refuse a recipe with an entry that cannot run under sampler importance weights.

    With a sampler correction (``mode`` other than ``"none"``, the language-model world's
    ``train.sampler_correction``) the trainer multiplies the advantages by the weights of
    :mod:`tether.catalogue.mismatch` after the advantage chain; an entry whose own formula needs
    them (it declares ``sampler_weights_conflict``, e.g. ``otb``) would silently run as if the
    sampler were exact.
    """
    if mode == "none":
        return
    specs: list[tuple[Kind, Mapping[str, Any]]] = [
        *(("reward", spec) for spec in recipe.rewards),
        *(("advantage", spec) for spec in recipe.advantage),
        ("policy_loss", recipe.policy_loss),
        *(("regularizer", spec) for spec in recipe.regularizers),
    ]
    for kind, spec in specs:
        entry = get(kind, str(spec["name"]))
        if entry.sampler_weights_conflict:
            raise ConfigError(
                f"train.sampler_correction={mode} cannot be used with recipe {recipe.name!r}: its {kind} "
                f"{entry.name!r} would ignore the sampler importance weights ({entry.sampler_weights_conflict}). "
                "Set train.sampler_correction=none (with an exact sampler, such as the built-in hf backend), "
                f"or use a recipe without {entry.name!r}"
            )


class Method:
    """The composed method of a recipe."""

    def __init__(self, recipe: Any, cost_limit: float | None = None) -> None:
        self.recipe = recipe
        name = getattr(recipe, "name", "recipe")
        spec = getattr(recipe, "constraint", None)
        self.constraint = Constraint(spec, f"{name}.constraint", cost_limit) if spec else None
        self.rewards = [
            build_component("reward", spec, f"{name}.rewards[{i}]") for i, spec in enumerate(recipe.rewards)
        ]
        self.advantages = [
            build_component("advantage", spec, f"{name}.advantage[{i}]")
            for i, spec in enumerate(recipe.advantage)
        ]
        if not self.advantages:
            raise ConfigError(f"{name}: a recipe needs an advantage estimator")
        check_shaping_is_read(name, self.rewards, self.advantages[0])
        self.policy_loss = build_component("policy_loss", recipe.policy_loss, f"{name}.policy_loss")
        self.regularizers = [
            build_component("regularizer", spec, f"{name}.regularizers[{i}]")
            for i, spec in enumerate(recipe.regularizers)
        ]

    @property
    def components(self) -> list[Component]:
        return [*self.rewards, *self.advantages, self.policy_loss, *self.regularizers]

    def required_inputs(self) -> set[str]:
        """Every input name some component needs from the world."""
        names: set[str] = set()
        for c in self.components:
            names.update(n for n in c.entry.inputs if n not in c.params)
        return names - PIPELINE_INPUTS

    def check_inputs(self, available: set[str], world: str) -> None:
        """Fail before any work when a component needs an input the world cannot provide."""
        for c in self.components:
            missing = sorted(set(c.entry.inputs) - set(c.params) - PIPELINE_INPUTS - available)
            if missing:
                raise TetherError(
                    f"{c.kind} {c.name!r} needs {missing}, which the {world} trainer does not provide. "
                    f"It provides: {', '.join(sorted(available))}."
                )

    def shape_rewards(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Apply the reward entries in order, updating ``inputs['rewards']``."""
        metrics: dict[str, torch.Tensor] = {}
        for c in self.rewards:
            rewards, m = call_entry(c, inputs)
            inputs["rewards"] = rewards
            metrics.update(m)
        return metrics

    def compute_advantages(self, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run the advantage chain: the first entry computes, later ones transform ``advantages``."""
        metrics: dict[str, torch.Tensor] = {}
        staged = dict(inputs)
        for c in self.advantages:
            adv, m = call_entry(c, staged)
            staged["advantages"] = adv
            metrics.update(m)
        return staged["advantages"], metrics

    def loss(
        self, inputs: Mapping[str, Any], aggregation: Aggregation | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Policy loss plus every regularizer term."""
        loss, metrics = call_entry(self.policy_loss, inputs, aggregation)
        for c in self.regularizers:
            term, m = call_entry(c, inputs, aggregation)
            loss = loss + term
            metrics.update(m)
        return loss, metrics

    def update_state(self, metrics: Mapping[str, float]) -> None:
        """Advance stateful parameters after an optimizer step, from the step's metrics."""
        for c in self.components:
            if c.state is None or c.entry.state_update is None:
                continue
            kwargs = dict(c.state.params)
            for arg, metric in c.state.inputs.items():
                if metric not in metrics:
                    raise TetherError(
                        f"state of {c.name!r} reads metric {metric!r}, which the step did not log"
                    )
                kwargs[arg] = float(metrics[metric])
            c.params[c.state.param] = c.entry.state_update(c.params[c.state.param], **kwargs)

    def state_dict(self) -> dict[str, Any]:
        out = {f"{i}:{c.name}": c.params[c.state.param] for i, c in enumerate(self.components) if c.state}
        if self.constraint is not None:
            out["constraint"] = self.constraint.state_dict()
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.constraint is not None and "constraint" in state:
            self.constraint.load_state_dict(state["constraint"])
        for i, c in enumerate(self.components):
            key = f"{i}:{c.name}"
            if c.state and key in state:
                c.params[c.state.param] = state[key]
