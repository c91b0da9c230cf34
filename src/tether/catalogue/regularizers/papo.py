"""PAPO: maximise the KL between the policy with and without the (masked) image, plus entropy penalties (card ratio#21)."""

from __future__ import annotations

import torch

from tether.catalogue.aggregate import AggregationLike, aggregate, local
from tether.catalogue.contracts import LossOutput, check_2d, check_same_shape, detached
from tether.catalogue.registry import register
from tether.catalogue.regularizers.kl import low_var_kl_per_token
from tether.errors import InvalidInputError


@register(
    "regularizer",
    "papo",
    paper="Perception-Aware Policy Optimization for Multimodal Reasoning",
    arxiv="2507.06448",
    status="exact",
    card="ratio#21",
)
def papo(
    logprobs: torch.Tensor,
    aug_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float = 0.01,
    eta_o: float = 0.05,
    eta_a: float = 0.05,
    kl_clip: float | None = None,
    aggregation: AggregationLike = "token-mean",
) -> LossOutput:
    """PAPO's Implicit Perception Loss (a KL to MAXIMISE) and Double Entropy Loss.

    Paper: Wang et al., "Perception-Aware Policy Optimization for Multimodal Reasoning",
    arXiv 2507.06448. Exact for the generic part (card ratio#21, github.com/MikeWangWZHL/PAPO).

    ``aug_logprobs`` = log-probs of the same response with the image patch-masked (14x14 patches
    blacked out with prob 0.6); detached when precomputed, differentiable when recomputed.
    KL_prcp_t = k3(lp, lp_aug) = low_var_kl: x = clamp(lp_aug - lp, -20, 20), exp(x) - x - 1,
    clamped to [-10, 10]; optionally clipped to [0, kl_clip] (the paper tries 0.2).
    term = -gamma * agg(KL_prcp) + eta_o * agg(-lp) + eta_a * agg(-lp_aug),
    gamma = 0.01 (config; 0.02 in the 7B script), eta_o = eta_a = 0.05 (scripts). The -lp terms
    are entropy estimates, so they PENALISE entropy (against KL hacking by raising entropy).
    With the released default (aug log-probs precomputed) the eta_a term has no gradient.
    gamma = eta_o = eta_a = 0 gives a zero term (plain GRPO).
    """
    check_2d("logprobs", logprobs)
    check_same_shape("logprobs", logprobs, aug_logprobs=aug_logprobs, response_mask=response_mask)
    if gamma < 0 or eta_o < 0 or eta_a < 0:
        raise InvalidInputError(f"papo: gamma, eta_o and eta_a must be >= 0, got {gamma}, {eta_o}, {eta_a}")
    if kl_clip is not None and kl_clip <= 0:
        raise InvalidInputError(f"papo: kl_clip must be > 0 or None, got {kl_clip}")
    valid = response_mask.bool()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    lp = torch.where(valid, logprobs, zero)
    lp_aug = torch.where(valid, aug_logprobs.to(logprobs.dtype), zero)
    kl_tok = low_var_kl_per_token(lp - lp_aug)
    if kl_clip is not None:
        kl_tok = torch.clamp(kl_tok, 0.0, kl_clip)
    kl_prcp = aggregate(kl_tok, response_mask, aggregation)
    ent_o = aggregate(-lp, response_mask, aggregation)
    ent_a = aggregate(-lp_aug, response_mask, aggregation)
    term = -gamma * kl_prcp + eta_o * ent_o + eta_a * ent_a
    loc = local(aggregation)
    return term, {
        "papo/kl_prcp": detached(aggregate(kl_tok.detach(), response_mask, loc)),
        "papo/entropy_orig": detached(aggregate(-lp.detach(), response_mask, loc)),
        "papo/entropy_aug": detached(aggregate(-lp_aug.detach(), response_mask, loc)),
        "reg/papo_loss": detached(term),
    }
