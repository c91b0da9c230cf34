"""ETR: per-sample elastic clip bounds that widen with the advantage magnitude."""

from __future__ import annotations

import torch

from tether.catalogue.aggregate import AggregationLike, aggregate, masked_mean
from tether.catalogue.contracts import LossOutput, check_2d, check_same_shape, detached, token_advantages
from tether.catalogue.ratio import log_ratio, ratio_metrics
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


def etr_bounds(
    advantages: torch.Tensor, eps_low: float, eps_high: float, lam: float, eps_cap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Elastic (eps_low_i, eps_high_i) = (min(e_l (1 + lam |A|), cap), min(e_h (1 + lam |A|), cap)).

    Only eps_high matters for A > 0 and only eps_low for A < 0 (the other side of the clip never
    binds), so both are returned for every token.
    """
    scale = 1.0 + lam * advantages.detach().abs()
    return torch.clamp(eps_low * scale, max=eps_cap), torch.clamp(eps_high * scale, max=eps_cap)


@register(
    "policy_loss",
    "etr",
    paper="ETR: Outcome-Guided Elastic Trust Regions for Policy Optimization",
    arxiv="2601.03723",
    status="reconstructed",
    card="ratio#3",
)
def etr(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    lam: float = 0.5,
    eps_cap: float = 1.0,
    aggregation: AggregationLike = "token-mean",
) -> LossOutput:
    """ETR (micro level): a PPO clip whose range widens with |A_i|, so strong signals move further.

    Paper: Zhang et al., "ETR: Outcome-Guided Elastic Trust Regions for Policy Optimization",
    arXiv 2601.03723. Reconstructed (no code or equations found; from the abstract and summaries) --
    a hypothesis; defaults are the card's starting point, not the paper's.

    e_i^high = min(e_h (1 + lam |A_i|), cap) for A_i > 0; e_i^low = min(e_l (1 + lam |A_i|), cap) for A_i < 0
    l_{i,t} = max(-A_i r, -A_i clip(r, 1 - e_i^low, 1 + e_i^high)), token-mean (DAPO); cap = 1.0.
    lam = 0 gives ``clip_higher`` (e_l=0.2, e_h=0.28). The macro level (larger budget for groups with
    pass rate near 0.5) is implicit in the advantage: use group-mean advantages without std division
    (A_i = R_i - p_g), whose magnitude peaks at p_g = 0.5; it is not part of this loss.
    """
    check_2d("logprobs", logprobs)
    check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, response_mask=response_mask)
    if eps_low < 0 or eps_high < 0 or lam < 0 or eps_cap <= 0:
        raise InvalidInputError(
            f"etr: need eps_low >= 0, eps_high >= 0, lam >= 0 and eps_cap > 0 "
            f"(card: 0.2, 0.28, 0.5, 1.0), got {eps_low}, {eps_high}, {lam}, {eps_cap}"
        )
    adv = token_advantages(advantages, response_mask).to(logprobs.dtype)
    e_low, e_high = etr_bounds(adv, eps_low, eps_high, lam, eps_cap)
    log_r = log_ratio(logprobs, old_logprobs)
    ratio = torch.exp(log_r)
    clipped = torch.minimum(torch.maximum(ratio, 1.0 - e_low), 1.0 + e_high)
    per_token = torch.maximum(-adv * ratio, -adv * clipped)
    loss = aggregate(per_token, response_mask, aggregation)

    metrics = ratio_metrics(log_r, response_mask)
    with torch.no_grad():
        m = response_mask.float()
        r = ratio.detach()
        low = ((r < 1.0 - e_low) & (adv < 0)).float()
        high = ((r > 1.0 + e_high) & (adv > 0)).float()
        metrics["policy/clip_frac_low"] = detached(masked_mean(low, m))
        metrics["policy/clip_frac_high"] = detached(masked_mean(high, m))
        metrics["policy/clip_frac"] = detached(masked_mean(torch.clamp(low + high, max=1.0), m))
        pos = m * (adv > 0).float()
        neg = m * (adv < 0).float()
        metrics["etr/eps_high_mean"] = detached(masked_mean(e_high, pos))
        metrics["etr/eps_low_mean"] = detached(masked_mean(e_low, neg))
    metrics["policy/loss"] = detached(loss)
    return loss, metrics
