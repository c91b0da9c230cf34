"""HeRL: clipped PPO on on-policy rows, a bounded importance weight rho/(rho + gamma) on hindsight rewrites."""

from __future__ import annotations

import math

import torch

from tether.catalogue.aggregate import AggregationLike, aggregate, masked_mean
from tether.catalogue.contracts import LossOutput, check_2d, check_same_shape, detached, token_advantages
from tether.catalogue.ratio import clipped_surrogate, log_ratio, ratio_metrics
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


@register(
    "policy_loss",
    "herl",
    paper="Experience is the Best Teacher: Motivating Effective Exploration in Reinforcement Learning for LLMs",
    arxiv="2603.20046",
    status="exact",
    card="adv#B22",
)
def herl(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    off_policy_mask: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float = 1.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: AggregationLike = "token-mean",
) -> LossOutput:
    """HeRL mixed-policy loss: rewrite tokens get -A rho/(rho + gamma) (no clip), other rows clipped PPO.

    Paper: Zhang et al., "Experience is the Best Teacher: Motivating Effective Exploration in
    Reinforcement Learning for LLMs", arXiv 2603.20046. Exact (card adv#B22, sikelifei/HeRL
    ``mixpolicy_vanilla``); the hindsight rewrite and the bonus reward are made by the loop.

    Rows with ``off_policy_mask`` [B] True are hindsight rewrites sampled by pi_he (the policy
    prompted with the failed response and unmet rubrics); ``behavior_logprobs`` [B, T] are their
    log-probs under pi_he. Per token:
      rewrite rows:  l_t = -A_t rho_t / (rho_t + gamma), rho_t = pi_theta / pi_he = exp(lp - behavior_lp);
      other rows:    l_t = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), r = exp(lp - lp_old).
    rho/(rho + gamma) = sigmoid(log rho - log gamma) lies in (0, 1), so the off-policy weight is
    bounded without clipping; dl/dlp = -A gamma rho / (rho + gamma)^2. Both kinds of rows share one
    token-mean. ``behavior_logprobs`` is read on rewrite rows only, ``old_logprobs`` on the others.
    """
    check_2d("logprobs", logprobs)
    check_same_shape(
        "logprobs",
        logprobs,
        old_logprobs=old_logprobs,
        behavior_logprobs=behavior_logprobs,
        response_mask=response_mask,
    )
    batch = logprobs.shape[0]
    if off_policy_mask.dim() != 1 or off_policy_mask.shape[0] != batch:
        raise InvalidInputError(
            f"herl: off_policy_mask must be a [batch] bool tensor ({batch}) marking rewrite rows, "
            f"got shape {tuple(off_policy_mask.shape)}"
        )
    if gamma <= 0:
        raise InvalidInputError(f"herl: gamma must be > 0 (the paper uses 1.0), got {gamma}")

    dtype = logprobs.dtype
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    valid = response_mask.bool()
    off_rows = off_policy_mask.bool().unsqueeze(-1)
    on_mask = valid & ~off_rows
    off_mask = valid & off_rows
    adv = token_advantages(advantages, response_mask).to(dtype)

    log_r = torch.where(on_mask, log_ratio(logprobs, old_logprobs), zero)
    on_loss = clipped_surrogate(torch.exp(log_r), adv, eps_low, eps_high)
    log_rho = torch.where(off_mask, logprobs - behavior_logprobs.to(dtype), zero)
    weight = torch.sigmoid(log_rho - math.log(gamma))
    off_loss = -adv * weight
    per_token = torch.where(off_rows, off_loss, on_loss)
    loss = aggregate(per_token, response_mask, aggregation)

    metrics = ratio_metrics(log_r, on_mask, adv, eps_low, eps_high)
    with torch.no_grad():
        metrics["herl/off_policy_weight_mean"] = detached(masked_mean(weight.detach(), off_mask.float()))
        metrics["herl/off_policy_token_frac"] = detached(masked_mean(off_mask.float(), valid.float()))
    metrics["policy/loss"] = detached(loss)
    return loss, metrics
