"""Soft replacements of the hard clip: SAPO's sigmoid gate on the token ratio, VESPO's Gamma
kernel on the sequence ratio."""

from __future__ import annotations

import math

import torch

from tether.catalogue.aggregate import AggregationLike, aggregate, masked_mean
from tether.catalogue.contracts import LossOutput, check_2d, check_same_shape, detached, token_advantages
from tether.catalogue.ratio import LOG_RATIO_CLAMP, log_ratio, ratio_metrics
from tether.catalogue.registry import register
from tether.errors import InvalidInputError

VESPO_LOG_W_FLOOR = math.log(1e-8)
"""The authors clamp the sequence log-weight to [log 1e-8, 20] before the kernel."""


def _const(value: float, like: torch.Tensor) -> torch.Tensor:
    """A scalar in ``like``'s dtype (``torch.where`` with Python floats would round it to float32)."""
    return torch.tensor(value, dtype=like.dtype, device=like.device)


@register(
    "policy_loss",
    "sapo",
    paper="Soft Adaptive Policy Optimization",
    arxiv="2511.20347",
    status="exact",
    card="lessons#feature-bar",
)
def sapo(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    aggregation: AggregationLike = "seq-mean-token-mean",
) -> LossOutput:
    """SAPO: a temperature-controlled sigmoid gate on the token ratio instead of a hard clip.

    Paper: Gao et al. (Qwen), "Soft Adaptive Policy Optimization", arXiv 2511.20347. Exact (the
    paper's gate). Agrees with TRL ``loss_type="sapo"`` to float64 rounding given TRL's own tau_neg,
    which TRL rounds to float32 (``torch.where`` with Python floats); with the exact 1.05 kept here
    the two differ by ~1e-6 relative (tested).

    f_t = (4 / tau) * sigmoid(tau * (r_t - 1)),  tau = tau_pos if A_t > 0 else tau_neg
    l_t = -f_t * A_t, seq-mean-token-mean (TRL's aggregation for ``sapo``).
    d l_t / d lp_t = -A_t * r_t * 4 s (1 - s) with s = sigmoid(tau (r_t - 1)): exactly the policy
    gradient -A_t at r = 1, decaying smoothly (never to a cliff) as r leaves 1. tau_neg > tau_pos
    (paper: 1.0 and 1.05) makes negative-advantage tokens, whose update raises the logits of every
    unsampled token, decay faster. ``sapo/gate_mean`` is the token-mean of 4 s (1 - s): 1 on-policy.
    """
    check_2d("logprobs", logprobs)
    check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, response_mask=response_mask)
    if tau_pos <= 0 or tau_neg <= 0:
        raise InvalidInputError(
            f"sapo: tau_pos and tau_neg must be > 0 (paper: 1.0 and 1.05), got {tau_pos}, {tau_neg}"
        )
    adv = token_advantages(advantages, response_mask).to(logprobs.dtype)
    log_r = log_ratio(logprobs, old_logprobs)
    ratio = torch.exp(log_r)
    tau = torch.where(adv > 0, _const(tau_pos, adv), _const(tau_neg, adv))
    gate = torch.sigmoid(tau * (ratio - 1.0))
    per_token = -(4.0 / tau) * gate * adv
    loss = aggregate(per_token, response_mask, aggregation)
    metrics = ratio_metrics(log_r, response_mask)
    with torch.no_grad():
        slope = 4.0 * gate * (1.0 - gate)
        metrics["sapo/gate_mean"] = detached(masked_mean(slope, response_mask.float()))
    metrics["policy/loss"] = detached(loss)
    return loss, metrics


