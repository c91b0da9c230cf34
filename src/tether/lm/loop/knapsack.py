"""Knapsack RL: per-prompt rollout budgets from each prompt's success rate at its previous visit."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import torch

from tether.catalogue import get
from tether.lm.loop._groups import group_rows
from tether.lm.plugins import LoopPlugin, Rollout, register_plugin
from tether.lm.tasks.base import Prompt

if TYPE_CHECKING:
    from tether.lm.trainer import RLTrainer


@register_plugin("knapsack")
class KnapsackBudget(LoopPlugin):
    """Knapsack RL: allocate the step's rollouts (prompts_per_step x group_size) across prompts.

    Paper: Li et al., "Knapsack RL: Unlocking Exploration of LLMs via Optimizing Budget Allocation",
    arXiv 2509.25849. Exact (liziniu/KnapsackRL; the allocation is the registered ``selection``
    entry ``knapsack``, card adv#B6).

    ``plan`` draws the next ``prompts_per_step`` prompts of the trainer's prompt stream and asks the
    ``knapsack`` entry for their rollout counts (sum = prompts_per_step x group_size; unseen prompts
    get the default group_size, p = 0 prompts ``negative_n``, p = 1 prompts ``positive_n``, the rest a
    knapsack DP). ``after_step`` records each prompt's rewards by ``Prompt.id``: p is the success rate
    of the prompt's previous visit, or the mean of its latest ``buffer`` rewards when that visit had
    fewer (rewards are clipped to [0, 1], the code's -1 -> 0). Prompts given 0 rollouts are skipped.
    The state (rewards per prompt id) is checkpointed.
    """

    paper = "Knapsack RL: Unlocking Exploration of LLMs via Optimizing Budget Allocation"
    arxiv = "2509.25849"
    status = "exact"

    def __init__(
        self,
        min_n: int = 2,
        negative_n: int = 2,
        positive_n: int = 2,
        max_n: int = 128,
        cost: Literal["probability", "expectation"] = "probability",
        alpha_c: float = 0.9,
        fallback: bool = True,
        buffer: int = 16,
    ) -> None:
        if buffer < 1:
            raise ValueError(f"buffer must be >= 1, got {buffer}")
        self.params: dict[str, Any] = {
            "min_n": min_n,
            "negative_n": negative_n,
            "positive_n": positive_n,
            "max_n": max_n,
            "cost": cost,
            "alpha_c": alpha_c,
            "fallback": fallback,
        }
        self.buffer = buffer
        self.history: dict[str, list[float]] = {}  # prompt id -> latest rewards
        self._metrics: dict[str, float] = {}

    def success_rate(self, prompt_id: str) -> float:
        """The prompt's success-rate estimate, NaN when it was never seen."""
        rewards = self.history.get(prompt_id)
        return sum(rewards) / len(rewards) if rewards else math.nan

    def plan(self, trainer: RLTrainer, n: int, group_size: int) -> list[tuple[Prompt, int]] | None:
        prompts = trainer.prompts.next(n)
        rates = torch.tensor([self.success_rate(p.id) for p in prompts], dtype=torch.float64)
        counts, metrics = get("selection", "knapsack").fn(rates, n=group_size, **self.params)
        self._metrics = {k: float(v) for k, v in metrics.items()}
        return [(p, int(k)) for p, k in zip(prompts, counts.tolist()) if k > 0]

    def after_step(
        self, trainer: RLTrainer, rollout: Rollout, inputs: dict[str, Any], metrics: dict[str, float]
    ) -> None:
        for rows in group_rows(rollout.group_ids):
            rewards = [min(1.0, max(0.0, float(rollout.scores[i].reward))) for i in rows]
            pid = rollout.prompts[rows[0]].id
            kept = self.history.get(pid, []) + rewards
            self.history[pid] = kept[-max(self.buffer, len(rewards)) :]
        metrics.update(self._metrics)
        metrics["knapsack/seen_prompts"] = float(len(self.history))

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {str(k): [float(x) for x in v] for k, v in state.get("history", {}).items()}
