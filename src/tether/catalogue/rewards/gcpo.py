"""GeometryZero's group-contrastive auxiliary-construction reward (GCPO)."""

from __future__ import annotations

import torch

from tether.catalogue.advantages.broadcast import check_per_sample
from tether.catalogue.advantages.group_stats import group_sum, groups_of
from tether.catalogue.contracts import Metrics, detached
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


@register(
    "reward",
    "gcpo",
    paper="GeometryZero: Improving Geometry Solving for LLM with Group Contrastive Policy Optimization",
    arxiv="2506.07160",
    status="reconstructed",
    card="adv#B18",
)
def gcpo(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    uses_aux: torch.Tensor,
    eta: float = 0.0,
    aux_reward: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """GCPO: reward auxiliary constructions only in groups where they raised accuracy.

    Paper: Wang et al., "GeometryZero: Improving Geometry Solving for LLM with Group Contrastive
    Policy Optimization", arXiv 2506.07160. Reconstructed (repo ekonwang/GeometryZero not read).

    Per group: U = samples with ``uses_aux``, N = the others; Delta = mean_U r - mean_N r (r = the
    accuracy reward), defined only when |U|, |N| >= 1. M = +1 if Delta > eta, -1 if Delta < -eta,
    else 0 (and 0 when no contrast is possible).  R'_i = r_i + M aux_reward 1[uses_aux_i].
    Then apply GRPO normalisation. eta is not given in the sources; 0.0 is our default. The
    paper's length reward (form unknown) is left out; add format / length rewards separately.
    """
    check_per_sample("rewards", rewards)
    groups = groups_of(group_ids, rewards.shape[0])
    if uses_aux.shape != rewards.shape:
        raise InvalidInputError(f"gcpo: uses_aux must be a [batch] bool tensor, got {tuple(uses_aux.shape)}")
    if eta < 0:
        raise InvalidInputError(f"gcpo: eta must be >= 0, got {eta}")
    r = rewards.detach()
    aux = uses_aux.bool()
    a = aux.to(r.dtype)
    n_u = group_sum(a, groups)
    n_n = group_sum(1.0 - a, groups)
    acc_u = group_sum(r * a, groups) / n_u.clamp(min=1.0)
    acc_n = group_sum(r * (1.0 - a), groups) / n_n.clamp(min=1.0)
    delta = acc_u - acc_n
    contrast = (n_u > 0) & (n_n > 0)
    mask = torch.where(
        contrast & (delta > eta),
        torch.ones_like(delta),
        torch.where(contrast & (delta < -eta), -torch.ones_like(delta), torch.zeros_like(delta)),
    )
    out = r + groups.gather(mask) * aux_reward * a
    metrics: Metrics = {
        "gcpo/positive_group_frac": detached((mask > 0).to(r.dtype).mean()),
        "gcpo/negative_group_frac": detached((mask < 0).to(r.dtype).mean()),
        "gcpo/aux_rate": detached(a.mean() if a.numel() else torch.zeros(())),
    }
    return out, metrics
