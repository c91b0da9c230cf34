"""A-GRAE: asymmetric group-relative advantages with a batch-accuracy curriculum."""

from __future__ import annotations

import torch

from tether.catalogue.advantages.baselines import AdvantageOutput, finish, outcome_group_stats
from tether.catalogue.advantages.group_stats import grpo_standardise, verl_single_sample
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


@register(
    "advantage",
    "a_grae",
    paper="Unveiling Implicit Advantage Symmetry: Why GRPO Struggles with Exploration and Difficulty Adaptation",
    arxiv="2602.05548",
    status="exact",
    card="adv#B4",
)
def a_grae(
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids: torch.Tensor,
    alpha_s: float = 1.0,
    eps: float = 1e-6,
) -> AdvantageOutput:
    """A-GRAE: reweight GRPO advantages from easy to hard prompts as batch accuracy rises, damp positives.

    Paper: Yu et al., "Unveiling Implicit Advantage Symmetry: Why GRPO Struggles with Exploration
    and Difficulty Adaptation", arXiv 2602.05548. Exact as released (Yu7-code/A-GRAE
    verl/trainer/ppo/core_algos.py, grpo_weight=2.0); the paper text was not read in full.

    A0 = GRPO advantage (unbiased std, eps); mu_q = group mean reward (accuracy; a lone sample has
    mu = 0 as in verl); mu_bar = mean of mu_q over the groups of the batch (progress proxy).
    A_hard = A0/(2(sqrt(mu_q) + eps)), A_easy = A0/(2(1 - sqrt(mu_q) + eps)),
    A = (1 - mu_bar) A_easy + mu_bar A_hard; if A > 0: A <- A min(1, mu_bar/alpha_s).
    alpha_s = 1 for math, 0.5 for geo3k / medical. mu_q = 1/4 gives A_hard = A_easy = A0.
    Rewards must lie in [0, 1] (accuracy). Positives are suppressed while mu_bar < alpha_s, so
    sum_i A_i <= 0: unsampled responses gain probability.
    """
    if alpha_s <= 0:
        raise InvalidInputError(f"a_grae: alpha_s must be > 0 (1.0 for math), got {alpha_s}")
    r, stats = outcome_group_stats(rewards, response_mask, group_ids)
    if bool(((r < 0) | (r > 1)).any()):
        raise InvalidInputError("a_grae: rewards must be accuracies in [0, 1]")
    mean, _ = verl_single_sample(stats)
    a0 = grpo_standardise(r, stats, eps)
    mu_group = torch.where(stats.count <= 1.0, torch.zeros_like(stats.mean), stats.mean)
    mu_bar = mu_group.mean() if stats.groups.num > 0 else torch.zeros((), dtype=r.dtype)
    root = torch.sqrt(mean.clamp(0.0, 1.0))
    hard = 0.5 * a0 / (root + eps)
    easy = 0.5 * a0 / (1.0 - root + eps)
    adv = (1.0 - mu_bar) * easy + mu_bar * hard
    damp = torch.clamp(mu_bar / alpha_s, max=1.0)
    adv = torch.where(adv > 0, adv * damp, adv)
    out, metrics = finish(adv, response_mask, r, stats)
    metrics["a_grae/batch_accuracy"] = mu_bar.detach().float().reshape(())
    return out, metrics
