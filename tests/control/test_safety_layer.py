"""The safety layer of Dalal et al. 2018 (card control#A5) as a wrapper around any policy.

Mini-experiment (card: "a random policy on the point mass gives zero wall crossings with the filter
and many without it"), measured on tether/PointWall-v0 with a uniformly random policy, 10 episodes of
100 steps (seeds 0-9), cost model fitted by ``SafetyLayer.from_env(seed=0)`` on 5000 random steps:

- without the filter: 168 steps beyond the wall, up to 1.0 deep;
- with the filter, limit 0 (both solvers): 20 steps beyond the wall, all within 0.003 of it (the
  learned g is about 1% off, so a projection onto the boundary overshoots by a hair half the time);
- with the filter and limit -0.01 (a margin of a tenth of one step; one value, chosen before running):
  0 steps beyond the wall.

So the card's "zero crossings" holds only with a small margin; at limit 0 we see 8x fewer crossings,
each a near-miss. On PointHazard (acceleration control, where the one-step linear model ignores the
momentum) the same recipe gives 27 vs 35 hazard steps: far weaker, as the paper's model predicts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import tether.control  # noqa: F401  (registers the tether/... ids)
from tether.control.envs import TETHER_ENV_IDS, PointHazardEnv, PointWallEnv, make_vec_env
from tether.control.safety_layer import (
    LinearCostModel,
    SafetyLayer,
    Transitions,
    collect_transitions,
    fit_cost_model,
)
from tether.errors import TetherError

WALL = "tether/PointWall-v0"


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny networks: one thread is faster than contending for shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def wall_layer() -> SafetyLayer:
    return SafetyLayer.from_env(gym.make(WALL), seed=0)


class ActionRecorder(gym.Wrapper[Any, Any, Any, Any]):
    """Records the actions that reach the env."""

    def __init__(self, env: gym.Env[Any, Any]) -> None:
        super().__init__(env)
        self.received: list[Any] = []

    def step(self, action: Any) -> Any:
        self.received.append(action)
        return self.env.step(action)


# --------------------------------------------------------------------------- environments


def test_point_wall_reports_constraint_and_moves_linearly() -> None:
    assert WALL in TETHER_ENV_IDS and WALL in gym.registry
    env = PointWallEnv()
    check_env(PointWallEnv(), skip_render_check=True)
    obs, info = env.reset(seed=0)
    assert obs.shape == (4,) and info["cost"] == 0.0
    assert info["constraint"].shape == (1,) and info["constraint"][0] < 0
    env.position = np.array([-0.5, 0.0])
    _, _, _, _, info = env.step(np.array([0.7, -0.3], np.float32))
    assert info["constraint"][0] == pytest.approx(-0.5 + 0.1 * 0.7)  # c(s') = c(s) + g^T a, g = (0.1, 0)
    env.position = np.array([-0.02, 0.0])
    _, _, _, _, info = env.step(np.array([0.5, 0.0], np.float32))
    assert info["cost"] == 1.0 and info["constraint"][0] == pytest.approx(0.03)
    spec = gym.spec(WALL)
    assert spec.max_episode_steps == 100


def test_point_hazard_reports_constraint_values() -> None:
    env = PointHazardEnv()
    _, info = env.reset(seed=0)
    assert info["constraint"].shape == (env.num_hazards,)
    env.action_space.seed(0)
    for _ in range(100):
        _, _, terminated, _, info = env.step(env.action_space.sample())
        distances = np.linalg.norm(env.hazards - env.position, axis=1)
        np.testing.assert_allclose(info["constraint"], env.hazard_radius - distances)
        assert info["cost"] == float((info["constraint"] > 0).any())
        if terminated:
            break
    assert PointHazardEnv(layout_seed=1, num_hazards=0).reset(seed=0)[1]["constraint"].shape == (0,)


# --------------------------------------------------------------------------- cost model


def test_collect_transitions_is_deterministic() -> None:
    a = collect_transitions(gym.make(WALL), 300, seed=3)
    b = collect_transitions(gym.make(WALL), 300, seed=3)
    assert len(a) == 300
    assert a.observations.shape == (300, 4) and a.actions.shape == (300, 2)
    assert a.constraints.shape == a.next_constraints.shape == (300, 1)
    assert torch.equal(a.actions, b.actions) and torch.equal(a.next_constraints, b.next_constraints)
    assert float(a.actions.abs().max()) <= 1.0


def test_fitted_model_recovers_the_linear_coefficients(wall_layer: SafetyLayer) -> None:
    data = collect_transitions(gym.make(WALL), 2000, seed=123)
    delta = data.next_constraints - data.constraints
    assert wall_layer.fit_loss is not None
    assert wall_layer.fit_loss < 0.05 * float(delta.var())  # explains > 95% of the change in c
    # On interior states (away from the arena's edges) the truth is g = (max_step, 0) = (0.1, 0).
    interior = data.observations[:, :2].abs().max(dim=1).values < 0.85
    with torch.no_grad():
        grads = wall_layer.model(data.observations[interior])
    err = (grads - torch.tensor([[[0.1, 0.0]]])).abs()
    # Measured: mean error 0.004 on the wall coefficient 0.1 (0.001 on the 0), worst 0.018.
    assert err.mean().item() < 0.01 and err.max().item() < 0.03, (err.mean().item(), err.max().item())


def test_fit_cost_model_on_exact_linear_data() -> None:
    gen = torch.Generator().manual_seed(0)
    obs = torch.rand(512, 3, generator=gen)
    actions = torch.rand(512, 2, generator=gen) * 2 - 1
    c = torch.randn(512, 2, generator=gen)
    true_g = torch.tensor([[0.3, -0.2], [0.0, 0.5]])
    data = Transitions(obs, actions, c, c + actions @ true_g.T)
    torch.manual_seed(0)
    model = LinearCostModel(3, 2, 2)
    before = fit_cost_model(model, data, epochs=0)
    after = fit_cost_model(model, data, epochs=60, lr=3e-3, batch_size=64)
    assert after < 1e-3 * before
    with pytest.raises(TetherError, match="build LinearCostModel"):
        fit_cost_model(LinearCostModel(3, 2, 1), data)


# --------------------------------------------------------------------------- the wrapper


def test_feasible_actions_pass_unchanged(wall_layer: SafetyLayer) -> None:
    recorder = ActionRecorder(gym.make(WALL))
    layer = SafetyLayer(recorder, wall_layer.model)
    obs, info = layer.reset(seed=5)
    assert info["safety_layer/corrected"] is False
    rng = np.random.default_rng(5)
    unchanged = 0
    for _ in range(100):
        action = rng.uniform(-1, 1, 2).astype(np.float32)
        with torch.no_grad():
            g = wall_layer.model(torch.as_tensor(obs)[None])[0, 0].double().numpy()
        feasible = info["constraint"][0] + g @ action.astype(np.float64) <= 0.0
        obs, _, _, _, info = layer.step(action)
        if feasible:
            unchanged += 1
            assert recorder.received[-1] is action
            assert info["safety_layer/corrected"] is False and info["safety_layer/correction"] == 0.0
        else:
            assert info["safety_layer/corrected"] is True and info["safety_layer/correction"] > 0
            # The corrected action lands on the predicted boundary.
            applied = np.asarray(recorder.received[-1], np.float64)
            assert abs(_predicted_before(g, applied, info)) < 1e-5
    assert unchanged > 50


def _predicted_before(g: np.ndarray, applied: np.ndarray, info: dict[str, Any]) -> float:
    """Predicted c(s) + g^T a* from the observed c(s') = c(s) + 0.1 a*_x: c(s) = c(s') - 0.1 a*_x."""
    c_before = float(info["constraint"][0]) - 0.1 * float(applied[0])
    return c_before + float(g @ applied)


def _count_costs(env_factory: Any, episodes: int = 10) -> tuple[float, float]:
    """Total cost and deepest violation of a uniformly random policy, episodes with seeds 0..n-1."""
    total, deepest = 0.0, 0.0
    for seed in range(episodes):
        env = env_factory()
        env.action_space.seed(seed)
        env.reset(seed=seed)
        done = False
        while not done:
            _, _, terminated, truncated, info = env.step(env.action_space.sample())
            total += info["cost"]
            if info["cost"] > 0:
                deepest = max(deepest, float(info["constraint"].max()))
            done = terminated or truncated
    return total, deepest


@pytest.mark.parametrize("solver", ["closed_form", "qp"])
def test_random_policy_crosses_the_wall_far_less_with_the_filter(
    wall_layer: SafetyLayer, solver: str
) -> None:
    without, deep_without = _count_costs(lambda: gym.make(WALL))
    with_filter, deep_with = _count_costs(
        lambda: SafetyLayer(gym.make(WALL), wall_layer.model, solver=solver)
    )
    # Measured: 168 steps beyond the wall (up to 1.0 deep) without, 20 (all within 0.003) with.
    assert without > 100 and deep_without > 0.5
    assert with_filter * 5 <= without
    assert deep_with < 0.01


def test_a_small_margin_gives_zero_wall_crossings(wall_layer: SafetyLayer) -> None:
    with_margin, _ = _count_costs(lambda: SafetyLayer(gym.make(WALL), wall_layer.model, limits=-0.01))
    assert with_margin == 0.0  # measured: 0 (limit -0.01 chosen once, before the run)


def test_works_inside_vector_envs(wall_layer: SafetyLayer) -> None:
    model = wall_layer.model
    envs = gym.make_vec(
        WALL, num_envs=3, vectorization_mode="sync", wrappers=[lambda e: SafetyLayer(e, model)]
    )
    envs.reset(seed=0)
    envs.action_space.seed(0)
    corrected = 0
    for _ in range(150):  # crosses an autoreset at step 100
        _, _, _, _, infos = envs.step(envs.action_space.sample())
        assert infos["safety_layer/corrected"].shape == (3,)
        assert infos["constraint"].shape == (3, 1)
        corrected += int(infos["safety_layer/corrected"].sum())
    envs.close()
    assert corrected > 0

    tether_envs = make_vec_env(WALL, num_envs=2, seed=1, wrappers=[lambda e: SafetyLayer(e, model)])
    tether_envs.reset(seed=1)
    _, _, _, _, infos = tether_envs.step(tether_envs.action_space.sample())
    assert infos["cost"].shape == (2,) and "safety_layer/correction" in infos
    tether_envs.close()


def test_point_hazard_with_several_constraints_and_qp() -> None:
    layer = SafetyLayer.from_env(gym.make("tether/PointHazard-v0"), steps=400, epochs=2, seed=0, solver="qp")
    assert layer.model.num_constraints == 4 and layer.limits.shape == (4,)
    layer.reset(seed=0)
    layer.action_space.seed(0)
    for _ in range(20):
        _, _, _, _, info = layer.step(layer.action_space.sample())
        assert isinstance(info["safety_layer/corrected"], bool)


def test_clear_errors() -> None:
    with pytest.raises(TetherError, match=r'info\["constraint"\]'):
        SafetyLayer(gym.make("Pendulum-v1"), LinearCostModel(3, 1, 1)).reset(seed=0)
    with pytest.raises(TetherError, match=r'info\["constraint"\]'):
        SafetyLayer.from_env(gym.make("Pendulum-v1"), steps=10)
    with pytest.raises(TetherError, match="predicts 2 constraints"):
        SafetyLayer(gym.make(WALL), LinearCostModel(4, 2, 2)).reset(seed=0)
    with pytest.raises(TetherError, match="2 dimensions"):
        SafetyLayer(gym.make(WALL), LinearCostModel(4, 3, 1))
    with pytest.raises(TetherError, match="Box action space"):
        SafetyLayer(gym.make("CartPole-v1"), LinearCostModel(4, 1, 1))
    with pytest.raises(TetherError, match="call reset"):
        SafetyLayer(gym.make(WALL), LinearCostModel(4, 2, 1)).step(np.zeros(2, np.float32))
