"""DYPO: GRPO plus a DPO-shaped Group Alignment Loss on groups with both successes and failures."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tether.catalogue.advantages.group_stats import groups_of
from tether.catalogue.aggregate import AggregationLike, aggregate, local
from tether.catalogue.contracts import (
    LossOutput,
    check_2d,
    check_groups,
    check_same_shape,
    detached,
    token_advantages,
)
from tether.catalogue.ratio import clipped_surrogate, log_ratio, ratio_metrics
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
    """GAL per group [Q]: the mean over the group's (success, failure) pairs of -log sigmoid(beta d)
    (0 for a group that is not mixed).

    d = [log pi(s) - log pi_ref(s)] - [log pi(f) - log pi_ref(f)], sequence log-probs = masked token sums.
    Rows without a valid token take part in no pair. Also returns ``mixed_group`` [Q] and
    ``mixed_row`` [B] (bool), ``group_index`` [B] (the group of each row) and metrics.
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
    per_group = groups.members().to(dtype) @ weighted.sum(-1)  # [Q]: a pair's group is its success row's
    with torch.no_grad():
        n_pairs = pair.sum().clamp(min=1)
        info = {
            "mixed_group": mixed_group,
            "mixed_row": mixed_row,
            "group_index": inverse,
            "mixed_groups": mixed_group.sum().to(dtype),
            "easy_groups": (members.any(-1) & (n_fail == 0)).sum(),
            "hard_groups": (members.any(-1) & (n_succ == 0)).sum(),
            "margin_mean": torch.where(pair, d, zero).sum() / n_pairs,
            "pair_accuracy": (pair & (d > 0)).sum() / n_pairs,
        }
    return per_group, info


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
    num_prompts: float | None = None,
) -> LossOutput:
    """DYPO (RL part): on mixed groups, alpha GRPO + (1 - alpha) Group Alignment Loss over success/failure pairs.

    Paper: Zhu et al., "Bridging SFT and RL: Dynamic Policy Optimization for Robust Reasoning",
    arXiv 2604.08926. Exact (card ratio#17, paper eqs 4, 5, 14, 15; the repository has no code).

    Success: r_i > success_threshold. Mixed group M: both successes and failures (among the rows
    with a valid token). Eq. 4's RL part, an expectation over prompts q:
      L = (1/D) sum_{q in M} [alpha L_GRPO(q) + (1 - alpha) L_GAL(q)], with
      L_GRPO(q) = PPO clip (eps 0.2) over q's rows, reduced by ``aggregation`` within the group
        (default seq-mean-token-mean: GRPO's (1/G) sum_i (1/|o_i|) sum_t);
      L_GAL(q) = mean over pairs (s, f) in q of -log sigmoid(beta d_sf),
      d_sf = [log pi(s) - log pi_ref(s)] - [log pi(f) - log pi_ref(f)] (masked token sums);
      D = ``num_prompts``: every prompt of the (mini-)batch, as eq. 4's E_q (the language-model trainer
        passes the mini-batch's count, so the sums of its micro-batches add up and the term keeps its
        ratio to the ``dypo_routing`` plugin's SFT term, which it divides by the same count); without
        it, the number of mixed groups in the call (reconstructed reading: the mean over M).
    dL_GAL/dd = -beta (1 - sigmoid(beta d)): its magnitude lies in (0, beta) and tends to 0 as d -> inf.
    All-correct groups contribute 0; all-wrong groups contribute 0 here and get gamma L_SFT on a teacher
    target from the ``dypo_routing`` loop plugin. alpha = 1 gives GRPO on the mixed rows. Every rollout
    of a group must be in the same call (the trainer splits batches at group boundaries for a loss
    that takes ``group_ids``). ``advantages`` are the caller's GRPO advantages.
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
    if num_prompts is not None and num_prompts <= 0:
        raise InvalidInputError(f"dypo: num_prompts must be > 0 when given, got {num_prompts}")

    success = rewards > success_threshold
    gal_per_group, info = group_alignment_loss(
        logprobs, ref_logprobs, success, group_ids, response_mask, beta
    )
    mixed_mask = response_mask.bool() & info["mixed_row"].unsqueeze(-1)
    adv = token_advantages(advantages, response_mask).to(logprobs.dtype)
    log_r = log_ratio(logprobs, old_logprobs)
    per_token = clipped_surrogate(torch.exp(log_r), adv, eps_low, eps_high)
    metrics = ratio_metrics(log_r, mixed_mask, adv, eps_low, eps_high)
    within = local(aggregation)
    grpo_sum = aggregate(per_token, torch.zeros_like(mixed_mask), within)  # 0, on the graph
    for q in info["mixed_group"].nonzero().flatten().tolist():
        grpo_sum = grpo_sum + aggregate(
            per_token, mixed_mask & (info["group_index"] == q).unsqueeze(-1), within
        )
    denom = (
        torch.as_tensor(num_prompts, dtype=logprobs.dtype, device=logprobs.device)
        if num_prompts is not None
        else info["mixed_groups"].clamp(min=1.0)
    )
    grpo = grpo_sum / denom
    gal = gal_per_group.sum() / denom
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
