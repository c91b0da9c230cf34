"""The importance-sampled surrogate of trust-region methods (TRPO, CPO): -r A, with no clipping."""

from __future__ import annotations

import torch

from tether.catalogue.aggregate import AggregationLike, aggregate, masked_mean
from tether.catalogue.contracts import LossOutput, check_2d, check_same_shape, detached, token_advantages
from tether.catalogue.ratio import log_ratio
from tether.catalogue.registry import register


@register(
    "policy_loss",
    "is_surrogate",
    paper="Trust Region Policy Optimization",
    arxiv="1502.05477",
    status="exact",
    card="control#A4",
    aliases=("trpo_surrogate",),
)
def is_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    aggregation: AggregationLike = "token-mean",
) -> LossOutput:
    """The negated surrogate advantage L(theta) = E[pi_theta / pi_old * A] of TRPO and CPO, unclipped.

    Paper: Schulman et al., "Trust Region Policy Optimization", arXiv 1502.05477 (eq. 14); CPO
    (Achiam et al., arXiv 1705.10528) maximizes the same surrogate under its cost constraint. Exact.

    l_t = -A_t r_t, r_t = exp(lp_t - lp_old_t) (log r clamped to [-20, 20] as everywhere in the
    catalogue). At theta = theta_old its gradient is the policy gradient -A grad log pi; the step
    size is bounded by the trust region (a KL constraint) of the method that uses it, not by a clip,
    so use it with a trust-region update (recipe ``constraint.trust_region``), not with SGD epochs.
    """
    check_2d("logprobs", logprobs)
    check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, response_mask=response_mask)
    adv = token_advantages(advantages, response_mask).to(logprobs.dtype)
    ratio = torch.exp(log_ratio(logprobs, old_logprobs))
    loss = aggregate(-adv * ratio, response_mask, aggregation)
    with torch.no_grad():
        m = response_mask.float()
        metrics = {
            "policy/loss": detached(loss),
            "policy/ratio_mean": detached(masked_mean(ratio.detach(), m)),
        }
    return loss, metrics
