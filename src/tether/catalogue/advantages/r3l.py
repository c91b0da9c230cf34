"""R^3L positive amplification: group-mean baseline with successes pinned to 1 and gains tripled."""

from __future__ import annotations

import torch

from tether.catalogue.advantages.baselines import AdvantageOutput, finish, outcome_group_stats
from tether.catalogue.registry import register


@register(
    "advantage",
    "r3l",
    paper=(
        "R^3L: Reflect-then-Retry Reinforcement Learning with Language-Guided Exploration, "
        "Pivotal Credit, and Positive Amplification"
    ),
    arxiv="2601.03715",
    status="exact",
    card="adv#B19",
)
def r3l(
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids: torch.Tensor,
    reward_max: float = 1.0,
    success_advantage: float = 1.0,
    amplification: float = 3.0,
) -> AdvantageOutput:
    """R^3L positive amplification: successes always get A = 1 and other above-mean samples 3x.

    Paper: Shi et al., "R^3L: Reflect-then-Retry Reinforcement Learning with Language-Guided
    Exploration, Pivotal Credit, and Positive Amplification", arXiv 2601.03715. Exact
    (shiweijiezero/R3L trinity/algorithm/advantage_fn/opmd_advantage.py).

    A_i = r_i - mean_g r; if r_i >= R_max (= 1): A_i = 1; elif A_i >= 0: A_i = 3 A_i; negatives unchanged.
    No std division. An all-correct group keeps A = 1 (not 0); advantages do not sum to 0, so a
    success-heavy group raises the log-probs it sampled at the expense of unsampled responses.
    The pivotal-credit prefix mask is a token mask (response_mask) set by the rollout, not here.
    """
    r, stats = outcome_group_stats(rewards, response_mask, group_ids)
    adv = r - stats.groups.gather(stats.mean)
    adv = torch.where(adv >= 0, amplification * adv, adv)
    adv = torch.where(r >= reward_max, torch.full_like(adv, success_advantage), adv)
    return finish(adv, response_mask, r, stats)
