"""GPG's loss: the policy gradient itself, -A log pi, with no ratio, clip or surrogate."""

from __future__ import annotations

import torch

from tether.catalogue.aggregate import AggregationLike, aggregate
from tether.catalogue.contracts import LossOutput, check_2d, check_same_shape, detached, token_advantages
from tether.catalogue.ratio import log_ratio, ratio_metrics
from tether.catalogue.registry import register


@register(
    "policy_loss",
    "gpg",
    paper="GPG: A Simple and Strong Reinforcement Learning Baseline for Model Reasoning",
    arxiv="2504.02546",
    status="exact",
    card="lessons#feature-bar",
)
def gpg_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    aggregation: AggregationLike = "token-mean",
) -> LossOutput:
    """GPG: l_t = -A_t log pi_theta(o_t), token-mean over the batch (1 / sum_i |o_i|).

    Paper: Chu et al., "GPG: A Simple and Strong Reinforcement Learning Baseline for Model
    Reasoning", arXiv 2504.02546 (eq. 7). Exact (the authors' GPGTrainer.compute_loss; verl
    ``compute_policy_loss_gpg``).

    The original objective's gradient, with no importance ratio, clip or KL: it is on-policy, so
    use it with one update per rollout (``train.epochs=1``, ``train.minibatches=1``); there its
    gradient equals PPO's at ratio 1. ``old_logprobs`` feeds only the ratio metrics, which show how
    far a later mini-batch has drifted. Pair with the ``gpg`` advantage.
    """
    check_2d("logprobs", logprobs)
    check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, response_mask=response_mask)
    adv = token_advantages(advantages, response_mask).to(logprobs.dtype)
    loss = aggregate(-adv * logprobs, response_mask, aggregation)
    metrics = ratio_metrics(log_ratio(logprobs, old_logprobs), response_mask)
    metrics["policy/loss"] = detached(loss)
    return loss, metrics
