"""DSDR's local scale: a length-invariant entropy bonus on correct responses, weighted by distinctiveness (card ratio#15)."""

from __future__ import annotations

import torch

from tether.catalogue.aggregate import Aggregation, aggregate
from tether.catalogue.contracts import LossOutput, check_2d, check_groups, check_same_shape, detached
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


def group_softmax(logits: torch.Tensor, eligible: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Softmax of ``logits`` [B] over the eligible members of each group; 0 for ineligible samples."""
    _, inv = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inv.max().item()) + 1 if inv.numel() else 0
    neg_inf = torch.full((), float("-inf"), dtype=logits.dtype, device=logits.device)
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    masked = torch.where(eligible, logits, neg_inf)
    gmax = torch.full((n_groups,), float("-inf"), dtype=logits.dtype, device=logits.device)
    gmax = gmax.scatter_reduce(0, inv, masked, reduce="amax", include_self=True)
    shifted = torch.where(eligible, logits - torch.where(eligible, gmax[inv], zero), zero)
    e = torch.where(eligible, torch.exp(shifted), zero)
    denom = torch.zeros(n_groups, dtype=logits.dtype, device=logits.device).index_add(0, inv, e)
    return e / denom[inv].clamp_min(torch.finfo(logits.dtype).tiny)


@register(
    "regularizer",
    "dsdr_entropy",
    paper="DSDR: Dual-Scale Diversity Regularization for Exploration in LLM Reasoning",
    arxiv="2602.19895",
    status="reconstructed",
    card="ratio#15",
)
def dsdr_entropy(
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    distinctiveness: torch.Tensor,
    coef: float = 0.001,
    temperature: float = 1.0,
    correct_threshold: float = 0.5,
) -> LossOutput:
    """DSDR local scale: entropy bonus on correct responses, allocated by a softmax of their distinctiveness.

    Paper: Wan et al., "DSDR: Dual-Scale Diversity Regularization for Exploration in LLM
    Reasoning", arXiv 2602.19895. Reconstructed (card ratio#15; the authors' repo was not
    retrievable, and the paper's coefficient and temperature were not found: the defaults
    coef = 0.001 and temperature = 1.0 are placeholders, tune them).

    correct_i = reward_i > 0.5 (and at least one valid token); d_i in [0, 1] = ``distinctiveness``
    (e.g. mean embedding distance to the other correct samples; detached);
    w_i = softmax over the correct samples of the same group of d_i / tau (0 for incorrect);
    term = -coef * (1/G) sum_g sum_{i in g, correct} w_i (1/L_i) sum_t H_{i,t}, G = number of groups.
    The 1/L_i makes it length-invariant. Incorrect samples get no entropy gradient; with all
    d equal the weights are uniform over the correct samples; coef = 0 gives GRPO. The global
    diversity reward bonus is a separate (reward) entry.
    """
    check_2d("entropy", entropy)
    check_same_shape("entropy", entropy, response_mask=response_mask)
    batch = entropy.shape[0]
    check_groups(group_ids, batch)
    for name, t in (("rewards", rewards), ("distinctiveness", distinctiveness)):
        if t.dim() != 1 or t.shape[0] != batch:
            raise InvalidInputError(f"{name} must be a [batch] tensor ({batch}), got shape {tuple(t.shape)}")
    if temperature <= 0:
        raise InvalidInputError(f"dsdr_entropy: temperature must be > 0, got {temperature}")
    if coef < 0:
        raise InvalidInputError(f"dsdr_entropy: coef must be >= 0, got {coef}")
    valid = response_mask.bool()
    correct = (rewards.detach() > correct_threshold) & valid.any(-1)
    d = distinctiveness.detach().to(entropy.dtype)
    w = group_softmax(d / temperature, correct, group_ids)
    n_groups = float(torch.unique(group_ids).numel())
    weighted = aggregate(
        w.unsqueeze(-1) * entropy,
        response_mask,
        Aggregation("seq-mean-token-mean", num_sequences=max(n_groups, 1.0)),
    )
    term = -coef * weighted
    return term, {
        "dsdr/weighted_entropy": detached(weighted),
        "dsdr/correct_frac": detached(correct.float().mean()),
        "dsdr/weight_max": detached(w.max() if w.numel() else torch.zeros(())),
        "reg/dsdr_loss": detached(term),
    }
