"""Environments with a cost signal, their registration and constructors.

Cost-signal API: every environment of the control world reports a per-step cost (float)
as ``info["cost"]`` after ``step`` (and ``0.0`` after ``reset``). :class:`CostInfo`
guarantees the key (0.0 when the wrapped env has none) and adds
``info["episode_cost"]`` (the sum of the episode's costs) on the step where the episode
terminates or is truncated. The cost wrappers below add their cost to any cost already in
``info``, so they compose.

Cost wrappers for tasks that have none:

- :class:`VelocityCost`: Safety-Gymnasium's velocity tasks, cost 1 when the speed exceeds a
  threshold (``VELOCITY_THRESHOLDS``; cost limit 25 per 1000-step episode).
- :class:`ForbiddenRegionCartPole`: CartPole with cost 1 while the cart is in a forbidden
  interval of the track.
- :class:`TorqueBudgetPendulum`: Pendulum with a cost on torque beyond a budget.

Plus :class:`PointHazardEnv`, a NumPy 2-D point-mass navigation task with circular hazards,
and :func:`make_env` / :func:`make_vec_env`, which build any registered Gymnasium id with
the cost API and optional observation / reward normalization.
"""

from __future__ import annotations

import copy
import hashlib
import math
import pickle
import types
from collections import deque
from collections.abc import Sequence
from typing import Any, Literal, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.envs.registration import WrapperSpec

from tether.errors import InvalidInputError

__all__ = [
    "COST_LIMIT",
    "VELOCITY_THRESHOLDS",
    "CostInfo",
    "ForbiddenRegionCartPole",
    "PointHazardEnv",
    "PointWallEnv",
    "TorqueBudgetPendulum",
    "VelocityCost",
    "make_env",
    "make_vec_env",
    "register_envs",
]

#: Safety-Gymnasium's cost limit for the velocity tasks (per 1000-step episode).
COST_LIMIT = 25.0

#: Safety-Gymnasium's velocity thresholds: x-velocity for the planar robots, xy-speed for
#: Ant and Humanoid.
VELOCITY_THRESHOLDS: dict[str, float] = {
    "Hopper": 0.7402,
    "Walker2d": 2.3415,
    "HalfCheetah": 3.2096,
    "Swimmer": 0.2282,
    "Ant": 2.6222,
    "Humanoid": 1.4149,
}

_XY_SPEED = {"Ant", "Humanoid"}

AnyEnv = gym.Env[Any, Any]


# --------------------------------------------------------------------------- cost API


class CostInfo(gym.Wrapper[Any, Any, Any, Any], gym.utils.RecordConstructorArgs):
    """Guarantees ``info["cost"]`` (float, 0.0 when absent) and adds ``info["episode_cost"]``.

    ``episode_cost`` is the sum of the episode's step costs and appears on the step that
    returns ``terminated`` or ``truncated`` (wrap outside the TimeLimit to see truncation).
    ``reset`` also reports ``cost = 0.0`` so that vector environments (whose autoreset
    returns the reset info) always carry the key.
    """

    def __init__(self, env: AnyEnv) -> None:
        gym.utils.RecordConstructorArgs.__init__(self)
        gym.Wrapper.__init__(self, env)
        self.episode_cost = 0.0

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed, options=options)
        info = dict(info)
        info["cost"] = 0.0
        self.episode_cost = 0.0
        return obs, info

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        info = dict(info)
        cost = float(info.get("cost", 0.0))
        info["cost"] = cost
        self.episode_cost += cost
        if terminated or truncated:
            info["episode_cost"] = self.episode_cost
        return obs, reward, terminated, truncated, info


def _add_cost(info: dict[str, Any], cost: float) -> dict[str, Any]:
    info = dict(info)
    info["cost"] = float(info.get("cost", 0.0)) + cost
    return info


