"""SPO: group-free single-stream sampling with per-prompt Beta value trackers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch

from tether.catalogue.advantages.spo import spo_divergence, spo_tracker_init, spo_tracker_update
from tether.lm.plugins import LoopPlugin, Rollout, check_param, register_plugin
from tether.lm.rollout import RolloutBatch
from tether.lm.tasks.base import Prompt

if TYPE_CHECKING:
    from tether.lm.trainer import RLTrainer


@register_plugin("spo")
class SingleStream(LoopPlugin):
    """SPO: prioritised single-sample prompts, Beta trackers as the baseline, KL-adaptive forgetting.

    Paper: "Single-stream Policy Optimization", arXiv 2509.13232. Reconstructed (cards adv#B30 and
    ratio#20; the tracker and the sampler are from the paper text, the loss is verl's recipe/spo).

    - ``plan``: draws prompts without replacement with probability proportional to
      sqrt(p_hat (1 - p_hat)) + eps_s (p_hat = alpha/(alpha + beta)) from ``trainer.generator``, ONE
      sample each (group-free: every row is its own group). ``batch="samples"`` draws
      prompts_per_step x group_size prompts (the same rollouts as a grouped method with that config),
      ``batch="prompts"`` draws prompts_per_step. ``train.group_size`` only sets that budget. A pool
      smaller than the budget is drawn from with replacement (still the whole budget of rows).
    - ``extra_inputs``: ``tracker_alpha``, ``tracker_beta`` [N] (before this step's update) for the
      ``spo`` advantage; unseen prompts start at spo_tracker_init(init_rate n0, n0, rho_min)
      (the paper's offline estimate is replaced by the prior rate ``init_rate``: reconstructed).
      It also computes D = mean_t |lp_then - lp_now| on the response stored at the prompt's previous
      visit, lp_now under the policy that sampled this step (before the update); D = 0 at a first visit.
    - ``after_step``: alpha, beta <- spo_tracker_update(alpha, beta, r, D) (the registered state
      update of ``spo``), then stores this visit's prompt tokens, response tokens and old log-probs.
      A failed verification is no reward: its row changes neither the tracker nor the stored visit.
    The state (trackers and last responses, per prompt id) is checkpointed; it grows with the number
    of prompts visited (one stored response each).
    """

    provides = ("tracker_alpha", "tracker_beta")
    per_row = ("tracker_alpha", "tracker_beta")
    dynamic_sampling_conflict = (
        "every prompt has one sample, so every group's rewards are equal and dynamic sampling would drop "
        "them all before the trackers see them"
    )
    paper = "Single-stream Policy Optimization"
    arxiv = "2509.13232"
    status = "reconstructed"

    def __init__(
        self,
        eps_s: float = 0.05,
        d_half: float = 0.06,
        rho_min: float = 0.875,
        rho_max: float = 0.96,
        init_rate: float = 0.5,
        init_samples: int = 8,
        batch: Literal["samples", "prompts"] = "samples",
    ) -> None:
        check_param(eps_s >= 0, "eps_s", eps_s, "must be >= 0")
        check_param(d_half > 0, "d_half", d_half, "must be > 0 (the divergence that halves the memory)")
        check_param(0.0 < rho_min < 1.0, "rho_min", rho_min, "must be in (0, 1) (a forgetting factor)")
        check_param(
            rho_min <= rho_max <= 1.0, "rho_max", rho_max, f"must be in [rho_min, 1] = [{rho_min}, 1]"
        )
        check_param(0.0 <= init_rate <= 1.0, "init_rate", init_rate, "must be in [0, 1]")
        check_param(init_samples >= 1, "init_samples", init_samples, "must be >= 1")
        check_param(batch in ("samples", "prompts"), "batch", batch, "must be 'samples' or 'prompts'")
        self.eps_s = eps_s
        self.update_params = {"d_half": d_half, "rho_min": rho_min, "rho_max": rho_max}
        a0, b0 = spo_tracker_init(torch.tensor([init_rate * init_samples]), init_samples, rho_min)
        self.init = (float(a0[0]), float(b0[0]))
        self.batch = batch
        self.trackers: dict[str, list[float]] = {}  # prompt id -> [alpha, beta]
        # prompt id -> {"prompt": token ids, "completion": token ids, "logprobs": log-probs then}
        self.last: dict[str, dict[str, list[Any]]] = {}
        self._divergence: torch.Tensor | None = None

    def tracker(self, prompt_id: str) -> tuple[float, float]:
        a, b = self.trackers.get(prompt_id, self.init)
        return float(a), float(b)

    def plan(self, trainer: RLTrainer, n: int, group_size: int) -> list[tuple[Prompt, int]] | None:
        pool = trainer.prompts.prompts
        want = n * group_size if self.batch == "samples" else n
        ab = torch.tensor([self.tracker(p.id) for p in pool], dtype=torch.float64)
        p_hat = ab[:, 0] / ab.sum(-1)
        weights = (p_hat * (1.0 - p_hat)).clamp(min=0.0).sqrt() + self.eps_s
        if float(weights.sum()) <= 0.0:
            weights = torch.ones_like(weights)
        # Without replacement while the pool covers the budget; a smaller pool is drawn with
        # replacement, still ``want`` rows.
        picks = torch.multinomial(weights, want, replacement=want > len(pool), generator=trainer.generator)
        return [(pool[i], 1) for i in picks.tolist()]

    def extra_inputs(self, trainer: RLTrainer, rollout: Rollout, inputs: dict[str, Any]) -> None:
        ab = torch.tensor([self.tracker(p.id) for p in rollout.prompts], dtype=torch.float32)
        inputs["tracker_alpha"] = ab[:, 0]
        inputs["tracker_beta"] = ab[:, 1]
        self._divergence = self.divergence(trainer, rollout.prompts)

    def divergence(self, trainer: RLTrainer, prompts: list[Prompt]) -> torch.Tensor:
        """D per row: mean |lp_then - lp_now| on each prompt's stored response (0 if none)."""
        out = torch.zeros(len(prompts), dtype=torch.float64)
        rows = [i for i, p in enumerate(prompts) if p.id in self.last]
        if not rows:
            return out
        stored = [self.last[prompts[i].id] for i in rows]
        batch = _stored_batch(stored, trainer)
        lp_now = trainer._no_grad_logprobs(trainer.model, batch)[0]
        width = batch.completion_ids.shape[1]
        then = torch.zeros((len(rows), width), dtype=torch.float32)
        for j, s in enumerate(stored):
            then[j, : len(s["logprobs"])] = torch.tensor(s["logprobs"], dtype=torch.float32)
        d = spo_divergence(then.double(), lp_now.double(), batch.completion_mask)
        out[torch.tensor(rows)] = d
        return out

    def after_step(
        self, trainer: RLTrainer, rollout: Rollout, inputs: dict[str, Any], metrics: dict[str, float]
    ) -> None:
        revisit = [p.id in self.last for p in rollout.prompts]
        rewards = inputs["rewards"].detach().double().clamp(0.0, 1.0)
        divergence = self._divergence if self._divergence is not None else torch.zeros(len(rollout))
        batch = rollout.batch
        old = inputs["old_logprobs"]
        scored = rollout.scored
        for i, prompt in enumerate(rollout.prompts):  # sequential: a prompt may appear twice
            if not bool(scored[i]):  # a failed verification is no reward: nothing to learn from it
                continue
            a, b = self.tracker(prompt.id)
            na, nb = spo_tracker_update(
                torch.tensor([a], dtype=torch.float64),
                torch.tensor([b], dtype=torch.float64),
                rewards[i : i + 1],
                divergence[i : i + 1],
                **self.update_params,
            )
            self.trackers[prompt.id] = [float(na[0]), float(nb[0])]
            pm, cm = batch.prompt_mask[i], batch.completion_mask[i]
            self.last[prompt.id] = {
                "prompt": batch.prompt_ids[i][pm].tolist(),
                "completion": batch.completion_ids[i][cm].tolist(),
                "logprobs": old[i][cm].float().tolist(),
            }
        self._divergence = None
        metrics["spo/divergence_mean"] = float(divergence.mean()) if len(divergence) else 0.0
        metrics["spo/revisit_frac"] = sum(revisit) / max(len(revisit), 1)
        metrics["spo/tracked_prompts"] = float(len(self.trackers))

    def state_dict(self) -> dict[str, Any]:
        return {"trackers": {k: list(v) for k, v in self.trackers.items()}, "last": self.last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trackers = {str(k): [float(x) for x in v] for k, v in state.get("trackers", {}).items()}
        self.last = {
            str(k): {
                "prompt": [int(x) for x in v["prompt"]],
                "completion": [int(x) for x in v["completion"]],
                "logprobs": [float(x) for x in v["logprobs"]],
            }
            for k, v in state.get("last", {}).items()
        }


def _stored_batch(stored: list[dict[str, list[Any]]], trainer: RLTrainer) -> RolloutBatch:
    """A RolloutBatch of stored (prompt, completion) token lists: prompts left-, completions right-padded."""
    pad = int(getattr(trainer.sampler, "pad_id", 0))
    n = len(stored)
    p_width = max(len(s["prompt"]) for s in stored)
    c_width = max(max(len(s["completion"]) for s in stored), 1)
    prompt_ids = torch.full((n, p_width), pad, dtype=torch.long)
    prompt_mask = torch.zeros((n, p_width), dtype=torch.bool)
    completion_ids = torch.full((n, c_width), pad, dtype=torch.long)
    completion_mask = torch.zeros((n, c_width), dtype=torch.bool)
    for j, s in enumerate(stored):
        p, c = s["prompt"], s["completion"]
        if p:
            prompt_ids[j, p_width - len(p) :] = torch.tensor(p, dtype=torch.long)
            prompt_mask[j, p_width - len(p) :] = True
        if c:
            completion_ids[j, : len(c)] = torch.tensor(c, dtype=torch.long)
            completion_mask[j, : len(c)] = True
    return RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        sampler_logprobs=torch.zeros((n, c_width)),
        truncated=torch.zeros(n, dtype=torch.bool),
        completion_texts=[""] * n,
        prompt_texts=[""] * n,
    )
