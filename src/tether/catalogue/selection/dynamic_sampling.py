"""DAPO's dynamic sampling: drop groups whose rewards carry no learning signal."""

from __future__ import annotations

from typing import Literal

import torch

from tether.catalogue.advantages.broadcast import check_per_sample
from tether.catalogue.advantages.group_stats import groups_of
from tether.catalogue.contracts import Metrics, detached
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


@register(
    "selection",
    "dynamic_sampling",
    paper="DAPO: An Open-Source LLM Reinforcement Learning System at Scale",
    arxiv="2503.14476",
    status="exact",
    card="ratio#B5",
)
def dynamic_sampling(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    drop: Literal["all_equal", "all_correct"] = "all_equal",
    correct_threshold: float = 0.5,
) -> tuple[torch.Tensor, Metrics]:
    """DAPO dynamic sampling: keep only groups whose rewards differ (nonzero group std).

    Paper: Yu et al., "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", arXiv
    2503.14476 (part d). Exact (the filter; re-generating until the batch is full is the trainer's).

    keep_i = not (max_g r == min_g r) for the group g of sample i ("all_equal", DAPO).
    "all_correct" drops only groups whose rewards are all equal AND correct (> correct_threshold),
    keeping all-wrong groups (NGRPO's filter, whose virtual max sample gives them a signal).
    Returns a [batch] bool keep mask.
    """
    check_per_sample("rewards", rewards)
    groups = groups_of(group_ids, rewards.shape[0])
    if drop not in ("all_equal", "all_correct"):
        raise InvalidInputError(f"dynamic_sampling: drop must be 'all_equal' or 'all_correct', got {drop!r}")
    r = rewards.detach()
    inverse, n = groups.index, groups.num
    g_max = torch.full((n,), -torch.inf, dtype=r.dtype, device=r.device).scatter_reduce(0, inverse, r, "amax")
    g_min = torch.full((n,), torch.inf, dtype=r.dtype, device=r.device).scatter_reduce(0, inverse, r, "amin")
    flat = g_max == g_min
    if drop == "all_correct":
        flat = flat & (g_min > correct_threshold)
    keep = ~flat[inverse]
    metrics: Metrics = {
        "selection/kept_frac": detached(keep.float().mean() if keep.numel() else torch.zeros(())),
        "selection/kept_groups": detached(float((~flat).sum().item())),
    }
    return keep, metrics