class VelocityCost(gym.Wrapper[Any, Any, Any, Any], gym.utils.RecordConstructorArgs):
    """Cost 1 on steps where the robot moves faster than ``threshold`` (Safety-Gymnasium).

    The speed is ``|info["x_velocity"]|``, or with ``xy=True`` the planar speed
    ``sqrt(x_velocity^2 + y_velocity^2)`` (Ant, Humanoid). Gymnasium's v5 MuJoCo tasks
    report these keys. The comparison is strict: cost 1 exactly when speed > threshold.
    Safety-Gymnasium compares the signed x-velocity (only forward speed is penalized);
    ``absolute=False`` gives that variant. The two differ only when running backwards faster
    than the threshold, which the forward reward already punishes.
    """

    def __init__(self, env: AnyEnv, threshold: float, xy: bool = False, absolute: bool = True) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, threshold=threshold, xy=xy, absolute=absolute)
        gym.Wrapper.__init__(self, env)
        if threshold < 0:
            raise ValueError(f"VelocityCost threshold must be >= 0, got {threshold}")
        self.threshold = float(threshold)
        self.xy = bool(xy)
        self.absolute = bool(absolute)

    def speed(self, info: dict[str, Any]) -> float:
        """The speed this wrapper compares with the threshold, read from a step's info."""
        keys = ("x_velocity", "y_velocity") if self.xy else ("x_velocity",)
        missing = [k for k in keys if k not in info]
        if missing:
            raise KeyError(
                f"VelocityCost needs {missing} in the step info; wrap an environment that reports "
                "them (Gymnasium's v5 MuJoCo tasks do)"
            )
        if self.xy:
            return math.hypot(float(info["x_velocity"]), float(info["y_velocity"]))
        vx = float(info["x_velocity"])
        return abs(vx) if self.absolute else vx

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        cost = 1.0 if self.speed(info) > self.threshold else 0.0
        return obs, reward, terminated, truncated, _add_cost(info, cost)


class ForbiddenRegionCartPole(gym.Wrapper[Any, Any, Any, Any], gym.utils.RecordConstructorArgs):
    """CartPole with cost 1 on every step that ends with the cart inside ``[low, high]``.

    The cart position is the first observation component (CartPole-v1 terminates at
    |x| > 2.4). The default ``[0.5, 1.5]`` lies on the right half of the track: the cart
    starts near 0 and a balancing policy that drifts right pays, one that stays left of 0.5
    (or moves past 1.5 quickly) does not. Ends are inclusive.
    """

    def __init__(self, env: AnyEnv, low: float = 0.5, high: float = 1.5) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, low=low, high=high)
        gym.Wrapper.__init__(self, env)
        if not low <= high:
            raise ValueError(f"ForbiddenRegionCartPole needs low <= high, got [{low}, {high}]")
        self.low = float(low)
        self.high = float(high)

    def cost(self, cart_position: float) -> float:
        """1.0 when the cart position is in the forbidden interval, else 0.0."""
        return 1.0 if self.low <= float(cart_position) <= self.high else 0.0

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated, truncated, _add_cost(info, self.cost(float(obs[0])))


class TorqueBudgetPendulum(gym.Wrapper[Any, Any, Any, Any], gym.utils.RecordConstructorArgs):
    """Pendulum with a cost on the applied torque u (the action clipped to [-2, 2]).

    ``mode="excess"`` (default): cost = max(0, |u| - budget), the torque above the budget;
    ``mode="indicator"``: cost = 1[|u| > budget]; ``mode="squared"``: cost = u^2 (budget
    unused). The default budget 1.0 is half of Pendulum's maximum torque 2.0: swinging up
    within the budget takes more swings, so reward and cost trade off. Per step the
    default cost lies in [0, 1], per 200-step episode in [0, 200].
    """

    def __init__(
        self, env: AnyEnv, budget: float = 1.0, mode: Literal["excess", "indicator", "squared"] = "excess"
    ) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, budget=budget, mode=mode)
        gym.Wrapper.__init__(self, env)
        if mode not in ("excess", "indicator", "squared"):
            raise ValueError(f"TorqueBudgetPendulum mode must be excess, indicator or squared, got {mode!r}")
        if budget < 0:
            raise ValueError(f"TorqueBudgetPendulum budget must be >= 0, got {budget}")
        self.budget = float(budget)
        self.mode = mode
        self.max_torque = float(getattr(env.unwrapped, "max_torque", 2.0))

    def cost(self, action: Any) -> float:
        """Cost of one action (clipped to the max torque as Pendulum applies it)."""
        u = float(
            np.clip(np.asarray(action, dtype=np.float64).reshape(-1)[0], -self.max_torque, self.max_torque)
        )
        if self.mode == "squared":
            return u * u
        if self.mode == "indicator":
            return 1.0 if abs(u) > self.budget else 0.0
        return max(0.0, abs(u) - self.budget)

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated, truncated, _add_cost(info, self.cost(action))


# --------------------------------------------------------------------------- point hazard

# Default hand-placed layout: the straight line from the start to the goal crosses a hazard.
_DEFAULT_GOAL = (1.5, 1.5)
_DEFAULT_START = (-1.5, -1.5)
_DEFAULT_HAZARDS = ((0.0, 0.0), (-0.9, 0.6), (0.6, -0.9), (1.0, 0.6))


