"""Per-group statistics of per-sample values, for group-relative advantage estimators.

Samples of the same prompt share a group id. Ids may be any integers (non-contiguous,
unsorted, negative): they are mapped to 0..Q-1 with ``torch.unique``. Every statistic is a
vectorised ``index_add`` over the batch, differentiable, and free of NaN:

- counts, sums and means (optionally over a subset of samples given by ``weights``); the mean of a
  group whose values are all equal is exactly that value, so its spread is exactly 0;
- the population variance sum (x - mean)^2 / n and the unbiased one sum (x - mean)^2 / (n - 1)
  (torch.std's default; verl and TRL use it); a group with fewer than two samples has variance 0;
- standard deviations through :func:`safe_sqrt`, whose gradient is 0 (not inf) at 0.

Conventions that differ between methods (verl's "a single-sample group has mean 0, std 1")
are applied by the estimators through :func:`verl_single_sample`; :func:`grpo_standardise`
is the one implementation of GRPO's (r - mean) / (std + eps) with that convention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tether.catalogue.contracts import check_groups
from tether.errors import InvalidInputError

GRPO_EPS = 1e-6


@dataclass(frozen=True)
class Groups:
    """Group membership: ``index[i]`` in 0..num-1 is the group of sample i."""

    index: torch.Tensor
    num: int

    def gather(self, per_group: torch.Tensor) -> torch.Tensor:
        """Per-group values [Q, ...] to per-sample values [B, ...]."""
        return per_group.index_select(0, self.index)  # deterministic backward, unlike per_group[index]

    def members(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[Q, B] bool: sample b belongs to group q (and ``rows[b]`` is true, when given)."""
        ids = torch.arange(self.num, device=self.index.device)
        out = self.index.unsqueeze(0) == ids.unsqueeze(1)
        return out if rows is None else out & rows.unsqueeze(0)


def groups_of(group_ids: torch.Tensor, batch: int) -> Groups:
    """Map arbitrary integer group ids [B] to contiguous group indices."""
    check_groups(group_ids, batch)
    if group_ids.is_floating_point() or group_ids.is_complex():
        raise InvalidInputError(
            f"group_ids must be an integer tensor (one prompt id per sample), got dtype {group_ids.dtype}"
        )
    unique, inverse = torch.unique(group_ids, return_inverse=True)
    return Groups(index=inverse.reshape(-1), num=int(unique.numel()))


def group_sum(values: torch.Tensor, groups: Groups) -> torch.Tensor:
    """Sum of ``values`` [B] (or [B, K]) within each group -> [Q] (or [Q, K])."""
    out = torch.zeros((groups.num, *values.shape[1:]), dtype=values.dtype, device=values.device)
    return out.index_add(0, groups.index, values)


