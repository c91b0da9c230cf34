"""tether control eval: results of a tiny trained run, reproducibility, a hand-rolled loop, errors, video."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tether.cli import main
from tether.config import from_dict
from tether.control.config import ControlConfig
from tether.control.envs import PointHazardEnv, make_env
from tether.control.evaluate import (
    EVAL_FILE,
    _check_safety_layer_env,
    _cost_limit,
    evaluate_run,
    load_control_config,
)
from tether.control.policy import ActorCritic
from tether.control.trainer import ControlTrainer
from tether.errors import TetherError
from tether.runs import Checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint

HAS_MOVIEPY = importlib.util.find_spec("moviepy") is not None
HAS_PYGAME = importlib.util.find_spec("pygame") is not None


def _train(out: Path, env_id: str, **settings: Any) -> Path:
    data: dict[str, Any] = {
        "env": {"id": env_id, "num_envs": 2, **settings.pop("env", {})},
        "train": {"total_steps": 256, "num_steps": 64, "epochs": 1, "minibatches": 2, "seed": 5},
        "run": {"out": str(out), "checkpoint_every": 100},  # one checkpoint, at the end
    }
    data["train"].update(settings.pop("train", {}))
    ControlTrainer(from_dict(ControlConfig, data)).train()
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def cartpole_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("eval") / "cartpole", "CartPole-v1")


@pytest.fixture(scope="module")
def hazard_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PointHazard with the observation normalizer and a cost limit (continuous actions)."""
    return _train(
        tmp_path_factory.mktemp("eval") / "hazard",
        "tether/PointHazard-v0",
        env={"normalize_obs": True},
        train={"cost_limit": 5.0},
    )


def _hand_rolled(run: Path, env_id: str, episodes: int, seed: int) -> list[tuple[float, float, int]]:
    """Deterministic episodes played with the weights loaded by hand (the reference for evaluate_run)."""
    cfg = load_control_config(run)
    ck = load_checkpoint(latest_checkpoint(run))  # type: ignore[arg-type]
    weights = {k[len("model.") :]: v for k, v in ck.tensors.items() if k.startswith("model.")}
    env = make_env(env_id)
    model = ActorCritic(
        env.observation_space,
        env.action_space,
        hidden=tuple(cfg.train.hidden),
        cost_critic=any(k.startswith("cost_critic.") for k in weights),
        normalize_obs=cfg.env.normalize_obs,
    )
    model.load_state_dict(weights)
    out = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        ret, cost, length, done = 0.0, 0.0, 0, False
        while not done:
            with torch.no_grad():
                action = model.act_deterministic(
                    model.normalize(torch.as_tensor(obs, dtype=torch.float32)[None])
                )
            obs, reward, term, trunc, info = env.step(model.env_action(action)[0])
            ret += float(reward)
            cost += float(info["cost"])
            length += 1
            done = term or trunc
        out.append((ret, cost, length))
    env.close()
    return out


def _numbers(r: dict[str, Any]) -> tuple[list[float], list[float], list[int]]:
    return r["episode_returns"], r["episode_costs"], r["episode_lengths"]


def test_episode_count_keys_and_eval_json(cartpole_run: Path) -> None:
    r = evaluate_run(cartpole_run, episodes=3, seed=7)
    assert len(r["episode_returns"]) == len(r["episode_costs"]) == len(r["episode_lengths"]) == 3
    for key in ("return", "cost"):
        for stat in ("mean", "std", "min", "max"):
            assert f"{key}_{stat}" in r
    assert r["return_mean"] == pytest.approx(float(np.mean(r["episode_returns"])))
    assert r["return_std"] == pytest.approx(float(np.std(r["episode_returns"])))
    assert r["return_min"] <= r["return_mean"] <= r["return_max"]
    assert r["env"] == "CartPole-v1" and r["deterministic"] is True and r["checkpoint_step"] == 2
    assert r["cost_limit"] is None and r["violation_rate"] is None  # ppo and no train.cost_limit
    assert r["cost_mean"] == 0.0  # CartPole-v1 has no cost (CostInfo reports 0)
    assert r["safety_layer"] is False and r["safety_layer/corrected_frac"] is None
    # CartPole's reward is 1 per step: the return is the length
    assert r["episode_returns"] == [float(n) for n in r["episode_lengths"]]
    stored = json.loads((cartpole_run / EVAL_FILE).read_text())
    assert stored == r


