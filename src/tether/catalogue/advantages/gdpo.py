"""GDPO: normalise each reward function within its group, sum them, then whiten over the batch."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tether.catalogue.advantages.baselines import AdvantageOutput
from tether.catalogue.advantages.broadcast import advantage_metrics, check_outcome, to_tokens
from tether.catalogue.advantages.group_stats import batch_mean_std, group_stats, groups_of
from tether.catalogue.contracts import Metrics, detached
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


@register(
    "advantage",
    "gdpo",
    paper="GDPO: Group reward-Decoupled Normalization Policy Optimization for Multi-reward RL Optimization",
    arxiv="2601.05242",
    status="exact",
    card="lessons#feature-bar",
    metric_only=("rewards",),
)
def gdpo(
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids: torch.Tensor,
    reward_parts: torch.Tensor,
    reward_weights: Sequence[float],
    eps: float = 1e-4,
) -> AdvantageOutput:
    """GDPO: per-reward group normalisation, weighted sum, then batch normalisation.

    Paper: Liu et al., "GDPO: Group reward-Decoupled Normalization Policy Optimization for
    Multi-reward RL Optimization", arXiv 2601.05242. Exact (TRL ``multi_objective_aggregation=
    "normalize_then_sum"``, checked against it in tests/catalogue/test_gdpo.py).

    With K reward functions r_k (``reward_parts`` [B, K], one column per function of
    ``task.rewards``; NaN where a function returned None) and weights w_k (``reward_weights``):

        A_k,i = (r_k,i - mean_g r_k) / (std_g r_k + eps)     within the group g of sample i
        S_i   = sum_k w_k A_k,i                               (a NaN part adds nothing)
        A_i   = (S_i - mean_batch S) / (std_batch S + eps)

    (unbiased stds, eps 1e-4 as TRL). GRPO instead normalises the weighted sum once, which maps
    different reward combinations onto the same advantage (the paper's "reward collapse"); the
    final batch step keeps the advantage's scale independent of K. With one reward function
    (``reward_parts`` = ``rewards`` [B, 1]) it is GRPO's advantage whitened over the batch.
    ``rewards`` (the combined reward) only feeds the ``adv/reward_mean`` metric (declared
    ``metric_only``): a recipe whose ``rewards:`` entries reshape it (``kl_in_reward``, an overlong
    penalty ...) would change nothing here, so :class:`tether.recipes.Method` refuses that
    composition; give the shaping as a reward function of the task (``task.rewards``), a KL
    penalty as a KL regularizer, or use an advantage that reads ``rewards``.
    """
    check_outcome(rewards, response_mask)
    if reward_parts.dim() != 2 or reward_parts.shape[0] != rewards.shape[0]:
        raise InvalidInputError(
            f"gdpo: reward_parts must be [batch, reward functions] with one row per sample "
            f"({rewards.shape[0]}), got shape {tuple(reward_parts.shape)}"
        )
    weights = [float(w) for w in reward_weights]
    if len(weights) != reward_parts.shape[1]:
        raise InvalidInputError(
            f"gdpo: {len(weights)} reward_weights for {reward_parts.shape[1]} reward functions; "
            "give one weight per column of reward_parts"
        )
    if not all(math.isfinite(w) for w in weights):
        raise InvalidInputError(f"gdpo: reward_weights must be finite, got {weights}")
    if not eps > 0:
        raise InvalidInputError(f"gdpo: eps must be > 0, got {eps}")
    parts = reward_parts.detach()
    parts = parts if parts.is_floating_point() else parts.to(torch.get_default_dtype())
    groups = groups_of(group_ids, parts.shape[0])
    total = torch.zeros(parts.shape[0], dtype=parts.dtype, device=parts.device)
    metrics: Metrics = {}
    for k, w in enumerate(weights):
        col = parts[:, k]
        valid = ~torch.isnan(col)
        filled = torch.where(valid, col, torch.zeros_like(col))
        stats = group_stats(filled, groups, weights=valid)
        norm = (filled - groups.gather(stats.mean)) / (groups.gather(stats.std) + eps)
        total = total + w * torch.where(valid, norm, torch.zeros_like(norm))
        metrics[f"gdpo/zero_std_frac_{k}"] = detached((stats.std <= 0).float().mean())
    mean, std = batch_mean_std(total)  # every sum is finite: a NaN part adds 0
    per_sample = (total - mean) / (std + eps)
    adv = to_tokens(per_sample, response_mask)
    combined = rewards.detach().to(parts.dtype)
    whole = group_stats(combined, groups)
    out = advantage_metrics(adv, response_mask, combined, whole.zero_std_frac())
    out.update(metrics)
    return adv, out
