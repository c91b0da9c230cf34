"""Example inputs for ``cpo_step`` beyond those of inputs_constraints.py (merged into inputs.MAKERS).

- ``episode_length``: T, the mean length of the episodes J_c was measured on, from 1 to ~1000 steps
  (a 0-dim tensor on odd seeds), so the rescaled b spans three orders of magnitude.
"""

from __future__ import annotations

from typing import Any

import torch

from tests.catalogue.inputs import Ctx, Maker


def _episode_length(c: Ctx) -> Any:
    value = 1.0 + float(c.rand(1).item()) * 999.0
    return torch.tensor(value, dtype=torch.float64) if c.spec.seed % 2 else value


MAKERS: dict[str, Maker] = {"episode_length": _episode_length}
