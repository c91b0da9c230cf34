"""Rows of each group of a rollout, in order of first appearance (shared by the loop plugins)."""

from __future__ import annotations

import torch


def group_rows(group_ids: torch.Tensor) -> list[list[int]]:
    """Row indices of each group, groups ordered by their first row, rows in batch order."""
    order: dict[int, list[int]] = {}
    for row, gid in enumerate(group_ids.tolist()):
        order.setdefault(int(gid), []).append(row)
    return list(order.values())
