"""Outcome baselines: REINFORCE with a baseline, RLOO, GRPO, Dr.GRPO and Lite PPO.

All take one scalar reward per sample, compute a per-sample advantage from group (or batch)
statistics of the rewards, and broadcast it over the response tokens (0 on padding).
Every sample counts in its group's statistics, including one whose response is all padding.
"""

from __future__ import annotations

from typing import Literal

import torch

from tether.catalogue.advantages.broadcast import advantage_metrics, as_float, check_outcome, to_tokens
from tether.catalogue.advantages.group_stats import (
    GroupStats,
    batch_mean_std,
    group_stats,
    groups_of,
    grpo_standardise,
    verl_single_sample,
)
from tether.catalogue.contracts import Metrics
from tether.catalogue.registry import register
from tether.errors import InvalidInputError

AdvantageOutput = tuple[torch.Tensor, Metrics]


def outcome_group_stats(
    rewards: torch.Tensor, response_mask: torch.Tensor, group_ids: torch.Tensor, unbiased: bool = True
) -> tuple[torch.Tensor, GroupStats]:
    """Checked float rewards and their per-group statistics."""
    check_outcome(rewards, response_mask)
    r = as_float(rewards)
    groups = groups_of(group_ids, r.shape[0])
    return r, group_stats(r, groups, unbiased=unbiased)


def finish(
    per_sample: torch.Tensor, response_mask: torch.Tensor, rewards: torch.Tensor, stats: GroupStats | None
) -> AdvantageOutput:
    adv = to_tokens(per_sample, response_mask)
    zero_frac = stats.zero_std_frac() if stats is not None else None
    return adv, advantage_metrics(adv, response_mask, rewards, zero_frac)


@register(
    "advantage",
    "reinforce_baseline",
    paper="Simple Statistical Gradient-Following Algorithms for Connectionist Reinforcement Learning",
    arxiv="",
    status="exact",
    card="adv#A1",
    aliases=("reinforce",),
)
def reinforce_baseline(
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids: torch.Tensor,
    baseline: Literal["group_mean", "batch_mean", "constant"] = "group_mean",
    baseline_value: float = 0.0,
) -> AdvantageOutput:
    """REINFORCE with a baseline: A_i = r_i - b, with b independent of the sampled response.

    Paper: Williams, "Simple Statistical Gradient-Following Algorithms for Connectionist
    Reinforcement Learning", Machine Learning 1992 (no arXiv id). Exact (textbook; verl core_algos).

    b = mean reward of the sample's group ("group_mean", the Dr.GRPO advantage), of the whole batch
    ("batch_mean"), or ``baseline_value`` ("constant"; 0 gives plain REINFORCE). The gradient
    sum_i A_i grad log pi(o_i) is unbiased for any b that does not depend on o_i (the group mean
    includes o_i itself; RLOO removes that bias). A is broadcast to every response token.
    """
    r, stats = outcome_group_stats(rewards, response_mask, group_ids)
    if baseline == "group_mean":
        b = stats.groups.gather(stats.mean)
    elif baseline == "batch_mean":
        b = r.mean() if r.numel() else torch.zeros((), dtype=r.dtype)
    elif baseline == "constant":
        b = torch.full_like(r, baseline_value)
    else:
        raise InvalidInputError(
            f"reinforce_baseline: baseline must be 'group_mean', 'batch_mean' or 'constant', got {baseline!r}"
        )
    return finish(r - b, response_mask, r, stats)


