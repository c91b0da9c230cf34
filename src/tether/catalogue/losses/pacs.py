"""PACS: predict the verifiable reward from a policy-derived score with weighted cross-entropy."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from tether.catalogue.advantages.group_stats import groups_of
from tether.catalogue.contracts import LossOutput, check_2d, check_groups, check_same_shape, detached
from tether.catalogue.ratio import log_ratio, ratio_metrics
from tether.catalogue.registry import register
from tether.errors import InvalidInputError

PacsScore = Literal["log_ratio", "mean_logprob"]


@register(
    "policy_loss",
    "pacs",
    paper="Implicit Actor Critic Coupling via a Supervised Learning Framework for RLVR",
    arxiv="2509.02522",
    status="exact",
    card="adv#B10",
)
def pacs(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    response_mask: torch.Tensor,
    beta: float = 1.0,
    score: PacsScore = "log_ratio",
    class_weights: bool = True,
    label_threshold: float = 0.5,
    num_samples: float | None = None,
) -> LossOutput:
    """PACS: the reward is a label, an RLOO-centred policy score is its logit, trained with weighted BCE.

    Paper: Li et al., "Implicit Actor Critic Coupling via a Supervised Learning Framework for RLVR",
    arXiv 2509.02522. Exact (card adv#B10, ritzz-ai/PACS ``pacs_core_algos.py``, RLOO logit).

    psi_i = beta sum_t (lp - lp_old)_{i,t}  (score "log_ratio", method 1; per-token log-ratio clamped
    to [-20, 20]), or psi_i = beta mean_t lp_{i,t} (score "mean_logprob", method 2).
    l_i = psi_i - (1/(G-1)) sum_{j != i, j in group} psi_j (RLOO; l_i = psi_i in a group of one).
    y_i = 1[r_i > label_threshold]; loss = (1/B) sum_i w_i BCEWithLogits(l_i, y_i), B = rows with a valid
    token (or ``num_samples``, the global count, for micro-batches). Class-balanced weights: in a group
    with both classes w_i = G / (2 n_{class(i)}), otherwise w_i = 1 (``class_weights=False``: all 1).
    The gradient flows through every psi_j of the group; at theta = theta_old (unweighted)
    dL/dpsi_k = G (mean_g r - r_k) / ((G - 1) B): an RLOO policy gradient. All rollouts of a group
    must be in the same call.
    """
    check_2d("logprobs", logprobs)
    check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, response_mask=response_mask)
    batch = logprobs.shape[0]
    check_groups(group_ids, batch)
    if rewards.dim() != 1 or rewards.shape[0] != batch:
        raise InvalidInputError(
            f"pacs: rewards must be a [batch] tensor ({batch}), got shape {tuple(rewards.shape)}"
        )
    if beta <= 0:
        raise InvalidInputError(f"pacs: beta must be > 0 (the paper uses 1.0), got {beta}")
    if score not in ("log_ratio", "mean_logprob"):
        raise InvalidInputError(f"pacs: score must be 'log_ratio' or 'mean_logprob', got {score!r}")
    if num_samples is not None and num_samples <= 0:
        raise InvalidInputError(f"pacs: num_samples must be > 0 when given, got {num_samples}")

    dtype = logprobs.dtype
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    valid = response_mask.bool()
    lengths = valid.sum(-1)
    valid_rows = lengths > 0
    log_r = log_ratio(logprobs, old_logprobs)
    if score == "log_ratio":
        psi = beta * torch.where(valid, log_r, zero).sum(-1)
    else:
        psi = beta * torch.where(valid, logprobs, zero).sum(-1) / lengths.clamp(min=1).to(dtype)

    groups = groups_of(group_ids, batch)
    members, row_group = groups.members(valid_rows), groups.index  # [Q, B], [B]
    m = members.to(dtype)
    group_sum = m @ torch.where(valid_rows, psi, zero)  # [Q]
    group_size = m.sum(-1)  # [Q]
    others = (group_size[row_group] - 1.0).clamp(min=0.0)
    loo_mean = (group_sum[row_group] - psi) / others.clamp(min=1.0)
    logit = psi - torch.where(others > 0, loo_mean, zero)

    labels = (rewards > label_threshold).to(dtype)
    if class_weights:
        n_pos = m @ labels.to(dtype)
        n_neg = group_size - n_pos
        both = (n_pos > 0) & (n_neg > 0)
        n_class = torch.where(labels > 0, n_pos[row_group], n_neg[row_group])
        balanced = group_size[row_group] / (2.0 * n_class.clamp(min=1.0))
        weights = torch.where(both[row_group], balanced, torch.ones_like(balanced))
    else:
        weights = torch.ones_like(psi)
    per_sample = weights * F.binary_cross_entropy_with_logits(logit, labels, reduction="none")
    per_sample = torch.where(valid_rows, per_sample, zero)
    denom = (
        torch.as_tensor(num_samples, dtype=dtype, device=logprobs.device)
        if num_samples is not None
        else valid_rows.sum().to(dtype).clamp(min=1.0)
    )
    loss = per_sample.sum() / denom

    metrics = ratio_metrics(log_r, response_mask)
    with torch.no_grad():
        n_valid = valid_rows.sum().clamp(min=1)
        prob = torch.sigmoid(logit)
        metrics["pacs/logit_mean"] = detached(torch.where(valid_rows, logit, zero).sum() / n_valid)
        metrics["pacs/score_mean"] = detached(torch.where(valid_rows, psi, zero).sum() / n_valid)
        correct = ((prob > 0.5).to(dtype) == labels) & valid_rows
        metrics["pacs/label_accuracy"] = detached(correct.sum() / n_valid)
    metrics["policy/loss"] = detached(loss)
    return loss, metrics
