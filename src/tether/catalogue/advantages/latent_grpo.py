"""Latent-GRPO invalid-sample masking: GRPO statistics over the non-truncated samples only."""

from __future__ import annotations

import torch

from tether.catalogue.advantages.baselines import AdvantageOutput
from tether.catalogue.advantages.broadcast import (
    advantage_metrics,
    as_float,
    check_outcome,
    check_per_sample,
    to_tokens,
)
from tether.catalogue.advantages.group_stats import group_stats, groups_of
from tether.catalogue.contracts import detached
from tether.catalogue.registry import register


@register(
    "advantage",
    "latent_grpo",
    paper="Latent-GRPO: Group Relative Policy Optimization for Latent Reasoning",
    arxiv="2604.27998",
    status="exact",
    card="adv#B17",
)
def latent_grpo(
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids: torch.Tensor,
    truncated: torch.Tensor,
    eps: float = 1e-6,
) -> AdvantageOutput:
    """Latent-GRPO advantage masking: truncated samples get A = 0 and do not enter the group statistics.

    Paper: "Latent-GRPO: Group Relative Policy Optimization for Latent Reasoning", arXiv 2604.27998.
    Exact (fengjixing-stupid/Latent-GRPO verl-0.4.x/verl/trainer/ppo/core_algos.py; only the
    invalid-sample masking, not the latent-specific noise and first-token parts).

    ``truncated`` [B] bool marks invalid samples (the released code: length == max_response_length).
    Over the valid samples of each group: mu, sigma (unbiased); fewer than 2 valid -> mu = 0, sigma = 1.
    A_i = (r_i - mu)/(sigma + eps) for valid samples, 0 for truncated ones. Without truncation
    it is exactly GRPO.
    """
    check_outcome(rewards, response_mask)
    check_per_sample("truncated", truncated, rewards.shape[0])
    r = as_float(rewards)
    valid = ~truncated.bool()
    groups = groups_of(group_ids, r.shape[0])
    stats = group_stats(r, groups, weights=valid)
    few = stats.count < 2.0
    mean = torch.where(few, torch.zeros_like(stats.mean), stats.mean)
    std = torch.where(few, torch.ones_like(stats.std), stats.std)
    a = (r - groups.gather(mean)) / (groups.gather(std) + eps)
    a = torch.where(valid, a, torch.zeros_like(a))
    adv = to_tokens(a, response_mask)
    metrics = advantage_metrics(adv, response_mask, r, stats.zero_std_frac())
    metrics["adv/invalid_frac"] = detached((~valid).float().mean() if valid.numel() else torch.zeros(()))
    return adv, metrics
