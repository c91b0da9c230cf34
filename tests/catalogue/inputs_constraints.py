"""Example inputs for the constraint entries (merged into inputs.MAKERS).

- ``cost_advantages``: [B] like ``advantages`` (so ``lagrangian_advantage`` gets matching shapes).
- ``lagrange_multiplier``: a float multiplier (state), 0 to 5 (extreme specs: up to 1e4).
- ``mean_cost``: J_c, a float around the default cost limit 25 (a 0-dim tensor on odd seeds).
- ``lagrange_state`` / ``pid_lagrange_state``: update-rule states, as dataclasses or as their JSON
  dicts (even / odd seeds), mid-run values so every branch (clamps, derivative) is exercised.
"""

from __future__ import annotations

from typing import Any

import torch

from tests.catalogue.inputs import Ctx, Maker
from tether.catalogue.constraints.lagrange import LagrangeState, PIDLagrangeState


def _multiplier(c: Ctx) -> float:
    return float(c.rand(1).item()) * (1e4 if c.spec.extreme else 5.0)


def _mean_cost(c: Ctx) -> Any:
    value = float(c.rand(1).item()) * 50.0
    return torch.tensor(value, dtype=torch.float64) if c.spec.seed % 2 else value


def _lagrange_state(c: Ctx) -> Any:
    state = LagrangeState(
        multiplier=float(c.rand(1).item()) * 2.0, adam_m=float(c.randn(1).item()), adam_v=1.0, step=3
    )
    return state.as_dict() if c.spec.seed % 2 else state


def _pid_state(c: Ctx) -> Any:
    history = tuple(float(v) for v in (c.rand(c.spec.tokens) * 40.0))
    state = PIDLagrangeState(
        multiplier=0.5,
        integral=float(c.rand(1).item()),
        delta_p=float(c.randn(1).item()),
        cost_d=float(c.rand(1).item()) * 40.0,
        cost_d_history=history,
    )
    return state.as_dict() if c.spec.seed % 2 else state


MAKERS: dict[str, Maker] = {
    "cost_advantages": lambda c: c.randn(c.spec.batch),
    "lagrange_multiplier": _multiplier,
    "mean_cost": _mean_cost,
    "lagrange_state": _lagrange_state,
    "pid_lagrange_state": _pid_state,
}
