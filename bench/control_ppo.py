"""tether PPO vs Stable-Baselines3 PPO with the same hyperparameters, in one process.

For each task (CartPole-v1, Pendulum-v1) and seed, trains tether's ``ControlTrainer`` and
SB3's ``PPO`` (MlpPolicy, separate 64x64 tanh actor and critic, orthogonal init, as tether's
policy) with RL-Baselines3-Zoo's tuned settings, and records

- env-steps/s: total environment steps / wall-clock of the training loop;
- time to target: wall-clock from the start of training until the mean return of the last
  10 finished episodes first reaches the target, checked once per rollout on both sides
  (tether: ``first_reached_env_steps``; SB3: a callback reading ``ep_info_buffer``), timed at
  the end of that rollout's update on both sides.

Ratios: throughput tether / SB3, time-to-target SB3 / tether (> 1: tether is faster).

    .venv/bin/python bench/control_ppo.py --tasks cartpole pendulum --seeds 1 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from typing import Any

import gymnasium as gym
import numpy as np
import torch

# Zoo settings (rl-baselines3-zoo hyperparams/ppo.yml), written once and used by both sides.
# CartPole-v1: the zoo anneals clip_range (lin_0.2); both sides use a fixed 0.2 here.
# Pendulum-v1: the zoo uses gSDE (use_sde, sde_sample_freq 4); both sides use a plain
# Gaussian (use_sde false) since tether has no gSDE.
TASKS: dict[str, dict[str, Any]] = {
    "cartpole": {
        "env": "CartPole-v1",
        "n_envs": 8,
        "n_steps": 32,
        "batch_size": 256,
        "n_epochs": 20,
        "lr": 1e-3,
        "anneal_lr": True,
        "gamma": 0.98,
        "gae_lambda": 0.8,
        "clip": 0.2,
        "ent_coef": 0.0,
        "vf_coef": 0.5,
        "max_grad_norm": 0.5,
        "normalize_obs": False,
        "normalize_reward": False,
        "total_steps": 100_000,
        "target": 475.0,
    },
    "pendulum": {
        "env": "Pendulum-v1",
        "n_envs": 4,
        "n_steps": 1024,
        "batch_size": 64,
        "n_epochs": 10,
        "lr": 1e-3,
        "anneal_lr": False,
        "gamma": 0.9,
        "gae_lambda": 0.95,
        "clip": 0.2,
        "ent_coef": 0.0,
        "vf_coef": 0.5,
        "max_grad_norm": 0.5,
        # The zoo normalizes obs and reward; tether's normalize_obs fails on gymnasium 1.4
        # (NormalizeObservation refuses the SAME_STEP autoreset tether uses), so both sides
        # normalize the reward only. Pendulum's observations are bounded (cos, sin, [-8, 8]).
        "normalize_obs": False,
        "normalize_reward": True,
        "total_steps": 200_000,
        "target": -250.0,
    },
}


def run_tether(task: dict[str, Any], seed: int, threads: int) -> dict[str, Any]:
    from tether.config import from_dict
    from tether.control.config import ControlConfig
    from tether.control.trainer import ControlTrainer

    rollout = task["n_envs"] * task["n_steps"]
    data = {
        "recipe": "ppo",
        "env": {
            "id": task["env"],
            "num_envs": task["n_envs"],
            "normalize_obs": task["normalize_obs"],
            "normalize_reward": task["normalize_reward"],
        },
        "train": {
            "total_steps": task["total_steps"],
            "num_steps": task["n_steps"],
            "minibatches": rollout // task["batch_size"],
            "epochs": task["n_epochs"],
            "lr": task["lr"],
            "anneal_lr": task["anneal_lr"],
            "adam_eps": 1e-5,
            "gamma": task["gamma"],
            "gae_lambda": task["gae_lambda"],
            "norm_adv": True,
            "max_grad_norm": task["max_grad_norm"],
            "vf_coef": task["vf_coef"],
            "clip_vloss": False,
            "hidden": [64, 64],
            "seed": seed,
            "torch_threads": threads,
            "target_return": task["target"],
        },
        # Checkpoints only at the end (SB3 saves none during learn()).
        "run": {"checkpoint_every": 10**9},
    }
    with tempfile.TemporaryDirectory() as out:
        data["run"]["out"] = out
        cfg = from_dict(ControlConfig, data)
        trainer = ControlTrainer(cfg)
        reached: dict[str, float] = {}
        start = time.perf_counter()

        def on_update(update: int, metrics: dict[str, float]) -> None:
            if trainer.first_reached is not None and "t" not in reached:
                reached["t"] = time.perf_counter() - start

        trainer.on_update = on_update
        summary = trainer.train()
        wall = time.perf_counter() - start
    return {
        "steps": summary["total_env_steps"],
        "wall": wall,
        "sps": summary["total_env_steps"] / wall,
        "reach_steps": summary["first_reached_env_steps"],
        "reach_time": reached.get("t"),
        "final_last10": summary["final_return_last10"],
    }


def run_sb3(task: dict[str, Any], seed: int, threads: int) -> dict[str, Any]:
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    torch.set_num_threads(threads)
    env = make_vec_env(task["env"], n_envs=task["n_envs"], seed=seed)
    if task["normalize_obs"] or task["normalize_reward"]:
        env = VecNormalize(
            env, norm_obs=task["normalize_obs"], norm_reward=task["normalize_reward"], gamma=task["gamma"]
        )
    lr = task["lr"]
    schedule = (lambda p: lr * p) if task["anneal_lr"] else lr
    model = PPO(
        "MlpPolicy",
        env,
        learning_rate=schedule,
        n_steps=task["n_steps"],
        batch_size=task["batch_size"],
        n_epochs=task["n_epochs"],
        gamma=task["gamma"],
        gae_lambda=task["gae_lambda"],
        clip_range=task["clip"],
        clip_range_vf=None,
        normalize_advantage=True,
        ent_coef=task["ent_coef"],
        vf_coef=task["vf_coef"],
        max_grad_norm=task["max_grad_norm"],
        use_sde=False,
        policy_kwargs={"net_arch": {"pi": [64, 64], "vf": [64, 64]}, "activation_fn": torch.nn.Tanh},
        seed=seed,
        device="cpu",
        verbose=0,
    )
    target = task["target"]
    state: dict[str, Any] = {"pending": False}

    class Reach(BaseCallback):
        # Checked at the end of each rollout (as tether), timed after that rollout's update.
        def _on_step(self) -> bool:
            return True

        def _on_rollout_end(self) -> None:
            buf = [ep["r"] for ep in self.model.ep_info_buffer]
            if "steps" not in state and buf and float(np.mean(buf[-10:])) >= target:
                state["steps"] = self.model.num_timesteps
                state["pending"] = True

        def _mark(self) -> None:
            if state["pending"]:
                state["t"] = time.perf_counter() - state["start"]
                state["pending"] = False

        def _on_rollout_start(self) -> None:
            self._mark()

        def _on_training_end(self) -> None:
            self._mark()

    state["start"] = time.perf_counter()
    model.learn(total_timesteps=task["total_steps"], callback=Reach())
    wall = time.perf_counter() - state["start"]
    buf = [ep["r"] for ep in model.ep_info_buffer]
    env.close()
    return {
        "steps": model.num_timesteps,
        "wall": wall,
        "sps": model.num_timesteps / wall,
        "reach_steps": state.get("steps"),
        "reach_time": state.get("t"),
        "final_last10": float(np.mean(buf[-10:])) if buf else None,
    }


def fmt(x: float | None, spec: str) -> str:
    return "not reached" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["cartpole", "pendulum"], choices=sorted(TASKS))
    ap.add_argument("--seeds", type=int, default=1, help="seeds 1..N per task and side")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on both sides")
    ap.add_argument("--steps", type=int, default=None, help="override every task's step budget")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gym.logger.min_level = 40

    results: list[dict[str, Any]] = []
    for name in args.tasks:
        task = dict(TASKS[name])
        if args.steps is not None:
            task["total_steps"] = args.steps
        for seed in range(1, args.seeds + 1):
            for side, fn in (("tether", run_tether), ("sb3", run_sb3)):
                r = fn(task, seed, args.threads)
                r.update(task=name, env=task["env"], seed=seed, side=side, target=task["target"])
                results.append(r)
                print(
                    f"[{task['env']} seed {seed} {side}] {r['steps']} steps in {r['wall']:.1f} s "
                    f"({r['sps']:.0f} steps/s); target {task['target']} at "
                    f"{fmt(r['reach_steps'], 'd')} steps / {fmt(r['reach_time'], '.1f')} s; "
                    f"final last-10 return {fmt(r['final_last10'], '.1f')}",
                    flush=True,
                )

    print()
    print(
        "| task | seed | tether steps/s | SB3 steps/s | throughput tether/SB3 | tether to target "
        "| SB3 to target | time ratio SB3/tether |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.tasks:
        thr, tim = [], []
        for seed in range(1, args.seeds + 1):
            t = next(r for r in results if r["task"] == name and r["seed"] == seed and r["side"] == "tether")
            s = next(r for r in results if r["task"] == name and r["seed"] == seed and r["side"] == "sb3")
            ratio = t["sps"] / s["sps"]
            thr.append(ratio)
            tr = None
            if t["reach_time"] is not None and s["reach_time"] is not None:
                tr = s["reach_time"] / t["reach_time"]
                tim.append(tr)

            def reach(r: dict[str, Any]) -> str:
                if r["reach_time"] is None:
                    return f"not reached ({fmt(r['final_last10'], '.0f')} at end)"
                return f"{r['reach_time']:.1f} s ({r['reach_steps']:,} steps)"

            print(
                f"| {t['env']} | {seed} | {t['sps']:,.0f} | {s['sps']:,.0f} | {ratio:.2f}x "
                f"| {reach(t)} | {reach(s)} | {fmt(tr, '.2f')}{'x' if tr is not None else ''} |"
            )
        if args.seeds > 1:
            med_t = f"{statistics.median(tim):.2f}x" if tim else "n/a"
            print(f"| {TASKS[name]['env']} | median | | | {statistics.median(thr):.2f}x | | | {med_t} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
