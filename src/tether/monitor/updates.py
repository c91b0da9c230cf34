"""Combining the metrics of several optimizer updates into one record per step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def combine_update_metrics(records: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """One value per metric over a step's updates: the mean, except extremes for names ending in
    ``_max`` (the largest) and ``_min`` (the smallest), e.g. ``policy/ratio_max``."""
    out: dict[str, float] = {}
    for key in sorted({k for r in records for k in r}):
        values = [r[key] for r in records if key in r]
        if key.endswith("_max"):
            out[key] = max(values)
        elif key.endswith("_min"):
            out[key] = min(values)
        else:
            out[key] = sum(values) / len(values)
    return out
