"""DYPO: GRPO plus a DPO-shaped Group Alignment Loss on groups with both successes and failures."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tether.catalogue.advantages.group_stats import groups_of
from tether.catalogue.aggregate import AggregationLike
from tether.catalogue.contracts import LossOutput, check_2d, check_groups, check_same_shape, detached
from tether.catalogue.losses.ppo_clip import clip_loss
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


def group_alignment_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    success: torch.Tensor,
    group_ids: torch.Tensor,
    response_mask: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GAL: mean over mixed groups of the mean over (success, failure) pairs of -log sigmoid(beta d).

    d = [log pi(s) - log pi_ref(s)] - [log pi(f) - log pi_ref(f)], sequence log-probs = masked token sums.
    Returns the loss and a [B] bool marking the rows of mixed groups.
    """
    dtype = logprobs.dtype
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    valid = response_mask.bool()
    valid_rows = valid.any(-1)
    seq = torch.where(valid, logprobs - ref_logprobs.to(dtype), zero).sum(-1)
    groups = groups_of(group_ids, valid_rows.shape[0])
    members, inverse = groups.members(valid_rows), groups.index
    m = members.to(dtype)
    n_succ = m @ success.to(dtype)
    n_fail = m.sum(-1) - n_succ
    mixed_group = (n_succ > 0) & (n_fail > 0)
    mixed_row = mixed_group[inverse] & valid_rows
    pair = (
        (inverse.unsqueeze(1) == inverse.unsqueeze(0))
        & (success & valid_rows).unsqueeze(1)
        & (~success & valid_rows).unsqueeze(0)
    )
    d = seq.unsqueeze(1) - seq.unsqueeze(0)
    per_pair = -F.logsigmoid(beta * d)
    pair_weight = 1.0 / (n_succ * n_fail).clamp(min=1.0)[inverse]  # [B] for the success row's group
    weighted = torch.where(pair, per_pair * pair_weight.unsqueeze(1), zero)
    n_mixed = mixed_group.sum().to(dtype)
    loss = weighted.sum() / n_mixed.clamp(min=1.0)
    with torch.no_grad():
        n_pairs = pair.sum().clamp(min=1)
        info = {
            "mixed_row": mixed_row,
            "mixed_groups": n_mixed,
            "easy_groups": (members.any(-1) & (n_fail == 0)).sum(),
            "hard_groups": (members.any(-1) & (n_succ == 0)).sum(),
            "margin_mean": torch.where(pair, d, zero).sum() / n_pairs,
            "pair_accuracy": (pair & (d > 0)).sum() / n_pairs,
        }
    return loss, info


@register(
    "policy_loss",
    "dypo",
    paper="Bridging SFT and RL: Dynamic Policy Optimization for Robust Reasoning",
    arxiv="2604.08926",
    status="exact",
    card="ratio#17",
)
def dypo(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    response_mask: torch.Tensor,
    alpha: float = 0.5,
    beta: float = 1.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    success_threshold: float = 0.5,
    aggregation: AggregationLike = "seq-mean-token-mean",
) -> LossOutput:
    """DYPO (RL part): on mixed groups, alpha GRPO + (1 - alpha) Group Alignment Loss over success/failure pairs.

    Paper: Zhu et al., "Bridging SFT and RL: Dynamic Policy Optimization for Robust Reasoning",
    arXiv 2604.08926. Exact (card ratio#17, paper eqs 4, 5, 14, 15; the repository has no code).

    Success: r_i > success_threshold. Mixed group M: both successes and failures.
    L = alpha L_GRPO + (1 - alpha) L_GAL, with
      L_GRPO = PPO clip (eps 0.2, seq-mean-token-mean) on the rows of mixed groups only;
      L_GAL = mean over mixed groups q of mean over pairs (s, f) in q of -log sigmoid(beta d_sf),
      d_sf = [log pi(s) - log pi_ref(s)] - [log pi(f) - log pi_ref(f)] (masked token sums).
    dL_GAL/dd = -beta (1 - sigmoid(beta d)): its magnitude lies in (0, beta) and tends to 0 as d -> inf.
    All-correct groups are dropped (zero loss). All-wrong groups are routed to SFT on teacher
    trajectories in the paper (gamma L_SFT); that needs teacher samples from the loop, so here they
    contribute 0. alpha = 1 gives GRPO on the mixed rows. All rollouts of a group must be in one call.
    Our reading (reconstructed detail): both terms are averaged over the mixed groups only (GRPO via
    seq-mean-token-mean over their rows, GAL over their pairs), and ``advantages`` are the caller's
    GRPO advantages.
    """
    check_2d("logprobs", logprobs)
    check_same_shape(
        "logprobs",
        logprobs,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        response_mask=response_mask,
    )
    batch = logprobs.shape[0]
    check_groups(group_ids, batch)
    if rewards.dim() != 1 or rewards.shape[0] != batch:
        raise InvalidInputError(
            f"dypo: rewards must be a [batch] tensor ({batch}), got shape {tuple(rewards.shape)}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise InvalidInputError(f"dypo: alpha must be in [0, 1] (the paper uses 0.5), got {alpha}")
    if beta <= 0:
        raise InvalidInputError(f"dypo: beta must be > 0 (the paper uses 1.0), got {beta}")

    success = rewards > success_threshold
    gal, info = group_alignment_loss(logprobs, ref_logprobs, success, group_ids, response_mask, beta)
    mixed_mask = response_mask.bool() & info["mixed_row"].unsqueeze(-1)
    grpo, metrics = clip_loss(
        logprobs, old_logprobs, advantages, mixed_mask, eps_low, eps_high, None, aggregation
    )
    loss = alpha * grpo + (1.0 - alpha) * gal
    metrics["dypo/grpo_loss"] = detached(grpo)
    metrics["dypo/gal_loss"] = detached(gal)
    metrics["dypo/mixed_groups"] = detached(info["mixed_groups"])
    metrics["dypo/easy_groups"] = detached(info["easy_groups"].float())
    metrics["dypo/hard_groups"] = detached(info["hard_groups"].float())
    metrics["dypo/gal_margin_mean"] = detached(info["margin_mean"])
    metrics["dypo/gal_pair_accuracy"] = detached(info["pair_accuracy"])
    metrics["policy/loss"] = detached(loss)
    return loss, metrics
