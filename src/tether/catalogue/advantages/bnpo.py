"""BNPO: normalise group-baselined rewards by a Beta density fitted to the batch's success rates."""

from __future__ import annotations

import math

import torch

from tether.catalogue.advantages.baselines import AdvantageOutput
from tether.catalogue.advantages.broadcast import advantage_metrics, as_float, check_outcome, to_tokens
from tether.catalogue.advantages.group_stats import Groups, group_stats, groups_of, verl_single_sample
from tether.catalogue.contracts import Metrics, detached
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


def beta_log_pdf(p: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """log f_Beta(p; alpha, beta) on [0, 1] via lgamma; -inf (not NaN) at p in {0, 1} when the density is 0."""
    log_norm = torch.lgamma(alpha + beta) - torch.lgamma(alpha) - torch.lgamma(beta)
    return torch.xlogy(alpha - 1.0, p) + torch.xlogy(beta - 1.0, 1.0 - p) + log_norm


def fit_beta(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BNPO's method-of-moments fit over the groups' success rates p [Q].

    m = mean p, v = unbiased var p (one group: m = 0, v = 1 as released, which gives alpha = beta = 1);
    a = (m(1-m)/v - 1) m, b = (m(1-m)/v - 1)(1 - m); alpha = max(1, 1 + a/3), beta = max(1, 1 + b/3).
    Guard (ours): v = 0 (every group has the same p) leaves the fit undefined (the released code divides
    by zero); we fall back to alpha = beta = 1, i.e. REINFORCE with the group-mean baseline.
    """
    p = p.detach()
    if p.numel() > 1:
        m = p.mean()
        v = p.var()
    else:
        m = torch.zeros((), dtype=p.dtype, device=p.device)
        v = torch.ones((), dtype=p.dtype, device=p.device)
    ok = v > 0
    ratio = m * (1.0 - m) / torch.where(ok, v, torch.ones_like(v)) - 1.0
    one = torch.ones((), dtype=p.dtype, device=p.device)
    alpha = torch.where(ok, torch.clamp(1.0 + ratio * m / 3.0, min=1.0), one)
    beta = torch.where(ok, torch.clamp(1.0 + ratio * (1.0 - m) / 3.0, min=1.0), one)
    return alpha, beta


def bnpo_component(
    r: torch.Tensor,
    groups: Groups,
    alpha: float | None,
    beta: float | None,
    weight_cap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """BNPO advantage [B] of one reward component already rescaled to [0, 1]; also alpha, beta, stats."""
    stats = group_stats(r, groups)
    mean, _ = verl_single_sample(stats)  # released code: single-sample group has p = 0
    p_group = torch.where(stats.count <= 1.0, torch.zeros_like(stats.mean), stats.mean)
    if alpha is None or beta is None:
        a, b = fit_beta(p_group)
    else:
        a = torch.tensor(float(alpha), dtype=r.dtype, device=r.device)
        b = torch.tensor(float(beta), dtype=r.dtype, device=r.device)
    log_pdf = beta_log_pdf(mean.detach(), a, b)
    weight = torch.exp(torch.clamp(-log_pdf, max=math.log(weight_cap)))
    return weight * (r - mean), a, b, stats.zero_std_frac()


@register(
    "advantage",
    "bnpo",
    paper="BNPO: Beta Normalization Policy Optimization",
    arxiv="2506.02864",
    status="exact",
    card="adv#B1",
)
def bnpo(
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids: torch.Tensor,
    alpha: float | None = None,
    beta: float | None = None,
    reward_min: float = 0.0,
    reward_max: float = 1.0,
    weight_cap: float = 1e6,
) -> AdvantageOutput:
    """BNPO: A = (r - p) / f_Beta(p; alpha, beta), with (alpha, beta) refit to the batch every step.

    Paper: Xiao et al., "BNPO: Beta Normalization Policy Optimization", arXiv 2506.02864.
    Exact (changyi7231/BNPO recipe/bnpo/src/bnpo_ray_trainer.py compute_bnpo_outcome_advantage).

    r~ = (r - reward_min)/(reward_max - reward_min) in [0, 1] (known reward bounds, not batch min/max);
    p_q = group mean of r~ (a single-sample group has p = 0, as released); over the groups of the batch
    m = mean p, v = var p (unbiased), a = (m(1-m)/v - 1) m, b = (m(1-m)/v - 1)(1-m),
    alpha = max(1, 1 + a/3), beta = max(1, 1 + b/3); w_q = min(1/f_Beta(p_q; alpha, beta), 1e6);
    A_i = w_q (r~_i - p_q). Pass ``alpha`` and ``beta`` to fix them: alpha = beta = 1 gives r - p
    (REINFORCE with group-mean baseline); alpha = beta = 3/2 gives (pi/8)(r - p)/sqrt(p(1-p)) (GRPO
    with population std, times pi/8). Guard (ours): v = 0 falls back to alpha = beta = 1.
    Advantage decomposition: ``rewards`` [B, K] (e.g. accuracy and format) runs BNPO per component
    with its own fit, and A = (1/K) sum_k A^(k).
    """
    check_outcome(rewards, response_mask, allow_components=True)
    if (alpha is None) != (beta is None):
        raise InvalidInputError(
            "bnpo: pass both alpha and beta to fix the Beta density, or neither to fit it"
        )
    if alpha is not None and beta is not None and (alpha <= 0 or beta <= 0):
        raise InvalidInputError(f"bnpo: alpha and beta must be > 0, got alpha={alpha}, beta={beta}")
    if reward_max <= reward_min:
        raise InvalidInputError(f"bnpo: reward_max ({reward_max}) must exceed reward_min ({reward_min})")
    if weight_cap <= 0:
        raise InvalidInputError(f"bnpo: weight_cap must be > 0, got {weight_cap}")
    r_all = as_float(rewards)
    scaled = (r_all - reward_min) / (reward_max - reward_min)
    if bool(((scaled < 0) | (scaled > 1)).any()):
        raise InvalidInputError(
            f"bnpo: rewards must lie in [reward_min, reward_max] = [{reward_min}, {reward_max}]; "
            "set reward_min/reward_max to the bounds of your reward"
        )
    comps = scaled.unsqueeze(-1) if scaled.dim() == 1 else scaled
    groups = groups_of(group_ids, comps.shape[0])
    per_sample = torch.zeros(comps.shape[0], dtype=comps.dtype, device=comps.device)
    metrics: Metrics = {}
    zero_frac = torch.zeros(())
    for k in range(comps.shape[1]):
        adv_k, a, b, zero_frac_k = bnpo_component(comps[:, k], groups, alpha, beta, weight_cap)
        per_sample = per_sample + adv_k / comps.shape[1]
        suffix = "" if comps.shape[1] == 1 else f"_{k}"
        metrics[f"bnpo/alpha{suffix}"] = detached(a)
        metrics[f"bnpo/beta{suffix}"] = detached(b)
        if k == 0:
            zero_frac = zero_frac_k
    adv = to_tokens(per_sample, response_mask)
    reward_for_metric = r_all if r_all.dim() == 1 else r_all[:, 0]
    out = advantage_metrics(adv, response_mask, reward_for_metric, zero_frac)
    out.update(metrics)
    return adv, out
