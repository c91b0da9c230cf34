"""ControlTrainer: a short run, GAE over episode ends, exact resume, early errors, Gaussian log-probs."""

from __future__ import annotations

import itertools
import math
import pickle
import sys
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from gymnasium.utils import EzPickle

from tests.control.resume import unbroken_and_resumed
from tether.config import ConfigError, apply_overrides, from_dict
from tether.control.config import ControlConfig
from tether.control.policy import ActorCritic, RunningNormalizer
from tether.control.trainer import (
    ControlTrainer,
    resolve_recipe,
    segment_advantages,
    standardize,
)
from tether.errors import TetherError
from tether.recipes.compose import Method
from tether.runs import RunDir, load_checkpoint


def make_config(out: Path, *overrides: str) -> ControlConfig:
    base = {
        "env": {"id": "CartPole-v1", "num_envs": 2},
        "train": {"total_steps": 256, "num_steps": 32, "epochs": 2, "minibatches": 2, "seed": 3},
        "run": {"out": str(out), "checkpoint_every": 2},
    }
    return from_dict(ControlConfig, apply_overrides(base, list(overrides)))


def test_short_run_writes_run_dir(tmp_path: Path) -> None:
    summary = ControlTrainer(make_config(tmp_path / "run")).train()
    run = RunDir(tmp_path / "run")
    records = run.metrics.read()
    assert len(records) == 4 and summary["updates"] == 4 and summary["total_env_steps"] == 256
    for key in (
        "policy/entropy",
        "policy/ratio_max",
        "grad/norm",
        "losses/explained_variance",
        "perf/sps",
        "perf/cpu_peak_rss_gb",
    ):
        assert key in records[-1]
    assert any("episode/return" in r for r in records)
    for r in records:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float))
    assert (tmp_path / "run" / "config.yaml").exists()
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()
    assert run.read_summary() is not None and summary["target_return"] == 475.0


def _hand_gae(r: list[float], v: list[float], boot: float, gamma: float, lam: float) -> list[float]:
    adv, nxt_v, nxt_a = [0.0] * len(r), boot, 0.0
    for t in reversed(range(len(r))):
        delta = r[t] + gamma * nxt_v - v[t]
        nxt_a = delta + gamma * lam * nxt_a
        adv[t], nxt_v = nxt_a, v[t]
    return adv


def test_segment_advantages_match_hand_gae_across_episode_ends() -> None:
    method = Method(resolve_recipe("ppo"))
    gamma, lam = 0.9, 0.8
    method.advantages[0].params.update(gamma=gamma, lam=lam)  # as ControlTrainer wires them
    # env 0: terminates at t=1, truncated at t=3 (bootstrap V(final)=2.0), rollout ends at t=5.
    # env 1: no episode end (bootstrap V(s_6)=-1.0).
    rewards = torch.tensor([[1.0, 0.5], [2.0, 0.5], [0.0, 1.0], [1.0, 0.0], [3.0, 2.0], [1.0, 1.0]])
    values = torch.tensor([[0.5, 0.1], [1.0, 0.2], [0.3, 0.3], [0.7, 0.4], [1.5, 0.5], [0.2, 0.6]])
    term = torch.zeros(6, 2, dtype=torch.bool)
    trunc = torch.zeros(6, 2, dtype=torch.bool)
    term[1, 0] = True
    trunc[3, 0] = True
    next_values = torch.zeros(6, 2)
    next_values[3, 0] = 2.0
    next_values[5, 0] = 0.25
    next_values[5, 1] = -1.0
    adv, ret, _ = segment_advantages(method, rewards, values, term, trunc, next_values, gamma, lam)
    col0 = [rewards[t, 0].item() for t in range(6)]
    val0 = [values[t, 0].item() for t in range(6)]
    expected0 = (
        _hand_gae(col0[0:2], val0[0:2], 0.0, gamma, lam)
        + _hand_gae(col0[2:4], val0[2:4], 2.0, gamma, lam)
        + _hand_gae(col0[4:6], val0[4:6], 0.25, gamma, lam)
    )
    expected1 = _hand_gae(rewards[:, 1].tolist(), values[:, 1].tolist(), -1.0, gamma, lam)
    torch.testing.assert_close(adv[:, 0], torch.tensor(expected0))
    torch.testing.assert_close(adv[:, 1], torch.tensor(expected1))
    torch.testing.assert_close(ret, adv + values)


