"""Tests for the control world's environments and the cost-signal API."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.utils.env_checker import check_env

import tether.control
from tether.control import (
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
from tether.control.envs import TETHER_ENV_IDS
from tether.errors import InvalidInputError


class StubVelocityEnv(gym.Env[np.ndarray, np.ndarray]):
    """Reports the x/y velocity given by the action; terminates after `horizon` steps."""

    def __init__(self, horizon: int = 3, report_cost: bool = False) -> None:
        self.observation_space = spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        self.action_space = spaces.Box(-10.0, 10.0, shape=(2,), dtype=np.float32)
        self.horizon = horizon
        self.report_cost = report_cost
        self.t = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(1, np.float32), {}

    def step(self, action: np.ndarray) -> Any:
        self.t += 1
        info: dict[str, Any] = {"x_velocity": float(action[0]), "y_velocity": float(action[1])}
        if self.report_cost:
            info["cost"] = 0.5
        return np.zeros(1, np.float32), 0.0, self.t >= self.horizon, False, info


EXPECTED_IDS = {
    "tether/SafeHopperVelocity-v0",
    "tether/SafeWalker2dVelocity-v0",
    "tether/SafeHalfCheetahVelocity-v0",
    "tether/SafeSwimmerVelocity-v0",
    "tether/SafeCartPole-v0",
    "tether/SafePendulum-v0",
    "tether/PointHazard-v0",
}


def test_registration_is_idempotent() -> None:
    assert EXPECTED_IDS <= set(TETHER_ENV_IDS)
    register_envs()
    register_envs()
    assert all(env_id in gym.registry for env_id in TETHER_ENV_IDS)
    assert tether.control.COST_LIMIT == 25.0


@pytest.mark.parametrize("env_id", TETHER_ENV_IDS)
def test_every_id_makes_resets_deterministically_and_reports_cost(
    env_id: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MuJoCo 4 writes a deprecation warning for Humanoid's XML to MUJOCO_LOG.TXT in the cwd.
    monkeypatch.chdir(tmp_path)

    def rollout() -> tuple[list[np.ndarray], list[float]]:
        env = gym.make(env_id)
        env.action_space.seed(3)
        obs, info = env.reset(seed=7)
        assert info["cost"] == 0.0
        observations, costs = [obs], []
        for _ in range(5):
            obs, _, terminated, truncated, info = env.step(env.action_space.sample())
            assert isinstance(info["cost"], float)
            observations.append(obs)
            costs.append(info["cost"])
            if terminated or truncated:
                break
        env.close()
        return observations, costs

    obs_a, cost_a = rollout()
    obs_b, cost_b = rollout()
    assert cost_a == cost_b
    for a, b in zip(obs_a, obs_b):
        np.testing.assert_array_equal(a, b)


def test_velocity_task_thresholds_and_episode_cost() -> None:
    env = gym.make("tether/SafeHopperVelocity-v0")
    wrapper = env
    while not isinstance(wrapper, VelocityCost):
        wrapper = wrapper.env  # type: ignore[assignment]
    assert wrapper.threshold == VELOCITY_THRESHOLDS["Hopper"] == 0.7402
    assert env.spec is not None and env.spec.max_episode_steps == 1000
    env.reset(seed=0)
    total, info = 0.0, {}
    for _ in range(1000):
        _, _, terminated, truncated, info = env.step(env.action_space.sample())
        total += info["cost"]
        if terminated or truncated:
            break
    assert info["episode_cost"] == pytest.approx(total)


@pytest.mark.parametrize("absolute", [True, False])
def test_velocity_cost_exactly_above_threshold(absolute: bool) -> None:
    env = CostInfo(VelocityCost(StubVelocityEnv(horizon=100), threshold=1.0, absolute=absolute))
    env.reset(seed=0)
    for vx, expected in [(0.5, 0.0), (1.0, 0.0), (1.0001, 1.0), (3.0, 1.0), (-0.9, 0.0)]:
        assert env.step(np.array([vx, 0.0]))[-1]["cost"] == expected
    assert env.step(np.array([-2.0, 0.0]))[-1]["cost"] == (1.0 if absolute else 0.0)


def test_velocity_cost_xy_speed_and_composition() -> None:
    env = VelocityCost(StubVelocityEnv(report_cost=True), threshold=1.0, xy=True)
    env.reset()
    assert env.step(np.array([0.6, 0.6]))[-1]["cost"] == 0.5  # speed 0.85: only the env's own cost
    assert env.step(np.array([0.8, 0.8]))[-1]["cost"] == 1.5  # speed 1.13: adds 1


def test_velocity_cost_needs_velocity_in_info() -> None:
    env = VelocityCost(gym.make("CartPole-v1"), threshold=1.0)
    env.reset(seed=0)
    with pytest.raises(KeyError, match="x_velocity"):
        env.step(0)


def test_cost_info_defaults_and_accumulates() -> None:
    env = CostInfo(StubVelocityEnv(horizon=3, report_cost=True))
    _, info = env.reset()
    assert info["cost"] == 0.0
    infos = [env.step(np.zeros(2))[-1] for _ in range(3)]
    assert [i["cost"] for i in infos] == [0.5, 0.5, 0.5]
    assert "episode_cost" not in infos[0]
    assert infos[-1]["episode_cost"] == 1.5
    env.reset()
    assert env.episode_cost == 0.0

    plain = CostInfo(StubVelocityEnv(horizon=1))
    plain.reset()
    info = plain.step(np.zeros(2))[-1]
    assert info["cost"] == 0.0 and info["episode_cost"] == 0.0


def test_cartpole_forbidden_region_on_constructed_states() -> None:
    env = ForbiddenRegionCartPole(gym.make("CartPole-v1"))
    assert (env.low, env.high) == (0.5, 1.5)
    assert [env.cost(x) for x in (0.0, 0.49, 0.5, 1.0, 1.5, 1.51, -1.0)] == [0, 0, 1, 1, 1, 0, 0]
    env.reset(seed=0)
    for x, expected in [(1.0, 1.0), (0.0, 0.0), (-1.0, 0.0), (1.4, 1.0)]:
        env.unwrapped.state = np.array([x, 0.0, 0.0, 0.0])  # type: ignore[attr-defined]
        obs, _, _, _, info = env.step(1)
        assert env.low <= obs[0] <= env.high if expected else not env.low <= obs[0] <= env.high
        assert info["cost"] == expected


def test_pendulum_torque_budget_costs() -> None:
    env = TorqueBudgetPendulum(gym.make("Pendulum-v1"))
    assert env.budget == 1.0 and env.mode == "excess"
    env.reset(seed=0)
    for u, expected in [(0.0, 0.0), (0.5, 0.0), (-1.0, 0.0), (1.5, 0.5), (-2.0, 1.0), (5.0, 1.0)]:
        assert env.step(np.array([u], np.float32))[-1]["cost"] == pytest.approx(expected)
    assert TorqueBudgetPendulum(gym.make("Pendulum-v1"), mode="indicator").cost([1.2]) == 1.0
    assert TorqueBudgetPendulum(gym.make("Pendulum-v1"), mode="indicator").cost([0.8]) == 0.0
    assert TorqueBudgetPendulum(gym.make("Pendulum-v1"), mode="squared").cost([-1.5]) == pytest.approx(2.25)
    with pytest.raises(ValueError, match="mode"):
        TorqueBudgetPendulum(gym.make("Pendulum-v1"), mode="cube")  # type: ignore[arg-type]


def test_point_hazard_cost_inside_and_outside() -> None:
    env = PointHazardEnv()
    env.reset(seed=0)
    hazard = env.hazards[0]
    env.position, env.velocity = hazard.copy(), np.zeros(2)
    assert env.step(np.zeros(2, np.float32))[-1]["cost"] == 1.0
    env.position = hazard + np.array([env.hazard_radius + 0.05, 0.0])
    env.velocity = np.zeros(2)
    assert not env.in_hazard()
    assert env.step(np.zeros(2, np.float32))[-1]["cost"] == 0.0
    _, info = env.reset(seed=1)
    assert info["cost"] == 0.0 and not env.in_hazard()
    far = env.start_center
    assert not env.in_hazard(far)


def test_point_hazard_goal_bonus() -> None:
    env = PointHazardEnv(goal_bonus=5.0)
    env.reset(seed=0)
    env.position = env.goal + np.array([env.goal_radius + 0.02, 0.0])
    env.velocity = np.array([-1.0, 0.0])
    obs, reward, terminated, _, info = env.step(np.array([-1.0, 0.0], np.float32))
    assert info["goal_reached"] and terminated
    assert reward > 5.0  # bonus plus positive progress
    assert obs.shape == env.observation_space.shape

    relocating = PointHazardEnv(terminate_on_goal=False)
    relocating.reset(seed=0)
    old_goal = relocating.goal.copy()
    relocating.position = old_goal.copy()
    _, reward, terminated, _, info = relocating.step(np.zeros(2, np.float32))
    assert info["goal_reached"] and not terminated and reward >= 1.0
    assert not np.allclose(relocating.goal, old_goal)


def test_point_hazard_progress_reward_and_layouts() -> None:
    env = PointHazardEnv()
    env.reset(seed=0)
    d0 = env.goal_distance()
    _, reward, _, _, _ = env.step(np.ones(2, np.float32))
    assert reward == pytest.approx(d0 - env.goal_distance())
    a, b = PointHazardEnv(layout_seed=3, num_hazards=6), PointHazardEnv(layout_seed=3, num_hazards=6)
    np.testing.assert_array_equal(a.hazards, b.hazards)
    assert a.observation_space.shape == (6 + 2 * 6,)
    rnd = PointHazardEnv(randomize_layout=True)
    rnd.reset(seed=0)
    h0 = rnd.hazards.copy()
    rnd.reset(seed=0)
    np.testing.assert_array_equal(h0, rnd.hazards)
    rnd.reset(seed=1)
    assert not np.array_equal(h0, rnd.hazards)


@pytest.mark.parametrize("kwargs", [{}, {"randomize_layout": True}, {"layout_seed": 5, "num_hazards": 8}])
def test_point_hazard_passes_env_checker(kwargs: dict[str, Any]) -> None:
    check_env(PointHazardEnv(**kwargs), skip_render_check=True)


def test_point_hazard_is_fast_and_registered_with_200_steps() -> None:
    env = gym.make("tether/PointHazard-v0")
    env.reset(seed=0)
    env.action_space.seed(0)
    steps, info = 0, {}
    while True:
        _, _, terminated, truncated, info = env.step(env.action_space.sample())
        steps += 1
        if terminated or truncated:
            break
    assert steps <= 200 and "episode_cost" in info


@pytest.mark.parametrize("env_id", ["tether/PointHazard-v0", "tether/SafeCartPole-v0", "CartPole-v1"])
def test_make_vec_env_reports_costs(env_id: str) -> None:
    envs = make_vec_env(env_id, num_envs=3, seed=0)
    assert envs.num_envs == 3
    obs, infos = envs.reset()
    assert obs.shape[0] == 3
    ended = False
    for _ in range(600):
        _, _, terminated, truncated, infos = envs.step(envs.action_space.sample())
        assert infos["cost"].shape == (3,)
        if (terminated | truncated).any():
            ended = True
            assert infos["_episode_cost"][terminated | truncated].all()
            break
    assert ended
    envs.close()


def test_make_vec_env_is_deterministic_with_seed() -> None:
    def first_obs() -> np.ndarray:
        envs = make_vec_env("tether/PointHazard-v0", num_envs=2, seed=11)
        obs, _ = envs.reset()
        obs2 = envs.step(envs.action_space.sample())[0]
        envs.close()
        return np.concatenate([obs, obs2])

    np.testing.assert_array_equal(first_obs(), first_obs())


def test_normalization_options_wrap() -> None:
    env = make_env("tether/SafePendulum-v0", normalize_obs=True, normalize_reward=True)
    assert isinstance(env, gym.wrappers.NormalizeReward)
    assert isinstance(env.env, gym.wrappers.NormalizeObservation)
    env.reset(seed=0)
    assert "cost" in env.step(env.action_space.sample())[-1]

    plain = make_env("CartPole-v1")
    plain.reset(seed=0)
    assert plain.step(0)[-1]["cost"] == 0.0

    envs = make_vec_env("tether/SafeCartPole-v0", 2, seed=0, normalize_obs=True, normalize_reward=True)
    assert isinstance(envs, gym.wrappers.vector.NormalizeReward)
    assert isinstance(envs.env, gym.wrappers.vector.NormalizeObservation)
    envs.reset()
    assert envs.step(envs.action_space.sample())[-1]["cost"].shape == (2,)
    envs.close()


def test_point_hazard_num_hazards_is_never_ignored() -> None:
    # Default: the hand-placed layout of 4; num_hazards None or 4 keep it.
    default = PointHazardEnv()
    assert default.num_hazards == 4 and default.observation_space.shape == (14,)
    np.testing.assert_array_equal(PointHazardEnv(num_hazards=4).hazards, default.hazards)
    # Any other count needs a drawn layout: refused, with the fix named, instead of silently ignored.
    for count in (0, 2, 9):
        with pytest.raises(InvalidInputError, match=r"layout_seed=K .* or randomize_layout=True"):
            PointHazardEnv(num_hazards=count)
    with pytest.raises(InvalidInputError, match="num_hazards=1 needs a drawn layout"):
        gym.make("tether/PointHazard-v0", num_hazards=1)
    # Negative counts are refused with or without a drawn layout.
    for kwargs in ({}, {"layout_seed": 0}, {"randomize_layout": True}):
        with pytest.raises(InvalidInputError, match=">= 0"):
            PointHazardEnv(num_hazards=-3, **kwargs)
    # Drawn layouts: num_hazards hazards, 4 when unset (the old default count).
    assert PointHazardEnv(num_hazards=2, layout_seed=0).hazards.shape == (2, 2)
    np.testing.assert_array_equal(
        PointHazardEnv(layout_seed=7).hazards, PointHazardEnv(layout_seed=7, num_hazards=4).hazards
    )
    drawn = PointHazardEnv(randomize_layout=True, num_hazards=3)
    drawn.reset(seed=1)
    assert drawn.hazards.shape == (3, 2) and drawn.observation_space.shape == (12,)
