"""From per-sample values to [B, T] token advantages, batch whitening, and advantage metrics.

Metric names (the TRL / verl names for the same quantity in brackets):

- ``adv/mean``, ``adv/std``, ``adv/min``, ``adv/max``: over valid response tokens
  [verl ``critic/advantages/mean|max|min``].
- ``adv/zero_std_frac``: fraction of groups whose rewards are all equal, i.e. that carry no
  group-relative signal [TRL ``frac_reward_zero_std``].
- ``adv/reward_mean``: mean outcome reward over the samples [TRL ``reward``; verl ``critic/score/mean``].
"""

from __future__ import annotations

import torch

from tether.catalogue.contracts import Metrics, check_2d, detached, token_advantages
from tether.errors import InvalidInputError


def check_outcome(rewards: torch.Tensor, response_mask: torch.Tensor, allow_components: bool = False) -> None:
    """``rewards`` [B] (or [B, K] when ``allow_components``) must match ``response_mask`` [B, T]."""
    check_2d("response_mask", response_mask)
    ok_dims = (1, 2) if allow_components else (1,)
    if rewards.dim() not in ok_dims or rewards.shape[0] != response_mask.shape[0]:
        want = "[batch] or [batch, components]" if allow_components else "[batch]"
        raise InvalidInputError(
            f"rewards must be a {want} tensor with one reward per sample ({response_mask.shape[0]}), "
            f"got shape {tuple(rewards.shape)}"
        )


def check_per_sample(name: str, tensor: torch.Tensor, batch: int | None = None) -> None:
    """``tensor`` must be [batch] (any length when ``batch`` is None)."""
    if tensor.dim() != 1 or (batch is not None and tensor.shape[0] != batch):
        count = "" if batch is None else f" ({batch})"
        raise InvalidInputError(
            f"{name} must be a [batch] tensor with one value per sample{count}, got shape {tuple(tensor.shape)}"
        )


def as_float(values: torch.Tensor) -> torch.Tensor:
    """Bool or integer rewards to the default float dtype; float tensors pass through (float64 stays)."""
    if values.is_floating_point():
        return values
    return values.to(torch.get_default_dtype())


def to_tokens(per_sample: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Broadcast [B] advantages over the response tokens; exactly 0 on padding."""
    expanded = token_advantages(per_sample, response_mask)
    return torch.where(
        response_mask.bool(), expanded, torch.zeros((), dtype=expanded.dtype, device=expanded.device)
    )


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(v - mean) / sqrt(var + eps) over valid tokens of the whole batch, unbiased var (verl masked_whiten).

    Fewer than two valid tokens: var = 0 (the centred value is then 0 too). Padding stays 0.
    """
    valid = mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    v = torch.where(valid, values, zero)
    n = valid.to(values.dtype).sum()
    mean = v.sum() / n.clamp(min=1.0)
    centred = torch.where(valid, values - mean, zero)
    var = (centred**2).sum() / (n - 1.0).clamp(min=1.0)
    return torch.where(valid, centred * torch.rsqrt(var + eps), zero)


def advantage_metrics(
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    rewards: torch.Tensor | None = None,
    zero_std_frac: torch.Tensor | None = None,
) -> Metrics:
    """The ``adv/*`` metrics for token advantages [B, T]."""
    with torch.no_grad():
        valid = response_mask.bool()
        adv = advantages.detach()
        if bool(valid.any()):
            vals = adv[valid].double()
            mean = vals.mean()
            std = vals.std() if vals.numel() > 1 else torch.zeros((), dtype=vals.dtype)
            lo, hi = vals.min(), vals.max()
        else:
            mean = std = lo = hi = torch.zeros(())
        out: Metrics = {
            "adv/mean": detached(mean),
            "adv/std": detached(std),
            "adv/min": detached(lo),
            "adv/max": detached(hi),
        }
        if rewards is not None and rewards.numel() > 0:
            out["adv/reward_mean"] = detached(rewards.detach().double().mean())
        if zero_std_frac is not None:
            out["adv/zero_std_frac"] = detached(zero_std_frac)
        return out
