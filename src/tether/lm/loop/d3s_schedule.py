"""D^3S's schedule: dual-level down-sampling whose keep ratios rise to 1 over training."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import torch

from tether.catalogue import get
from tether.lm.logprobs import completion_logprobs
from tether.lm.plugins import LoopPlugin, Rollout, check_param, register_plugin

if TYPE_CHECKING:
    from tether.lm.trainer import RLTrainer


@register_plugin("d3s_schedule")
class DownSamplingSchedule(LoopPlugin):
    """D^3S: keep the max-variance rollouts and their top |A| x H tokens, relaxing to all over training.

    Paper: "Learning More with Less: A Dynamic Dual-Level Down-Sampling Framework for Efficient Policy
    Optimization", arXiv 2509.22115. Reconstructed (no public code; card adv#B5): the selection is the
    registered ``selection`` entry ``d3s``; the schedule and its start values are our reading.

    At step s (``trainer.step_idx``), kappa_sample and kappa_token rise from kappa_sample_0 and
    kappa_token_0 to 1 over ``schedule_steps`` steps ("linear": k0 + (1 - k0) min(1, s/S); "cosine":
    k0 + (1 - k0)(1 - cos(pi min(1, s/S)))/2). In ``after_advantages`` the behaviour policy's entropy is
    computed (one no-grad forward pass, skipped once both kappas are 1) and the ``d3s`` token mask is
    AND-ed into ``inputs["response_mask"]``, so the loss's token normaliser counts the kept tokens.
    Advantages are not recomputed. Metrics: d3s/kappa_sample, d3s/kappa_token, selection/*.
    """

    paper = "Learning More with Less: A Dynamic Dual-Level Down-Sampling Framework for Efficient Policy Optimization"
    arxiv = "2509.22115"
    status = "reconstructed"

    def __init__(
        self,
        kappa_sample_0: float = 0.5,
        kappa_token_0: float = 0.5,
        schedule_steps: int = 100,
        schedule: Literal["linear", "cosine"] = "linear",
        scope: Literal["group", "batch"] = "group",
    ) -> None:
        for name, k in (("kappa_sample_0", kappa_sample_0), ("kappa_token_0", kappa_token_0)):
            check_param(0.0 < k <= 1.0, name, k, "must be in (0, 1]")
        check_param(schedule_steps >= 0, "schedule_steps", schedule_steps, "must be >= 0")
        check_param(schedule in ("linear", "cosine"), "schedule", schedule, "must be 'linear' or 'cosine'")
        check_param(scope in ("group", "batch"), "scope", scope, "must be 'group' or 'batch'")
        self.k0 = (kappa_sample_0, kappa_token_0)
        self.schedule_steps = schedule_steps
        self.schedule = schedule
        self.scope = scope
        self._metrics: dict[str, float] = {}

    def kappas(self, step: int) -> tuple[float, float]:
        """(kappa_sample, kappa_token) at step ``step``."""
        frac = 1.0 if self.schedule_steps == 0 else min(1.0, max(0, step) / self.schedule_steps)
        ramp = frac if self.schedule == "linear" else (1.0 - math.cos(math.pi * frac)) / 2.0
        return tuple(min(1.0, k + (1.0 - k) * ramp) for k in self.k0)  # type: ignore[return-value]

    def after_advantages(self, trainer: RLTrainer, rollout: Rollout, inputs: dict[str, Any]) -> None:
        ks, kt = self.kappas(trainer.step_idx)
        self._metrics = {"d3s/kappa_sample": ks, "d3s/kappa_token": kt}
        if ks >= 1.0 and kt >= 1.0:
            return
        mask, metrics = get("selection", "d3s").fn(
            inputs["advantages"],
            inputs["group_ids"],
            self.entropy(trainer, rollout),
            inputs["response_mask"],
            kappa_sample=ks,
            kappa_token=kt,
            scope=self.scope,
        )
        inputs["response_mask"] = inputs["response_mask"] & mask.to(inputs["response_mask"].device)
        self._metrics.update({k: float(v) for k, v in metrics.items()})

    @staticmethod
    def entropy(trainer: RLTrainer, rollout: Rollout) -> torch.Tensor:
        """Entropy [N, T] of the behaviour (current, not yet updated) policy, no gradient."""
        batch, s = rollout.batch, trainer.config.sampling
        size = trainer.config.train.micro_batch_size or len(batch)
        dev = trainer.device
        parts = []
        was_training = trainer.model.training
        trainer.model.eval()
        with torch.no_grad():
            for start in range(0, len(batch), size):
                rows = slice(start, start + size)
                _, ent = completion_logprobs(
                    trainer.model,
                    batch.prompt_ids[rows].to(dev),
                    batch.prompt_mask[rows].to(dev),
                    batch.completion_ids[rows].to(dev),
                    batch.completion_mask[rows].to(dev),
                    temperature=s.temperature,
                    top_k=s.top_k,
                    top_p=s.top_p,
                    compute_entropy=True,
                )
                assert ent is not None
                parts.append(ent.float().cpu())
        trainer.model.train(was_training)
        return torch.cat(parts)

    def after_step(
        self, trainer: RLTrainer, rollout: Rollout, inputs: dict[str, Any], metrics: dict[str, float]
    ) -> None:
        metrics.update(self._metrics)
