"""DGPO: difficulty-balanced group advantages (MAD normalisation) and difficulty-aware prompt weights."""

from __future__ import annotations

import torch

from tether.catalogue.advantages.baselines import AdvantageOutput, outcome_group_stats
from tether.catalogue.advantages.broadcast import (
    advantage_metrics,
    as_float,
    check_per_sample,
    to_tokens,
)
from tether.catalogue.advantages.group_stats import group_mean, group_sum
from tether.catalogue.contracts import detached
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


@register(
    "advantage",
    "dgpo",
    paper=(
        "Harder Is Better: Boosting Mathematical Reasoning via Difficulty-Aware GRPO and "
        "Multi-Aspect Question Reformulation"
    ),
    arxiv="2601.20614",
    status="exact",
    card="adv#B11",
)
def dgpo(
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids: torch.Tensor,
    accuracy: torch.Tensor | None = None,
    temperature: float = 2.0,
    eps: float = 1e-4,
    question_weighting: bool = True,
    rescale_valid_tokens: bool = True,
) -> AdvantageOutput:
    """DGPO: every group gets the same total update (MAD scaling), then harder prompts are up-weighted.

    Paper: Dai et al., "Harder Is Better: Boosting Mathematical Reasoning via Difficulty-Aware GRPO
    and Multi-Aspect Question Reformulation", arXiv 2601.20614. Exact (AMAP-ML/MathForge
    trl-0.20.0/trl/trainer/grpo_trainer.py, enable_dgpo).

    DGAE: A_i = G (r_i - mean_g r)/(sum_j |r_j - mean_g r| + 1e-4), so sum_i |A_i| = G in every group with
    spread (binary: A_i = (r_i - p)/(2 p (1 - p))). DQW (``question_weighting``): valid groups V (std > 0);
    lambda_q = |V| softmax_{q in V}(-acc_q / T), T = 2, acc_q = group mean of ``accuracy`` (optional
    input; default: the rewards), with acc_q := 1 for a valid group whose accuracy is all 0;
    lambda = 1 otherwise; A <- lambda_q A. Token normalisation (``rescale_valid_tokens``): the code divides
    the loss by the tokens of valid groups only; here A is multiplied by N_tok(batch)/N_tok(valid groups),
    which gives that loss under token-mean aggregation (local counts).
    """
    if temperature <= 0:
        raise InvalidInputError(f"dgpo: temperature must be > 0 (paper: 2.0), got {temperature}")
    r, stats = outcome_group_stats(rewards, response_mask, group_ids)
    g = stats.groups
    centred = r - g.gather(stats.mean)
    mad_sum = group_sum(centred.abs(), g)
    adv = g.gather(stats.count) * centred / (g.gather(mad_sum) + eps)
    valid_group = stats.std > 0
    metrics_extra: dict[str, torch.Tensor] = {}
    if question_weighting:
        if accuracy is None:
            acc_r = r
        else:
            check_per_sample("accuracy", accuracy, r.shape[0])
            acc_r = as_float(accuracy).to(r.dtype)
        acc = group_mean(acc_r.detach(), g)
        all_zero = group_sum((acc_r.detach() != 0).to(r.dtype), g) == 0
        acc = torch.where(all_zero, torch.ones_like(acc), acc)
        logits = torch.where(valid_group, -acc / temperature, torch.full_like(acc, float("-inf")))
        n_valid = valid_group.to(r.dtype).sum()
        if bool(valid_group.any()):
            weights = n_valid * torch.softmax(logits, dim=0)
            lam = torch.where(valid_group, weights, torch.ones_like(weights))
        else:
            lam = torch.ones_like(acc)
        adv = adv * g.gather(lam)
        if bool(valid_group.any()):
            metrics_extra["dgpo/weight_max"] = detached(lam[valid_group].max())
            metrics_extra["dgpo/weight_min"] = detached(lam[valid_group].min())
    if rescale_valid_tokens:
        m = response_mask.to(r.dtype)
        tokens_all = m.sum()
        tokens_valid = (m.sum(-1) * g.gather(valid_group).to(r.dtype)).sum()
        scale = torch.where(
            tokens_valid > 0, tokens_all / tokens_valid.clamp(min=1.0), torch.ones_like(tokens_all)
        )
        adv = adv * scale
    out = to_tokens(adv, response_mask)
    metrics = advantage_metrics(out, response_mask, r, stats.zero_std_frac())
    metrics.update(metrics_extra)
    return out, metrics
