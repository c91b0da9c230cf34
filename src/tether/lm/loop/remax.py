"""ReMax's baseline: one greedy response per prompt, scored like the samples."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from tether.lm.plugins import LoopPlugin, Rollout, register_plugin
from tether.lm.rollout import greedy
from tether.lm.tasks.base import safe_score_batch

if TYPE_CHECKING:
    from tether.lm.trainer import RLTrainer


@register_plugin("remax")
class GreedyBaseline(LoopPlugin):
    """ReMax: before the update, generate the policy's greedy response to each prompt of the step
    and score it; its reward is the ``baseline_rewards`` input of the ``remax`` advantage.

    Paper: Li et al., "ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for
    Aligning Large Language Models", arXiv 2310.10505 (Algorithm 1, lines 4-6). Exact.

    Greedy is argmax decoding (top_k=1) at the step's sampling settings otherwise (max_new_tokens),
    with the trainer's sampler (so a vLLM engine is reused), one response per distinct prompt: the
    cost is one extra sample per prompt. A greedy response whose verifier fails gives a NaN baseline
    (that prompt's samples then get advantage 0). Stateless: nothing to checkpoint. Logs
    ``remax/greedy_reward`` (mean over prompts) and ``remax/greedy_errors``.
    """

    provides = ("baseline_rewards",)
    per_row = ("baseline_rewards",)
    paper = "ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for Aligning Large Language Models"
    arxiv = "2310.10505"
    status = "exact"

    def __init__(self) -> None:
        self._metrics: dict[str, float] = {}

    def extra_inputs(self, trainer: RLTrainer, rollout: Rollout, inputs: dict[str, Any]) -> None:
        ids = rollout.group_ids.tolist()
        first: dict[int, int] = {}
        for row, gid in enumerate(ids):
            first.setdefault(gid, row)
        prompts = [rollout.prompts[row] for row in first.values()]
        argmax = trainer.sampler.with_config(greedy(trainer.config.sampling))
        # its own generator: argmax decoding draws no randomness that matters, and the trainer's
        # stream (which orders mini-batches) stays that of a run without the plugin
        batch = argmax.generate([p.text for p in prompts], generator=torch.Generator().manual_seed(0))
        scores = safe_score_batch(trainer.task, prompts, batch.completion_texts)
        value = {gid: (math.nan if s.error else s.reward) for gid, s in zip(first, scores)}
        inputs["baseline_rewards"] = torch.tensor([value[g] for g in ids], dtype=torch.float64)
        known = [v for v in value.values() if not math.isnan(v)]
        self._metrics = {
            "remax/greedy_reward": sum(known) / len(known) if known else math.nan,
            "remax/greedy_errors": float(len(value) - len(known)),
        }

    def after_step(
        self, trainer: RLTrainer, rollout: Rollout, inputs: dict[str, Any], metrics: dict[str, float]
    ) -> None:
        metrics.update(self._metrics)