def test_write_false_leaves_no_file(cartpole_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "copy"
    shutil.copytree(cartpole_run, run)
    (run / EVAL_FILE).unlink(missing_ok=True)
    evaluate_run(run, episodes=1, write=False)
    assert not (run / EVAL_FILE).exists()


@pytest.mark.parametrize("which", ["cartpole_run", "hazard_run"])
def test_returns_equal_a_hand_rolled_loop(which: str, request: pytest.FixtureRequest) -> None:
    run: Path = request.getfixturevalue(which)
    env_id = load_control_config(run).env.id
    r = evaluate_run(run, episodes=2, seed=123, write=False)
    expected = _hand_rolled(run, env_id, 2, 123)
    assert list(zip(*_numbers(r))) == expected  # exact equality


def test_deterministic_and_stochastic_evaluations_are_reproducible(hazard_run: Path) -> None:
    rng = torch.get_rng_state()
    a = evaluate_run(hazard_run, episodes=2, write=False)
    b = evaluate_run(hazard_run, episodes=2, write=False)
    assert _numbers(a) == _numbers(b)
    s1 = evaluate_run(hazard_run, episodes=2, deterministic=False, write=False)
    torch.manual_seed(999)  # the caller's RNG state does not matter
    s2 = evaluate_run(hazard_run, episodes=2, deterministic=False, write=False)
    assert _numbers(s1) == _numbers(s2) and s1["deterministic"] is False
    assert s1["episode_returns"] != a["episode_returns"]  # sampling really happened
    s3 = evaluate_run(hazard_run, episodes=2, deterministic=False, seed=11, write=False)
    assert s3["episode_returns"] != s1["episode_returns"]
    torch.set_rng_state(rng)


def test_the_stored_observation_normalizer_is_used(hazard_run: Path, tmp_path: Path) -> None:
    ck = load_checkpoint(latest_checkpoint(hazard_run))  # type: ignore[arg-type]
    assert float(ck.tensors["model.obs_norm.count"]) > 256  # statistics were learned during training
    before = evaluate_run(hazard_run, episodes=2, write=False)
    run = tmp_path / "zeroed"
    shutil.copytree(hazard_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    tensors = dict(ck.tensors)
    tensors["model.obs_norm.mean"] = torch.zeros_like(tensors["model.obs_norm.mean"])
    tensors["model.obs_norm.var"] = torch.zeros_like(tensors["model.obs_norm.var"])
    save_checkpoint(run, Checkpoint(ck.step, tensors, ck.state))
    after = evaluate_run(run, episodes=2, write=False)
    assert after["episode_returns"] != before["episode_returns"]


def test_costs_and_violation_rate(hazard_run: Path) -> None:
    r = evaluate_run(hazard_run, episodes=10, seed=10_000, deterministic=False, write=False)
    costs = r["episode_costs"]
    assert r["cost_limit"] == 5.0  # train.cost_limit
    assert r["violation_rate"] == pytest.approx(float(np.mean([c > 5.0 for c in costs])))
    assert max(costs) > 5.0 >= min(costs)  # this seed has violations and non-violations
    assert 0.0 < r["violation_rate"] < 1.0
    assert r["cost_mean"] == pytest.approx(float(np.mean(costs))) and r["cost_max"] == max(costs)
    assert all(c == int(c) and 0 <= c <= n for c, n in zip(costs, r["episode_lengths"]))  # 0/1 per step


def test_cost_limit_falls_back_to_the_recipe(hazard_run: Path) -> None:
    cfg = load_control_config(hazard_run)
    plain = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, cost_limit=None))
    assert _cost_limit(plain) is None  # ppo has no constraint
    assert _cost_limit(dataclasses.replace(plain, recipe="ppo_lag")) == 25.0  # the recipe's
    assert _cost_limit(dataclasses.replace(cfg, recipe="ppo_lag")) == 5.0  # the config's wins


def test_safety_layer_at_eval_time(hazard_run: Path, cartpole_run: Path) -> None:
    r = evaluate_run(hazard_run, episodes=2, safety_layer=True, safety_layer_steps=500, write=False)
    assert r["safety_layer"] is True
    assert 0.0 <= r["safety_layer/corrected_frac"] <= 1.0 and r["safety_layer/fit_loss"] is not None
    with pytest.raises(TetherError, match="continuous"):
        evaluate_run(cartpole_run, episodes=1, safety_layer=True, write=False)


def test_errors_before_any_work(tmp_path: Path, cartpole_run: Path, hazard_run: Path) -> None:
    with pytest.raises(TetherError, match=r"not a control run.*config\.yaml"):
        evaluate_run(tmp_path)
    with pytest.raises(TetherError, match="not a directory"):
        evaluate_run(tmp_path / "missing")
    no_ckpt = tmp_path / "no_ckpt"
    no_ckpt.mkdir()
    shutil.copy(cartpole_run / "config.yaml", no_ckpt / "config.yaml")
    with pytest.raises(TetherError, match="no checkpoint"):
        evaluate_run(no_ckpt)
    lm_like = tmp_path / "other"
    lm_like.mkdir()
    (lm_like / "config.yaml").write_text("model: {name: tiny}\n")
    with pytest.raises(TetherError, match="not a control config"):
        evaluate_run(lm_like)
    with pytest.raises(TetherError, match="is not a checkpoint"):
        evaluate_run(cartpole_run, checkpoint=tmp_path)
    with pytest.raises(TetherError, match=r"Pendulum-v1.*does not match the policy"):
        evaluate_run(cartpole_run, env_id="Pendulum-v1")
    with pytest.raises(TetherError, match="does not match the policy"):
        evaluate_run(hazard_run, env_id="CartPole-v1")
    with pytest.raises(TetherError, match="unknown environment id"):
        evaluate_run(cartpole_run, env_id="CartPoel-v1")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(TetherError, match="episodes must be a positive integer"):
            evaluate_run(cartpole_run, episodes=bad)  # type: ignore[arg-type]
    with pytest.raises(TetherError, match=r'info\["constraint"\]'):
        _check_safety_layer_env(make_env("Pendulum-v1"), "Pendulum-v1", 0)


