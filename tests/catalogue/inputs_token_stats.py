"""Example inputs built from the old policy's distribution per token (OTB's ``sum_pi_squared``)."""

from __future__ import annotations

import torch

from tests.catalogue.inputs import Ctx, Maker


def _sum_pi_squared(c: Ctx) -> torch.Tensor:
    """A value sum_v pi(v)^2 that some distribution over ``vocab`` entries could have, given the
    old probability p of the sampled token: p^2 + (1 - p)^2 s with s in [1 / (V - 1), 1]."""
    p = c.get("old_logprobs").detach().exp()
    floor = 1.0 / (c.spec.vocab - 1)
    s = floor + (1.0 - floor) * c.rand(c.spec.batch, c.spec.tokens)
    return p**2 + (1.0 - p) ** 2 * s


MAKERS: dict[str, Maker] = {"sum_pi_squared": _sum_pi_squared}
