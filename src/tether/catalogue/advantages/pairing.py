"""Rare-event amplification with bidirectional pairing: GRPO advantages re-weighted per group."""

from __future__ import annotations

import torch

from tether.catalogue.advantages.broadcast import check_outcome, to_tokens
from tether.catalogue.advantages.group_stats import GRPO_EPS, group_mean, groups_of, grpo_scores
from tether.catalogue.contracts import Metrics, check_groups, detached
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


@register(
    "advantage",
    "pairing_weights",
    paper="Beyond Variance: Prompt-Efficient RLVR via Rare-Event Amplification and Bidirectional Pairing",
    arxiv="2602.03452",
    status="reconstructed",
    card="adv#B7",
)
def pairing_weights(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    response_mask: torch.Tensor,
    tau_plus: float = 0.25,
    tau_minus: float = 0.75,
    lambda_plus: float = 2.0,
    lambda_minus: float = 2.0,
    correct_threshold: float = 0.5,
    eps: float = GRPO_EPS,
) -> tuple[torch.Tensor, Metrics]:
    """Rare-event amplification: scale GRPO advantages of hard-but-solvable and easy-but-brittle groups.

    Paper: "Beyond Variance: Prompt-Efficient RLVR via Rare-Event Amplification and Bidirectional
    Pairing", arXiv 2602.03452. Reconstructed from the abstract (no code; card adv#B7).

    p_q = fraction of correct samples (r > correct_threshold) in the group.
    A_i = GRPO (r_i - mean_q) / (std_q + eps), then A_i <- lambda_plus A_i on q+ groups (0 < p <= tau_plus),
    lambda_minus A_i on q- groups (tau_minus <= p < 1), unchanged otherwise. The weights act AFTER the
    normalisation (a re-weighting of the rewards before it would be erased by GRPO's affine
    invariance). Defaults: tau+ = 0.25, tau- = 0.75 from the card; the paper's lambdas are unknown,
    2.0 is our choice (lambda = 1 gives GRPO). Pair selection of prompts is the sampler's job.
    """
    check_outcome(rewards, response_mask)
    check_groups(group_ids, rewards.shape[0])
    if not 0.0 < tau_plus < tau_minus < 1.0:
        raise InvalidInputError(
            f"pairing_weights: need 0 < tau_plus < tau_minus < 1, got {tau_plus}, {tau_minus}"
        )
    if lambda_plus < 0 or lambda_minus < 0:
        raise InvalidInputError("pairing_weights: lambda_plus and lambda_minus must be >= 0")
    base = grpo_scores(rewards, group_ids, eps)
    groups = groups_of(group_ids, base.shape[0])
    p = groups.gather(group_mean((rewards.detach() > correct_threshold).to(base.dtype), groups))
    hard = (p > 0) & (p <= tau_plus)
    brittle = (p >= tau_minus) & (p < 1)
    weight = torch.where(
        hard,
        torch.full_like(p, lambda_plus),
        torch.where(brittle, torch.full_like(p, lambda_minus), torch.ones_like(p)),
    )
    adv = base * weight
    metrics: Metrics = {
        "pairing/hard_frac": detached(hard.to(p.dtype).mean()),
        "pairing/brittle_frac": detached(brittle.to(p.dtype).mean()),
        "adv/abs_mean": detached(adv.abs().mean()),
    }
    return to_tokens(adv, response_mask), metrics