class PointHazardEnv(gym.Env[np.ndarray, np.ndarray]):
    """2-D point mass that must reach a goal while avoiding circular hazards (NumPy, fast).

    Dynamics (dt = ``dt``): v <- damping * v + max_accel * dt * clip(a, -1, 1), speed clipped
    to ``max_speed``; p <- p + dt * v, clipped to the arena [-size, size]^2 (the velocity
    component into a wall is zeroed).

    Reward: ``progress_scale * (d_prev - d)`` with d the distance to the goal, plus
    ``goal_bonus`` on the step that reaches the goal (d <= goal_radius). Reaching the goal
    terminates the episode (``terminate_on_goal=True``) or, as in Safety-Gym, moves the goal
    to a fresh random position. Cost: 1.0 on every step that ends inside a hazard
    (distance to a hazard centre < ``hazard_radius``), else 0.0, reported as ``info["cost"]``.

    Constraint signal (for a safety layer, ``tether.control.safety_layer``): after reset and every
    step ``info["constraint"]`` is a float array [num_hazards] of c_i(s) = hazard_radius - ||p - h_i||,
    safe when c_i(s) <= 0 (limit 0); a step costs 1 exactly when some c_i(s') > 0.

    Observation (float32): position (2), velocity (2), goal - position (2), then
    hazard_i - position for each hazard (2 each): 6 + 2 * num_hazards values.
    Action: Box [-1, 1]^2 (acceleration command).

    Layout: by default a fixed hand-placed layout (4 hazards, start near (-1.5, -1.5), goal at
    (1.5, 1.5)); ``layout_seed=k`` draws one fixed layout from seed k; ``randomize_layout=True``
    draws a new layout at every reset from the env's RNG. ``num_hazards`` (>= 0; None: 4) is the
    hazard count of a drawn layout; with the hand-placed layout it must be None or 4 (any other
    count is refused, never ignored: set ``layout_seed`` or ``randomize_layout`` to draw one).
    The start position is jittered by +-``start_noise`` at each reset. Everything is
    deterministic under ``reset(seed=...)``. Registered as ``tether/PointHazard-v0`` with
    200 steps per episode.

    Rendering: ``render_mode="rgb_array"`` makes :meth:`render` return a ``render_size`` x
    ``render_size`` RGB uint8 image of the arena (hazards red, goal green, agent blue), drawn with
    NumPy alone (for ``gymnasium.wrappers.RecordVideo``).
    """

    metadata: dict[str, Any] = {"render_modes": ["rgb_array"], "render_fps": 10}  # noqa: RUF012
    render_size = 256

    def __init__(
        self,
        *,
        size: float = 2.0,
        num_hazards: int | None = None,
        hazard_radius: float = 0.35,
        goal_radius: float = 0.3,
        dt: float = 0.1,
        max_accel: float = 2.0,
        max_speed: float = 1.0,
        damping: float = 0.9,
        progress_scale: float = 1.0,
        goal_bonus: float = 1.0,
        terminate_on_goal: bool = True,
        start_noise: float = 0.2,
        layout_seed: int | None = None,
        randomize_layout: bool = False,
        render_mode: str | None = None,
    ) -> None:
        super().__init__()
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"PointHazardEnv render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.render_mode = render_mode
        self.size = float(size)
        self.hazard_radius = float(hazard_radius)
        self.goal_radius = float(goal_radius)
        self.dt = float(dt)
        self.max_accel = float(max_accel)
        self.max_speed = float(max_speed)
        self.damping = float(damping)
        self.progress_scale = float(progress_scale)
        self.goal_bonus = float(goal_bonus)
        self.terminate_on_goal = bool(terminate_on_goal)
        self.start_noise = float(start_noise)
        self.randomize_layout = bool(randomize_layout)

        if num_hazards is not None and num_hazards < 0:
            raise InvalidInputError(f"PointHazardEnv: num_hazards must be >= 0, got {num_hazards}")
        if layout_seed is None and not randomize_layout:
            if num_hazards is not None and num_hazards != len(_DEFAULT_HAZARDS):
                raise InvalidInputError(
                    f"PointHazardEnv: num_hazards={num_hazards} needs a drawn layout, but neither layout_seed "
                    f"nor randomize_layout is set and the hand-placed layout has {len(_DEFAULT_HAZARDS)} "
                    "hazards; set layout_seed=K (one fixed layout drawn from seed K) or randomize_layout=True "
                    "(a new one at every reset), or leave num_hazards unset"
                )
            self.hazards = np.array(_DEFAULT_HAZARDS, dtype=np.float64)
            self.goal = np.array(_DEFAULT_GOAL, dtype=np.float64)
            self.start_center = np.array(_DEFAULT_START, dtype=np.float64)
        else:
            count = len(_DEFAULT_HAZARDS) if num_hazards is None else int(num_hazards)
            rng = np.random.default_rng(layout_seed)
            self.start_center, self.goal, self.hazards = self._sample_layout(rng, count)
        self.num_hazards = len(self.hazards)

        s, v = self.size, self.max_speed
        low = [-s, -s, -v, -v] + [-2 * s] * (2 + 2 * self.num_hazards)
        high = [s, s, v, v] + [2 * s] * (2 + 2 * self.num_hazards)
        self._obs_low = np.array(low, np.float32)
        self._obs_high = np.array(high, np.float32)
        self.observation_space = spaces.Box(self._obs_low, self._obs_high, dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.position = self.start_center.copy()
        self.velocity = np.zeros(2)

    # -- layout ---------------------------------------------------------------------------

    def _sample_point(self, rng: np.random.Generator, margin: float) -> np.ndarray:
        lim = self.size - margin
        return rng.uniform(-lim, lim, size=2)

    def _sample_goal(
        self, rng: np.random.Generator, hazards: np.ndarray, avoid: np.ndarray | None
    ) -> np.ndarray:
        clearance = self.hazard_radius + self.goal_radius + 0.1
        goal = self._sample_point(rng, self.goal_radius)
        for _ in range(1000):
            far_from_hazards = len(hazards) == 0 or bool(
                np.min(np.linalg.norm(hazards - goal, axis=1)) > clearance
            )
            far_from_avoid = avoid is None or float(np.linalg.norm(goal - avoid)) > self.size
            if far_from_hazards and far_from_avoid:
                break
            goal = self._sample_point(rng, self.goal_radius)
        return goal

    def _sample_layout(
        self, rng: np.random.Generator, num_hazards: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        margin = self.start_noise + 0.05
        start = self._sample_point(rng, margin)
        goal = self._sample_point(rng, self.goal_radius)
        for _ in range(1000):
            if float(np.linalg.norm(goal - start)) > self.size:
                break
            goal = self._sample_point(rng, self.goal_radius)
        hazards: list[np.ndarray] = []
        start_clear = self.hazard_radius + self.start_noise * math.sqrt(2) + 0.1
        goal_clear = self.hazard_radius + self.goal_radius + 0.1
        for _ in range(num_hazards):
            h = self._sample_point(rng, 0.0)
            for _ in range(1000):
                if (
                    float(np.linalg.norm(h - start)) > start_clear
                    and float(np.linalg.norm(h - goal)) > goal_clear
                ):
                    break
                h = self._sample_point(rng, 0.0)
            hazards.append(h)
        return start, goal, np.array(hazards, dtype=np.float64).reshape(num_hazards, 2)

    # -- API ------------------------------------------------------------------------------

    def goal_distance(self) -> float:
        return float(np.linalg.norm(self.goal - self.position))

    def in_hazard(self, position: np.ndarray | None = None) -> bool:
        """Whether ``position`` (default: the current one) is strictly inside a hazard."""
        p = self.position if position is None else np.asarray(position, dtype=np.float64)
        if self.num_hazards == 0:
            return False
        return bool(np.min(np.linalg.norm(self.hazards - p, axis=1)) < self.hazard_radius)

    def _obs(self) -> np.ndarray:
        parts = [self.position, self.velocity, self.goal - self.position]
        parts.extend(self.hazards - self.position)
        obs = np.concatenate(parts).astype(np.float32)
        return np.clip(obs, self._obs_low, self._obs_high)

    def constraint_values(self) -> np.ndarray:
        """c_i(s) = hazard_radius - ||p - h_i|| for each hazard (float64 [num_hazards]); safe when <= 0."""
        if self.num_hazards == 0:
            return np.zeros(0, dtype=np.float64)
        distances = np.linalg.norm(self.hazards - self.position, axis=1)
        return np.asarray(self.hazard_radius - distances, dtype=np.float64)

    def _info(self, cost: float, reached: bool) -> dict[str, Any]:
        return {
            "cost": cost,
            "goal_reached": reached,
            "goal_distance": self.goal_distance(),
            "constraint": self.constraint_values(),
        }

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        if self.randomize_layout:
            self.start_center, self.goal, self.hazards = self._sample_layout(self.np_random, self.num_hazards)
        noise = self.np_random.uniform(-self.start_noise, self.start_noise, size=2)
        lim = self.size
        self.position = np.clip(self.start_center + noise, -lim, lim)
        self.velocity = np.zeros(2)
        return self._obs(), self._info(0.0, False)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(2), -1.0, 1.0)
        prev_distance = self.goal_distance()
        v = self.damping * self.velocity + self.max_accel * self.dt * a
        speed = float(np.linalg.norm(v))
        if speed > self.max_speed:
            v *= self.max_speed / speed
        p = self.position + self.dt * v
        hit_wall = np.abs(p) > self.size
        v[hit_wall] = 0.0
        self.position = np.clip(p, -self.size, self.size)
        self.velocity = v

        distance = self.goal_distance()
        reward = self.progress_scale * (prev_distance - distance)
        reached = distance <= self.goal_radius
        terminated = False
        if reached:
            reward += self.goal_bonus
            if self.terminate_on_goal:
                terminated = True
            else:
                self.goal = self._sample_goal(self.np_random, self.hazards, avoid=self.position)
        cost = 1.0 if self.in_hazard() else 0.0
        return self._obs(), float(reward), terminated, False, self._info(cost, bool(reached))

    def render(self) -> np.ndarray | None:
        """The arena as an RGB uint8 image [render_size, render_size, 3] (``None`` without a render mode)."""
        if self.render_mode is None:
            return None
        n, s = self.render_size, self.size
        centres = (np.arange(n) + 0.5) / n * 2 * s - s
        x, y = np.meshgrid(centres, -centres)  # row 0 at the top: y = +size
        image = np.full((n, n, 3), 235, dtype=np.uint8)

        def disc(centre: np.ndarray, radius: float, colour: tuple[int, int, int]) -> None:
            image[(x - centre[0]) ** 2 + (y - centre[1]) ** 2 < radius**2] = colour

        for h in self.hazards:
            disc(h, self.hazard_radius, (220, 90, 90))
        disc(self.goal, self.goal_radius, (80, 180, 80))
        disc(self.position, 0.08, (40, 70, 200))
        image[[0, 1, -2, -1], :] = 60
        image[:, [0, 1, -2, -1]] = 60
        return image


# --------------------------------------------------------------------------- point wall


class PointWallEnv(gym.Env[np.ndarray, np.ndarray]):
    """A point moved directly by the action, with a wall it must not cross (NumPy, fast).

    The ball tasks of Dalal et al. 2018 ("Safe Exploration in Continuous Action Spaces", arXiv
    1801.08757), card control#A5: the action sets the displacement, p <- clip(p + max_step * clip(a,
    -1, 1), -size, size) in ``dim`` dimensions, so the constraint changes linearly with the action.

    Constraint: c(s) = p_0 - wall, the signed distance of the first coordinate past the wall (the
    position itself with the default wall at 0), safe when c(s) <= 0 (limit 0). Reported after reset
    and every step as ``info["constraint"]`` (float array [1]). Cost: 1.0 on every step that ends
    beyond the wall (c(s') > 0), else 0.0, as ``info["cost"]``. Away from the arena's edges
    c(s') = c(s) + g^T a exactly, with g = (max_step, 0, ...).

    Reward: -||p - goal|| per step. The goal is drawn uniformly over the whole arena at each reset,
    so it lies beyond the wall about half the time (the ball tasks' temptation). Start: p_0 uniform in
    [-size, wall - start_margin], the other coordinates uniform in [-size, size].
    Observation (float32): position (dim), goal - position (dim). Action: Box [-1, 1]^dim.
    Registered as ``tether/PointWall-v0`` with 100 steps per episode.
    """

    metadata: dict[str, Any] = {"render_modes": [], "render_fps": 10}  # noqa: RUF012

    def __init__(
        self,
        *,
        dim: int = 2,
        size: float = 1.0,
        wall: float = 0.0,
        max_step: float = 0.1,
        start_margin: float = 0.1,
    ) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"PointWallEnv dim must be >= 1, got {dim}")
        if not -size < wall - start_margin < size or start_margin < 0:
            raise ValueError(
                f"PointWallEnv needs -size < wall - start_margin < size and start_margin >= 0, got "
                f"size {size}, wall {wall}, start_margin {start_margin}"
            )
        self.dim = int(dim)
        self.size = float(size)
        self.wall = float(wall)
        self.max_step = float(max_step)
        self.start_margin = float(start_margin)
        bound = np.full(2 * self.dim, 2 * self.size, np.float32)
        bound[: self.dim] = self.size
        self._obs_bound = bound
        self.observation_space = spaces.Box(-bound, bound, dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(self.dim,), dtype=np.float32)
        self.position = np.zeros(self.dim)
        self.position[0] = self.wall - self.start_margin
        self.goal = np.zeros(self.dim)

    def constraint_values(self) -> np.ndarray:
        """c(s) = p_0 - wall (float64 [1]); safe when <= 0."""
        return np.array([self.position[0] - self.wall], dtype=np.float64)

    def beyond_wall(self) -> bool:
        return bool(self.position[0] > self.wall)

    def _obs(self) -> np.ndarray:
        obs = np.concatenate([self.position, self.goal - self.position]).astype(np.float32)
        return np.clip(obs, -self._obs_bound, self._obs_bound)

    def _info(self, cost: float) -> dict[str, Any]:
        return {"cost": cost, "constraint": self.constraint_values()}

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self.position = self.np_random.uniform(-self.size, self.size, size=self.dim)
        self.position[0] = self.np_random.uniform(-self.size, self.wall - self.start_margin)
        self.goal = self.np_random.uniform(-self.size, self.size, size=self.dim)
        return self._obs(), self._info(0.0)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(self.dim), -1.0, 1.0)
        self.position = np.clip(self.position + self.max_step * a, -self.size, self.size)
        reward = -float(np.linalg.norm(self.position - self.goal))
        cost = 1.0 if self.beyond_wall() else 0.0
        return self._obs(), reward, False, False, self._info(cost)


