"""Clip-Cov and KL-Cov: restrain the few tokens whose log-prob / advantage covariance drives
entropy collapse (Cui et al. 2025)."""

from __future__ import annotations

import torch

from tether.catalogue.aggregate import AggregationLike, aggregate, masked_mean
from tether.catalogue.contracts import (
    LossOutput,
    Metrics,
    check_2d,
    check_same_shape,
    detached,
    token_advantages,
)
from tether.catalogue.ratio import clipped_surrogate, log_ratio, ratio_metrics
from tether.catalogue.registry import register
from tether.errors import InvalidInputError

PAPER = "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models"
ARXIV = "2505.22617"


def token_covariance(
    logprobs: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """Per-token centred product (A_t - mean A)(lp_t - mean lp) over the valid tokens, detached [B, T].

    The means are over every valid token of the batch (the authors' batch-level covariance); the
    sum of the entries over valid tokens divided by their count is the covariance of A and lp.
    Padded positions hold 0.
    """
    with torch.no_grad():
        m = response_mask.to(logprobs.dtype)
        valid = response_mask.bool()
        zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
        lp = torch.where(valid, logprobs.detach(), zero)
        adv = torch.where(valid, advantages.detach().to(logprobs.dtype), zero)
        centred = (adv - masked_mean(adv, m)) * (lp - masked_mean(lp, m))
        return torch.where(valid, centred, zero)


def _prepare(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inputs both covariance losses start from, checked: ``(valid, mask as float, token
    advantages, log-ratio, ratio, per-token covariance)``."""
    check_2d("logprobs", logprobs)
    check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, response_mask=response_mask)
    adv = token_advantages(advantages, response_mask).to(logprobs.dtype)
    log_r = log_ratio(logprobs, old_logprobs)
    cov = token_covariance(logprobs, adv, response_mask)
    return response_mask.bool(), response_mask.to(logprobs.dtype), adv, log_r, torch.exp(log_r), cov


def _cov_metrics(cov: torch.Tensor, selected: torch.Tensor, m: torch.Tensor, prefix: str) -> Metrics:
    with torch.no_grad():
        return {
            f"{prefix}/selected_frac": detached(masked_mean(selected.to(m.dtype), m)),
            f"{prefix}/cov_mean": detached(masked_mean(cov, m)),
            f"{prefix}/cov_max": detached(cov[m.bool()].max() if bool(m.bool().any()) else torch.zeros(())),
        }


@register("policy_loss", "clip_cov", paper=PAPER, arxiv=ARXIV, status="exact", card="lessons#feature-bar")
def clip_cov(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_ratio: float = 2e-4,
    cov_low: float = 1.0,
    cov_high: float = 5.0,
    eps_low: float = 1.0,
    eps_high: float = 1.0,
    aggregation: AggregationLike = "token-mean",
    generator: torch.Generator | None = None,
) -> LossOutput:
    """Clip-Cov: detach a random few tokens whose log-prob / advantage covariance is high.

    Paper: Cui et al., "The Entropy Mechanism of Reinforcement Learning for Reasoning Language
    Models", arXiv 2505.22617. Exact (the authors' PRIME-RL/Entropy-Mechanism-of-RL
    ``compute_policy_loss_clip_cov`` and their run scripts: r = 2e-4, bounds 1 and 5, PPO clip 1).

    The paper shows the entropy change is driven by Cov(lp, A) over tokens: confident tokens with
    positive advantage lower the entropy. With c_t = (A_t - mean A)(lp_t - mean lp) over the valid
    tokens, the candidates are the valid tokens not already clipped by PPO with cov_low < c_t <
    cov_high; max(1, floor(clip_ratio * N_valid)) of them, drawn uniformly at random (``generator``;
    None draws from torch's global generator, which run checkpoints save), lose their loss and so
    their gradient: l_t = corr_t * max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), corr_t in {0, 1},
    token-mean. The authors ran it with eps = 1, i.e. PPO's clip all but off (ratio capped at 2).
    The covariance is taken over the batch the loss sees (a micro-batch when the trainer splits one).
    """
    if not 0.0 < clip_ratio <= 1.0:
        raise InvalidInputError(
            f"clip_cov: clip_ratio is a fraction of tokens in (0, 1] (paper: 2e-4), got {clip_ratio}"
        )
    if cov_low >= cov_high:
        raise InvalidInputError(
            f"clip_cov: cov_low must be < cov_high (paper: 1 and 5), got {cov_low}, {cov_high}"
        )
    if eps_low < 0 or eps_high < 0:
        raise InvalidInputError(f"clip_cov: eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")
    valid, m, adv, log_r, ratio, cov = _prepare(logprobs, old_logprobs, advantages, response_mask)
    surrogate = clipped_surrogate(ratio, adv, eps_low, eps_high)
    with torch.no_grad():
        clipped = (-adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)) > (-adv * ratio)
        candidates = valid & ~clipped & (cov > cov_low) & (cov < cov_high)
        flat = candidates.flatten().nonzero().squeeze(-1)
        n_valid = int(valid.sum())
        n_pick = min(max(int(clip_ratio * n_valid), 1), flat.numel())
        selected = torch.zeros_like(candidates)
        if n_pick > 0:
            order = torch.randperm(flat.numel(), generator=generator, device="cpu").to(flat.device)
            selected.view(-1)[flat[order[:n_pick]]] = True
    per_token = torch.where(selected, torch.zeros_like(surrogate), surrogate)
    loss = aggregate(per_token, response_mask, aggregation)
    metrics = ratio_metrics(log_r, response_mask, adv, eps_low, eps_high)
    metrics.update(_cov_metrics(cov, selected, m, "clip_cov"))
    with torch.no_grad():
        metrics["clip_cov/candidate_frac"] = detached(masked_mean(candidates.to(m.dtype), m))
    metrics["policy/loss"] = detached(loss)
    return loss, metrics


@register("policy_loss", "kl_cov", paper=PAPER, arxiv=ARXIV, status="exact", card="lessons#feature-bar")
def kl_cov(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    k_ratio: float = 2e-3,
    kl_coef: float = 1.0,
    aggregation: AggregationLike = "token-mean",
) -> LossOutput:
    """KL-Cov: a |log-ratio| penalty on the tokens of highest log-prob / advantage covariance.

    Paper: Cui et al., "The Entropy Mechanism of Reinforcement Learning for Reasoning Language
    Models", arXiv 2505.22617. Exact (the authors' PRIME-RL/Entropy-Mechanism-of-RL
    ``compute_policy_loss_kl_cov``: k_percent 0.2, i.e. k_ratio 2e-3, and ppo_kl_coef 1).

    With c_t = (A_t - mean A)(lp_t - mean lp) over the valid tokens (see ``clip_cov``), the
    max(1, floor(k_ratio * N_valid)) valid tokens of largest c_t get a penalty:
    l_t = -A_t r_t + kl_coef * |lp_t - lp_old_t| on them, l_t = -A_t r_t elsewhere (no ratio clip:
    the authors' loss has none), token-mean. On-policy (r = 1) the penalty's gradient is 0 and
    KL-Cov equals the plain policy gradient; over several updates it holds the selected tokens,
    the ones that lower entropy most, near their old probabilities. Deterministic (top-k; ties
    are broken by ``torch.topk``). The covariance is taken over the batch the loss sees.
    """
    if not 0.0 < k_ratio <= 1.0:
        raise InvalidInputError(
            f"kl_cov: k_ratio is a fraction of tokens in (0, 1] (paper: 2e-3), got {k_ratio}"
        )
    if kl_coef < 0:
        raise InvalidInputError(f"kl_cov: kl_coef must be >= 0 (paper: 1), got {kl_coef}")
    valid, m, adv, log_r, ratio, cov = _prepare(logprobs, old_logprobs, advantages, response_mask)
    with torch.no_grad():
        n_valid = int(valid.sum())
        selected = torch.zeros_like(valid)
        if n_valid > 0:
            n_pick = max(int(k_ratio * n_valid), 1)
            ranked = torch.where(valid, cov, torch.full_like(cov, float("-inf")))
            selected.view(-1)[torch.topk(ranked.flatten(), n_pick).indices] = True
    penalty = torch.where(selected, kl_coef * log_r.abs(), torch.zeros_like(log_r))
    per_token = -adv * ratio + penalty
    loss = aggregate(per_token, response_mask, aggregation)
    metrics = ratio_metrics(log_r, response_mask)
    metrics.update(_cov_metrics(cov, selected, m, "kl_cov"))
    with torch.no_grad():
        metrics["kl_cov/abs_log_ratio_mean"] = detached(masked_mean(log_r.abs(), m))
    metrics["policy/loss"] = detached(loss)
    return loss, metrics
