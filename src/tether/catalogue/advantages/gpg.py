"""GPG's advantage: the group-mean baseline, rescaled for the groups that carry no signal."""

from __future__ import annotations

from typing import Literal

import torch

from tether.catalogue.advantages.baselines import AdvantageOutput, finish, outcome_group_stats
from tether.catalogue.contracts import detached
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


@register(
    "advantage",
    "gpg",
    paper="GPG: A Simple and Strong Reinforcement Learning Baseline for Model Reasoning",
    arxiv="2504.02546",
    status="exact",
    card="lessons#feature-bar",
)
def gpg(
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids: torch.Tensor,
    f_norm: Literal["none", "std"] = "none",
    eps: float = 1e-4,
) -> AdvantageOutput:
    """GPG advantage: A_i = alpha (r_i - mean_g r) / F_norm, with alpha = B / (B - M).

    Paper: Chu et al., "GPG: A Simple and Strong Reinforcement Learning Baseline for Model
    Reasoning", arXiv 2504.02546 (eq. 8-9). Exact (the authors' AMAP-ML/GPG trainer: ``adjust_gd``
    divides the loss by (B - M) / B, ``scale_rewards`` False gives F_norm = 1).

    B is the number of samples, M the number in groups whose rewards are all equal (a single-sample
    group included): their advantage is 0, so they shrink the batch's mean gradient by (B - M) / B;
    alpha = B / (B - M) undoes that, making the estimate that of the informative samples alone.
    When every group is flat (M = B) all advantages are 0 and alpha is reported as 1.
    F_norm = 1 ("none", the paper's default) or the group's unbiased std + eps ("std"; the
    authors' code adds 1e-4). verl's ``compute_gpg_outcome_advantage`` takes alpha = B / (number of
    nonzero rewards) instead, which is not the paper's; tether follows the paper and the authors.
    The paper's threshold beta_th (re-sample until (B - M) / B >= beta_th) is a sampling rule, not
    part of the estimate; ``train.dynamic_sampling`` is the loop's (stricter) form of it.
    """
    if f_norm not in ("none", "std"):
        raise InvalidInputError(f"gpg: f_norm must be 'none' (F_norm = 1) or 'std', got {f_norm!r}")
    if not eps > 0:
        raise InvalidInputError(f"gpg: eps must be > 0, got {eps}")
    r, stats = outcome_group_stats(rewards, response_mask, group_ids)
    centred = r - stats.groups.gather(stats.mean)  # a single-sample group: 0, as it counts in M
    if f_norm == "std":
        centred = centred / (stats.groups.gather(stats.std) + eps)
    flat = stats.groups.gather(stats.zero_std.to(r.dtype))
    b = float(r.shape[0])
    informative = b - float(flat.sum())
    alpha = b / informative if informative > 0 else 1.0
    adv, metrics = finish(alpha * centred, response_mask, r, stats)
    metrics["gpg/alpha"] = detached(alpha)
    return adv, metrics
