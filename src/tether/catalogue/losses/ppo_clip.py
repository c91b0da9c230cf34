"""PPO's clipped surrogate and its direct variants (dual clip, clip-higher)."""

from __future__ import annotations

import torch

from tether.catalogue.aggregate import AggregationLike, aggregate, masked_mean
from tether.catalogue.contracts import LossOutput, check_2d, check_same_shape, detached, token_advantages
from tether.catalogue.ratio import clipped_surrogate, log_ratio, ratio_metrics
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


def clip_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
    aggregation: AggregationLike,
) -> LossOutput:
    """Shared body of the clipped losses: PPO clip with optional dual clip for A < 0."""
    check_2d("logprobs", logprobs)
    check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, response_mask=response_mask)
    adv = token_advantages(advantages, response_mask).to(logprobs.dtype)
    log_r = log_ratio(logprobs, old_logprobs)
    ratio = torch.exp(log_r)
    per_token = clipped_surrogate(ratio, adv, eps_low, eps_high)
    metrics = ratio_metrics(log_r, response_mask, adv, eps_low, eps_high)
    if dual_clip is not None:
        capped = torch.minimum(per_token, -adv * dual_clip)
        per_token = torch.where(adv < 0, capped, per_token)
        with torch.no_grad():
            hit = ((adv < 0) & (ratio > dual_clip)).float()
            metrics["policy/dual_clip_frac"] = detached(masked_mean(hit, response_mask.float()))
    loss = aggregate(per_token, response_mask, aggregation)
    metrics["policy/loss"] = detached(loss)
    return loss, metrics


@register(
    "policy_loss",
    "ppo_clip",
    paper="Proximal Policy Optimization Algorithms",
    arxiv="1707.06347",
    status="exact",
    card="ratio#B1",
    aliases=("ppo", "vanilla"),
)
def ppo_clip(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: AggregationLike = "token-mean",
) -> LossOutput:
    """PPO clipped surrogate: a first-order trust region on the token ratio.

    Paper: Schulman et al., "Proximal Policy Optimization Algorithms", arXiv 1707.06347. Exact.

    l_t = max(-A_t r_t, -A_t clip(r_t, 1 - eps_low, 1 + eps_high)), r_t = exp(lp_t - lp_old_t)
    with log r clamped to [-20, 20] (as verl). The derivative w.r.t. lp_t is -A_t r_t inside the
    trust region and 0 once the ratio has moved past the bound in the direction A favours.
    Inputs: logprobs, old_logprobs, response_mask [B, T]; advantages [B] or [B, T].
    """
    return clip_loss(logprobs, old_logprobs, advantages, response_mask, eps_low, eps_high, None, aggregation)


@register(
    "policy_loss",
    "dual_clip",
    paper="Mastering Complex Control in MOBA Games with Deep Reinforcement Learning",
    arxiv="1912.09729",
    status="exact",
    card="ratio#B2",
)
def dual_clip(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    clip_c: float = 3.0,
    aggregation: AggregationLike = "token-mean",
) -> LossOutput:
    """Dual-clip PPO: also caps the loss of negative-advantage tokens whose ratio exploded.

    Paper: Ye et al., "Mastering Complex Control in MOBA Games with Deep Reinforcement
    Learning", arXiv 1912.09729. Exact (verl ``clip_ratio_c``, default 3.0).

    For A_t < 0: l_t = min(max(-A r, -A clip(r, 1-eps_low, 1+eps_high)), -A c); for A_t >= 0 plain
    PPO clip. A stale token with r > c then has zero gradient and loss exactly -A c, so the loss
    is bounded by |A| max(c, 1 + eps_high). Requires c > 1.
    """
    if clip_c <= 1.0:
        raise InvalidInputError(f"dual_clip: clip_c must be > 1 (verl uses 3.0), got {clip_c}")
    return clip_loss(
        logprobs, old_logprobs, advantages, response_mask, eps_low, eps_high, clip_c, aggregation
    )


@register(
    "policy_loss",
    "clip_higher",
    paper="DAPO: An Open-Source LLM Reinforcement Learning System at Scale",
    arxiv="2503.14476",
    status="exact",
    card="ratio#B5",
    aliases=("dapo",),
)
def clip_higher(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    aggregation: AggregationLike = "token-mean",
) -> LossOutput:
    """DAPO's loss: decoupled clip (clip-higher) with token-level mean over the whole batch.

    Paper: Yu et al., "DAPO: An Open-Source LLM Reinforcement Learning System at Scale",
    arXiv 2503.14476. Exact (parts a and b; overlong shaping and dynamic sampling are the
    ``dapo_overlong`` reward and ``dynamic_sampling`` selection entries).

    l_t = max(-A r, -A clip(r, 1 - 0.2, 1 + 0.28)), token-mean: positive-advantage tokens keep
    their gradient up to r = 1.28, which leaves low-probability tokens room to grow (entropy).
    For micro-batches pass an Aggregation with the global token count (TRL ``num_items_in_batch``).
    """
    return clip_loss(logprobs, old_logprobs, advantages, response_mask, eps_low, eps_high, None, aggregation)
