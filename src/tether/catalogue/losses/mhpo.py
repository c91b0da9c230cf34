"""MHPO: a smooth bounded map of the log-ratio times a detached, asymmetric hazard decay."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tether.catalogue.aggregate import AggregationLike, aggregate, masked_mean
from tether.catalogue.contracts import LossOutput, check_2d, check_same_shape, detached, token_advantages
from tether.catalogue.ratio import log_ratio, ratio_metrics
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


def log_fidelity_modulator(x: torch.Tensor, c: float) -> torch.Tensor:
    """LFM: psi = c tanh(x / c), a smooth map of the log-ratio into (-c, c)."""
    return c * torch.tanh(x / c)


def decoupled_hazard(
    psi: torch.Tensor,
    k_p: float,
    lam_p: float,
    k_n: float,
    lam_n: float,
    center_hazard: bool = False,
) -> torch.Tensor:
    """DHP: zeta = (h(psi)/lam_p)^k_p + (h(-psi)/lam_n)^k_n, on a DETACHED psi.

    h = softplus (as reconstructed) or, with ``center_hazard``, max(softplus(u) - log 2, 0), which is
    0 for u <= 0 so that zeta(0) = 0 (weight exp(-zeta) = 1 at r = 1) and each side only penalises
    its own direction of shift.
    """
    u = psi.detach()

    def h(v: torch.Tensor) -> torch.Tensor:
        sp = F.softplus(v)
        return torch.clamp(sp - math.log(2.0), min=0.0) if center_hazard else sp

    return (h(u) / lam_p) ** k_p + (h(-u) / lam_n) ** k_n


@register(
    "policy_loss",
    "mhpo",
    paper="MHPO: Modulated Hazard-aware Policy Optimization for Stable Reinforcement Learning",
    arxiv="2603.16929",
    status="reconstructed",
    card="ratio#1",
)
def mhpo(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    c: float = 1.5,
    k_p: float = 1.5,
    lam_p: float = 1.0,
    k_n: float = 2.0,
    lam_n: float = 0.8,
    center_hazard: bool = False,
    aggregation: AggregationLike = "token-mean",
) -> LossOutput:
    """MHPO: replace hard clipping by a bounded log-ratio modulator and a survival-style hazard decay.

    Paper: Wang et al., "MHPO: Modulated Hazard-aware Policy Optimization for Stable Reinforcement
    Learning", arXiv 2603.16929. Reconstructed (no official code; formulas from two third-party notes
    that agree; the paper itself was not read) -- a hypothesis.

    x = lp - lp_old (clamped to +-20); psi = c tanh(x / c)                    (Log-Fidelity Modulator)
    zeta = (softplus(sg psi)/lam_p)^k_p + (softplus(-sg psi)/lam_n)^k_n      (Decoupled Hazard Penalty)
    l_t = -exp(psi_t - sg(zeta_t)) * A_t, token-mean.
    d l / d lp = -A exp(psi - zeta) sech^2(x / c): nonzero for every finite ratio (no dead zone) and
    |d l / d lp| <= |A| max_u e^{c u}(1 - u^2), about 1.593 |A| for c = 1.5 (below the claimed e^c).
    Open issue: as written exp(-zeta) is about 0.265 at r = 1 (not 1); ``center_hazard=True`` uses
    max(softplus(u) - log 2, 0) instead, giving weight 1 at r = 1. Defaults (said to be section 4.1):
    c=1.5, k_p=1.5, lam_p=1.0, k_n=2.0, lam_n=0.8. As c, lam_p, lam_n -> inf the loss tends to -r A.
    """
    check_2d("logprobs", logprobs)
    check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, response_mask=response_mask)
    for name, value in (("c", c), ("k_p", k_p), ("lam_p", lam_p), ("k_n", k_n), ("lam_n", lam_n)):
        if not value > 0:
            raise InvalidInputError(
                f"mhpo: {name} must be > 0 (paper: c=1.5, k_p=1.5, lam_p=1.0, k_n=2.0, lam_n=0.8), got {value}"
            )
    adv = token_advantages(advantages, response_mask).to(logprobs.dtype)
    x = log_ratio(logprobs, old_logprobs)
    psi = log_fidelity_modulator(x, c)
    zeta = decoupled_hazard(psi, k_p, lam_p, k_n, lam_n, center_hazard)
    per_token = -torch.exp(psi - zeta) * adv
    loss = aggregate(per_token, response_mask, aggregation)

    metrics = ratio_metrics(x, response_mask)
    with torch.no_grad():
        m = response_mask.float()
        weight = torch.exp(-zeta)
        multiplier = torch.exp(psi.detach() - zeta) / torch.cosh(x.detach() / c) ** 2
        metrics["mhpo/hazard_weight_mean"] = detached(masked_mean(weight, m))
        metrics["mhpo/psi_mean"] = detached(masked_mean(psi.detach(), m))
        metrics["mhpo/grad_multiplier_mean"] = detached(masked_mean(multiplier, m))
    metrics["policy/loss"] = detached(loss)
    return loss, metrics
