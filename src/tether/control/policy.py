"""Control policies: CleanRL-style MLP actors (categorical, diagonal Gaussian) and critics.

Every network is a tanh MLP (64x64 by default) with orthogonal initialisation as in CleanRL's
``ppo.py`` / ``ppo_continuous_action.py``: hidden layers gain sqrt(2), the actor's output layer
gain 0.01, a critic's output layer gain 1, biases 0. The Gaussian actor has a
state-independent log standard deviation initialised at 0.

Observation normalization lives in the policy (:class:`RunningNormalizer`, buffers saved with
the weights), so an evaluation or a resumed run sees exactly the statistics the policy was
trained with. It replaces Gymnasium's vector ``NormalizeObservation``, which cannot run with
the same-step autoreset the trainer uses and keeps its statistics outside the checkpointed model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch import nn
from torch.distributions import Categorical, Normal

from tether.errors import TetherError


def layer_init(layer: nn.Linear, std: float = math.sqrt(2), bias: float = 0.0) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


def mlp(in_dim: int, out_dim: int, hidden: Sequence[int], out_std: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    last = in_dim
    for h in hidden:
        layers += [layer_init(nn.Linear(last, h)), nn.Tanh()]
        last = h
    layers.append(layer_init(nn.Linear(last, out_dim), std=out_std))
    return nn.Sequential(*layers)


class RunningNormalizer(nn.Module):
    """Running mean and variance of a stream of vectors, and the clipped standardization by them.

    The statistics are merged batch by batch with Chan et al.'s parallel update (the same as
    Gymnasium's ``RunningMeanStd``: initial mean 0, variance 1, count ``1e-4``), kept in float64
    buffers. ``forward`` returns ``clip((x - mean) / sqrt(var + eps), -clip, clip)`` in float32 and
    never changes the statistics; only :meth:`update` does.
    """

    def __init__(self, dim: int, clip: float = 10.0, eps: float = 1e-8) -> None:
        super().__init__()
        self.clip = float(clip)
        self.eps = float(eps)
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("var", torch.ones(dim, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge a batch ``[N, dim]`` into the running statistics."""
        x = x.detach().to(torch.float64).reshape(-1, self.get_buffer("mean").shape[0])
        mean, var, count = self.get_buffer("mean"), self.get_buffer("var"), self.get_buffer("count")
        n = x.shape[0]
        if n == 0:
            return
        b_mean = x.mean(0)
        b_var = x.var(0, unbiased=False)
        delta = b_mean - mean
        total = count + n
        new_mean = mean + delta * n / total
        m2 = var * count + b_var * n + delta.pow(2) * count * n / total
        mean.copy_(new_mean)
        var.copy_(m2 / total)
        count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, var = self.get_buffer("mean"), self.get_buffer("var")
        z = (x.to(torch.float64) - mean) / torch.sqrt(var + self.eps)
        return z.clamp(-self.clip, self.clip).to(torch.float32)


