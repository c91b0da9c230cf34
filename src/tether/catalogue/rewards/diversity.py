"""DSDR's global scale: a bounded distinctiveness bonus for correct responses."""

from __future__ import annotations

import torch

from tether.catalogue.contracts import Metrics, detached
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


@register(
    "reward",
    "dsdr_bonus",
    paper="DSDR: Dual-Scale Diversity Regularization for Exploration in LLM Reasoning",
    arxiv="2602.19895",
    status="reconstructed",
    card="ratio#15",
)
def dsdr_bonus(
    rewards: torch.Tensor,
    distinctiveness: torch.Tensor,
    lam_g: float = 0.1,
    d_max: float = 1.0,
    correct_threshold: float = 0.5,
) -> tuple[torch.Tensor, Metrics]:
    """DSDR global bonus: correct responses that are distinctive in their group earn a little more.

    Paper: Wan et al., "DSDR: Dual-Scale Diversity Regularization for Exploration in LLM Reasoning",
    arXiv 2602.19895. Reconstructed (repo SUSTechBruce/DSDR not retrievable; card ratio#15).

    R'_i = R_i + lam_g min(d_i, d_max) 1[R_i > correct_threshold], d_i = ``distinctiveness`` in [0, 1]
    (e.g. mean 1 - cos(e_i, e_j) over other correct j, averaged with formula uniqueness; negative
    values are clamped to 0). Requires d_max lam_g < 1 so correctness still dominates.
    Defaults unknown in the paper: lam_g = 0.1, d_max = 1.0 are ours. The local entropy term is a
    regulariser, not a reward.
    """
    if distinctiveness.shape != rewards.shape:
        raise InvalidInputError(
            f"dsdr_bonus: distinctiveness must be [batch] like rewards, got {tuple(distinctiveness.shape)}"
        )
    if lam_g < 0 or d_max < 0:
        raise InvalidInputError("dsdr_bonus: lam_g and d_max must be >= 0")
    if d_max * lam_g >= 1.0:
        raise InvalidInputError(
            f"dsdr_bonus: need d_max * lam_g < 1 so a bonus never outweighs correctness, got {d_max * lam_g}"
        )
    r = rewards.detach()
    correct = r > correct_threshold
    d = torch.clamp(distinctiveness.detach().to(r.dtype), min=0.0)
    bonus = torch.where(correct, lam_g * torch.clamp(d, max=d_max), torch.zeros_like(r))
    out = r + bonus
    return out, {"reward/diversity_bonus_mean": detached(bonus.mean() if bonus.numel() else torch.zeros(()))}
