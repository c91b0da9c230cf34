"""NGRPO: GRPO statistics computed with virtual maximum-reward samples added to every group."""

from __future__ import annotations

import torch

from tether.catalogue.advantages.baselines import AdvantageOutput, finish, outcome_group_stats
from tether.catalogue.advantages.group_stats import safe_sqrt
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


@register(
    "advantage",
    "ngrpo",
    paper="NGRPO: Negative-enhanced Group Relative Policy Optimization",
    arxiv="2509.18851",
    status="exact",
    card="adv#B3",
)
def ngrpo(
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids: torch.Tensor,
    reward_max: float = 1.0,
    num_virtual: int = 1,
    eps: float = 1e-6,
) -> AdvantageOutput:
    """NGRPO advantage calibration: m virtual samples with reward R_max join each group's mean and std.

    Paper: Nan et al., "NGRPO: Negative-enhanced Group Relative Policy Optimization",
    arXiv 2509.18851. Exact (nangongrui-ngr/NGRPO verl/trainer/ppo/core_algos.py
    compute_ngrpo_outcome_advantage).

    mu' and sigma' (unbiased) over {r_1..r_G} plus R_max repeated m times; A_i = (r_i - mu')/(sigma' + eps)
    for the real samples only. Binary rewards, m = 1: an all-wrong group gets A_i = -1/sqrt(G+1)
    (G = 8: -1/3) instead of 0; an all-correct group gets 0. m = 0 is GRPO (a lone sample then uses
    mean 0, std 1). Advantages no longer sum to 0 (negative bias), which pushes probability mass to
    unsampled responses. The paper pairs it with asymmetric clipping (eps_low 0.16, eps_high 0.24).
    """
    if num_virtual < 0:
        raise InvalidInputError(f"ngrpo: num_virtual must be >= 0, got {num_virtual}")
    r, stats = outcome_group_stats(rewards, response_mask, group_ids)
    g = stats.groups
    m = float(num_virtual)
    n = stats.count + m
    total = stats.mean * stats.count + m * reward_max
    mean = total / n.clamp(min=1.0)
    real_dev = torch.zeros_like(stats.mean).index_add(0, g.index, (r - g.gather(mean)) ** 2)
    ss = real_dev + m * (reward_max - mean) ** 2
    std = safe_sqrt(ss / (n - 1.0).clamp(min=1.0))
    single = n <= 1.0
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    return finish((r - g.gather(mean)) / (g.gather(std) + eps), response_mask, r, stats)
