"""CISPO: clip the detached importance-sampling weight, never the token's gradient."""

from __future__ import annotations

from typing import Literal

import torch

from tether.catalogue.aggregate import AggregationLike, aggregate, masked_mean
from tether.catalogue.contracts import LossOutput, check_2d, check_same_shape, detached, token_advantages
from tether.catalogue.ratio import log_ratio, ratio_metrics
from tether.catalogue.registry import register
from tether.errors import InvalidInputError

CispoBound = Literal["relative", "absolute"]

DEFAULT_EPS_HIGH: dict[str, float] = {"relative": 0.2, "absolute": 5.0}


def cispo_weight_bounds(bound: str, eps_low: float, eps_high: float | None) -> tuple[float | None, float]:
    """(lower, upper) bounds of the IS weight for a ``bound`` convention; lower None = no floor."""
    if bound not in DEFAULT_EPS_HIGH:
        raise InvalidInputError(
            f"cispo: bound must be 'relative' (verl: weight in [1-eps_low, 1+eps_high]) or "
            f"'absolute' (TRL: weight <= eps_high), got {bound!r}"
        )
    high = DEFAULT_EPS_HIGH[bound] if eps_high is None else eps_high
    if bound == "relative":
        if high < 0 or eps_low < 0:
            raise InvalidInputError(
                f"cispo: with bound='relative' eps_low and eps_high must be >= 0, got {eps_low}, {high}"
            )
        return 1.0 - eps_low, 1.0 + high
    if high <= 0:
        raise InvalidInputError(
            f"cispo: with bound='absolute' eps_high is the cap on the weight and must be > 0 "
            f"(TRL/ScaleRL use 5.0), got {high}"
        )
    return None, high


@register(
    "policy_loss",
    "cispo",
    paper="MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention",
    arxiv="2506.13585",
    status="exact",
    card="ratio#B7",
)
def cispo(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    eps_low: float = 10.0,
    eps_high: float | None = None,
    bound: CispoBound = "relative",
    aggregation: AggregationLike = "token-mean",
) -> LossOutput:
    """CISPO: REINFORCE weighted by a clipped, stop-gradient IS weight; every token keeps a gradient.

    Paper: MiniMax, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention",
    arXiv 2506.13585 (section 3.1). Exact (verl ``compute_policy_loss_cispo``; TRL ``loss_type="cispo"``).

    l_t = -sg(w_t) * A_t * lp_t, token-mean, with r_t = exp(lp_t - lp_old_t) (log r clamped to +-20) and
    - bound="relative" (verl, default): w = clip(r, 1 - eps_low, 1 + eps_high); eps_low=10 means no
      effective floor (the paper tunes only the upper bound), eps_high=None means 0.2 (verl example);
    - bound="absolute" (TRL): w = min(r, eps_high); eps_low is ignored; eps_high=None means 5.0 (ScaleRL).
    d l_t / d lp_t = -A_t w_t: nonzero for every A_t != 0, and -A_t at r = 1 (REINFORCE). The value
    is not a surrogate of the return (only its gradient is meaningful). ``cispo/clip_frac`` is the
    fraction of valid tokens whose weight was truncated, whatever the sign of A.
    """
    check_2d("logprobs", logprobs)
    check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, response_mask=response_mask)
    low, high = cispo_weight_bounds(bound, eps_low, eps_high)
    adv = token_advantages(advantages, response_mask).to(logprobs.dtype)
    log_r = log_ratio(logprobs, old_logprobs)
    with torch.no_grad():
        ratio = torch.exp(log_r)
        weight = torch.clamp(ratio, min=low, max=high)
        weight = torch.where(response_mask.bool(), weight, torch.zeros_like(weight))
    per_token = -weight * adv * logprobs
    loss = aggregate(per_token, response_mask, aggregation)

    metrics = ratio_metrics(log_r, response_mask)
    with torch.no_grad():
        m = response_mask.float()
        hit_high = (ratio > high).float()
        hit_low = (ratio < low).float() if low is not None else torch.zeros_like(hit_high)
        metrics["cispo/clip_frac_high"] = detached(masked_mean(hit_high, m))
        metrics["cispo/clip_frac_low"] = detached(masked_mean(hit_low, m))
        metrics["cispo/clip_frac"] = detached(masked_mean(torch.clamp(hit_high + hit_low, max=1.0), m))
        metrics["cispo/weight_mean"] = detached(masked_mean(weight, m))
    metrics["policy/loss"] = detached(loss)
    return loss, metrics
