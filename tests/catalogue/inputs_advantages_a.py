"""Example inputs for the advantage estimators of tether.catalogue.advantages (set A).

- ``tracker_alpha`` / ``tracker_beta`` [B]: SPO's per-prompt Beta tracker values (positive).
- ``truncated`` [B] bool: Latent-GRPO's invalid (truncated) samples.
- ``accuracy`` [B]: DGPO's optional accuracy reward (binary).
"""

from __future__ import annotations

from tests.catalogue.inputs import Maker

MAKERS: dict[str, Maker] = {
    "tracker_alpha": lambda c: 0.5 + 4.0 * c.rand(c.spec.batch),
    "tracker_beta": lambda c: 0.5 + 4.0 * c.rand(c.spec.batch),
    "truncated": lambda c: c.rand(c.spec.batch) < 0.3,
    "accuracy": lambda c: (c.rand(c.spec.batch) > 0.5).double(),
}
