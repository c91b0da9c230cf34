"""OPO: the length-weighted group baseline, the variance-optimal one for sequence rewards."""

from __future__ import annotations

import torch

from tether.catalogue.advantages.baselines import AdvantageOutput, finish, outcome_group_stats
from tether.catalogue.advantages.group_stats import group_sum
from tether.catalogue.registry import register


@register(
    "advantage",
    "opo",
    paper="On-Policy RL with Optimal Reward Baseline",
    arxiv="2505.23585",
    status="exact",
    card="lessons#feature-bar",
)
def opo(rewards: torch.Tensor, response_mask: torch.Tensor, group_ids: torch.Tensor) -> AdvantageOutput:
    """OPO: A_i = r_i - b_g with b_g = sum_j L_j r_j / sum_j L_j, the group's length-weighted mean reward.

    Paper: Hao et al., "On-Policy RL with Optimal Reward Baseline", arXiv 2505.23585. Exact
    (verl ``compute_opo_outcome_advantage``).

    The baseline that minimises the gradient variance is b* = E[|grad log pi(o)|^2 r] / E[|grad log
    pi(o)|^2]; the paper takes |grad log pi(o)|^2 proportional to the response length L (tokens
    contribute roughly independent gradients), which gives the length-weighted mean. No std
    normalisation. A group of one sample gets b = 0 (verl), so A = r. L counts the valid response
    tokens (the mask); a group whose responses are all empty falls back to b = 0 as well.
    """
    r, stats = outcome_group_stats(rewards, response_mask, group_ids)
    lengths = response_mask.to(r.dtype).sum(-1)
    weighted = group_sum(lengths * r, stats.groups)
    total = group_sum(lengths, stats.groups)
    baseline = torch.where(
        (stats.count > 1.0) & (total > 0), weighted / total.clamp(min=1.0), torch.zeros_like(total)
    )
    return finish(r - stats.groups.gather(baseline), response_mask, r, stats)
