"""Per-group statistics and token broadcasting used by the advantage, reward and selection entries
of RiskPO, ACE, CAPO, ProGRPO, DCPO, VERL, RLVMR, pairing, GCPO and the selection rules.

Private to those modules (the registry skips modules whose name starts with ``_``). Group std is
the unbiased one (torch.std, verl/TRL); a group with a single sample uses mean 0 and std 1, as verl.
"""

from __future__ import annotations

import torch

from tether.catalogue.contracts import check_groups, token_advantages
from tether.errors import InvalidInputError

GRPO_EPS = 1e-6


def group_inverse(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Dense group index 0..n-1 per sample, and the number of groups."""
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(uniq.numel())


def group_sum(values: torch.Tensor, inverse: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Sum of ``values`` [B] per group -> [num_groups]."""
    out = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
    return out.index_add(0, inverse, values)


def group_mean_std(
    values: torch.Tensor, group_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample group mean, unbiased group std and group size (each [B]); std is 0 for size 1."""
    inverse, n = group_inverse(group_ids)
    ones = torch.ones_like(values)
    count = group_sum(ones, inverse, n)
    mean = group_sum(values, inverse, n) / count
    dev = values - mean[inverse]
    var = group_sum(dev * dev, inverse, n) / (count - 1.0).clamp(min=1.0)
    std = torch.sqrt(var.clamp(min=0.0))
    return mean[inverse], std[inverse], count[inverse]


def grpo_scores(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = GRPO_EPS) -> torch.Tensor:
    """GRPO's (r - mean_g) / (std_g + eps) per sample [B]; singletons use mean 0, std 1 (verl)."""
    r = rewards.detach()
    mean, std, count = group_mean_std(r, group_ids)
    single = count < 2
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    return (r - mean) / (std + eps)


def check_rewards(rewards: torch.Tensor, group_ids: torch.Tensor | None = None) -> None:
    if rewards.dim() != 1:
        raise InvalidInputError(f"rewards must be a [batch] tensor, got shape {tuple(rewards.shape)}")
    if group_ids is not None:
        check_groups(group_ids, rewards.shape[0])


def check_mask(response_mask: torch.Tensor, batch: int) -> None:
    if response_mask.dim() != 2 or response_mask.shape[0] != batch:
        raise InvalidInputError(
            f"response_mask must be a [batch, tokens] tensor with batch {batch}, got {tuple(response_mask.shape)}"
        )


def to_tokens(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Broadcast [B] (or pass [B, T]) values to [B, T], exactly zero on padding, detached."""
    full = token_advantages(values.detach(), response_mask)
    return torch.where(response_mask.bool(), full, torch.zeros((), dtype=full.dtype, device=full.device))


def masked_seq_mean(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the valid tokens of each row [B]; 0 for an all-padding row."""
    valid = response_mask.bool()
    zeros = torch.zeros((), dtype=values.dtype, device=values.device)
    total = torch.where(valid, values, zeros).sum(-1)
    return total / valid.sum(-1).clamp(min=1).to(values.dtype)