# --------------------------------------------------------------------------- registration


def _wrapper_spec(cls: type, **kwargs: Any) -> WrapperSpec:
    return WrapperSpec(name=cls.__name__, entry_point=f"{__name__}:{cls.__name__}", kwargs=kwargs)


_COST_INFO_SPEC = WrapperSpec(name="CostInfo", entry_point=f"{__name__}:CostInfo", kwargs={})

_MUJOCO_ENTRY_POINTS = {
    "Hopper": "gymnasium.envs.mujoco.hopper_v5:HopperEnv",
    "Walker2d": "gymnasium.envs.mujoco.walker2d_v5:Walker2dEnv",
    "HalfCheetah": "gymnasium.envs.mujoco.half_cheetah_v5:HalfCheetahEnv",
    "Swimmer": "gymnasium.envs.mujoco.swimmer_v5:SwimmerEnv",
    "Ant": "gymnasium.envs.mujoco.ant_v5:AntEnv",
    "Humanoid": "gymnasium.envs.mujoco.humanoid_v5:HumanoidEnv",
}

#: The ids :func:`register_envs` registers.
TETHER_ENV_IDS: tuple[str, ...] = (
    *(f"tether/Safe{robot}Velocity-v0" for robot in _MUJOCO_ENTRY_POINTS),
    "tether/SafeCartPole-v0",
    "tether/SafePendulum-v0",
    "tether/PointHazard-v0",
    "tether/PointWall-v0",
)


