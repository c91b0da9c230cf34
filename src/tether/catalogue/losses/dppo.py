"""DPPO: PPO's trust region on a divergence of the token's probability, not on its ratio."""

from __future__ import annotations

from typing import Literal

import torch

from tether.catalogue.aggregate import AggregationLike, aggregate, masked_mean
from tether.catalogue.contracts import LossOutput, check_2d, check_same_shape, detached, token_advantages
from tether.catalogue.ratio import log_ratio, ratio_metrics
from tether.catalogue.registry import register
from tether.errors import InvalidInputError

Divergence = Literal["tv", "kl"]


def binary_kl(old_logprobs: torch.Tensor, logprobs: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KL(Bernoulli(p_old) || Bernoulli(p)) of the sampled token against the rest of the vocabulary:
    p_old (log p_old - log p) + (1 - p_old) log((1 - p_old + eps) / (1 - p + eps)) (eps as the authors')."""
    p_old, p = old_logprobs.exp(), logprobs.exp()
    return p_old * (old_logprobs - logprobs) + (1.0 - p_old) * torch.log(
        (1.0 - p_old + eps) / (1.0 - p + eps)
    )


def trust_region_mask(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    delta_low: float,
    delta_high: float,
    divergence: Divergence,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keep, out_high, out_low), bool [B, T]: a token is dropped when the update has already moved
    its probability past the trust region in the direction its advantage pushes it."""
    with torch.no_grad():
        p, p_old = logprobs.detach().exp(), old_logprobs.detach().exp()
        if divergence == "tv":  # binary total variation |p - p_old|, by side
            out_high = (p - p_old) > delta_high
            out_low = (p - p_old) < -delta_low
        else:
            d = binary_kl(old_logprobs.detach().double(), logprobs.detach().double())
            out_high = (d > delta_high) & (p > p_old)
            out_low = (d > delta_low) & (p < p_old)
        out_high = out_high & (advantages > 0)
        out_low = out_low & ~(advantages > 0)
        return ~(out_high | out_low), out_high, out_low


@register(
    "policy_loss",
    "dppo",
    paper="Rethinking the Trust Region in LLM Reinforcement Learning",
    arxiv="2602.04879",
    status="exact",
    card="lessons#feature-bar",
    aliases=("dppo_tv", "dppo_kl"),
)
def dppo(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    divergence: Divergence = "tv",
    delta_low: float = 0.15,
    delta_high: float = 0.15,
    ratio_cap: float = 10.0,
    aggregation: AggregationLike = "seq-mean-token-sum-norm",
) -> LossOutput:
    """DPPO: policy gradient weighted by the (capped, detached) ratio, masked outside a divergence
    trust region.

    Paper: Qi et al., "Rethinking the Trust Region in LLM Reinforcement Learning", arXiv 2602.04879
    (DPPO-Binary-TV and DPPO-Binary-KL). Exact against verl ``dppo_tv`` / ``dppo_kl`` (mask and
    weight both against ``old_log_prob``), which anchor the trust region at the recomputed old
    policy, not at the sampler's as the paper does (see "The anchor" below):

        l_t = -A_t * sg(min(r_t, C)) * M_t * log pi(y_t),   r_t = pi / pi_old   (log r clamped to +-20)
        TV:  M_t = 0 if A_t > 0 and p - p_old > delta_high, or A_t <= 0 and p - p_old < -delta_low
        KL:  D = KL(Bern(p_old) || Bern(p)); M_t = 0 if A_t > 0, p > p_old and D > delta_high,
             or A_t <= 0, p < p_old and D > delta_low

    with p = pi(y_t) and p_old = pi_old(y_t). The gradient of an unmasked token is PPO's unclipped
    -A r grad log pi (up to the cap C, the authors' truncated importance sampling, 10 by default and
    1e4 in their run script). PPO's ratio clip over-constrains rare tokens (a ratio of 2 on p = 0.001
    moves almost no mass) and under-constrains likely ones; a divergence of the probability itself
    does not. ``divergence="tv"`` (delta 0.15 in the authors' script) or ``"kl"`` (delta 0.05).

    The anchor: the trust region (and the weight r) is measured against ``old_logprobs``, the
    trainer's recomputed pi_old. This is the recompute variant. The paper's DPPO, and the
    authors' default in sail-sg/Stable-RL (``dppo_binary_tv`` / ``dppo_binary_kl``), anchor the
    region at the rollout (sampler) policy mu instead, and the paper finds that this choice matters
    for stability under training-inference mismatch (its recompute-anchored ratio baseline, MiniRL,
    lets the mismatch grow until training collapses). The two coincide when the sampler is exact
    (mu = pi_old up to float error, as with tether's built-in sampler); with another engine (vLLM,
    lower precision) this loss is the recompute variant, not the paper's. Stable-RL's
    ``_recompute`` variants mask as here but weight by pi / mu, so they too match this loss only
    for an exact sampler. ``train.sampler_correction`` does not move the anchor: it only multiplies
    each token's policy-gradient term by an importance weight pi_old / mu (per token or per
    sequence); the rollout-anchored variant is not implemented.
    """
    check_2d("logprobs", logprobs)
    check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, response_mask=response_mask)
    if divergence not in ("tv", "kl"):
        raise InvalidInputError(f"dppo: divergence must be 'tv' or 'kl', got {divergence!r}")
    if not (delta_low >= 0 and delta_high >= 0):
        raise InvalidInputError(f"dppo: delta_low and delta_high must be >= 0, got {delta_low}, {delta_high}")
    if not ratio_cap > 0:
        raise InvalidInputError(f"dppo: ratio_cap must be > 0 (the authors use 10), got {ratio_cap}")
    adv = token_advantages(advantages, response_mask).to(logprobs.dtype)
    log_r = log_ratio(logprobs, old_logprobs)
    keep, out_high, out_low = trust_region_mask(
        logprobs, old_logprobs, adv, delta_low, delta_high, divergence
    )
    with torch.no_grad():
        weight = torch.exp(log_r).clamp(max=ratio_cap) * keep.to(logprobs.dtype)
    per_token = -adv * weight * logprobs
    loss = aggregate(per_token, response_mask, aggregation)
    metrics = ratio_metrics(log_r, response_mask)
    with torch.no_grad():
        m = response_mask.float()
        metrics["policy/clip_frac_high"] = detached(masked_mean(out_high.float(), m))
        metrics["policy/clip_frac_low"] = detached(masked_mean(out_low.float(), m))
        metrics["policy/clip_frac"] = detached(masked_mean((~keep).float(), m))
        metrics["dppo/capped_frac"] = detached(masked_mean((torch.exp(log_r) > ratio_cap).float() * keep, m))
    metrics["policy/loss"] = detached(loss)
    return loss, metrics
