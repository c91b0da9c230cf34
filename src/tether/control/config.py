"""Typed configuration of the control world (``tether control train``).

Defaults are CleanRL's ``ppo.py`` (Huang et al., "The 37 Implementation Details of PPO");
``configs/cartpole_ppo.yaml`` holds RL-Baselines3-Zoo's tuned CartPole-v1 settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tether.config import ConfigError
from tether.monitor.alarms import MonitorConfig
from tether.recipes.loader import absolute_recipe
from tether.userimports import absolute_spec

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class EnvSettings:
    id: str = field(
        default="CartPole-v1", metadata={"help": "any registered Gymnasium id (tether/... included)"}
    )
    num_envs: int = field(default=4, metadata={"min": 1, "help": "parallel environments (CleanRL 4)"})
    vectorization: str = field(default="sync", metadata={"choices": ("sync", "async")})
    normalize_obs: bool = field(default=False, metadata={"help": "running mean/std of observations"})
    normalize_reward: bool = field(default=False, metadata={"help": "scale rewards by the return's std"})


@dataclass
class TrainSettings:
    total_steps: int = field(default=500_000, metadata={"min": 1, "help": "environment steps (all envs)"})
    num_steps: int = field(default=128, metadata={"min": 1, "help": "rollout length per env (CleanRL 128)"})
    epochs: int = field(default=4, metadata={"min": 1, "help": "passes over each rollout"})
    minibatches: int = field(
        default=4,
        metadata={
            "min": 1,
            "help": "minibatches per epoch: the rollout split into this many, sizes differing by at most one",
        },
    )
    lr: float = field(default=2.5e-4, metadata={"min": 0.0, "min_exclusive": True})
    anneal_lr: bool = field(default=True, metadata={"help": "linear decay of lr to 0 over the run"})
    adam_eps: float = field(default=1e-5, metadata={"min": 0.0, "min_exclusive": True})
    gamma: float | None = field(
        default=None, metadata={"min": 0.0, "max": 1.0, "help": "discount; null: the recipe's, else 0.99"}
    )
    gae_lambda: float | None = field(
        default=None, metadata={"min": 0.0, "max": 1.0, "help": "GAE lambda; null: the recipe's, else 0.95"}
    )
    norm_adv: bool = field(default=True, metadata={"help": "whiten advantages per minibatch (CleanRL)"})
    max_grad_norm: float = field(default=0.5, metadata={"min": 0.0, "min_exclusive": True})
    max_nan_skips: int = field(
        default=3,
        metadata={
            "min": 1,
            "help": "consecutive updates with an optimizer step skipped for a NaN/inf loss or gradient "
            "before the run stops",
        },
    )
    vf_coef: float = field(default=0.5, metadata={"min": 0.0, "help": "loss += vf_coef * mean((V - R)^2)"})
    clip_vloss: bool = field(default=True, metadata={"help": "clip the value update (CleanRL, PPO2)"})
    vclip: float = field(default=0.2, metadata={"min": 0.0, "min_exclusive": True})
    cost_critic: bool = field(
        default=False, metadata={"help": "also learn V_c on the env's cost signal (on with a constraint)"}
    )
    cost_limit: float | None = field(
        default=None,
        metadata={
            "min": 0.0,
            "help": "episode-cost limit d: overrides a constrained recipe's; with any recipe, logs the "
            "violation rate",
        },
    )
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    seed: int = field(
        default=1, metadata={"min": 0, "max": 2**32 - 1, "help": "numpy seeds must be in [0, 2**32)"}
    )
    torch_threads: int = field(
        default=1,
        metadata={
            "min": 0,
            "help": "torch.set_num_threads (1: tiny MLPs gain nothing from more and parallel seeds would "
            "oversubscribe the cores); 0 leaves torch's default",
        },
    )
    target_return: float | None = field(
        default=None, metadata={"help": "success threshold; null: the env spec's reward_threshold"}
    )

    def validate(self) -> None:
        if any(h < 1 for h in self.hidden):
            raise ConfigError(f"train.hidden: {self.hidden!r} must hold positive layer widths")


@dataclass
class RunSettings:
    out: str = "runs/control"
    checkpoint_every: int = field(default=50, metadata={"min": 1, "help": "updates between checkpoints"})
    keep_checkpoints: int = field(default=2, metadata={"min": 1})


@dataclass
class ControlConfig:
    recipe: str = "ppo"
    imports: list[str] = field(
        default_factory=list,
        metadata={
            "help": "your modules or .py files, imported first: they may register Gymnasium envs "
            "(gymnasium.register), catalogue entries and recipes' components (tether.userimports)"
        },
    )
    env: EnvSettings = field(default_factory=EnvSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    run: RunSettings = field(default_factory=RunSettings)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    @property
    def batch_size(self) -> int:
        return self.env.num_envs * self.train.num_steps

    @property
    def num_updates(self) -> int:
        return max(1, self.train.total_steps // self.batch_size)

    def validate(self) -> None:
        self.imports = [absolute_spec(e) for e in self.imports]
        self.recipe = absolute_recipe(self.recipe)
        if self.train.minibatches > self.batch_size:
            raise ConfigError(
                f"train.minibatches: {self.train.minibatches} exceeds the rollout batch "
                f"env.num_envs x train.num_steps = {self.env.num_envs} x {self.train.num_steps} = "
                f"{self.batch_size}, so some minibatches would be empty; set train.minibatches to at most "
                f"{self.batch_size}, or raise env.num_envs or train.num_steps"
            )
        if self.train.total_steps < self.batch_size:
            raise ConfigError(
                f"train.total_steps: {self.train.total_steps} is below one rollout "
                f"(env.num_envs x train.num_steps = {self.batch_size})"
            )
