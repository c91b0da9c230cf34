"""The KL penalty placed in the reward (RLHF's R = r - beta * KL), fixed or adaptive."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from tether.catalogue.contracts import Metrics, detached
from tether.catalogue.registry import register
from tether.catalogue.regularizers.kl import (
    adaptive_kl_coef,
    k1_per_token,
    k2_per_token,
    k3_per_token,
    low_var_kl_per_token,
    masked_log_ratio,
)
from tether.errors import InvalidInputError

ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "k1": k1_per_token,
    "k2": k2_per_token,
    "k3": k3_per_token,
    "low_var_kl": low_var_kl_per_token,
    "abs": torch.abs,
}


@register(
    "reward",
    "kl_in_reward",
    paper="Fine-Tuning Language Models from Human Preferences",
    arxiv="1909.08593",
    status="exact",
    card="ratio#B8",
    state_update=adaptive_kl_coef,
)
def kl_in_reward(
    rewards: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    coef: float = 0.001,
    estimator: Literal["k1", "k2", "k3", "low_var_kl", "abs"] = "k1",
) -> tuple[torch.Tensor, Metrics]:
    """KL in the reward: R' = R - coef * sum_t k(lp_old,t - lp_ref,t), before advantages.

    Paper: Ziegler et al., "Fine-Tuning Language Models from Human Preferences", arXiv 1909.08593,
    section 2.2: R(x, y) = r(x, y) - beta log(pi(y|x) / rho(y|x)), the log-ratio of the whole
    sequence, i.e. the sum of per-token k1 = lp - lp_ref over the completion (also InstructGPT's
    objective, and verl's ``use_kl_in_reward`` with ``kl_penalty`` = ``estimator``). Exact.

    The log-probs are the sampling policy's (``old_logprobs``), so the penalty carries no gradient:
    unlike a KL loss term (``kl_k*``), it acts only through the advantages. verl subtracts the
    per-token KL from token-level rewards; for outcome-level advantages (GRPO, RLOO, ...), which
    sum a completion's token rewards, that is this sum. Default ``coef`` 0.001 (verl
    ``algorithm.kl_ctrl.kl_coef``). With a ``state`` wired to ``adaptive_kl_coef`` and
    ``inputs: {kl: reward/kl}`` the coefficient adapts to a per-sequence KL target, as in the
    paper. Metrics: ``reward/kl``, the mean over sequences of each sequence's summed KL estimate
    (1/B sum_i sum_t k_i,t), and ``reward/kl_penalty`` (the mean amount subtracted, coef * reward/kl).
    verl's ``actor/reward_kl_penalty`` is a different quantity, the mean over sequences of each
    sequence's token-mean KL (1/B sum_i (1/T_i) sum_t k_i,t): ``reward/kl`` is about the response
    length T times larger (exactly T when every response has T tokens). verl's adaptive controller
    reads that token-mean value, so a verl KL target corresponds to a ``target`` here about T times
    larger.
    """
    if rewards.dim() != 1:
        raise InvalidInputError(f"kl_in_reward: rewards must be [batch], got {tuple(rewards.shape)}")
    if coef < 0:
        raise InvalidInputError(f"kl_in_reward: coef must be >= 0 (a penalty), got {coef}")
    if estimator not in ESTIMATORS:
        raise InvalidInputError(
            f"kl_in_reward: estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}"
        )
    with torch.no_grad():
        d = masked_log_ratio(old_logprobs.detach().float(), ref_logprobs.detach().float(), response_mask)
        seq_kl = ESTIMATORS[estimator](d).sum(-1).to(rewards.dtype)  # d = 0, so k = 0, on padding
        if seq_kl.shape != rewards.shape:
            raise InvalidInputError("kl_in_reward: one completion of log-probs per reward is needed")
        penalty = coef * seq_kl
    metrics: Metrics = {"reward/kl": detached(seq_kl.mean()), "reward/kl_penalty": detached(penalty.mean())}
    return rewards.detach() - penalty, metrics
