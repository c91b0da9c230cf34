"""Example inputs for the regularizers' state and side inputs (merged into inputs.MAKERS).

- ``anchor_entropy`` (SIREN's H0) and ``smoothed_kl`` (SAFE's previous KL_s): state floats.
  ``smoothed_kl`` = 1.0 keeps SAFE's penalty active (KL_s > tau = 0.3) so its gradient is tested.
- ``historical_entropy`` (EPO): one history value per sample, [B], detached.
- ``aug_logprobs`` (PAPO): log-probs under the masked image; differentiable (recomputed case).
- ``distinctiveness`` (DSDR): [B] in [0, 1].
"""

from __future__ import annotations

import torch

from tests.catalogue.inputs import Ctx, Maker


def _aug_logprobs(c: Ctx) -> torch.Tensor:
    s = c.spec
    if s.extreme:
        base = -(c.rand(s.batch, s.tokens) * 50.0 + 1e-3)
    else:
        base = (c.get("logprobs").detach() + 0.5 * c.randn(s.batch, s.tokens)).clamp(max=-1e-4)
    return base.requires_grad_(True)


MAKERS: dict[str, Maker] = {
    "anchor_entropy": lambda c: 0.5,
    "smoothed_kl": lambda c: 1.0,
    "historical_entropy": lambda c: 0.5 + c.rand(c.spec.batch),
    "aug_logprobs": _aug_logprobs,
    "distinctiveness": lambda c: c.rand(c.spec.batch),
}