def group_count(
    groups: Groups, weights: torch.Tensor | None = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Number of samples (or of samples with ``weights`` true) in each group -> [Q]."""
    ones = torch.ones(groups.index.shape[0], dtype=dtype, device=groups.index.device)
    if weights is not None:
        ones = weights.to(dtype)
    return group_sum(ones, groups)


def _flat_groups(
    values: torch.Tensor, groups: Groups, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(flat, level)`` per group [Q] (or [Q, K]): whether the (selected) values of the group are all
    equal (max == min; an empty group is not flat), and that common value. Differentiable: the
    gradient of ``level`` is shared evenly among the group's samples, as a mean's."""
    shape = (groups.num, *values.shape[1:])
    index = groups.index.view(-1, *([1] * (values.dim() - 1))).expand_as(values)
    inf = torch.full((), torch.inf, dtype=values.dtype, device=values.device)
    hi_src, lo_src = values, values
    if weights is not None:
        hi_src = torch.where(weights.bool(), values, -inf)
        lo_src = torch.where(weights.bool(), values, inf)
    hi = torch.full(shape, -torch.inf, dtype=values.dtype, device=values.device).scatter_reduce(
        0, index, hi_src, "amax"
    )
    lo = torch.full(shape, torch.inf, dtype=values.dtype, device=values.device).scatter_reduce(
        0, index, lo_src, "amin"
    )
    return hi == lo, lo


def group_mean(values: torch.Tensor, groups: Groups, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``values`` [B] within each group (over samples with ``weights`` true) -> [Q]; 0 if empty.

    A group whose values are all equal has exactly that value as its mean (a float sum of n equal
    values divided by n need not give it back: eight float32 rewards of 0.9 have a mean 3.6e-8 away,
    a std of 6e-8, and GRPO's (r - mean) / (std + 1e-6) would give every sample -0.056). So a flat
    group's deviations, variance and std are exactly 0, and so are its GRPO advantages.
    """
    count = group_count(groups, weights, values.dtype)
    if weights is not None:
        selected = torch.where(
            weights.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device)
        )
    else:
        selected = values
    mean = group_sum(selected, groups) / count.clamp(min=1.0)
    if not values.is_floating_point():
        return mean
    flat, level = _flat_groups(values, groups, weights)
    return torch.where(flat, level, mean)


def group_var(
    values: torch.Tensor, groups: Groups, unbiased: bool = True, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Variance within each group -> [Q]: sum (x - mean)^2 / (n - 1) if ``unbiased`` else / n.

    Groups with fewer than two (selected) samples get variance 0.
    """
    count = group_count(groups, weights, values.dtype)
    mean = group_mean(values, groups, weights)
    dev2 = (values - groups.gather(mean)) ** 2
    if weights is not None:
        dev2 = torch.where(weights.bool(), dev2, torch.zeros((), dtype=values.dtype, device=values.device))
    denom = count - 1.0 if unbiased else count
    var = group_sum(dev2, groups) / denom.clamp(min=1.0)
    return torch.where(count > 1.0, var, torch.zeros_like(var))


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt(max(x, 0)) with gradient 0 (not inf) where x <= 0."""
    positive = x > 0
    return torch.where(
        positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x)
    )


def group_std(
    values: torch.Tensor, groups: Groups, unbiased: bool = True, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Standard deviation within each group -> [Q] (0 for groups with fewer than two samples)."""
    return safe_sqrt(group_var(values, groups, unbiased, weights))


@dataclass(frozen=True)
class GroupStats:
    """Count, mean and standard deviation of one value per sample, per group."""

    groups: Groups
    count: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    @property
    def zero_std(self) -> torch.Tensor:
        """[Q] bool: groups whose values are all equal (includes single-sample groups)."""
        return self.std <= 0

    def zero_std_frac(self) -> torch.Tensor:
        """Fraction of groups with zero spread (TRL ``frac_reward_zero_std``)."""
        if self.groups.num == 0:
            return torch.zeros(())
        return self.zero_std.float().mean()


def group_stats(
    values: torch.Tensor, groups: Groups, unbiased: bool = True, weights: torch.Tensor | None = None
) -> GroupStats:
    """Count, mean and std (unbiased by default) of ``values`` [B] in each group."""
    return GroupStats(
        groups=groups,
        count=group_count(groups, weights, values.dtype),
        mean=group_mean(values, groups, weights),
        std=group_std(values, groups, unbiased, weights),
    )


def batch_mean_std(values: torch.Tensor, unbiased: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of ``values`` [B] over the whole batch (std 0 when fewer than two samples)."""
    n = values.shape[0]
    if n == 0:
        zero = torch.zeros((), dtype=values.dtype, device=values.device)
        return zero, zero
    mean = values.mean()
    denom = max(n - 1, 1) if unbiased else n
    var = ((values - mean) ** 2).sum() / denom
    return mean, safe_sqrt(var) if n > 1 else torch.zeros_like(var)


def verl_single_sample(stats: GroupStats) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (mean, std) with verl's convention: a single-sample group has mean 0 and std 1."""
    single = stats.count <= 1.0
    mean = torch.where(single, torch.zeros_like(stats.mean), stats.mean)
    std = torch.where(single, torch.ones_like(stats.std), stats.std)
    return stats.groups.gather(mean), stats.groups.gather(std)


def grpo_standardise(values: torch.Tensor, stats: GroupStats, eps: float = GRPO_EPS) -> torch.Tensor:
    """GRPO's (v - mean_g) / (std_g + eps) per sample [B] from ``stats`` of ``values`` (verl singletons)."""
    mean, std = verl_single_sample(stats)
    return (values - mean) / (std + eps)


def grpo_scores(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = GRPO_EPS) -> torch.Tensor:
    """GRPO scores of detached ``rewards`` [B]: unbiased group std, singletons use mean 0, std 1 (verl)."""
    r = rewards.detach()
    return grpo_standardise(r, group_stats(r, groups_of(group_ids, r.shape[0])), eps)
