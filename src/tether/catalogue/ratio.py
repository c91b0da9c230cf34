"""Importance ratios, PPO clipping and the ratio metrics every policy loss reports.

Metric names (stable; the TRL / verl names for the same quantity in brackets):

- ``policy/ratio_mean|min|max``: token ratio r = pi/pi_old over valid tokens
  [TRL ``sampling/importance_sampling_ratio/*`` is the sampler ratio, not this one].
- ``policy/clip_frac_low``: fraction of tokens with A < 0 and r < 1 - eps_low
  [TRL ``clip_ratio/low_mean``; verl ``actor/pg_clipfrac_lower``].
- ``policy/clip_frac_high``: fraction with A > 0 and r > 1 + eps_high [TRL ``clip_ratio/high_mean``].
- ``policy/clip_frac``: either side [TRL ``clip_ratio/region_mean``; verl ``actor/pg_clipfrac``].
- ``policy/approx_kl``: token-mean of (r - 1) - log r, the k3 estimate of KL(pi_old || pi)
  [CleanRL ``losses/approx_kl``; verl ``actor/ppo_kl`` uses k1].
- ``policy/loss``: the aggregated policy loss [verl ``actor/pg_loss``].
"""

from __future__ import annotations

import torch

from tether.catalogue.aggregate import masked_mean
from tether.catalogue.contracts import Metrics, detached

LOG_RATIO_CLAMP = 20.0


def log_ratio(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, clamp: float = LOG_RATIO_CLAMP
) -> torch.Tensor:
    """log(pi / pi_old), clamped to [-clamp, clamp] (verl clamps at 20) so exp never overflows."""
    return torch.clamp(logprobs - old_logprobs, -clamp, clamp)


def clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> torch.Tensor:
    """PPO's per-token loss max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))."""
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    return torch.maximum(-advantages * ratio, -advantages * clipped)


def ratio_metrics(
    log_r: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor | None = None,
    eps_low: float | None = None,
    eps_high: float | None = None,
) -> Metrics:
    """Ratio statistics and, when clip bounds are given, clip fractions by side."""
    with torch.no_grad():
        valid = mask.bool()
        lr = log_r.detach().float()
        ratio = torch.exp(lr)
        m = valid.float()
        if bool(valid.any()):
            r_min = ratio[valid].min()
            r_max = ratio[valid].max()
        else:
            r_min = r_max = torch.ones(())
        out: Metrics = {
            "policy/ratio_mean": detached(masked_mean(ratio, m)),
            "policy/ratio_min": detached(r_min),
            "policy/ratio_max": detached(r_max),
            "policy/approx_kl": detached(masked_mean(torch.expm1(lr) - lr, m)),
        }
        if advantages is not None and eps_low is not None and eps_high is not None:
            adv = advantages.detach()
            low = ((ratio < 1.0 - eps_low) & (adv < 0)).float()
            high = ((ratio > 1.0 + eps_high) & (adv > 0)).float()
            out["policy/clip_frac_low"] = detached(masked_mean(low, m))
            out["policy/clip_frac_high"] = detached(masked_mean(high, m))
            out["policy/clip_frac"] = detached(masked_mean(torch.clamp(low + high, max=1.0), m))
        return out
