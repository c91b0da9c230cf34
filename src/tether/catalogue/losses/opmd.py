"""OPMD as used by R^3L: a ratio-free, scaled REINFORCE loss -A log pi / (1 + tau)."""

from __future__ import annotations

import torch

from tether.catalogue.aggregate import AggregationLike, aggregate, masked_mean
from tether.catalogue.contracts import LossOutput, check_2d, check_same_shape, detached, token_advantages
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


@register(
    "policy_loss",
    "opmd",
    paper=(
        "R^3L: Reflect-then-Retry Reinforcement Learning with Language-Guided Exploration, "
        "Pivotal Credit, and Positive Amplification"
    ),
    arxiv="2601.03715",
    status="exact",
    card="adv#B19",
)
def opmd(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    tau: float = 1.0,
    aggregation: AggregationLike = "token-mean",
) -> LossOutput:
    """OPMD loss of R^3L: token-mean of -A log pi_theta / (1 + tau), with no ratio and no clipping.

    Paper: Shi et al., "R^3L: Reflect-then-Retry Reinforcement Learning with Language-Guided
    Exploration, Pivotal Credit, and Positive Amplification", arXiv 2601.03715. Exact (card adv#B19,
    shiweijiezero/R3L on Trinity-RFT ``opmd_policy_loss``).

    l_t = -A_t lp_t / (1 + tau), aggregated by token-mean, so dL/dlp_t = -A_t / ((1 + tau) N_tok).
    R^3L's positive amplification and pivotal credit live in the advantages and the response mask
    (mask the shared prefix of a retry pair to exclude it). Inputs: logprobs, response_mask [B, T];
    advantages [B] or [B, T]. Requires tau >= 0.
    """
    check_2d("logprobs", logprobs)
    check_same_shape("logprobs", logprobs, response_mask=response_mask)
    if tau < 0:
        raise InvalidInputError(f"opmd: tau must be >= 0 (R^3L uses 1.0), got {tau}")
    adv = token_advantages(advantages, response_mask).to(logprobs.dtype)
    per_token = -adv * logprobs / (1.0 + tau)
    loss = aggregate(per_token, response_mask, aggregation)
    with torch.no_grad():
        m = response_mask.float()
        metrics = {
            "policy/loss": detached(loss),
            "opmd/logprob_mean": detached(masked_mean(logprobs.detach(), m)),
            "opmd/advantage_mean": detached(masked_mean(adv, m)),
        }
    return loss, metrics
