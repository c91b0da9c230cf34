"""Control world: Gymnasium / MuJoCo tasks with a cost signal.

Every environment of this world reports a per-step ``cost`` (float) in ``info``; the
episode's total cost is added as ``info["episode_cost"]`` on the step that ends it
(:class:`~tether.control.envs.CostInfo`). Importing this package registers the ``tether/...``
Gymnasium ids (:func:`~tether.control.envs.register_envs`, idempotent):

- ``tether/SafeHopperVelocity-v0``, ``tether/SafeWalker2dVelocity-v0``,
  ``tether/SafeHalfCheetahVelocity-v0``, ``tether/SafeSwimmerVelocity-v0``,
  ``tether/SafeAntVelocity-v0``, ``tether/SafeHumanoidVelocity-v0``: MuJoCo v5 tasks with
  Safety-Gymnasium's velocity cost;
- ``tether/SafeCartPole-v0``: CartPole-v1 with a forbidden region for the cart;
- ``tether/SafePendulum-v0``: Pendulum-v1 with a torque budget;
- ``tether/PointHazard-v0``: a fast NumPy point-mass navigation task with hazards.
"""

from __future__ import annotations

from tether.control.envs import (
    COST_LIMIT,
    VELOCITY_THRESHOLDS,
    CostInfo,
    ForbiddenRegionCartPole,
    PointHazardEnv,
    TorqueBudgetPendulum,
    VelocityCost,
    make_env,
    make_vec_env,
    register_envs,
)

register_envs()

__all__ = [
    "COST_LIMIT",
    "VELOCITY_THRESHOLDS",
    "CostInfo",
    "ForbiddenRegionCartPole",
    "PointHazardEnv",
    "TorqueBudgetPendulum",
    "VelocityCost",
    "make_env",
    "make_vec_env",
    "register_envs",
]