@pytest.mark.parametrize(
    "extra",
    [
        (),
        ("env.id=Pendulum-v1", "env.normalize_obs=true", "env.normalize_reward=true"),
        # MuJoCo envs pickle only their constructor arguments: the simulation is saved beside them.
        # Hopper's episodes end (and reset from np_random) within the run; Ant's next step reads a
        # quantity the last one derived (xpos), so the whole MjData must come back, not the state alone.
        ("env.id=tether/SafeHopperVelocity-v0", "train.epochs=1"),
        ("env.id=tether/SafeAntVelocity-v0", "train.epochs=1"),
    ],
    ids=["plain", "normalized", "mujoco-hopper", "mujoco-ant"],
)
def test_resume_reproduces_unbroken_run(tmp_path: Path, extra: tuple[str, ...]) -> None:
    a, b, resumed_at = unbroken_and_resumed(make_config, tmp_path, *extra)
    assert resumed_at == 2
    alarms = RunDir(tmp_path / "b").alarms.read() if (tmp_path / "b" / "alarms.jsonl").exists() else []
    assert all(r["kind"] != "env_reset_on_resume" for r in alarms)  # the envs were restored, not reset
    assert len(a) == len(b) == 4 and a == b
    if "mujoco" in " ".join(extra):
        assert any("episode/count" in r for r in a[2:])  # episodes ended (and reset) after the resume


class CountingEnv(gym.Env[np.ndarray, np.ndarray], EzPickle):
    """An env whose state (a step counter) lives outside its constructor arguments, the only thing
    ``EzPickle`` pickles: unpickled, it counts from 0 again."""

    observation_space = spaces.Box(-np.inf, np.inf, (1,), np.float32)
    action_space = spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self) -> None:
        EzPickle.__init__(self)
        self.count = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        super().reset(seed=seed)
        self.count = 0
        return np.zeros(1, np.float32), {}

    def step(self, action: np.ndarray) -> Any:
        self.count += 1
        return np.array([self.count], np.float32), float(self.count % 3), False, False, {}


def test_a_snapshot_that_does_not_reproduce_the_envs_resets_them_with_an_alarm(tmp_path: Path) -> None:
    if "tether_test/Counting-v0" not in gym.registry:
        gym.register("tether_test/Counting-v0", entry_point=CountingEnv, max_episode_steps=50)
    a, b, resumed_at = unbroken_and_resumed(make_config, tmp_path, "env.id=tether_test/Counting-v0")
    assert resumed_at == 2
    alarms = RunDir(tmp_path / "b").alarms.read()
    assert [r["kind"] for r in alarms] == ["env_reset_on_resume"] and alarms[0]["step"] == 2
    summary = RunDir(tmp_path / "b").read_summary()
    assert summary is not None and summary["env_reset_on_resume"] is True
    assert a[:2] == b[:2] and a[2:] != b[2:]  # after the reset, the resumed run goes its own way


def test_env_fingerprint_ignores_sharing_and_sees_the_simulation() -> None:
    from tether.control.envs import env_fingerprint, restore_simulation_state, simulation_state

    env = gym.make("tether/SafeHopperVelocity-v0")
    env.reset(seed=0)
    for _ in range(5):
        env.step(env.action_space.sample())
    snapshot = pickle.loads(pickle.dumps((env, simulation_state(env))))
    assert env_fingerprint(snapshot[0]) != env_fingerprint(env)  # EzPickle: a fresh simulation
    restore_simulation_state(*snapshot)
    assert env_fingerprint(snapshot[0]) == env_fingerprint(env)
    env.unwrapped.data.qvel[0] += 1e-12
    assert env_fingerprint(snapshot[0]) != env_fingerprint(env)


