"""Prompt streams: which prompts each RL step trains on (seeded, checkpointable)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tether.lm.tasks.base import Prompt


class PromptStream:
    """Shuffled passes over the train prompts.

    The order of pass ``e`` is a permutation seeded by (seed, e), so the whole state is the pass
    number and the cursor: a resumed run draws exactly the prompts it would have drawn.
    """

    def __init__(self, prompts: Sequence[Prompt], seed: int) -> None:
        if not prompts:
            raise ValueError("PromptStream needs at least one prompt")
        self.prompts = list(prompts)
        self.seed = seed
        self.epoch = 0
        self.cursor = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.prompts), generator=g).tolist()

    def next(self, n: int) -> list[Prompt]:
        out: list[Prompt] = []
        while len(out) < n:
            if self.cursor >= len(self._order):
                self.epoch += 1
                self.cursor = 0
                self._order = self._permutation(self.epoch)
            out.append(self.prompts[self._order[self.cursor]])
            self.cursor += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self._order = self._permutation(self.epoch)
