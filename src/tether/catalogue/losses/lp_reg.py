"""Lp-Reg: pull the lowest-probability negative-advantage tokens toward a min-p filtered proxy."""

from __future__ import annotations

import math

import torch

from tether.catalogue.aggregate import AggregationLike, aggregate, masked_mean
from tether.catalogue.contracts import LossOutput, check_2d, check_same_shape, detached, token_advantages
from tether.catalogue.ratio import clipped_surrogate, log_ratio, ratio_metrics
from tether.catalogue.registry import register
from tether.errors import InvalidInputError

FILTERED_LOGIT = -1e4
"""Logit given to tokens the min-p filter removes (their proxy log-prob is then about -1e4)."""


def min_p_proxy_logprobs(old_logits: torch.Tensor, token_ids: torch.Tensor, kappa: float) -> torch.Tensor:
    """log pi_proxy of the sampled tokens, [B, T], no gradient.

    pi_proxy(v) is proportional to pi_old(v) * 1[pi_old(v) >= kappa * max_v' pi_old(v')]; filtered
    tokens get logit -1e4 before renormalising.
    """
    with torch.no_grad():
        old_logp = torch.log_softmax(old_logits.detach(), dim=-1)
        threshold = old_logp.max(dim=-1, keepdim=True).values + (math.log(kappa) if kappa > 0 else -math.inf)
        keep = old_logp >= threshold
        proxy = torch.where(keep, old_logp, torch.full_like(old_logp, FILTERED_LOGIT))
        proxy = torch.log_softmax(proxy, dim=-1)
        return proxy.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)


def select_low_probability(
    logprobs: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor, rho: float
) -> torch.Tensor:
    """Mask of the k = int(rho * N_neg) valid A < 0 tokens with the lowest current log-prob.

    N_neg counts valid tokens with A < 0 in the batch; nothing is selected unless k > 1 (as the
    released code). Ties at the threshold are broken by ``topk``.
    """
    with torch.no_grad():
        neg = response_mask.bool() & (advantages < 0)
        flat_neg = neg.reshape(-1)
        k = int(rho * int(flat_neg.sum().item()))
        selected = torch.zeros_like(flat_neg)
        if k > 1:
            idx = flat_neg.nonzero(as_tuple=True)[0]
            lp = logprobs.detach().reshape(-1)[idx]
            lowest = torch.topk(lp, k, largest=False).indices
            selected[idx[lowest]] = True
        return selected.reshape(neg.shape)


def k3_toward(logprobs: torch.Tensor, target_logprobs: torch.Tensor) -> torch.Tensor:
    """k3(lp, lp_tgt) = exp(lp_tgt - lp) - (lp_tgt - lp) - 1 (exp argument clamped +-20, value to [-10, 10])."""
    d = torch.clamp(target_logprobs - logprobs, -20.0, 20.0)
    return torch.clamp(torch.exp(d) - d - 1.0, -10.0, 10.0)


