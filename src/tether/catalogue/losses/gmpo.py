"""GMPO: the geometric mean of the token ratios, clipped token-wise in log space."""

from __future__ import annotations

import torch

from tether.catalogue.aggregate import AggregationLike, aggregate, masked_mean
from tether.catalogue.contracts import LossOutput, check_2d, check_same_shape, detached, token_advantages
from tether.catalogue.ratio import log_ratio, ratio_metrics
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


@register(
    "policy_loss",
    "gmpo",
    paper="Geometric-Mean Policy Optimization",
    arxiv="2507.20673",
    status="exact",
    card="lessons#feature-bar",
    aliases=("geo_mean",),
)
def gmpo(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    eps_low: float = 0.4,
    eps_high: float = 0.4,
    aggregation: AggregationLike = "seq-mean-token-mean",
) -> LossOutput:
    """GMPO: maximise the geometric mean of the token ratios, each clipped pessimistically in log space.

    Paper: Zhao et al., "Geometric-Mean Policy Optimization", arXiv 2507.20673. Exact (the
    authors' callsys/GMPO ``train_zero_math_gmpo.py``, cliprange 0.4; verl ``geo_mean``).

    d_t = lp_t - lp_old_t (clamped to +-20); d~_t = min(d_t, clip(d_t, -eps_low, eps_high)) where
    A_t > 0 and max(d_t, clip(d_t, -eps_low, eps_high)) where A_t < 0 (PPO's pessimism, in log space);
    R_i = exp((1/L_i) sum_t m d~_t), A_i = (1/L_i) sum_t m A_t;  l_i = -A_i R_i, mean over sequences.
    The geometric mean is less sensitive to one outlier token than GRPO's arithmetic mean of
    ratios, which lets GMPO use a wider range: ratios in [e^-0.4, e^0.4] (paper default). Unclipped,
    d l_i / d lp_{i,t} = -A_i R_i / L_i; a clipped token has zero gradient of its own.
    ``aggregation`` reduces the per-sequence loss broadcast to its tokens, so the default
    seq-mean-token-mean is the mean over sequences (an all-padding row does not count).
    """
    check_2d("logprobs", logprobs)
    check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, response_mask=response_mask)
    if eps_low < 0 or eps_high < 0:
        raise InvalidInputError(
            f"gmpo: eps_low and eps_high are log-space bounds and must be >= 0 (paper: 0.4), got {eps_low}, {eps_high}"
        )
    valid = response_mask.bool()
    m = response_mask.to(logprobs.dtype)
    adv = token_advantages(advantages, response_mask).to(logprobs.dtype)
    d = log_ratio(logprobs, old_logprobs)
    d_clip = torch.clamp(d, -eps_low, eps_high)
    pessimistic = torch.where(
        adv > 0, torch.minimum(d, d_clip), torch.where(adv < 0, torch.maximum(d, d_clip), d)
    )
    zero = torch.zeros((), dtype=d.dtype, device=d.device)
    lengths = m.sum(-1).clamp(min=1.0)
    seq_log_ratio = torch.where(valid, pessimistic, zero).sum(-1) / lengths
    seq_adv = torch.where(valid, adv, zero).sum(-1) / lengths
    per_seq = -seq_adv * torch.exp(seq_log_ratio)
    loss = aggregate(per_seq.unsqueeze(-1).expand_as(d), response_mask, aggregation)
    metrics = ratio_metrics(d, response_mask)
    with torch.no_grad():
        high = ((adv > 0) & (d > eps_high)).to(m.dtype)
        low = ((adv < 0) & (d < -eps_low)).to(m.dtype)
        metrics["policy/clip_frac_high"] = detached(masked_mean(high, m))
        metrics["policy/clip_frac_low"] = detached(masked_mean(low, m))
        metrics["policy/clip_frac"] = detached(masked_mean(torch.clamp(high + low, max=1.0), m))
        rows = valid.any(-1)
        seq_ratio = torch.exp(seq_log_ratio.detach()[rows]) if bool(rows.any()) else torch.ones(1)
        metrics["gmpo/seq_ratio_mean"] = detached(seq_ratio.mean())
        metrics["gmpo/seq_ratio_max"] = detached(seq_ratio.max())
    metrics["policy/loss"] = detached(loss)
    return loss, metrics
