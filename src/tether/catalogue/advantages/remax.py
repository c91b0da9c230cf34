"""ReMax: REINFORCE with the reward of the greedy response as the baseline."""

from __future__ import annotations

import torch

from tether.catalogue.advantages.baselines import AdvantageOutput, finish, outcome_group_stats
from tether.catalogue.advantages.broadcast import check_per_sample
from tether.catalogue.contracts import detached
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


@register(
    "advantage",
    "remax",
    paper="ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for Aligning Large Language Models",
    arxiv="2310.10505",
    status="exact",
    card="lessons#feature-bar",
)
def remax(
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids: torch.Tensor,
    baseline_rewards: torch.Tensor,
) -> AdvantageOutput:
    """ReMax: A_i = r_i - r(greedy response to the prompt of sample i).

    Paper: Li et al., "ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for
    Aligning Large Language Models", arXiv 2310.10505 (Algorithm 1). Exact (verl
    ``compute_remax_outcome_advantage`` for an outcome reward).

    ``baseline_rewards`` [B]: the reward of the policy's greedy (argmax) response to each sample's
    prompt, generated before the update (the ``remax`` loop plugin provides it). The baseline does
    not depend on the sampled response, so the gradient stays unbiased; it is the reward a
    deterministic policy would get, so a sample is pushed up only when it beats the greedy answer.
    No normalisation. A NaN baseline (its greedy response could not be scored) gives that prompt's
    samples advantage 0. Broadcast to every response token.
    """
    check_per_sample("baseline_rewards", baseline_rewards, rewards.shape[0] if rewards.dim() else None)
    r, stats = outcome_group_stats(rewards, response_mask, group_ids)
    b = baseline_rewards.detach().to(r.dtype)
    if bool(torch.isinf(b).any()):
        raise InvalidInputError(
            "remax: baseline_rewards must be finite (or NaN for an unscored greedy response)"
        )
    known = ~torch.isnan(b)
    adv, metrics = finish(
        torch.where(known, r - torch.nan_to_num(b), torch.zeros_like(r)), response_mask, r, stats
    )
    metrics["remax/baseline_mean"] = detached(b[known].mean() if bool(known.any()) else torch.zeros(()))
    return adv, metrics