@register(
    "policy_loss",
    "lp_reg",
    paper="Low-probability Tokens Sustain Exploration in Reinforcement Learning with Verifiable Reward",
    arxiv="2510.03222",
    status="exact",
    card="ratio#7",
)
def lp_reg(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    old_logits: torch.Tensor,
    token_ids: torch.Tensor,
    kappa: float = 0.02,
    rho: float = 0.01,
    beta: float = 1.0,
    eps_low: float = 1.0,
    eps_high: float = 9.0,
    clip_c: float | None = 10.0,
    aggregation: AggregationLike = "token-mean",
) -> LossOutput:
    """Lp-Reg: protect "reasoning sparks" by a selective forward-KL pull toward a min-p proxy.

    Paper: Huang et al., "Low-probability Tokens Sustain Exploration in Reinforcement Learning with
    Verifiable Reward", arXiv 2510.03222. Exact (card from CarlanLark/Lp-Reg-dev).

    Proxy: pi_proxy(v) ~ pi_old(v) 1[pi_old(v) >= kappa max pi_old] (filtered logits -1e4), from
    ``old_logits`` as given (the paper uses temperature 1).
    Selection S: among valid tokens with A < 0, the k = int(rho N_neg) with the lowest current lp
    (only if k > 1), restricted to lp < lp_proxy (this also drops min-p-filtered tokens).
    t in S:     l_t = -A_t r_t + beta k3(lp_t, lp_proxy_t), k3 = exp(lp_proxy - lp) - (lp_proxy - lp) - 1
                (clamped to [-10, 10]); the PG part is unclipped; d k3 / d lp = 1 - pi_proxy/pi < 0.
    otherwise:  l_t = clipl(r, A; eps_low=1, eps_high=9) (ratio window [0, 10]) with dual clip
                min(., -A c) for A < 0, c = 10.
    Aggregated token-mean. rho = 0 gives the base loss. Inputs: ``old_logits`` [B, T, V] and
    ``token_ids`` [B, T] build the proxy; gradients flow through ``logprobs`` only.
    """
    check_2d("logprobs", logprobs)
    check_same_shape(
        "logprobs", logprobs, old_logprobs=old_logprobs, response_mask=response_mask, token_ids=token_ids
    )
    if old_logits.dim() != 3 or old_logits.shape[:2] != logprobs.shape:
        raise InvalidInputError(
            f"old_logits must be [batch, tokens, vocab] matching logprobs {tuple(logprobs.shape)}, "
            f"got {tuple(old_logits.shape)}"
        )
    if not 0.0 <= kappa <= 1.0 or not 0.0 <= rho <= 1.0:
        raise InvalidInputError(
            f"lp_reg: kappa and rho must be in [0, 1] (paper: 0.02, 0.01), got {kappa}, {rho}"
        )
    if beta < 0 or eps_low < 0 or eps_high < 0:
        raise InvalidInputError(
            f"lp_reg: beta, eps_low, eps_high must be >= 0, got {beta}, {eps_low}, {eps_high}"
        )
    if clip_c is not None and clip_c <= 1.0:
        raise InvalidInputError(f"lp_reg: clip_c must be > 1 or None (paper: 10), got {clip_c}")

    adv = token_advantages(advantages, response_mask).to(logprobs.dtype)
    log_r = log_ratio(logprobs, old_logprobs)
    ratio = torch.exp(log_r)
    base = clipped_surrogate(ratio, adv, eps_low, eps_high)
    dual_hit = torch.zeros_like(response_mask, dtype=torch.bool)
    if clip_c is not None:
        base = torch.where(adv < 0, torch.minimum(base, -adv * clip_c), base)
        dual_hit = (adv < 0) & (ratio.detach() > clip_c)

    lp_proxy = min_p_proxy_logprobs(old_logits, token_ids, kappa).to(logprobs.dtype)
    candidates = select_low_probability(logprobs, adv, response_mask, rho)
    selected = candidates & (logprobs.detach() < lp_proxy)
    kl = k3_toward(logprobs, lp_proxy)
    regularised = -adv * ratio + beta * kl
    per_token = torch.where(selected, regularised, base)
    loss = aggregate(per_token, response_mask, aggregation)

    metrics = ratio_metrics(log_r, response_mask, adv, eps_low, eps_high)
    with torch.no_grad():
        m = response_mask.float()
        sel = selected.float()
        metrics["policy/dual_clip_frac"] = detached(masked_mean(dual_hit.float(), m))
        metrics["lp_reg/selected_frac"] = detached(masked_mean(sel, m))
        metrics["lp_reg/candidate_frac"] = detached(masked_mean(candidates.float(), m))
        metrics["lp_reg/kl_mean"] = detached(masked_mean(kl.detach(), sel * m))
        filtered = (lp_proxy < FILTERED_LOGIT / 2).float()
        metrics["lp_reg/filtered_frac"] = detached(masked_mean(filtered, m))
    metrics["policy/loss"] = detached(loss)
    return loss, metrics