def register_envs() -> None:
    """Register the ``tether/...`` ids with Gymnasium (idempotent; run on import of tether.control).

    Each is built by ``gymnasium.make`` as base env -> TimeLimit -> cost wrapper -> CostInfo.
    """
    for robot, entry_point in _MUJOCO_ENTRY_POINTS.items():
        env_id = f"tether/Safe{robot}Velocity-v0"
        if env_id in gym.registry:
            continue
        gym.register(
            id=env_id,
            entry_point=entry_point,
            max_episode_steps=1000,
            additional_wrappers=(
                _wrapper_spec(
                    VelocityCost, threshold=VELOCITY_THRESHOLDS[robot], xy=robot in _XY_SPEED, absolute=False
                ),
                _COST_INFO_SPEC,
            ),
        )
    if "tether/SafeCartPole-v0" not in gym.registry:
        gym.register(
            id="tether/SafeCartPole-v0",
            entry_point="gymnasium.envs.classic_control.cartpole:CartPoleEnv",
            max_episode_steps=500,
            reward_threshold=475.0,
            additional_wrappers=(_wrapper_spec(ForbiddenRegionCartPole, low=0.5, high=1.5), _COST_INFO_SPEC),
        )
    if "tether/SafePendulum-v0" not in gym.registry:
        gym.register(
            id="tether/SafePendulum-v0",
            entry_point="gymnasium.envs.classic_control.pendulum:PendulumEnv",
            max_episode_steps=200,
            additional_wrappers=(
                _wrapper_spec(TorqueBudgetPendulum, budget=1.0, mode="excess"),
                _COST_INFO_SPEC,
            ),
        )
    if "tether/PointHazard-v0" not in gym.registry:
        gym.register(
            id="tether/PointHazard-v0",
            entry_point=f"{__name__}:PointHazardEnv",
            max_episode_steps=200,
            additional_wrappers=(_COST_INFO_SPEC,),
        )
    if "tether/PointWall-v0" not in gym.registry:
        gym.register(
            id="tether/PointWall-v0",
            entry_point=f"{__name__}:PointWallEnv",
            max_episode_steps=100,
            additional_wrappers=(_COST_INFO_SPEC,),
        )


