"""Sampler/trainer mismatch: importance weights that correct for it, and the statistics that
show it.

A rollout backend that is not the trainer's own forward pass (vLLM, or any engine in lower
precision or with other kernels) samples from a distribution ``mu`` that differs from the
trainer's ``pi_old``, so the policy gradient of the samples is biased. Feng Yao, Liyuan Liu,
Dinghuai Zhang, Chengyu Dong, Jingbo Shang, Jianfeng Gao, "Your Efficient RL Framework Secretly
Brings You Off-Policy RL Training" (blog, 2025; "On the Rollout-Training Mismatch in Modern RL
Systems", NeurIPS 2025) weight each token's policy-gradient term by the truncated importance
ratio ``min(pi_old(y_t) / mu(y_t), C)`` (TIS; exact, ``token_truncate`` with ``clip_min=0``).
The other three modes are TRL's ``vllm_importance_sampling_mode`` variants (token/sequence x
truncate/mask; the sequence-masked one after Liu et al. 2025, "When Speed Kills Stability"),
written from TRL 1.16's definitions: a sequence's ratio is the product of its tokens' ratios,
``mask`` zeroes ratios outside ``[C_min, C_max]`` and keeps the others unclipped.

The trainer applies the weight to the advantages, token by token. For the PPO-clip family (and
every loss linear in the advantage) this equals weighting the per-token policy-gradient loss, as
TRL and verl do, because ``-min(r w A, clip(r) w A) = -w min(r A, clip(r) A)`` for ``w >= 0``;
KL and entropy terms are not weighted.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from tether.catalogue.aggregate import masked_mean

Mode = Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]

__all__ = ["Mode", "correction_metrics", "importance_stats", "sampler_importance_weights"]


def sampler_importance_weights(
    trainer_logprobs: Tensor,
    sampler_logprobs: Tensor,
    mask: Tensor,
    mode: Mode,
    clip_min: float = 0.0,
    clip_max: float = 2.0,
) -> Tensor:
    """Per-token weights ``[N, T]`` for the policy-gradient term (0 outside ``mask``).

    ``token_*``: ``rho_t = exp(log pi_old(y_t) - log mu(y_t))`` per token; ``sequence_*``: one
    ``rho = exp(sum_t ...)`` per row, on every token of the row. ``*_truncate`` clamps rho to
    ``[clip_min, clip_max]``; ``*_mask`` sets it to 0 outside that range and keeps it inside.
    ``none``: all ones on the mask.
    """
    m = mask.to(trainer_logprobs.dtype)
    if mode == "none":
        return m
    diff = (trainer_logprobs - sampler_logprobs.to(trainer_logprobs.dtype)) * m
    diff = torch.nan_to_num(diff, nan=0.0)  # a missing sampler log-prob: no correction there
    log_rho = diff.sum(dim=-1, keepdim=True).expand_as(diff) if mode.startswith("sequence") else diff
    rho = torch.exp(log_rho)
    if mode.endswith("truncate"):
        w = rho.clamp(min=clip_min, max=clip_max)
    else:
        w = torch.where((rho >= clip_min) & (rho <= clip_max), rho, torch.zeros_like(rho))
    return w * m


def importance_stats(trainer_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor) -> dict[str, float]:
    """Token-level ratio ``pi_old / mu`` over the mask: min, max, and the effective sample size
    as a fraction, ``(sum rho)^2 / (n sum rho^2)`` (1: no mismatch; small: a few tokens carry the
    batch)."""
    m = mask.bool()
    if not bool(m.any()):
        return {}
    rho = torch.exp((trainer_logprobs.float() - sampler_logprobs.float())[m])
    rho = torch.nan_to_num(rho, nan=1.0, posinf=torch.finfo(rho.dtype).max)
    ess = float(rho.sum() ** 2 / (rho.numel() * (rho**2).sum()).clamp(min=1e-30))
    return {
        "rollout/is_ratio_min": float(rho.min()),
        "rollout/is_ratio_max": float(rho.max()),
        "rollout/is_ess": ess,
    }


def correction_metrics(weights: Tensor, mask: Tensor) -> dict[str, float]:
    """The applied weights over the mask: their mean and the fraction set to zero (masked)."""
    m = mask.to(weights.dtype)
    return {
        "rollout/is_weight_mean": float(masked_mean(weights, m)),
        "rollout/is_zeroed_frac": float(masked_mean((weights == 0).to(weights.dtype), m)),
    }
