"""Safe RL in the control world: constrained recipes (PPO-Lag, PID-Lag), the multiplier, the cost limit."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from tests.control.resume import unbroken_and_resumed
from tether.catalogue.advantages.broadcast import masked_whiten
from tether.config import ConfigError, apply_overrides, from_dict
from tether.control.config import ControlConfig
from tether.control.trainer import ControlTrainer, resolve_recipe
from tether.errors import TetherError
from tether.recipes.compose import Method
from tether.recipes.loader import load_recipe
from tether.runs import RunDir


def make_config(out: Path, *overrides: str) -> ControlConfig:
    base = {
        "recipe": "ppo_lag",
        "env": {"id": "tether/PointHazard-v0", "num_envs": 2},
        "train": {"total_steps": 1600, "num_steps": 200, "epochs": 2, "minibatches": 2, "seed": 5},
        "run": {"out": str(out), "checkpoint_every": 2},
    }
    return from_dict(ControlConfig, apply_overrides(base, list(overrides)))


def test_constrained_recipes_compose() -> None:
    for name, rule in (("ppo_lag", "lagrange_update"), ("pid_lag", "pid_lagrange_update")):
        method = Method(resolve_recipe(name))
        c = method.constraint
        assert c is not None and c.multiplier is not None and c.multiplier.name == rule
        assert c.objective is not None and c.objective.name == "lagrangian_advantage"
        assert c.cost_limit == 25.0 and c.multiplier.params["cost_limit"] == 25.0
    assert Method(resolve_recipe("ppo")).constraint is None


def test_config_cost_limit_overrides_the_recipe() -> None:
    method = Method(resolve_recipe("ppo_lag"), cost_limit=3.5)
    assert method.constraint is not None
    assert method.constraint.cost_limit == 3.5 and method.constraint.multiplier is not None
    assert method.constraint.multiplier.params["cost_limit"] == 3.5


def test_multiplier_moves_with_the_cost() -> None:
    # Initial multiplier is the state's default (0.001 for PPO-Lag's Adam rule, 0 for PID).
    lag = Method(resolve_recipe("ppo_lag"), cost_limit=10.0).constraint
    pid = Method(resolve_recipe("pid_lag"), cost_limit=10.0).constraint
    assert lag is not None and pid is not None
    assert lag.value == pytest.approx(0.001) and pid.value == 0.0
    for c in (lag, pid):
        values = [c.value]
        for _ in range(5):
            c.update(30.0)  # over the limit: lambda rises
            values.append(c.value)
        assert all(b > a for a, b in itertools.pairwise(values[1:])), values
        for _ in range(200):
            c.update(0.0)  # far under the limit: lambda falls to 0 and stays >= 0
        assert c.value == pytest.approx(0.0, abs=1e-6) and c.value >= 0.0


def test_zero_multiplier_gives_the_reward_advantage() -> None:
    c = Method(resolve_recipe("ppo_lag")).constraint
    assert c is not None
    c.value = 0.0
    adv, cadv = torch.randn(64), torch.randn(64)
    out, _ = c.combine(adv, cadv)
    assert torch.equal(out, adv)
    c.value = 3.0
    out, _ = c.combine(adv, cadv)
    assert torch.allclose(out, (adv - 3.0 * cadv) / 4.0)


def test_trainer_runs_constrained_recipe_and_logs_safety_metrics(tmp_path: Path) -> None:
    trainer = ControlTrainer(make_config(tmp_path / "run", "train.cost_limit=0.5"))
    assert trainer.model.cost_critic is not None  # a constraint turns the cost critic on
    summary = trainer.train()
    records = RunDir(tmp_path / "run").metrics.read()
    with_episodes = [r for r in records if "episode/cost" in r]
    assert with_episodes, "no episode ended"
    for r in with_episodes:
        assert r["safety/cost_limit"] == 0.5
        assert 0.0 <= r["safety/violation_rate"] <= 1.0
        assert r["lagrange/mean_cost"] == pytest.approx(r["episode/cost"], rel=1e-6)
        assert 0.0 <= r["safety/violation_rate_last10"] <= 1.0
    # Once the near-random policy drifts into hazards (episode cost > 0.5), lambda rises.
    lams = [r["lagrange/multiplier"] for r in records]
    over = [i for i, r in enumerate(records) if r.get("episode/cost", 0.0) > 0.5]
    assert over, "no episode went over the limit"
    assert all(lams[i] > lams[i - 1] for i in over if i > 0)
    assert lams[-1] > 0.001
    assert summary["cost_limit"] == 0.5 and summary["within_cost_limit"] in (True, False)


def test_policy_advantages_combine_standardized_reward_and_centered_cost_advantages(tmp_path: Path) -> None:
    trainer = ControlTrainer(make_config(tmp_path / "run"))
    assert trainer.constraint is not None
    adv = torch.randn(200, 2, dtype=torch.float64)
    cadv = torch.randn(200, 2, dtype=torch.float64)
    episode = torch.tensor([[1.0], [1e6], [200.0]])  # J_c far above the limit: lambda > 0
    out, combined, metrics = trainer._constrain(adv, cadv, episode)
    lam = trainer.constraint.value
    assert combined and lam > 0 and metrics["lagrange/multiplier"] == pytest.approx(lam, rel=1e-6)
    r = masked_whiten(adv.reshape(-1, 1), torch.ones(400, 1, dtype=torch.bool)).reshape(-1)
    expected = (r - lam * (cadv.reshape(-1) - cadv.mean())) / (1 + lam)
    assert torch.allclose(out.reshape(-1), expected, atol=1e-6)


@pytest.mark.parametrize("recipe", ["ppo_lag", "pid_lag"])
def test_multiplier_steps_only_on_rollouts_where_an_episode_ended(tmp_path: Path, recipe: str) -> None:
    trainer = ControlTrainer(make_config(tmp_path / "run", f"recipe={recipe}", "train.cost_limit=5"))
    c = trainer.constraint
    assert c is not None
    adv, cadv = torch.randn(200, 2), torch.randn(200, 2)
    over = torch.tensor([[1.0], [30.0], [200.0]])  # one episode ended, its cost over the limit
    none = torch.zeros(3, 0)  # no episode ended: no new measurement of J_c
    values, states, updated = [c.value], [dict(c.state)], []
    for episode in (over, none, none, over):
        trainer.recent_costs += episode[1].tolist()  # as the rollout records them
        _, _, metrics = trainer._constrain(adv, cadv, episode)
        values.append(c.value)
        states.append(dict(c.state))
        updated.append(metrics["lagrange/updated"])
        assert metrics["lagrange/multiplier"] == pytest.approx(c.value, rel=1e-6)  # logged in float32
    assert updated == [1.0, 0.0, 0.0, 1.0]
    assert values[1] > values[0] and values[4] > values[3]  # moves on the rollouts with an episode
    assert values[1] == values[2] == values[3] and states[1] == states[2] == states[3]  # not without


def test_multiplier_holds_in_a_run_whose_episodes_outlast_the_rollout(tmp_path: Path) -> None:
    # 200-step episodes, 32-step rollouts: most rollouts end no episode (the audit's repro).
    cfg = make_config(tmp_path / "run", "train.total_steps=1024", "train.num_steps=32", "train.cost_limit=5")
    ControlTrainer(cfg).train()
    records = RunDir(tmp_path / "run").metrics.read()
    assert any("episode/count" in r for r in records) and any("episode/count" not in r for r in records)
    for before, r in itertools.pairwise([{"lagrange/multiplier": None}, *records]):
        assert r["lagrange/updated"] == float("episode/count" in r)
        if "episode/count" not in r:
            if before["lagrange/multiplier"] is not None:
                assert r["lagrange/multiplier"] == before["lagrange/multiplier"]
            assert "lagrange/mean_cost" not in r
        else:
            assert r["lagrange/mean_cost"] == pytest.approx(r["episode/cost"], rel=1e-6)
    moved = [r for r in records if "episode/count" in r and r["episode/cost"] > 5]
    assert moved and all(r["lagrange/multiplier_delta"] > 0 for r in moved)


def test_resume_restores_the_multiplier_exactly(tmp_path: Path) -> None:
    a, b, resumed_at = unbroken_and_resumed(make_config, tmp_path, "recipe=pid_lag", "train.cost_limit=1")
    assert resumed_at == 2
    assert len(a) == len(b) == 4 and a == b


def test_plain_ppo_logs_violation_rate_with_a_cost_limit(tmp_path: Path) -> None:
    summary = ControlTrainer(make_config(tmp_path / "run", "recipe=ppo", "train.cost_limit=2")).train()
    records = RunDir(tmp_path / "run").metrics.read()
    assert any("safety/violation_rate" in r for r in records)
    assert all("lagrange/multiplier" not in r for r in records)
    assert summary["cost_limit"] == 2.0


def test_constraint_block_errors(tmp_path: Path) -> None:
    def write(text: str) -> str:
        path = tmp_path / "r.yaml"
        path.write_text("advantage: gae\npolicy_loss: ppo_clip\n" + text)
        return str(path)

    with pytest.raises(TetherError, match="unknown keys"):
        load_recipe(write("constraint: {multiplier: lagrange_update, penalty: x}\n"))
    with pytest.raises(TetherError, match=r"needs a constraint\.multiplier"):
        load_recipe(write("constraint: {objective: lagrangian_advantage}\n"))
    with pytest.raises(ConfigError, match="not a multiplier update rule"):
        Method(load_recipe(write("constraint: {cost_limit: 1, multiplier: lagrangian_advantage}\n")))
    with pytest.raises(ConfigError, match="does not combine"):
        Method(
            load_recipe(
                write(
                    "constraint: {cost_limit: 1, multiplier: lagrange_update, objective: pid_lagrange_update}\n"
                )
            )
        )


def test_lm_trainer_refuses_constrained_recipes(tmp_path: Path) -> None:
    from tether.lm.config import LMConfig
    from tether.lm.trainer import RLTrainer

    path = tmp_path / "safe.yaml"
    path.write_text(
        "advantage: grpo\npolicy_loss: ppo_clip\n"
        "constraint: {cost_limit: 1, multiplier: lagrange_update, objective: lagrangian_advantage}\n"
    )
    cfg = from_dict(LMConfig, {"recipe": str(path), "run": {"out": str(tmp_path / "run")}})
    with pytest.raises(TetherError, match="control world"):
        RLTrainer(cfg)


def test_cpo_recipe_moves_the_actor_within_its_trust_region(tmp_path: Path) -> None:
    trainer = ControlTrainer(make_config(tmp_path / "run", "recipe=cpo", "train.cost_limit=2"))
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in optimized for p in trainer.model.actor.parameters())  # Adam: critics only
    before = [p.detach().clone() for p in trainer.model.actor.parameters()]
    trainer.train()
    records = RunDir(tmp_path / "run").metrics.read()
    for r in records:
        assert r["cpo/kl"] <= 0.01 + 1e-6
        assert r["cpo/optim_case"] in (0.0, 1.0, 2.0, 3.0, 4.0)
        if r.get("episode/cost", 0.0) > 2 and r["cpo/no_cost_estimate"] == 0.0:
            assert r["cpo/cost_excess"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.actor.parameters(), strict=True))


def test_cpo_resume_is_exact(tmp_path: Path) -> None:
    a, b, _ = unbroken_and_resumed(make_config, tmp_path, "recipe=cpo", "train.cost_limit=2")
    assert a == b


def test_cpo_scales_the_cost_surrogate_by_the_mean_length_of_the_episodes_j_c_comes_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 200-step episodes, 32-step rollouts of 2 envs: no episode ends in the first six rollouts (J_c is
    # then 0 and T the steps each env has taken), then most rollouts end none (J_c and T from the last
    # ten episodes).
    import tether.control.trainer as trainer_module

    cfg = make_config(tmp_path / "run", "recipe=cpo", "train.total_steps=1024", "train.num_steps=32")
    trainer = ControlTrainer(cfg)
    real = trainer_module.cpo_update
    calls: list[tuple[float, float, list[float], list[float], int]] = []

    def spy(*args: object, **kwargs: object) -> dict[str, float]:
        calls.append(
            (
                float(kwargs["mean_episode_cost"]),  # type: ignore[arg-type]
                float(kwargs["episode_length"]),  # type: ignore[arg-type]
                list(trainer.recent_costs),
                list(trainer.recent_lengths),
                trainer.env_steps,
            )
        )
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(trainer_module, "cpo_update", spy)
    trainer.train()
    records = RunDir(tmp_path / "run").metrics.read()
    assert len(calls) == len(records) == 16
    kinds = set()
    for (mean_cost, length, costs, lengths, env_steps), r in zip(calls, records, strict=True):
        assert r["cpo/cost_scale"] == pytest.approx(length, rel=1e-6)
        if "episode/count" in r:  # this rollout's episodes, for J_c and T alike
            kinds.add("fresh")
            assert mean_cost == pytest.approx(r["episode/cost"], rel=1e-6)
            assert length == pytest.approx(r["episode/length"], rel=1e-6)
        elif costs:  # the last ten episodes, for J_c and T alike
            kinds.add("last ten")
            assert mean_cost == pytest.approx(sum(costs[-10:]) / len(costs[-10:]))
            assert length == pytest.approx(sum(lengths[-10:]) / len(lengths[-10:]))
        else:  # none yet: J_c = 0, T = steps per env so far
            kinds.add("none")
            assert r["cpo/no_cost_estimate"] == 1.0 and mean_cost == 0.0
            assert length == env_steps / 2
    assert kinds == {"fresh", "last ten", "none"}


def test_cpo_omnisafe_units_leave_the_cost_surrogate_unscaled(tmp_path: Path) -> None:
    recipe = tmp_path / "cpo_omnisafe_units.yaml"
    text = (Path(resolve_recipe("cpo").path)).read_text()
    recipe.write_text(
        text.replace("params: {target_kl: 0.01}", "params: {target_kl: 0.01, omnisafe_units: true}")
    )
    assert "omnisafe_units: true" in recipe.read_text()
    ControlTrainer(make_config(tmp_path / "run", f"recipe={recipe}", "train.total_steps=800")).train()
    records = RunDir(tmp_path / "run").metrics.read()
    assert records and all(r["cpo/cost_scale"] == 1.0 for r in records)


def test_cpo_resume_is_exact_when_t_comes_from_the_last_episodes(tmp_path: Path) -> None:
    # 100-step rollouts: episodes end in rollout 2 (checkpointed), none in rollout 3, whose T then comes
    # from the lengths saved with the checkpoint.
    a, b, resumed_at = unbroken_and_resumed(
        make_config,
        tmp_path,
        "recipe=cpo",
        "train.cost_limit=2",
        "train.num_steps=100",
        "train.total_steps=800",
    )
    assert resumed_at == 2
    assert "episode/count" in a[1] and "episode/count" not in a[2]
    assert a == b


@pytest.mark.parametrize("recipe", ["ppo_lag", "cpo"])
def test_one_sample_rollouts_train_without_nan(tmp_path: Path, recipe: str) -> None:
    # num_envs 1 x num_steps 1: the batch standardization sees one value (its Bessel std is NaN).
    cfg = make_config(
        tmp_path / "run",
        f"recipe={recipe}",
        "env.num_envs=1",
        "train.num_steps=1",
        "train.minibatches=1",
        "train.total_steps=5",
    )
    summary = ControlTrainer(cfg).train()
    records = RunDir(tmp_path / "run").metrics.read()
    assert len(records) == 5 and summary["nan_skips"] == 0
    assert all(r["train/skipped_updates"] == 0 for r in records)
    assert all(math.isfinite(v) for r in records for v in r.values() if isinstance(v, float))