# --------------------------------------------------------------------------- constructors


def _has_cost_info(env: Any) -> bool:
    while env is not None:
        if isinstance(env, CostInfo):
            return True
        env = getattr(env, "env", None)
    return False


def ensure_cost_info(env: AnyEnv) -> AnyEnv:
    """Wrap ``env`` in :class:`CostInfo` unless it already is."""
    return env if _has_cost_info(env) else CostInfo(env)


def make_env(
    env_id: str,
    *,
    normalize_obs: bool = False,
    normalize_reward: bool = False,
    gamma: float = 0.99,
    **kwargs: Any,
) -> AnyEnv:
    """``gymnasium.make(env_id, **kwargs)`` with the cost API and optional normalization.

    Works for any registered id: envs without costs get :class:`CostInfo` (cost 0.0).
    ``normalize_obs`` adds ``gymnasium.wrappers.NormalizeObservation``; ``normalize_reward``
    adds ``gymnasium.wrappers.NormalizeReward(gamma=gamma)``. Costs are never normalized.
    """
    env: AnyEnv = ensure_cost_info(gym.make(env_id, **kwargs))
    if normalize_obs:
        env = gym.wrappers.NormalizeObservation(env)
    if normalize_reward:
        env = gym.wrappers.NormalizeReward(env, gamma=gamma)
    return env


