"""Knapsack RL: per-prompt rollout budgets from each prompt's success rate at its previous visit."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import torch

from tether.catalogue import get
from tether.errors import TetherError
from tether.lm.loop._groups import group_rows
from tether.lm.plugins import LoopPlugin, Rollout, check_param, register_plugin
from tether.lm.tasks.base import Prompt

if TYPE_CHECKING:
    from tether.lm.config import LMConfig
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
    fewer (rewards are clipped to [0, 1], the code's -1 -> 0). A failed verification is no reward: it
    is not recorded (a prompt whose every sample failed keeps its history). Prompts given 0 rollouts
    are skipped. The state (rewards per prompt id) is checkpointed.
    """

    paper = "Knapsack RL: Unlocking Exploration of LLMs via Optimizing Budget Allocation"
    arxiv = "2509.25849"
    status = "exact"
    dynamic_sampling_conflict = (
        "dynamic sampling drops the groups whose rewards are all equal before the plugin records them, "
        "so the p = 0 and p = 1 prompts the budget is about are never seen, and its refills add rollouts "
        "beyond the knapsack budget"
    )

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
        check_param(min_n >= 1, "min_n", min_n, "must be >= 1")
        check_param(max_n >= min_n, "max_n", max_n, f"must be >= min_n ({min_n})")
        check_param(negative_n >= 0, "negative_n", negative_n, "must be >= 0")
        check_param(positive_n >= 0, "positive_n", positive_n, "must be >= 0")
        check_param(
            cost in ("probability", "expectation"), "cost", cost, "must be 'probability' or 'expectation'"
        )
        check_param(0.0 < alpha_c < 1.0, "alpha_c", alpha_c, "must be in (0, 1)")
        check_param(buffer >= 1, "buffer", buffer, "must be >= 1")
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

    def check_config(self, config: LMConfig) -> None:
        n = config.train.group_size
        for key in ("min_n", "negative_n", "positive_n"):
            if self.params[key] > n:
                raise TetherError(
                    f"loop plugin 'knapsack': method.knapsack.{key}={self.params[key]} exceeds "
                    f"train.group_size={n}, the default rollouts per prompt whose total the knapsack "
                    f"shares out; lower it or raise train.group_size"
                )

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
            scored = [i for i in rows if rollout.scores[i].error is None]  # an error is no reward
            if not scored:
                continue
            rewards = [min(1.0, max(0.0, float(rollout.scores[i].reward))) for i in scored]
            pid = rollout.prompts[rows[0]].id
            kept = self.history.get(pid, []) + rewards
            self.history[pid] = kept[-max(self.buffer, len(rewards)) :]
        metrics.update(self._metrics)
        metrics["knapsack/seen_prompts"] = float(len(self.history))

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {str(k): [float(x) for x in v] for k, v in state.get("history", {}).items()}
