"""Pass@k advantages: the analytic Pass@k-training form, and verl's best-of-group (grpo_passk) form."""

from __future__ import annotations

import torch

from tether.catalogue.advantages.baselines import AdvantageOutput, finish, outcome_group_stats
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


def log_comb(n: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """log C(n, k) for 0 <= k <= n (float tensors), via lgamma."""
    return torch.lgamma(n + 1.0) - torch.lgamma(k + 1.0) - torch.lgamma(n - k + 1.0)


def comb_ratio(n_top: torch.Tensor, n_bottom: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """C(n_top, k) / C(n_bottom, k), 0 where k > n_top (n_top <= n_bottom, k <= n_bottom)."""
    ok = (k <= n_top) & (k >= 0)
    safe_top = torch.where(ok, n_top, k)
    value = torch.exp(log_comb(safe_top, k) - log_comb(n_bottom, k))
    return torch.where(ok, value, torch.zeros_like(value))


def check_binary(rewards: torch.Tensor, name: str) -> None:
    if not bool(((rewards == 0) | (rewards == 1)).all()):
        raise InvalidInputError(f"{name}: rewards must be binary (0 or 1) for the analytic pass@k advantage")


@register(
    "advantage",
    "passk",
    paper="Pass@k Training for Adaptively Balancing Exploration and Exploitation of Large Reasoning Models",
    arxiv="2508.10751",
    status="exact",
    card="adv#A7",
)
def passk(
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids: torch.Tensor,
    k: int = 4,
    eps: float = 1e-6,
) -> AdvantageOutput:
    """Analytic Pass@k advantage: the expected advantage of each rollout under pass@k group rewards.

    Paper: Chen et al., "Pass@k Training for Adaptively Balancing Exploration and Exploitation of
    Large Reasoning Models", arXiv 2508.10751. Exact (RUCAIBox/Passk_Training code/passk_adv.py).

    Group of N rollouts with N_neg failures (binary rewards): R = 1 - C(N_neg, k)/C(N, k),
    sigma = sqrt(R (1 - R)) (population std), A_pos = (1 - R)/(sigma + eps),
    A_neg = (1 - R - C(N_neg - 1, k - 1)/C(N - 1, k - 1))/(sigma + eps).
    Advantages sum to 0 per group; k = 1 is GRPO with the population std. The released code has no
    default k; k = 4 is our choice (the paper trains with several k). A group smaller than k uses
    k_eff = N (then only an all-wrong group could have signal, and it has none: all 0).
    """
    if k < 1:
        raise InvalidInputError(f"passk: k must be >= 1, got {k}")
    r, stats = outcome_group_stats(rewards, response_mask, group_ids)
    check_binary(r, "passk")
    n = stats.count
    n_neg = n - stats.mean * n
    n_neg = torch.round(n_neg)
    kk = torch.minimum(torch.full_like(n, float(k)), n)
    pass_rate = 1.0 - comb_ratio(n_neg, n, kk)
    sigma = torch.sqrt((pass_rate * (1.0 - pass_rate)).clamp(min=0.0))
    a_pos = (1.0 - pass_rate) / (sigma + eps)
    drop = comb_ratio(n_neg - 1.0, n - 1.0, kk - 1.0)
    drop = torch.where(n_neg >= 1.0, drop, torch.zeros_like(drop))
    a_neg = (1.0 - pass_rate - drop) / (sigma + eps)
    g = stats.groups
    per_sample = torch.where(r > 0.5, g.gather(a_pos), g.gather(a_neg))
    return finish(per_sample, response_mask, r, stats)


@register(
    "advantage",
    "passk_max",
    paper="Optimizing Language Models for Inference Time Objectives using Reinforcement Learning",
    arxiv="2503.19595",
    status="exact",
    card="adv#A7",
)
def passk_max(
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids: torch.Tensor,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> AdvantageOutput:
    """Pass@k leave-one-out credit: only the best response of a group gets a (positive) advantage.

    Paper: Tang et al., "Optimizing Language Models for Inference Time Objectives using
    Reinforcement Learning", arXiv 2503.19595. Exact (verl compute_grpo_passk_outcome_advantage).

    A_best = r_max - r_second (the max of the group minus the max of the others), optionally
    divided by (std_g r + eps) (unbiased std; verl norm_adv_by_std_in_grpo, default on); every other
    response gets 0. Ties for the best give 0 (first index is "best"). A single-sample group
    gets 0 (verl rejects it).
    """
    r, stats = outcome_group_stats(rewards, response_mask, group_ids)
    g = stats.groups
    b = r.shape[0]
    neg_inf = torch.full((g.num,), float("-inf"), dtype=r.dtype, device=r.device)
    top = neg_inf.scatter_reduce(0, g.index, r.detach(), reduce="amax", include_self=True)
    positions = torch.arange(b, device=r.device)
    is_top = r.detach() == g.gather(top)
    candidates = torch.where(is_top, positions, torch.full_like(positions, b))
    first = torch.full((g.num,), b, dtype=positions.dtype, device=r.device)
    first = first.scatter_reduce(0, g.index, candidates, reduce="amin", include_self=True)
    is_best = positions == g.gather(first)
    others = torch.where(is_best, torch.full_like(r, float("-inf")), r.detach())
    second = neg_inf.scatter_reduce(0, g.index, others, reduce="amax", include_self=True)
    has_second = torch.isfinite(g.gather(second))
    second_s = torch.where(has_second, g.gather(second), torch.zeros_like(r))
    gap = torch.where(has_second, r - second_s, torch.zeros_like(r))
    if norm_by_std:
        gap = gap / (g.gather(stats.std) + eps)
    per_sample = torch.where(is_best & has_second, gap, torch.zeros_like(r))
    return finish(per_sample, response_mask, r, stats)
