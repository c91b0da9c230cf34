"""Example inputs for the constraint entries (merged into inputs.MAKERS).

- ``cost_advantages``: [B] like ``advantages`` (so ``lagrangian_advantage`` gets matching shapes).
- ``lagrange_multiplier``: a float multiplier (state), 0 to 5 (extreme specs: up to 1e4).
- ``mean_cost``: J_c, a float around the default cost limit 25 (a 0-dim tensor on odd seeds).
- ``lagrange_state`` / ``pid_lagrange_state``: update-rule states, as dataclasses or as their JSON
  dicts (even / odd seeds), mid-run values so every branch (clamps, derivative) is exercised.
- ``actions`` [B, A] (A = tokens), ``constraint_gradients`` [B, K, A] (K = group_size, so K > A
  happens and some rows are jointly infeasible; the all-padding row's gradients are all zero and on
  odd seeds constraint 0 has g = 0 everywhere) and ``constraint_values`` [B, K]: safety-layer inputs;
  extreme specs scale them by 1e3.
- ``reward_gradient`` / ``cost_gradient`` / ``hinv_reward_gradient`` / ``hinv_cost_gradient``: flat
  vectors of one length for ``cpo_step``, with H^-1 g and H^-1 b solved from one random SPD matrix;
  extreme specs use a near-singular H and, on even seeds, a vanishing cost gradient (case 4).
- ``cost_excess``: c = J_c - d, either sign, from ~1e-3 to ~1e2 in size so all of CPO's cases 0..4
  occur (a 0-dim tensor on odd seeds).
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


def _scale(c: Ctx) -> float:
    return 1e3 if c.spec.extreme else 1.0


def _constraint_gradients(c: Ctx) -> torch.Tensor:
    batch, action_dim = c.get("actions").shape
    grads = c.randn(batch, c.spec.group_size, action_dim) * _scale(c)
    if c.spec.all_padding_row:
        grads[-1] = 0.0  # the g^T g == 0 guard
    if c.spec.seed % 2:
        grads[:, 0] = 0.0
    return grads


def _cpo_problem(c: Ctx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(H, g, b) shared by the four cpo_step vectors: H symmetric positive definite."""
    if "_cpo_problem" not in c.cache:
        n = c.spec.tokens + 2
        m = c.randn(n, n)
        h = m @ m.T + (1e-6 if c.spec.extreme else 0.1) * torch.eye(n, dtype=torch.float64)
        g = c.randn(n)
        b = c.randn(n) * (1e-5 if c.spec.extreme and c.spec.seed % 2 == 0 else 1.0)
        c.cache["_cpo_problem"] = (h, g, b)
    problem: tuple[torch.Tensor, torch.Tensor, torch.Tensor] = c.cache["_cpo_problem"]
    return problem


def _cost_excess(c: Ctx) -> Any:
    exponent = int(float(c.rand(1).item()) * 6) - 3  # |c| from ~1e-3 to ~1e2
    value = float(c.randn(1).item()) * 10.0**exponent
    return torch.tensor(value, dtype=torch.float64) if c.spec.seed % 2 else value


MAKERS: dict[str, Maker] = {
    "cost_advantages": lambda c: c.randn(c.spec.batch),
    "lagrange_multiplier": _multiplier,
    "mean_cost": _mean_cost,
    "lagrange_state": _lagrange_state,
    "pid_lagrange_state": _pid_state,
    "actions": lambda c: c.randn(c.spec.batch, c.spec.tokens) * _scale(c),
    "constraint_gradients": _constraint_gradients,
    "constraint_values": lambda c: c.randn(*c.get("constraint_gradients").shape[:2]) * _scale(c),
    "reward_gradient": lambda c: _cpo_problem(c)[1],
    "cost_gradient": lambda c: _cpo_problem(c)[2],
    "hinv_reward_gradient": lambda c: torch.linalg.solve(_cpo_problem(c)[0], _cpo_problem(c)[1]),
    "hinv_cost_gradient": lambda c: torch.linalg.solve(_cpo_problem(c)[0], _cpo_problem(c)[2]),
    "cost_excess": _cost_excess,
}