def make_vec_env(
    env_id: str,
    num_envs: int,
    seed: int | None = None,
    vectorization_mode: Literal["sync", "async"] = "sync",
    *,
    normalize_obs: bool = False,
    normalize_reward: bool = False,
    gamma: float = 0.99,
    vector_kwargs: dict[str, Any] | None = None,
    wrappers: Sequence[Any] = (),
    **kwargs: Any,
) -> gym.vector.VectorEnv[Any, Any, Any]:
    """``gymnasium.make_vec`` with the cost API, seeding and optional normalization.

    Each sub-env gets :class:`CostInfo` (unless it already has it), so ``infos["cost"]`` is an
    array of shape ``[num_envs]`` after every step and ``infos["episode_cost"]`` (with its
    mask ``infos["_episode_cost"]``) on steps where an episode ends. With ``seed`` the
    envs are reset once with seeds ``seed, seed + 1, ...`` and the action space is seeded,
    so what follows (including a later ``reset()`` without seed) is deterministic.
    Normalization uses ``gymnasium.wrappers.vector.NormalizeObservation`` /
    ``NormalizeReward(gamma=gamma)``; it is added after the seeding reset.
    """
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    wrapper_fns: list[Any] = [*wrappers, ensure_cost_info]
    envs: gym.vector.VectorEnv[Any, Any, Any] = gym.make_vec(
        env_id,
        num_envs=num_envs,
        vectorization_mode=vectorization_mode,
        vector_kwargs=vector_kwargs,
        wrappers=wrapper_fns,
        **kwargs,
    )
    if seed is not None:
        envs.reset(seed=seed)
        envs.action_space.seed(seed)
        envs.observation_space.seed(seed)
    if normalize_obs:
        envs = gym.wrappers.vector.NormalizeObservation(envs)
    if normalize_reward:
        envs = gym.wrappers.vector.NormalizeReward(envs, gamma=gamma)
    return envs


# --------------------------------------------------------------------------- snapshots (resume)

#: Attributes of a MuJoCo env that hold the simulation (captured as its state vector instead).
_MUJOCO_HANDLES = ("model", "data", "mujoco_renderer")


def _mujoco_base(env: Any) -> Any | None:
    """The unwrapped env when it simulates with MuJoCo (``model`` / ``data`` from ``mujoco``), else None."""
    base = getattr(env, "unwrapped", env)
    model, data = getattr(base, "model", None), getattr(base, "data", None)
    if model is None or data is None or not type(data).__module__.startswith("mujoco"):
        return None
    return base


#: Quantities the last step derived (read by the next one: Ant's position before the step is the
#: ``xpos`` of the state before the last step), fingerprinted beside the integration state.
_MUJOCO_DERIVED = ("xpos", "xquat", "qacc", "cfrc_ext", "sensordata")


def _mujoco_state(base: Any) -> np.ndarray:
    """The simulation's full integration state (``mjSTATE_INTEGRATION``: time, qpos, qvel, act,
    warm start, controls, applied forces, mocap, user data, plugin state)."""
    import mujoco

    spec = int(mujoco.mjtState.mjSTATE_INTEGRATION)
    state = np.empty(mujoco.mj_stateSize(base.model, spec), dtype=np.float64)
    mujoco.mj_getState(base.model, base.data, state, spec)
    return state


