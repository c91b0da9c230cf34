"""Combining the metrics of several micro-batches into one per update, and of several optimizer
updates into one record per step.

Names ending in ``_max`` / ``_min`` (``policy/ratio_max``, ``gspo/seq_ratio_min``) are extremes:
the largest / smallest over the parts, never an average, which would hide the one part that blew up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def is_extreme(name: str) -> bool:
    """Whether ``name`` is a maximum or minimum (combined by max / min, not averaged)."""
    return name.endswith(("_max", "_min"))


def _extreme(name: str, values: Sequence[float]) -> float:
    return max(values) if name.endswith("_max") else min(values)


def combine_update_metrics(records: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """One value per metric over a step's updates: the mean, except extremes for names ending in
    ``_max`` (the largest) and ``_min`` (the smallest), e.g. ``policy/ratio_max``."""
    out: dict[str, float] = {}
    for key in sorted({k for r in records for k in r}):
        values = [r[key] for r in records if key in r]
        if is_extreme(key):
            out[key] = _extreme(key, values)
        else:
            out[key] = sum(values) / len(values)
    return out


def combine_micro_batch_metrics(
    parts: Sequence[tuple[float, float, Mapping[str, float]]],
) -> dict[str, float]:
    """One update's metrics from its micro-batches' ``(valid tokens, rows, metrics)``.

    - a name ending in ``loss`` is a partial sum under the mini-batch's aggregation: the parts add up;
    - ``_max`` / ``_min``: the extreme over the micro-batches that hold a valid token (a micro-batch
      without one reports placeholders such as ratio 1);
    - every other metric describes its micro-batch: the mean weighted by each micro-batch's share of
      the valid tokens (of the rows, when no micro-batch holds a valid token), over the micro-batches
      that report it.

    A single micro-batch's metrics come back unchanged (as ``0.0 + v``, what the trainer always
    logged: a -0.0 reads 0.0).
    """
    if len(parts) == 1:
        return {k: 0.0 + v for k, v in parts[0][2].items()}
    with_tokens = [p for p in parts if p[0] > 0]
    weighted = with_tokens or list(parts)
    out: dict[str, float] = {}
    for key in sorted({k for _, _, m in parts for k in m}):
        if key.endswith("loss"):
            out[key] = sum(m[key] for _, _, m in parts if key in m)
            continue
        if is_extreme(key):
            values = [m[key] for _, _, m in weighted if key in m] or [m[key] for _, _, m in parts if key in m]
            out[key] = _extreme(key, values)
            continue
        holders = [(t if with_tokens else r, m[key]) for t, r, m in weighted if key in m]
        if not holders:  # reported only by micro-batches without a valid token
            holders = [(r, m[key]) for _, r, m in parts if key in m]
        total = sum(w for w, _ in holders)
        value = 0.0
        for w, v in holders:
            value += v * (w / total if total > 0 else 1.0 / len(holders))
        out[key] = value
    return out
