"""ROVER: regress the log-ratio Q onto reward plus the uniform-policy value of the next state."""

from __future__ import annotations

import math

import torch

from tether.catalogue.aggregate import AggregationLike, aggregate, masked_mean
from tether.catalogue.contracts import LossOutput, check_2d, check_same_shape, detached, token_advantages
from tether.catalogue.ratio import log_ratio, ratio_metrics
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


def uniform_policy_value(
    logits: torch.Tensor, old_logits: torch.Tensor, response_mask: torch.Tensor, rho: float
) -> torch.Tensor:
    """V_uni(s_t) = rho [mean_v log pi(v|s_t) - mean_v log pi_old(v|s_t)] per position, 0 on padding."""
    mean_new = torch.log_softmax(logits, dim=-1).mean(dim=-1)
    mean_old = torch.log_softmax(old_logits, dim=-1).mean(dim=-1)
    value = rho * (mean_new - mean_old)
    return torch.where(response_mask.bool(), value, torch.zeros_like(value))


@register(
    "policy_loss",
    "rover",
    paper="Random Policy Valuation is Enough for LLM Reasoning with Verifiable Rewards",
    arxiv="2509.24981",
    status="exact",
    card="adv#B9",
)
def rover(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    logits: torch.Tensor,
    old_logits: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    rho: float = 1.0,
    clip_eps: float | None = None,
    aggregation: AggregationLike = "token-mean",
) -> LossOutput:
    """ROVER: Q-regression of a uniformly random policy's value, with Q parameterised by the policy's log-ratio.

    Paper: He et al., "Random Policy Valuation is Enough for LLM Reasoning with Verifiable Rewards",
    arXiv 2509.24981. Exact (card adv#B9, tinnerhrhe/ROVER ``DataParallelROVERActor``).

    Q_{i,t} = rho (lp - lp_old)_{i,t} (log-ratio clamped to [-20, 20]);
    V_uni(s_{i,t+1}) = rho [ (1/|V|) sum_v log pi_theta(v | s_{t+1}) - (1/|V|) sum_v log pi_old(v | s_{t+1}) ]
    (vocabulary mean of the log-softmax of ``logits`` / ``old_logits``, 0 after the last valid token);
    target_{i,t} = r~_i + V_uni(s_{i,t+1}), with r~ the ``advantages`` input (the group-normalised
    reward, broadcast to every token); loss = token-mean of (Q - sg(target))^2.
    Optional clip (``clip_eps`` = eps, off by default): where target > Q and log-ratio > log(1 + eps),
    or target < Q and log-ratio < log(1 - eps), the log-ratio is replaced by that bound (zero gradient).
    On-policy (pi_theta = pi_old) Q = V_uni = 0, so the gradient is -2 rho mean(r~ grad lp): REINFORCE on r~.
    Inputs: logprobs, old_logprobs, response_mask [B, T]; logits, old_logits [B, T, V]; advantages [B] or [B, T].
    """
    check_2d("logprobs", logprobs)
    check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, response_mask=response_mask)
    if logits.dim() != 3 or logits.shape[:2] != logprobs.shape:
        raise InvalidInputError(
            f"rover: logits must be [batch, tokens, vocab] matching logprobs {tuple(logprobs.shape)}, "
            f"got {tuple(logits.shape)}"
        )
    if old_logits.shape != logits.shape:
        raise InvalidInputError(
            f"rover: old_logits has shape {tuple(old_logits.shape)} but logits has {tuple(logits.shape)}"
        )
    if rho <= 0:
        raise InvalidInputError(f"rover: rho must be > 0 (the paper uses 1.0), got {rho}")
    if clip_eps is not None and not 0.0 < clip_eps < 1.0:
        raise InvalidInputError(f"rover: clip_eps must be in (0, 1) or None (no clip), got {clip_eps}")

    valid = response_mask.bool()
    adv = token_advantages(advantages, response_mask).to(logprobs.dtype)
    log_r = log_ratio(logprobs, old_logprobs)
    with torch.no_grad():
        v_uni = uniform_policy_value(logits.detach(), old_logits.detach(), response_mask, rho).to(
            logprobs.dtype
        )
        v_next = torch.zeros_like(v_uni)
        v_next[:, :-1] = v_uni[:, 1:]
        target = adv + v_next
    q_lr = log_r
    metrics = ratio_metrics(log_r, response_mask)
    if clip_eps is not None:
        hi, lo = math.log1p(clip_eps), math.log1p(-clip_eps)
        q_now = rho * log_r.detach()
        over = (target > q_now) & (log_r.detach() > hi)
        under = (target < q_now) & (log_r.detach() < lo)
        q_lr = torch.where(
            over, torch.full_like(log_r, hi), torch.where(under, torch.full_like(log_r, lo), log_r)
        )
        with torch.no_grad():
            metrics["policy/clip_frac"] = detached(masked_mean((over | under).float(), valid.float()))
    q = rho * q_lr
    per_token = (q - target).square()
    loss = aggregate(per_token, response_mask, aggregation)
    with torch.no_grad():
        m = valid.float()
        metrics["rover/q_mean"] = detached(masked_mean(q.detach(), m))
        metrics["rover/target_mean"] = detached(masked_mean(target, m))
        metrics["rover/v_uni_mean"] = detached(masked_mean(v_uni, m))
    metrics["policy/loss"] = detached(loss)
    return loss, metrics
