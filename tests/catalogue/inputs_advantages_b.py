"""Example inputs for RiskPO, DCPO, RLVMR, GCPO and Knapsack (advantages / rewards / selection, part b)."""

from __future__ import annotations

import torch

from tests.catalogue.inputs import Ctx, Maker


def _bundle_ids(c: Ctx) -> torch.Tensor:
    return torch.arange(c.spec.groups).repeat_interleave(c.spec.group_size) // 2


def _sample_index(c: Ctx) -> torch.Tensor:
    return torch.arange(c.spec.group_size).repeat(c.spec.groups)


def _step_tags(c: Ctx) -> torch.Tensor:
    return torch.randint(0, 4, (c.spec.batch, c.spec.tokens), generator=c.gen)


def _success_rates(c: Ctx) -> torch.Tensor:
    p = c.rand(c.spec.batch)
    p[0] = 0.0
    p[1] = 1.0
    if c.spec.batch > 2:
        p[2] = float("nan")
    return p


MAKERS: dict[str, Maker] = {
    "bundle_ids": _bundle_ids,
    "sample_index": _sample_index,
    "step_tags": _step_tags,
    "step_rewards": lambda c: (c.rand(c.spec.batch, c.spec.tokens) > 0.5).double(),
    "current_entropy": lambda c: float(c.rand(1).item()),
    "uses_aux": lambda c: c.rand(c.spec.batch) > 0.5,
    "success_rates": _success_rates,
}