def test_bad_env_id_fails_before_work(tmp_path: Path) -> None:
    with pytest.raises(TetherError, match="CartPole-v1"):
        ControlTrainer(make_config(tmp_path / "run", "env.id=CartPol-v1"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
def test_unsupported_spaces_fail_before_the_run_directory_exists(
    tmp_path: Path, dry_run: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    from tether.cli import main

    out = tmp_path / "frozen"
    args = ["control", "train", "--env", "FrozenLake-v1", "--steps", "512", "--out", str(out)]
    assert main(args + ["--dry-run"] * dry_run) == 2
    assert not out.exists()
    err = capsys.readouterr().err
    assert "'FrozenLake-v1'" in err and "flat Box observation space, got Discrete(16)" in err
    if "tether_test/MultiDiscrete-v0" not in gym.registry:
        gym.register("tether_test/MultiDiscrete-v0", entry_point=MultiDiscreteEnv)
    with pytest.raises(TetherError, match="unsupported action space MultiDiscrete"):
        ControlTrainer(make_config(tmp_path / "md", "env.id=tether_test/MultiDiscrete-v0"))
    assert not (tmp_path / "md").exists()


class MultiDiscreteEnv(CountingEnv):
    action_space = spaces.MultiDiscrete([2, 3])  # type: ignore[assignment]


def test_imports_register_a_users_env_and_eval_finds_it_again(tmp_path: Path) -> None:
    env_file = tmp_path / "my_envs.py"
    env_file.write_text(
        "import gymnasium as gym\n"
        "if 'user/ShortCartPole-v0' not in gym.registry:\n"
        "    gym.register('user/ShortCartPole-v0', entry_point='gymnasium.envs.classic_control:CartPoleEnv',"
        " max_episode_steps=20)\n"
    )
    out = tmp_path / "run"
    cfg = make_config(out, "env.id=user/ShortCartPole-v0", f"imports=[{env_file}]", "train.total_steps=128")
    ControlTrainer(cfg).train()
    lengths = [r["episode/length"] for r in RunDir(out).metrics.read() if "episode/length" in r]
    assert lengths and max(lengths) <= 20  # the user's registration (20-step episodes) was used
    from tether.control.evaluate import evaluate_run

    # As in a new process: the env and the imported file are forgotten; the run's config imports it again.
    del gym.registry["user/ShortCartPole-v0"]
    for name in [m for m in sys.modules if m.startswith("tether_user_my_envs_")]:
        del sys.modules[name]
    result = evaluate_run(out, episodes=2, write=False)
    assert result["env"] == "user/ShortCartPole-v0" and max(result["episode_lengths"]) <= 20


def test_bad_config_and_recipe_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.lr"):
        make_config(tmp_path, "train.lr=-1")
    with pytest.raises(ConfigError, match=r"train\.epoch"):
        make_config(tmp_path, "train.epoch=3")
    with pytest.raises(ConfigError, match="minibatches"):
        make_config(tmp_path, "train.minibatches=1000")
    with pytest.raises(ConfigError) as err:
        make_config(tmp_path, "train.num_steps=5", "train.minibatches=11")  # 2 envs x 5 steps = 10 samples
    for part in ("train.minibatches: 11", "env.num_envs x train.num_steps = 2 x 5 = 10", "at most 10"):
        assert part in str(err.value)
    with pytest.raises(TetherError, match="control recipe"):
        ControlTrainer(make_config(tmp_path / "run", "recipe=pp"))
    assert not (tmp_path / "run").exists()


def test_gaussian_log_probs_match_torch_normal() -> None:
    torch.manual_seed(0)
    obs_space = spaces.Box(-1.0, 1.0, shape=(3,))
    act_space = spaces.Box(-2.0, 2.0, shape=(2,))
    model = ActorCritic(obs_space, act_space)
    with torch.no_grad():
        model.actor.log_std.copy_(torch.tensor([-0.3, 0.4]))
    obs = torch.randn(5, 3)
    action = torch.randn(5, 2)
    logp, entropy = model.evaluate(obs, action)
    mean = model.actor.net(obs)
    ref = torch.distributions.Normal(mean, torch.tensor([-0.3, 0.4]).exp())
    torch.testing.assert_close(logp, ref.log_prob(action).sum(-1))
    torch.testing.assert_close(entropy, ref.entropy().sum(-1))
    assert model.env_action(torch.full((1, 2), 5.0)).tolist() == [[2.0, 2.0]]


def test_mhpo_recipe_runs(tmp_path: Path) -> None:
    summary = ControlTrainer(make_config(tmp_path / "run", "recipe=ppo_mhpo", "train.total_steps=64")).train()
    assert summary["recipe"] == "ppo_mhpo" and summary["updates"] == 1
    assert resolve_recipe("mhpo").name == "ppo_mhpo"  # `--recipe mhpo` works in the control world


def test_cli_control_train(tmp_path: Path) -> None:
    from tether.cli import main

    out = tmp_path / "cli"
    rc = main(
        [
            "control",
            "train",
            "--env",
            "CartPole-v1",
            "--steps",
            "64",
            "--out",
            str(out),
            "env.num_envs=2",
            "train.num_steps=32",
            "train.anneal_lr=false",
        ]
    )
    assert rc == 0 and (out / "summary.json").exists()
    assert main(["control", "train", "--env", "Nope-v0", "--out", str(tmp_path / "x")]) == 2
    # --resume alone continues with the run's settings (CartPole, 2 envs, 32 steps), extended to 128
    # (allowed because the learning rate is not annealed over the budget)
    assert main(["control", "train", "--out", str(out), "--resume", "--steps", "128"]) == 0
    records = RunDir(out).metrics.read()
    assert len(records) == 2 and records[-1]["env_steps"] == 128
    # a setting that changes the math is refused, and nothing is touched
    assert main(["control", "train", "--out", str(out), "--resume", "--steps", "192", "train.lr=0.1"]) == 2
    assert len(RunDir(out).metrics.read()) == 2
    # with the learning rate annealed over the budget (the default), the budget is part of the math
    annealed = tmp_path / "annealed"
    small = ["env.num_envs=2", "train.num_steps=32"]
    assert (
        main(["control", "train", "--env", "CartPole-v1", "--steps", "64", "--out", str(annealed), *small])
        == 0
    )
    assert main(["control", "train", "--out", str(annealed), "--resume", "--steps", "128"]) == 2


def test_running_normalizer_matches_batch_statistics() -> None:
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, 3, generator=g, dtype=torch.float64) * 4 + 3 for n in (1, 7, 20)]
    norm = RunningNormalizer(3)
    for c in chunks:
        norm.update(c)
    data = torch.cat(chunks)
    # The prior (mean 0, var 1, count 1e-4) weighs 1e-4 / 28 of the total: within 1e-4 of the data's.
    assert torch.allclose(norm.get_buffer("mean"), data.mean(0), atol=1e-4)
    assert torch.allclose(norm.get_buffer("var"), data.var(0, unbiased=False), rtol=1e-4)
    z = norm(data)
    assert z.dtype == torch.float32
    assert torch.allclose(z.mean(0).double(), torch.zeros(3, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(norm(torch.full((1, 3), 1e9)), torch.full((1, 3), 10.0))  # clipped


def test_observation_normalizer_is_trained_and_saved_with_the_policy(tmp_path: Path) -> None:
    cfg = make_config(
        tmp_path / "run", "env.id=Pendulum-v1", "env.normalize_obs=true", "train.total_steps=128"
    )
    trainer = ControlTrainer(cfg)
    trainer.train()
    norm = trainer.model.obs_norm
    assert norm is not None and float(norm.get_buffer("count")) == pytest.approx(128 + 1e-4)
    state = trainer.model.state_dict()
    assert "obs_norm.mean" in state and "obs_norm.var" in state
    # The stored rollout observations are the normalized ones, so the networks never see raw input.
    raw = torch.tensor([[1.0, 0.0, 8.0]])
    assert not torch.allclose(trainer.model.normalize(raw), raw)


def test_ctrl_c_stops_after_the_update_with_its_checkpoint(tmp_path: Path) -> None:
    import os
    import signal

    from tether.errors import RunInterrupted
    from tether.runs import latest_checkpoint

    out = tmp_path / "run"
    trainer = ControlTrainer(make_config(out, "run.checkpoint_every=100"))
    trainer.on_update = lambda update, metrics: os.kill(os.getpid(), signal.SIGINT) if update == 2 else None
    with pytest.raises(RunInterrupted, match=r"interrupted after step 2 of 4.*tether control train --out"):
        trainer.train()
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == "step_000000002"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    summary = ControlTrainer(make_config(out, "run.checkpoint_every=100"), resume=True).train()
    assert summary["updates"] == 4 and len(RunDir(out).metrics.read()) == 4


def _spy_loss(trainer: ControlTrainer, nan_calls: set[int] | None = None) -> list[float]:
    """Record the ratio_max of every policy-loss call; make the loss NaN on the given (1-based) calls."""
    original = trainer.method.loss
    seen: list[float] = []

    def loss(inputs: Any, aggregation: Any = None) -> Any:
        value, metrics = original(inputs) if aggregation is None else original(inputs, aggregation)
        seen.append(float(metrics["policy/ratio_max"]))
        if nan_calls is not None and len(seen) in nan_calls:
            value = value * float("nan")
        return value, metrics

    trainer.method.loss = loss  # type: ignore[method-assign]
    return seen


def test_update_metrics_keep_extremes_over_minibatches_and_epochs(tmp_path: Path) -> None:
    """policy/ratio_max is the largest over the step's 16 updates, not their mean."""
    trainer = ControlTrainer(make_config(tmp_path / "run", "train.epochs=4", "train.minibatches=4"))
    seen = _spy_loss(trainer)
    trainer.step()
    seen.clear()
    metrics = trainer.step()
    assert len(seen) == 16 and max(seen) > sum(seen) / len(seen)
    assert metrics["policy/ratio_max"] == max(seen)
    assert metrics["policy/ratio_min"] < 1.0 < metrics["policy/ratio_max"]


def test_a_nan_loss_never_reaches_the_weights_and_is_alarmed(tmp_path: Path) -> None:
    out = tmp_path / "run"
    trainer = ControlTrainer(make_config(out, "train.total_steps=128", "run.checkpoint_every=1"))
    _spy_loss(trainer, nan_calls={1})
    summary = trainer.train()
    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
    records = RunDir(out).metrics.read()
    assert [r["train/skipped_updates"] for r in records] == [1.0, 0.0]
    assert [r["train/nan_skips"] for r in records] == [1.0, 1.0]
    assert all(math.isfinite(r["grad/norm"]) for r in records)  # the step's other updates went through
    assert summary["alarms"] == {"nan": 1} and summary["nan_skips"] == 1
    for path in sorted((out / "checkpoints").glob("step_*")):
        tensors = load_checkpoint(path).tensors
        assert all(bool(torch.isfinite(v).all()) for v in tensors.values() if v.is_floating_point())


def test_repeated_nan_stops_the_control_run_with_its_checkpoint_intact(tmp_path: Path) -> None:
    from tether.runs import latest_checkpoint
    from tether.runs.interrupt import NonFiniteError

    out = tmp_path / "run"
    trainer = ControlTrainer(make_config(out, "train.max_nan_skips=2", "run.checkpoint_every=1"))
    _spy_loss(trainer, nan_calls=set(range(5, 100)))  # from update 2 on (2 epochs x 2 minibatches each)
    with pytest.raises(NonFiniteError, match=r"2 consecutive updates.*last good checkpoint .* is intact"):
        trainer.train()
    kept = latest_checkpoint(out)
    assert kept is not None and kept.name == "step_000000002"  # update 3 stopped the run unsaved
    tensors = load_checkpoint(kept).tensors
    assert all(bool(torch.isfinite(v).all()) for v in tensors.values() if v.is_floating_point())
    first = load_checkpoint(out / "checkpoints" / "step_000000001").tensors
    weights = [k for k in tensors if k.startswith("model.")]
    assert weights and all(torch.equal(tensors[k], first[k]) for k in weights)  # update 2 changed nothing
    records = RunDir(out).metrics.read()
    assert [r["step"] for r in records] == [1, 2, 3]  # the stopping update is logged
    assert all(math.isnan(r["grad/norm"]) for r in records[1:])
    alarms = RunDir(out).alarms.read()
    assert alarms[-1]["kind"] == "stopped" and alarms[-1]["value"] == 2.0
    assert [a["step"] for a in alarms if a["kind"] == "nan"] == [2, 3]


def _minibatch_indices(
    trainer: ControlTrainer, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[torch.Tensor], list[list[int]]]:
    """One step's permutations and, per minibatch, the batch indices it trained on (read back from the
    observations the critic saw; the rollout's observations are made distinct)."""
    perms: list[torch.Tensor] = []
    real_randperm = torch.randperm

    def randperm(n: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        perm = real_randperm(n, *args, **kwargs)
        perms.append(perm)
        return perm

    real_rollout = trainer.rollout
    seen: list[list[int]] = []

    def record(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen.append([int(v) for v in args[0][:, 0].tolist()])

    def rollout() -> dict[str, torch.Tensor]:
        ro = real_rollout()
        obs = ro["obs"]
        obs[..., 0] = torch.arange(obs[..., 0].numel(), dtype=obs.dtype).view(obs.shape[:2])
        trainer.model.critic.register_forward_pre_hook(record)  # from here on: the update's minibatches
        return ro

    monkeypatch.setattr(torch, "randperm", randperm)
    monkeypatch.setattr(trainer, "rollout", rollout)
    trainer.step()
    return perms, seen


@pytest.mark.parametrize(("num_steps", "minibatches", "sizes"), [(5, 6, [2, 2, 2, 2, 1, 1]), (8, 4, [4] * 4)])
def test_minibatches_are_exactly_train_minibatches_contiguous_chunks_of_the_permutation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, num_steps: int, minibatches: int, sizes: list[int]
) -> None:
    # 2 envs x 5 steps = 10 samples in 6 minibatches: ceil(10 / 6) = 2 per minibatch gave only 5.
    # With 16 samples in 4 the split is the old one: perm[0:4], perm[4:8], ...
    cfg = make_config(
        tmp_path / "run",
        f"train.num_steps={num_steps}",
        f"train.minibatches={minibatches}",
        "train.epochs=2",
        f"train.total_steps={2 * num_steps}",
    )
    trainer = ControlTrainer(cfg)
    perms, seen = _minibatch_indices(trainer, monkeypatch)
    assert len(perms) == 2 and len(seen) == 2 * minibatches
    for epoch, perm in enumerate(perms):
        chunks = seen[epoch * minibatches : (epoch + 1) * minibatches]
        assert [len(c) for c in chunks] == sizes
        bounds = [0, *itertools.accumulate(sizes)]
        assert chunks == [perm[lo:hi].tolist() for lo, hi in itertools.pairwise(bounds)]


def test_standardize_matches_masked_whiten_below_two_samples() -> None:
    one = standardize(torch.tensor([0.7]))
    assert torch.equal(one, torch.zeros(1))  # Bessel's std of one value is NaN; here it counts as 0
    values = torch.randn(17, dtype=torch.float64)
    assert torch.equal(standardize(values), (values - values.mean()) / (values.std() + 1e-8))