@register(
    "advantage",
    "rloo",
    paper="Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs",
    arxiv="2402.14740",
    status="exact",
    card="adv#A2",
)
def rloo(rewards: torch.Tensor, response_mask: torch.Tensor, group_ids: torch.Tensor) -> AdvantageOutput:
    """RLOO: each sample's baseline is the mean reward of the other samples of its group.

    Paper: Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style Optimization for
    Learning from Human Feedback in LLMs", arXiv 2402.14740. Exact (verl compute_rloo_outcome_advantage).

    A_i = r_i - (1/(G-1)) sum_{j != i} r_j = G/(G-1) (r_i - mean_g r). A group of one sample
    has no other sample: A_i = r_i (verl). Advantages sum to 0 in every group of size >= 2.
    """
    r, stats = outcome_group_stats(rewards, response_mask, group_ids)
    g = stats.groups.gather(stats.count)
    mean = stats.groups.gather(stats.mean)
    scale = g / (g - 1.0).clamp(min=1.0)
    per_sample = torch.where(g > 1.0, scale * (r - mean), r)
    return finish(per_sample, response_mask, r, stats)


@register(
    "advantage",
    "grpo",
    paper="DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
    arxiv="2402.03300",
    status="exact",
    card="adv#A3",
)
def grpo(
    rewards: torch.Tensor, response_mask: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6
) -> AdvantageOutput:
    """GRPO: standardise each reward within its group of samples for the same prompt.

    Paper: Shao et al., "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
    Language Models", arXiv 2402.03300. Exact (verl compute_grpo_outcome_advantage).

    A_i = (r_i - mean_g r) / (std_g r + eps), std unbiased (torch.std). eps = 1e-6 as verl;
    TRL uses 1e-4. A single-sample group uses mean 0 and std 1 (verl), so A = r / (1 + eps).
    A group whose rewards are all equal gets A = 0. Invariant to r -> a r + b with a > 0 (up to eps).
    """
    r, stats = outcome_group_stats(rewards, response_mask, group_ids)
    return finish(grpo_standardise(r, stats, eps), response_mask, r, stats)


@register(
    "advantage",
    "dr_grpo",
    paper="Understanding R1-Zero-Like Training: A Critical Perspective",
    arxiv="2503.20783",
    status="exact",
    card="adv#A4",
)
def dr_grpo(rewards: torch.Tensor, response_mask: torch.Tensor, group_ids: torch.Tensor) -> AdvantageOutput:
    """Dr.GRPO advantage: the group mean is subtracted, without dividing by the group std.

    Paper: Liu et al., "Understanding R1-Zero-Like Training: A Critical Perspective",
    arXiv 2503.20783. Exact (verl norm_adv_by_std_in_grpo=False; TRL loss_type="dr_grpo").

    A_i = r_i - mean_g r (a single-sample group uses mean 0, as verl). Dividing by std gives
    low-variance (too easy or too hard) prompts larger weights; Dr.GRPO removes that. The paper
    also removes the 1/|o_i| length normalisation: pair this advantage with the
    "seq-mean-token-sum-norm" aggregation in the policy loss.
    """
    r, stats = outcome_group_stats(rewards, response_mask, group_ids)
    mean, _ = verl_single_sample(stats)
    return finish(r - mean, response_mask, r, stats)


@register(
    "advantage",
    "lite_ppo",
    paper="Part I: Tricks or Traps? A Deep Dive into RL for LLM Reasoning",
    arxiv="2508.08221",
    status="exact",
    card="ratio#14",
)
def lite_ppo(
    rewards: torch.Tensor, response_mask: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6
) -> AdvantageOutput:
    """Lite PPO: subtract the group mean, divide by the standard deviation of the whole batch.

    Paper: Liu et al., "Part I: Tricks or Traps? A Deep Dive into RL for LLM Reasoning",
    arXiv 2508.08221. Exact (TRL scale_rewards="batch").

    A_i = (r_i - mean_g r) / (std_batch r + eps), std over ALL rewards of the batch, unbiased.
    A group whose rewards are all equal gets A = 0 even when the batch std is positive, and a
    single-sample group gets A = 0 (its mean is its own reward). eps = 1e-6 (TRL: 1e-4).
    The paper pairs it with the vanilla PPO clip loss and token-mean aggregation.
    """
    r, stats = outcome_group_stats(rewards, response_mask, group_ids)
    _, batch_std = batch_mean_std(r)
    mean = stats.groups.gather(stats.mean)
    return finish((r - mean) / (batch_std + eps), response_mask, r, stats)
