"""Example inputs for estimators of several reward functions (GDPO: per-function rewards and
weights) and for baselines from extra responses (ReMax: the greedy response's reward)."""

from __future__ import annotations

import torch

from tests.catalogue.inputs import Ctx, Maker


def _reward_parts(c: Ctx) -> torch.Tensor:
    parts = (c.rand(c.spec.batch, 3) > 0.5).double()
    parts[1, 2] = float("nan")  # a function that gave None for one sample
    return parts


MAKERS: dict[str, Maker] = {
    "reward_parts": _reward_parts,
    "reward_weights": lambda c: (1.0, 0.5, 2.0),
    "baseline_rewards": lambda c: (c.rand(c.spec.batch) > 0.5).double(),
}