class CategoricalActor(nn.Module):
    """pi(a|s) = Categorical(logits = MLP(s)) for a Discrete action space."""

    def __init__(self, obs_dim: int, num_actions: int, hidden: Sequence[int] = (64, 64)) -> None:
        super().__init__()
        self.net = mlp(obs_dim, num_actions, hidden, out_std=0.01)

    def distribution(self, obs: torch.Tensor) -> Categorical:
        return Categorical(logits=self.net(obs), validate_args=False)

    def log_prob(self, dist: Any, action: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = dist.log_prob(action.long())
        return out

    def mode(self, dist: Any) -> torch.Tensor:
        out: torch.Tensor = dist.probs.argmax(-1)
        return out

    def entropy(self, dist: Any) -> torch.Tensor:
        out: torch.Tensor = dist.entropy()
        return out


class GaussianActor(nn.Module):
    """pi(a|s) = N(MLP(s), diag(exp(log_std))^2), log-prob and entropy summed over action dimensions."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: Sequence[int] = (64, 64)) -> None:
        super().__init__()
        self.net = mlp(obs_dim, action_dim, hidden, out_std=0.01)
        self.log_std = nn.Parameter(torch.zeros(action_dim))

    def distribution(self, obs: torch.Tensor) -> Normal:
        mean = self.net(obs)
        return Normal(mean, self.log_std.expand_as(mean).exp(), validate_args=False)

    def log_prob(self, dist: Any, action: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = dist.log_prob(action).sum(-1)
        return out

    def mode(self, dist: Any) -> torch.Tensor:
        out: torch.Tensor = dist.mean
        return out

    def entropy(self, dist: Any) -> torch.Tensor:
        out: torch.Tensor = dist.entropy().sum(-1)
        return out


class ValueCritic(nn.Module):
    """V(s) = MLP(s), a scalar per state."""

    def __init__(self, obs_dim: int, hidden: Sequence[int] = (64, 64)) -> None:
        super().__init__()
        self.net = mlp(obs_dim, 1, hidden, out_std=1.0)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(obs).squeeze(-1)
        return out


class CostCritic(ValueCritic):
    """V_c(s): expected discounted cost (same architecture as the value critic)."""


def check_spaces(observation_space: spaces.Space[Any], action_space: spaces.Space[Any]) -> None:
    """Refuse the spaces the control policies cannot handle: they need a flat Box observation space
    and a Discrete or flat Box action space (the planner runs this before any work)."""
    if not isinstance(observation_space, spaces.Box) or len(observation_space.shape) != 1:
        raise TetherError(
            f"the control policies need a flat Box observation space, got {observation_space}; "
            "flatten the observations with a wrapper"
        )
    if not isinstance(action_space, spaces.Discrete) and not (
        isinstance(action_space, spaces.Box) and len(action_space.shape) == 1
    ):
        raise TetherError(
            f"unsupported action space {action_space}: use Discrete or a flat Box (diagonal Gaussian)"
        )


class ActorCritic(nn.Module):
    """An actor, a value critic and (optionally) a cost critic with separate networks.

    With ``normalize_obs`` the module holds a :class:`RunningNormalizer`; the networks take
    normalized observations, :meth:`normalize` maps raw ones (identity without a normalizer).
    """

    def __init__(
        self,
        observation_space: spaces.Space[Any],
        action_space: spaces.Space[Any],
        hidden: Sequence[int] = (64, 64),
        cost_critic: bool = False,
        normalize_obs: bool = False,
    ) -> None:
        super().__init__()
        check_spaces(observation_space, action_space)
        assert isinstance(observation_space, spaces.Box)
        obs_dim = int(observation_space.shape[0])
        self.discrete = isinstance(action_space, spaces.Discrete)
        self.actor: CategoricalActor | GaussianActor
        if isinstance(action_space, spaces.Discrete):
            self.actor = CategoricalActor(obs_dim, int(action_space.n), hidden)
            self.action_shape: tuple[int, ...] = ()
        elif isinstance(action_space, spaces.Box) and len(action_space.shape) == 1:
            self.actor = GaussianActor(obs_dim, int(action_space.shape[0]), hidden)
            self.action_shape = (int(action_space.shape[0]),)
            self.register_buffer(
                "action_low", torch.as_tensor(np.asarray(action_space.low), dtype=torch.float32)
            )
            self.register_buffer(
                "action_high", torch.as_tensor(np.asarray(action_space.high), dtype=torch.float32)
            )
        else:  # pragma: no cover - check_spaces refused it
            raise AssertionError(action_space)
        self.critic = ValueCritic(obs_dim, hidden)
        self.cost_critic = CostCritic(obs_dim, hidden) if cost_critic else None
        self.obs_norm = RunningNormalizer(obs_dim) if normalize_obs else None

    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        """Raw observations -> the networks' input (the running normalizer, or float32 as is)."""
        if self.obs_norm is None:
            return obs.to(torch.float32)
        out: torch.Tensor = self.obs_norm(obs)
        return out

    def act_deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        """The most likely action (argmax for categorical, the mean for Gaussian) of normalized ``obs``."""
        return self.actor.mode(self.actor.distribution(obs))

    def act(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample actions; returns (action, log-prob)."""
        dist = self.actor.distribution(obs)
        action = dist.sample()  # type: ignore[no-untyped-call]
        return action, self.actor.log_prob(dist, action)

    def evaluate(self, obs: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log pi(action|obs), entropy), both [B] and differentiable."""
        dist = self.actor.distribution(obs)
        return self.actor.log_prob(dist, action), self.actor.entropy(dist)

    def env_action(self, action: torch.Tensor) -> np.ndarray:
        """The action sent to the environment (Gaussian samples are clipped to the bounds)."""
        if self.discrete:
            return action.cpu().numpy()
        low, high = self.get_buffer("action_low"), self.get_buffer("action_high")
        return torch.maximum(torch.minimum(action, high), low).cpu().numpy()
