"""REAL: verifiable rewards as class labels, rollouts classified by a log-ratio score."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from tether.catalogue.advantages.group_stats import groups_of
from tether.catalogue.contracts import LossOutput, check_2d, check_groups, check_same_shape, detached
from tether.catalogue.ratio import log_ratio, ratio_metrics
from tether.catalogue.registry import register
from tether.errors import InvalidInputError

RealVariant = Literal["sum", "product", "bce"]


def _log1p_sum_exp(x: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """Per group q: log(1 + sum_{b in members[q]} exp(x_b)), via logsumexp with an anchor at 0."""
    neg_inf = torch.tensor(float("-inf"), dtype=x.dtype, device=x.device)
    logits = torch.where(members, x.unsqueeze(0), neg_inf)
    anchor = torch.zeros(members.shape[0], 1, dtype=x.dtype, device=x.device)
    return torch.logsumexp(torch.cat([anchor, logits], dim=1), dim=1)


def _log_sum_exp(x: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """Per group q: log sum_{b in members[q]} exp(x_b); rows with no member give 0 (masked later)."""
    has_any = members.any(dim=1, keepdim=True)
    neg_inf = torch.tensor(float("-inf"), dtype=x.dtype, device=x.device)
    logits = torch.where(members, x.unsqueeze(0), neg_inf)
    logits = torch.where(has_any, logits, torch.zeros_like(logits))
    return torch.logsumexp(logits, dim=1)


@register(
    "policy_loss",
    "real",
    paper="Rewards as Labels: Revisiting RLVR from a Classification Perspective",
    arxiv="2602.05630",
    status="exact",
    card="adv#B8",
)
def real(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    response_mask: torch.Tensor,
    tau: float = 0.5,
    variant: RealVariant = "sum",
    label_threshold: float = 0.5,
    num_prompts: float | None = None,
) -> LossOutput:
    """REAL: classify each group's rollouts as correct/incorrect from a log-ratio score, with anchor logits at 0.

    Paper: Zhai et al., "Rewards as Labels: Revisiting RLVR from a Classification Perspective",
    arXiv 2602.05630. Exact (card adv#B8, from Red-RL/REAL ``compute_policy_loss_real``); the
    normalisation of the ``bce`` variant (summed per mixed group like the others) is reconstructed.

    s_i = (1/|o_i|) sum_t (lp - lp_old)_{i,t} (length-normalised log-ratio; each token's log-ratio
    clamped to [-20, 20] as a safety rail). Labels y_i = 1[r_i > label_threshold] (binary rewards
    in {0, 1} give y = r). For a group q with positives P and negatives N, both non-empty:

      "sum" (default): L_q = log(1 + sum_{i in N} exp(s_i / tau)) + log(1 + sum_{i in P} exp(-s_i / tau))
      "product":       L_q = log(1 + (sum_N exp(s_i / tau)) (sum_P exp(-s_i / tau)))
      "bce":           L_q = sum_{i in P} softplus(-s_i / tau) + sum_{i in N} softplus(s_i / tau)

    Groups with a single class contribute 0. loss = sum_q L_q / (number of prompts), where the
    number of prompts counts every group with a valid row (single-class ones included); pass the
    global count as ``num_prompts`` when the batch is split into micro-batches. All rollouts of a
    group must be in the same call. At s = 0 the "sum" weights dL/ds_i are -1/(tau (1 + |P|)) for
    positives and +1/(tau (1 + |N|)) for negatives, and |dL_q/ds_i| < 1/tau for every s.
    Computed with logsumexp, so large |s / tau| never overflows. No clipping, no advantages.
    """
    check_2d("logprobs", logprobs)
    check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, response_mask=response_mask)
    batch = logprobs.shape[0]
    check_groups(group_ids, batch)
    if rewards.dim() != 1 or rewards.shape[0] != batch:
        raise InvalidInputError(
            f"real: rewards must be a [batch] tensor ({batch}), got shape {tuple(rewards.shape)}"
        )
    if tau <= 0:
        raise InvalidInputError(f"real: tau must be > 0 (the paper uses 0.5), got {tau}")
    if variant not in ("sum", "product", "bce"):
        raise InvalidInputError(f"real: variant must be 'sum', 'product' or 'bce', got {variant!r}")
    if num_prompts is not None and num_prompts <= 0:
        raise InvalidInputError(f"real: num_prompts must be > 0 when given, got {num_prompts}")

    valid = response_mask.bool()
    lengths = valid.sum(-1)
    valid_rows = lengths > 0
    log_r = log_ratio(logprobs, old_logprobs)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    score = torch.where(valid, log_r, zero).sum(-1) / lengths.clamp(min=1).to(logprobs.dtype)
    x = score / tau

    members = groups_of(group_ids, batch).members(valid_rows)
    positive = (rewards > label_threshold).unsqueeze(0)
    pos = members & positive
    neg = members & ~positive
    mixed = pos.any(dim=1) & neg.any(dim=1)

    if variant == "sum":
        per_group = _log1p_sum_exp(x, neg) + _log1p_sum_exp(-x, pos)
    elif variant == "product":
        per_group = F.softplus(_log_sum_exp(x, neg) + _log_sum_exp(-x, pos))
    else:
        per_sample = torch.where(positive.squeeze(0), F.softplus(-x), F.softplus(x))
        per_group = torch.where(members, per_sample.unsqueeze(0), zero).sum(dim=1)
    per_group = torch.where(mixed, per_group, zero)

    groups_here = members.any(dim=1).sum().to(logprobs.dtype).clamp(min=1.0)
    denom = (
        torch.as_tensor(num_prompts, dtype=logprobs.dtype, device=logprobs.device)
        if num_prompts is not None
        else groups_here
    )
    loss = per_group.sum() / denom

    metrics = ratio_metrics(log_r, response_mask)
    with torch.no_grad():
        n_valid = valid_rows.sum().clamp(min=1)
        metrics["real/score_mean"] = detached(torch.where(valid_rows, score, zero).sum() / n_valid)
        metrics["real/mixed_groups"] = detached(mixed.sum().to(torch.float32))
        metrics["real/mixed_group_frac"] = detached(mixed.sum() / members.any(dim=1).sum().clamp(min=1))
    metrics["policy/loss"] = detached(loss)
    return loss, metrics