def test_other_env_with_the_same_spaces(cartpole_run: Path) -> None:
    r = evaluate_run(cartpole_run, episodes=2, env_id="tether/SafeCartPole-v0", write=False)
    assert r["env"] == "tether/SafeCartPole-v0" and r["trained_env"] == "CartPole-v1"
    # Same dynamics and seeds: the returns are the CartPole ones, now with the forbidden-region cost.
    assert r["episode_returns"] == evaluate_run(cartpole_run, episodes=2, write=False)["episode_returns"]


def test_explicit_checkpoint(cartpole_run: Path) -> None:
    path = latest_checkpoint(cartpole_run)
    r = evaluate_run(cartpole_run, episodes=1, checkpoint=path, write=False)
    assert r["checkpoint"] == str(path) and r["checkpoint_step"] == 2


def test_cli_prints_the_table(cartpole_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["control", "eval", str(cartpole_run), "--episodes", "2", "--seed", "3", "--stochastic"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "return" in out and "cost" in out and "violation rate" in out and "stochastic" in out
    assert str(cartpole_run / EVAL_FILE) in out
    stored = json.loads((cartpole_run / EVAL_FILE).read_text())
    assert stored["episodes"] == 2 and stored["seed"] == 3 and stored["deterministic"] is False
    assert f"{stored['return_mean']:.3f}" in out
    rc = main(["control", "eval", str(cartpole_run), "--episodes", "0"])
    assert rc == 2 and "episodes must be a positive integer" in capsys.readouterr().err


# --------------------------------------------------------------------------- video


def test_point_hazard_renders_rgb_frames() -> None:
    env = PointHazardEnv(render_mode="rgb_array")
    env.reset(seed=0)
    frame = env.render()
    assert frame is not None and frame.shape == (256, 256, 3) and frame.dtype == np.uint8
    n, s = env.render_size, env.size
    col = int((env.position[0] + s) / (2 * s) * n)
    row = int((s - env.position[1]) / (2 * s) * n)
    assert tuple(frame[row, col]) == (40, 70, 200)  # the agent, drawn where it is
    assert PointHazardEnv().render() is None
    with pytest.raises(ValueError, match="render_mode"):
        PointHazardEnv(render_mode="human")


def test_video_needs_moviepy(hazard_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "moviepy" else real(name, *a)
    )
    with pytest.raises(TetherError, match=r"pip install tether\[video\]"):
        evaluate_run(hazard_run, episodes=1, video_dir=tmp_path / "v")
    assert not (tmp_path / "v").exists()


def test_render_failure_names_mujoco_gl(
    hazard_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tether.control.evaluate as ev

    def broken(self: PointHazardEnv) -> None:
        raise RuntimeError("no OpenGL context")

    monkeypatch.setattr(PointHazardEnv, "render", broken)
    monkeypatch.setattr(ev, "_is_mujoco", lambda env_id: True)
    with pytest.raises(TetherError, match=r"MUJOCO_GL=egl.*MUJOCO_GL=osmesa"):
        evaluate_run(hazard_run, episodes=1, video_dir=tmp_path / "v")


@pytest.mark.skipif(not HAS_MOVIEPY, reason="moviepy is not installed (pip install tether[video])")
def test_video_of_point_hazard(hazard_run: Path, tmp_path: Path) -> None:
    video = tmp_path / "videos"
    r = evaluate_run(hazard_run, episodes=1, video_dir=video, write=False)
    files = sorted(video.glob("*.mp4"))
    assert [p.name for p in files] == ["eval-episode-0.mp4"] and files[0].stat().st_size > 1000
    assert r["videos"] == [str(files[0])]
    # Recording changes nothing in the numbers.
    assert _numbers(r) == _numbers(evaluate_run(hazard_run, episodes=1, write=False))


@pytest.mark.skipif(HAS_PYGAME, reason="pygame is installed")
@pytest.mark.skipif(not HAS_MOVIEPY, reason="moviepy is not installed")
def test_cartpole_video_without_pygame_names_the_fix(cartpole_run: Path, tmp_path: Path) -> None:
    with pytest.raises(TetherError, match="pip install pygame"):
        evaluate_run(cartpole_run, episodes=1, video_dir=tmp_path / "v")


@pytest.mark.skipif(not (HAS_MOVIEPY and HAS_PYGAME), reason="needs moviepy and pygame")
def test_video_of_cartpole(cartpole_run: Path, tmp_path: Path) -> None:
    evaluate_run(cartpole_run, episodes=1, video_dir=tmp_path / "v", write=False)
    assert (tmp_path / "v" / "eval-episode-0.mp4").stat().st_size > 1000
