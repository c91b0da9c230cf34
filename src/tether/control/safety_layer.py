"""Safety layer (Dalal et al. 2018): a learned linear cost model and an action-projection wrapper.

Paper: Dalal, Dvijotham, Vecerik, Hester, Paduraru, Tassa, "Safe Exploration in Continuous Action
Spaces", arXiv 1801.08757 (card control#A5). The layer sits between any policy and the environment:

1. Pretraining on random exploration: :func:`collect_transitions` plays uniformly random actions and
   records (s, a, c(s), c(s')); :func:`fit_cost_model` fits g(s; w) by minimizing
   E[(c_i(s') - c_i(s) - g_i(s)^T a)^2] for every constraint i.
2. Filtering: :class:`SafetyLayer` replaces each incoming action mu by
   argmin_a 1/2 ||a - mu||^2 s.t. c_i(s) + g_i(s)^T a <= C_i, through the catalogue entry
   ``constraint/action_projection`` (the paper's closed form, or the exact QP), within the action box.

Constraint-signal API: an environment that wants a safety layer reports ``info["constraint"]``, a
float array [K] of the constraint values c_i(s) of the *current* state (safe when c_i(s) <= C_i),
after ``reset`` and after every ``step``. ``tether/PointHazard-v0`` (hazard distances) and
``tether/PointWall-v0`` (the card's wall, c(s) = position) report it.

The wrapper needs nothing from the policy, so it works with any agent (even a random one) and inside
``gymnasium.make_vec(..., wrappers=[lambda env: SafetyLayer(env, model)])``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, SupportsFloat

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from torch import nn

from tether.catalogue.constraints.projection import action_projection
from tether.control.policy import mlp
from tether.errors import TetherError

__all__ = [
    "CONSTRAINT_KEY",
    "LinearCostModel",
    "SafetyLayer",
    "Transitions",
    "collect_transitions",
    "fit_cost_model",
    "read_constraint",
]

#: The info key of the constraint-signal API.
CONSTRAINT_KEY = "constraint"

Solver = Literal["closed_form", "qp"]
AnyEnv = gym.Env[Any, Any]


def read_constraint(info: dict[str, Any], expected: int | None = None) -> np.ndarray:
    """``info["constraint"]`` as a float64 [K] array; a clear error when it is missing or has K != expected."""
    if CONSTRAINT_KEY not in info:
        raise TetherError(
            'the environment does not report info["constraint"], which a safety layer needs: make it '
            'return info["constraint"] = np.array([c_1(s), ..., c_K(s)]) (the constraint values of the '
            "current state, safe when c_i(s) <= limit_i) after reset() and after every step(), as "
            "tether/PointHazard-v0 and tether/PointWall-v0 do"
        )
    values = np.asarray(info[CONSTRAINT_KEY], dtype=np.float64).reshape(-1)
    if expected is not None and values.shape[0] != expected:
        raise TetherError(
            f'info["constraint"] has {values.shape[0]} values but the cost model predicts {expected} '
            "constraints; fit the model on this environment (SafetyLayer.from_env) or build "
            f"LinearCostModel with num_constraints={values.shape[0]}"
        )
    return values


def _box(space: spaces.Space[Any]) -> spaces.Box:
    if not isinstance(space, spaces.Box) or len(space.shape) != 1:
        raise TetherError(
            f"a safety layer needs a flat Box action space (continuous actions), got {space}; "
            "flatten the actions with a wrapper or use a continuous-action environment"
        )
    return space


def _flat_obs_dim(space: spaces.Space[Any]) -> int:
    if not isinstance(space, spaces.Box) or len(space.shape) != 1:
        raise TetherError(
            f"the cost model needs a flat Box observation space, got {space}; flatten the observations "
            "with gymnasium.wrappers.FlattenObservation"
        )
    return int(space.shape[0])


# --------------------------------------------------------------------------- the cost model


class LinearCostModel(nn.Module):
    """g(s; w): one action-vector per constraint, c_i(s') ~ c_i(s) + g_i(s)^T a.

    The paper trains one network per constraint; here a single tanh MLP with K * A outputs holds all
    of them (the same model class, with shared hidden layers). ``forward`` maps observations [B, obs]
    to gradients [B, K, A]. Hidden sizes are ours (the card gives none); the output layer starts small
    (orthogonal, gain 0.1).
    """

    def __init__(
        self, obs_dim: int, action_dim: int, num_constraints: int, hidden: Sequence[int] = (64, 64)
    ) -> None:
        super().__init__()
        if min(obs_dim, action_dim, num_constraints) < 1:
            raise TetherError(
                f"LinearCostModel needs obs_dim, action_dim and num_constraints >= 1, got "
                f"{obs_dim}, {action_dim}, {num_constraints}"
            )
        self.obs_dim = int(obs_dim)
        self.action_dim = int(action_dim)
        self.num_constraints = int(num_constraints)
        self.net = mlp(self.obs_dim, self.num_constraints * self.action_dim, hidden, out_std=0.1)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(obs.to(torch.float32))
        return out.reshape(*obs.shape[:-1], self.num_constraints, self.action_dim)

    def predict(self, obs: torch.Tensor, actions: torch.Tensor, constraints: torch.Tensor) -> torch.Tensor:
        """Predicted next constraint values c(s) + g(s)^T a, [B, K]."""
        grads = self(obs)
        out: torch.Tensor = constraints.to(grads.dtype) + (
            grads @ actions.to(grads.dtype).unsqueeze(-1)
        ).squeeze(-1)
        return out


# --------------------------------------------------------------------------- pretraining data


@dataclass
class Transitions:
    """Random-exploration data: observations [N, obs], actions [N, A], c(s) and c(s') [N, K]."""

    observations: torch.Tensor
    actions: torch.Tensor
    constraints: torch.Tensor
    next_constraints: torch.Tensor

    def __len__(self) -> int:
        return int(self.actions.shape[0])


def collect_transitions(env: AnyEnv, steps: int, seed: int = 0) -> Transitions:
    """Play ``steps`` uniformly random actions (the paper's pretraining) and record (s, a, c(s), c(s')).

    The env is reset with ``seed`` and again (unseeded, so deterministically) whenever an episode
    ends; actions are drawn uniformly from the action box with ``numpy.random.default_rng(seed)``.
    """
    if steps < 1:
        raise TetherError(f"collect_transitions needs steps >= 1, got {steps}")
    box = _box(env.action_space)
    low, high = np.asarray(box.low, np.float64), np.asarray(box.high, np.float64)
    if not (np.isfinite(low).all() and np.isfinite(high).all()):
        raise TetherError(
            f"uniformly random exploration needs a bounded action box, got low {low} and high {high}; "
            "wrap the env with gymnasium.wrappers.ClipAction or RescaleAction"
        )
    rng = np.random.default_rng(seed)
    obs, info = env.reset(seed=seed)
    constraint = read_constraint(info)
    k = constraint.shape[0]
    observations, actions, constraints, next_constraints = [], [], [], []
    for _ in range(steps):
        action = rng.uniform(low, high).astype(box.dtype)
        next_obs, _, terminated, truncated, info = env.step(action)
        next_constraint = read_constraint(info, k)
        observations.append(np.asarray(obs, np.float32).reshape(-1))
        actions.append(np.asarray(action, np.float64))
        constraints.append(constraint)
        next_constraints.append(next_constraint)
        if terminated or truncated:
            obs, info = env.reset()
            constraint = read_constraint(info, k)
        else:
            obs, constraint = next_obs, next_constraint
    return Transitions(
        observations=torch.as_tensor(np.stack(observations)),
        actions=torch.as_tensor(np.stack(actions), dtype=torch.float32),
        constraints=torch.as_tensor(np.stack(constraints), dtype=torch.float32),
        next_constraints=torch.as_tensor(np.stack(next_constraints), dtype=torch.float32),
    )


def cost_model_loss(model: LinearCostModel, data: Transitions) -> torch.Tensor:
    """Mean over samples and constraints of (c_i(s') - c_i(s) - g_i(s)^T a)^2."""
    predicted = model.predict(data.observations, data.actions, data.constraints)
    return ((data.next_constraints.to(predicted.dtype) - predicted) ** 2).mean()


def fit_cost_model(
    model: LinearCostModel,
    data: Transitions,
    epochs: int = 30,
    lr: float = 3e-3,
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Fit g(s; w) with Adam on E[(c(s') - c(s) - g(s)^T a)^2]; returns the final loss on all of ``data``.

    Minibatches are shuffled with ``torch.Generator().manual_seed(seed)``. Defaults are ours.
    """
    if epochs < 0 or batch_size < 1 or lr <= 0:
        raise TetherError(
            f"fit_cost_model needs epochs >= 0, batch_size >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}"
        )
    k, a = data.constraints.shape[1], data.actions.shape[1]
    if (k, a, data.observations.shape[1]) != (model.num_constraints, model.action_dim, model.obs_dim):
        raise TetherError(
            f"data has {data.observations.shape[1]} observation dims, {a} action dims and {k} constraints "
            f"but the model expects {model.obs_dim}, {model.action_dim} and {model.num_constraints}; "
            "build LinearCostModel from the same environment"
        )
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    n = len(data)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            batch = Transitions(
                data.observations[idx], data.actions[idx], data.constraints[idx], data.next_constraints[idx]
            )
            loss = cost_model_loss(model, batch)
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
    with torch.no_grad():
        return float(cost_model_loss(model, data))


# --------------------------------------------------------------------------- the wrapper


class SafetyLayer(gym.Wrapper[Any, Any, Any, Any]):
    """Projects every incoming action onto the linearized constraints before the env sees it.

    On each step: read c(s) from the last info, compute g(s) with ``model`` from the last observation,
    clip the incoming action mu to the action box (what the env would apply), and replace it by
    ``action_projection(mu, g(s), c(s), limits, solver, low, high)``. An action that satisfies the
    linearized constraints is passed on exactly as given. The step's info gets
    ``safety_layer/corrected`` (bool) and ``safety_layer/correction`` (||a* - mu||, 0.0 after reset).

    ``limits`` are the C_i (a float or one per constraint; default 0, as for the tether point tasks).
    ``solver`` is ``"closed_form"`` (the paper's single-active-constraint rule) or ``"qp"`` (exact with
    several active constraints). Use :meth:`from_env` to collect data, fit the model and wrap in one go.
    """

    def __init__(
        self,
        env: AnyEnv,
        model: LinearCostModel,
        limits: float | Sequence[float] = 0.0,
        solver: Solver = "closed_form",
    ) -> None:
        super().__init__(env)
        box = _box(env.action_space)
        if solver not in ("closed_form", "qp"):
            raise TetherError(f"SafetyLayer solver must be 'closed_form' or 'qp', got {solver!r}")
        if model.action_dim != int(box.shape[0]):
            raise TetherError(
                f"the cost model predicts {model.action_dim}-dimensional action vectors but the env's "
                f"actions have {box.shape[0]} dimensions; fit the model on this environment"
            )
        limit_array = np.broadcast_to(np.asarray(limits, np.float64), (model.num_constraints,)).copy()
        if not np.isfinite(limit_array).all():
            raise TetherError(f"SafetyLayer limits must be finite, got {limits}")
        self.model = model
        self.solver: Solver = solver
        self.limits = limit_array
        self.fit_loss: float | None = None
        self._low = torch.as_tensor(np.asarray(box.low, np.float64))
        self._high = torch.as_tensor(np.asarray(box.high, np.float64))
        self._obs: Any = None
        self._constraint: np.ndarray | None = None

    @classmethod
    def from_env(
        cls,
        env: AnyEnv,
        *,
        steps: int = 5000,
        epochs: int = 30,
        seed: int = 0,
        limits: float | Sequence[float] = 0.0,
        solver: Solver = "closed_form",
        hidden: Sequence[int] = (64, 64),
        lr: float = 3e-3,
        batch_size: int = 256,
    ) -> SafetyLayer:
        """Collect ``steps`` random transitions on ``env``, fit a :class:`LinearCostModel`, wrap ``env``.

        The fitted loss is kept as ``fit_loss``. Reset the returned wrapper before stepping it.
        """
        data = collect_transitions(env, steps, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LinearCostModel(
                _flat_obs_dim(env.observation_space),
                data.actions.shape[1],
                data.constraints.shape[1],
                hidden,
            )
        loss = fit_cost_model(model, data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
        layer = cls(env, model, limits=limits, solver=solver)
        layer.fit_loss = loss
        return layer

    def _remember(self, obs: Any, info: dict[str, Any]) -> None:
        self._obs = obs
        self._constraint = read_constraint(info, self.model.num_constraints)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed, options=options)
        self._remember(obs, info)
        info = dict(info)
        info["safety_layer/corrected"] = False
        info["safety_layer/correction"] = 0.0
        return obs, info

    def project(self, action: Any) -> tuple[Any, bool, float]:
        """The action to apply now, whether it differs from ``action`` (clipped to the box), and ||a* - mu||."""
        if self._constraint is None:
            raise TetherError(
                "SafetyLayer: call reset() before step(); it reads the constraint values from reset's info"
            )
        mu = torch.as_tensor(np.asarray(action, np.float64).reshape(1, -1))
        mu = torch.maximum(torch.minimum(mu, self._high), self._low)
        with torch.no_grad():
            obs = torch.as_tensor(np.asarray(self._obs, np.float32).reshape(1, -1))
            grads = self.model(obs).to(torch.float64)
        # Fast path (same result): a mu that satisfies every linearized constraint passes unchanged.
        predicted = self._constraint + grads[0].numpy() @ mu[0].numpy()
        if bool(np.all(predicted <= self.limits)):
            return action, False, 0.0
        safe, _ = action_projection(
            mu,
            grads,
            torch.as_tensor(self._constraint).reshape(1, -1),
            limits=torch.as_tensor(self.limits),
            solver=self.solver,
            low=self._low,
            high=self._high,
        )
        correction = float((safe - mu).norm())
        if correction == 0.0:
            return action, False, 0.0
        out = safe[0].numpy().astype(self.env.action_space.dtype)
        return out, True, correction

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        applied, corrected, correction = self.project(action)
        obs, reward, terminated, truncated, info = self.env.step(applied)
        self._remember(obs, info)
        info = dict(info)
        info["safety_layer/corrected"] = corrected
        info["safety_layer/correction"] = correction
        return obs, reward, terminated, truncated, info
