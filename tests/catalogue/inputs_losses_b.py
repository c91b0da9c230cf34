"""Example-input makers for the loss entries real, rover, pacs, flow_of_reasoning, dypo, opmd, calibrl, herl."""

from __future__ import annotations

import torch

from tests.catalogue.inputs import Ctx, Maker


def _logp_like(c: Ctx) -> torch.Tensor:
    s = c.spec
    return -(c.rand(s.batch, s.tokens) * (50.0 if s.extreme else 3.0) + 1e-3)


def _off_policy_mask(c: Ctx) -> torch.Tensor:
    mask = c.rand(c.spec.batch) < 0.3
    mask[0] = True  # at least one rewrite row
    if c.spec.batch > 1:
        mask[1] = False  # and at least one on-policy row
    return mask


MAKERS: dict[str, Maker] = {
    # the expert trajectory's old log-probs, aligned by position with each sample (CalibRL)
    "expert_old_logprobs": _logp_like,
    # log-probs of hindsight rewrites under the policy that wrote them (HeRL)
    "behavior_logprobs": _logp_like,
    # [B] bool: rows that are off-policy rewrites (HeRL)
    "off_policy_mask": _off_policy_mask,
    # learned log-partition of trajectory balance (Flow of Reasoning), one per row
    "log_z": lambda c: (c.randn(c.spec.batch) + 5.0).requires_grad_(True),
}