def simulation_state(env: Any) -> dict[str, Any] | None:
    """What pickling a sub-environment loses: a MuJoCo env (Gymnasium's are ``EzPickle``) pickles
    only its constructor arguments, so its simulation data (``MjData``: the state and what the last
    step derived from it, which the next step reads) and its Python attributes (``np_random``,
    ``spec``, the spaces and whatever a subclass keeps) are captured here; None for an env that does
    not simulate with MuJoCo. Pickle it with the env so that shared objects stay shared. See
    :func:`restore_simulation_state`."""
    base = _mujoco_base(env)
    if base is None:
        return None
    attributes = {k: v for k, v in vars(base).items() if k not in _MUJOCO_HANDLES}
    return {"data": copy.copy(base.data), "attributes": attributes}


def restore_simulation_state(env: Any, saved: dict[str, Any] | None) -> None:
    """Put a :func:`simulation_state` back into an env rebuilt by unpickling (its ``MjData`` is
    overwritten in place: the renderer keeps a reference to it)."""
    if saved is None:
        return
    base = _mujoco_base(env)
    if base is None:
        raise ValueError("a MuJoCo simulation state cannot be restored into an env without one")
    import mujoco

    data = saved["data"]
    for name in ("qpos", "qvel", "act", "ctrl", "qacc_warmstart", "mocap_pos", "userdata", "plugin_state"):
        if getattr(data, name).shape != getattr(base.data, name).shape:
            raise ValueError(f"the saved MuJoCo data does not fit this model ({name})")
    mujoco.mj_copyData(base.data, base.model, data)
    vars(base).update(saved["attributes"])


def _feed(digest: Any, obj: Any, seen: set[int]) -> None:
    """Feed ``obj``'s value into ``digest``: the same for equal values, however they are shared
    (``seen`` holds the objects being fed, to break cycles).

    (Pickled bytes are not: they record which objects are shared, interned strings included.)
    Raises ``TypeError`` for a value it cannot read (an object without attributes that does not pickle).
    """
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, np.generic)):
        digest.update(f"{type(obj).__name__}:{obj!r};".encode())
    elif isinstance(obj, np.ndarray):
        digest.update(f"ndarray:{obj.dtype}:{obj.shape};".encode())
        digest.update(np.ascontiguousarray(obj).tobytes() if obj.dtype != object else pickle.dumps(obj))
    elif isinstance(obj, np.random.Generator):
        _feed(digest, obj.bit_generator.state, seen)
    elif isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        digest.update(
            f"callable:{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', obj)!r};".encode()
        )
    elif id(obj) in seen:  # a cycle: the object is being fed already
        digest.update(b"cycle;")
    else:
        seen.add(id(obj))
        digest.update(f"{type(obj).__qualname__}(".encode())
        if isinstance(obj, dict):
            for key in sorted(obj, key=repr):
                _feed(digest, key, seen)
                _feed(digest, obj[key], seen)
        elif isinstance(obj, (set, frozenset)):
            for item in sorted(obj, key=repr):
                _feed(digest, item, seen)
        elif isinstance(obj, (list, tuple, deque)):
            for item in obj:
                _feed(digest, item, seen)
        elif hasattr(obj, "__dict__"):
            _feed(digest, vars(obj), seen)
        else:
            try:
                digest.update(pickle.dumps(obj))
            except Exception as err:
                raise TypeError(f"cannot fingerprint a {type(obj).__qualname__}") from err
        digest.update(b");")
        seen.discard(id(obj))  # a shared object is fed again where it is met again


def env_fingerprint(env: Any) -> str | None:
    """A digest of everything a sub-environment carries: each layer's attributes (the wrapped env
    aside) and, for a MuJoCo env, its simulation state in place of the simulator handles.

    Two envs with equal fingerprints step alike; a resume compares the fingerprint of each restored
    env with the one saved, so that a snapshot that does not reproduce the env (an ``EzPickle`` env
    whose state lives outside its constructor arguments) is never trusted. None when some attribute
    cannot be read (e.g. a Box2D world).
    """
    digest = hashlib.sha256()
    layer = env
    while layer is not None:
        fields = {k: v for k, v in vars(layer).items() if k != "env"}
        base = _mujoco_base(layer)
        if base is not None and base is layer:
            for key in _MUJOCO_HANDLES:
                fields.pop(key, None)
            fields["mujoco.state"] = _mujoco_state(base)
            for name in _MUJOCO_DERIVED:
                fields[f"mujoco.{name}"] = np.array(getattr(base.data, name))
        try:
            digest.update(f"layer:{type(layer).__qualname__};".encode())
            _feed(digest, fields, set())
        except (TypeError, RecursionError):
            return None
        layer = getattr(layer, "env", None)
    return digest.hexdigest()
