"""R2VPO: unclipped policy gradient with a Lagrangian penalty on the variance of the ratio."""

from __future__ import annotations

import torch

from tether.catalogue.aggregate import AggregationLike, aggregate, masked_mean
from tether.catalogue.contracts import LossOutput, check_2d, check_same_shape, detached, token_advantages
from tether.catalogue.ratio import log_ratio, ratio_metrics
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


def ratio_variance(ratio: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Var_hat(r) = mean_t (r_t - mean_t r)^2 over the valid tokens of the batch (0 if none); differentiable."""
    valid = response_mask.bool()
    r_bar = masked_mean(ratio, response_mask)
    dev = torch.where(valid, ratio - r_bar, torch.zeros((), dtype=ratio.dtype, device=ratio.device))
    return masked_mean(dev * dev, response_mask)


def r2vpo_dual_update(
    lagrange_multiplier: float,
    ratio_variance: float | torch.Tensor,
    delta: float = 0.05,
    lr: float = 0.01,
) -> float:
    """Projected dual ascent on the ratio-variance constraint: lam <- max(0, lam + lr (Var_hat(r) - delta)).

    Call once after each optimiser step with the ``r2vpo/ratio_var`` metric; pass the result as the
    next ``lagrange_multiplier``. The multiplier grows while Var(r) > delta and never goes negative.
    """
    if lr <= 0:
        raise InvalidInputError(f"r2vpo_dual_update: lr must be > 0 (card: 0.01 to 0.1), got {lr}")
    if lagrange_multiplier < 0:
        raise InvalidInputError(
            f"r2vpo_dual_update: lagrange_multiplier must be >= 0 (start at 0), got {lagrange_multiplier}"
        )
    var = (
        float(ratio_variance.detach().item()) if isinstance(ratio_variance, torch.Tensor) else ratio_variance
    )
    return max(0.0, float(lagrange_multiplier) + lr * (var - delta))


@register(
    "policy_loss",
    "r2vpo",
    paper="Ratio-Variance Regularized Policy Optimization for Efficient LLM Fine-tuning",
    arxiv="2601.03320",
    status="reconstructed",
    card="ratio#4",
    state_update=r2vpo_dual_update,
)
def r2vpo(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    lagrange_multiplier: float = 0.0,
    delta: float = 0.05,
    aggregation: AggregationLike = "token-mean",
) -> LossOutput:
    """R2VPO: replace clipping by the constraint Var(r) <= delta, enforced with a primal-dual multiplier.

    Paper: Luo et al., "Ratio-Variance Regularized Policy Optimization for Efficient LLM Fine-tuning",
    arXiv 2601.03320. Reconstructed (no code found; from the abstract and summaries) -- a hypothesis;
    delta = 0.05 is the card's suggestion, the paper's value is unknown.

    L(theta, lam) = -agg_t(r_t A_t) + lam (Var_hat(r) - delta),  r = exp(lp - lp_old) (log r clamped +-20)
    Var_hat(r) = mean_t (r_t - mean_t r)^2 over the valid tokens of this batch. lam is state: pass the
    current multiplier as ``lagrange_multiplier`` and advance it with the registered
    ``r2vpo_dual_update`` (lam <- max(0, lam + eta (Var_hat - delta))). Under pi_old sampling
    E[r] = 1 and Var(r) = chi^2(pi_theta || pi_old) (about 2 KL for small steps). Per-token gradient:
    (-A_t r_t + 2 lam (r_t - r_bar) r_t / N) d lp_t: no token's PG gradient is ever zeroed. With
    micro-batches Var_hat is computed per micro-batch (it is not additive). Metric ``r2vpo/ratio_var``.
    """
    check_2d("logprobs", logprobs)
    check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, response_mask=response_mask)
    if lagrange_multiplier < 0 or delta < 0:
        raise InvalidInputError(
            f"r2vpo: lagrange_multiplier and delta must be >= 0, got {lagrange_multiplier}, {delta}"
        )
    adv = token_advantages(advantages, response_mask).to(logprobs.dtype)
    log_r = log_ratio(logprobs, old_logprobs)
    ratio = torch.exp(log_r)
    pg = aggregate(-adv * ratio, response_mask, aggregation)
    var = ratio_variance(ratio, response_mask)
    loss = pg + lagrange_multiplier * (var - delta)

    metrics = ratio_metrics(log_r, response_mask)
    metrics["r2vpo/ratio_var"] = detached(var)
    metrics["r2vpo/constraint_violation"] = detached(var - delta)
    metrics["r2vpo/lagrange_multiplier"] = detached(float(lagrange_multiplier))
    metrics["r2vpo/pg_loss"] = detached(pg)
    metrics["policy/loss"] = detached(loss)
    return loss, metrics