@register(
    "policy_loss",
    "vespo",
    paper="VESPO: Variational Sequence-Level Soft Policy Optimization for Stable Off-Policy LLM Training",
    arxiv="2602.10693",
    status="exact",
    card="lessons#feature-bar",
)
def vespo(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    k_pos: float = 2.0,
    lambda_pos: float = 3.0,
    k_neg: float = 3.0,
    lambda_neg: float = 2.0,
    aggregation: AggregationLike = "token-mean",
) -> LossOutput:
    """VESPO: REINFORCE scaled by a Gamma kernel of the whole-sequence importance weight.

    Paper: Shen et al., "VESPO: Variational Sequence-Level Soft Policy Optimization for Stable
    Off-Policy LLM Training", arXiv 2602.10693. Exact (the authors' FloyedShen/VESPO
    ``compute_policy_loss_vespo`` and their run scripts' k, lambda; agrees with TRL
    ``loss_type="vespo"`` to float64 rounding, tested).

    log w_i = clamp(sum_t m_{i,t} clamp(lp - lp_old, +-20), log 1e-8, 20)   (the product ratio,
    no length normalisation);  phi(w) = exp(lambda + k log w - lambda w) = e^lambda w^k e^(-lambda w),
    so phi(1) = 1, with (k, lambda) = (k_pos, lambda_pos) where A >= 0 else (k_neg, lambda_neg);
    l_t = -sg(phi(w_i)) * A_t * lp_t, token-mean. The gradient is phi(w) A grad log pi: the plain
    policy gradient on-policy, down-weighted smoothly for w far below 1 (power k) and far above
    (exponential decay lambda). The value is not a surrogate of the return; only its gradient is
    meaningful (as CISPO). Token advantages [B, T] pick (k, lambda) per token by their sign.
    The authors fold the sampler/trainer correction into w; tether's ``train.sampler_correction``
    instead multiplies the advantages token-wise, as it does for every loss.
    """
    check_2d("logprobs", logprobs)
    check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, response_mask=response_mask)
    if min(k_pos, k_neg) < 0 or min(lambda_pos, lambda_neg) <= 0:
        raise InvalidInputError(
            "vespo: k_pos, k_neg must be >= 0 and lambda_pos, lambda_neg > 0 "
            f"(authors: 2, 3, 3, 2), got k=({k_pos}, {k_neg}), lambda=({lambda_pos}, {lambda_neg})"
        )
    valid = response_mask.bool()
    adv = token_advantages(advantages, response_mask).to(logprobs.dtype)
    log_r = log_ratio(logprobs, old_logprobs)
    with torch.no_grad():
        zero = torch.zeros((), dtype=log_r.dtype, device=log_r.device)
        seq_log_w = torch.where(valid, log_r.detach(), zero).sum(-1, keepdim=True)
        log_w = torch.clamp(seq_log_w, VESPO_LOG_W_FLOOR, LOG_RATIO_CLAMP)
        nonneg = adv >= 0
        k = torch.where(nonneg, _const(k_pos, adv), _const(k_neg, adv))
        lam = torch.where(nonneg, _const(lambda_pos, adv), _const(lambda_neg, adv))
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        phi = torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)
        phi = torch.where(valid, phi, zero)
    # Padded log-probs may be -inf: zero them so that 0 * lp stays finite in the graph.
    lp = torch.where(valid, logprobs, torch.zeros_like(logprobs))
    per_token = -phi * adv * lp
    loss = aggregate(per_token, response_mask, aggregation)
    metrics = ratio_metrics(log_r, response_mask)
    with torch.no_grad():
        rows = valid.any(-1)
        if bool(rows.any()):
            w_rows = torch.exp(log_w.squeeze(-1)[rows])
            metrics["vespo/seq_weight_mean"] = detached(w_rows.mean())
            metrics["vespo/seq_weight_max"] = detached(w_rows.max())
        else:
            metrics["vespo/seq_weight_mean"] = metrics["vespo/seq_weight_max"] = detached(1.0)
        metrics["vespo/phi_mean"] = detached(masked_mean(phi, response_mask.float()))
    metrics["policy/loss"] = detached(loss)
    return loss, metrics
