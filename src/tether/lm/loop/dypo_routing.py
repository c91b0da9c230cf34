"""DYPO's routing: all-wrong groups to SFT on a teacher target, all-correct groups out of the loss."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch

from tether.lm.logprobs import completion_logprobs
from tether.lm.loop._groups import group_rows
from tether.lm.plugins import LoopPlugin, Rollout, check_param, register_plugin
from tether.lm.rollout import eos_token_ids, pad_token_id

if TYPE_CHECKING:
    from tether.lm.trainer import RLTrainer


@register_plugin("dypo_routing")
class DynamicRouting(LoopPlugin):
    """DYPO: route each group by outcome; all-wrong groups get gamma L_SFT on a teacher target.

    Paper: Zhu et al., "Bridging SFT and RL: Dynamic Policy Optimization for Robust Reasoning",
    arXiv 2604.08926. Exact routing (card ratio#17, eq. 4: L = E_q[1_H gamma L_SFT + 1_M (alpha
    L_GRPO + (1 - alpha) L_GAL)]); the teacher is reconstructed: m = 1 teacher, the task's
    ``reference(prompt)``.

    Success: reward > ``success_threshold`` (the ``dypo`` loss's parameter of the same name must
    agree: a recipe or override that sets them apart is refused at load). A group is routed by its
    scored samples (a failed verification is no reward): all-wrong (H) when none succeeds, all-correct
    (E) when all do, none when no sample was scored. In ``after_advantages`` the rows of all-correct
    groups are dropped from the RL loss (response_mask zeroed), and with ``mask_hard`` the rows of
    all-wrong groups too (they are trained by SFT only, as in eq. 4; the ``dypo`` loss already
    restricts its own terms to mixed groups, this also removes them from regularizers).
    ``extra_loss`` gives the SFT term of eq. 4: gamma * sum over the all-wrong prompts q of the
    micro-batch of (its rows here / its rows) * L_SFT(q), divided by the mini-batch's prompt count
    (``Rollout.prompt_count``: the ``num_prompts`` by which the ``dypo`` loss divides its mixed-group
    terms), so both terms are expectations over the same prompts and the micro-batch parts add up to
    the mini-batch's term. L_SFT(q) = NLL(target + EOS | prompt) under the raw model distribution
    (temperature 1, no truncation), once per prompt, the prompt tokens being the rollout's own;
    ``sft_reduction="token-mean"`` averages it over the target tokens (default), ``"sum"`` is the
    paper's sequence -log pi(tau | q). Mixed groups use the recipe's ``dypo`` policy loss.
    """

    paper = "Bridging SFT and RL: Dynamic Policy Optimization for Robust Reasoning"
    arxiv = "2604.08926"
    status = "exact"
    whole_groups = True  # eq. 4 is an expectation over prompts: each route is a whole group's
    dynamic_sampling_conflict = (
        "dynamic sampling drops the all-wrong and all-correct groups before the plugin routes them, "
        "so the SFT route would never run"
    )
    shared_params = {"success_threshold": ("dypo",)}  # noqa: RUF012

    def __init__(
        self,
        gamma: float = 1.0,
        success_threshold: float = 0.5,
        mask_hard: bool = True,
        sft_reduction: Literal["token-mean", "sum"] = "token-mean",
    ) -> None:
        check_param(gamma >= 0, "gamma", gamma, "must be >= 0")
        check_param(
            sft_reduction in ("token-mean", "sum"),
            "sft_reduction",
            sft_reduction,
            "must be 'token-mean' or 'sum'",
        )
        self.gamma = gamma
        self.success_threshold = success_threshold
        self.mask_hard = mask_hard
        self.sft_reduction = sft_reduction
        self.hard_rows = torch.zeros(0, dtype=torch.bool)
        self.easy_rows = torch.zeros(0, dtype=torch.bool)

    def route(
        self, rewards: torch.Tensor, group_ids: torch.Tensor, scored: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hard, easy) [N] bool: rows of all-wrong and of all-correct groups, judged on the scored rows
        (``scored`` [N] bool, default all); a group without a scored row is neither."""
        success = rewards.detach() > self.success_threshold
        ok = torch.ones_like(success) if scored is None else scored.to(torch.bool)
        hard = torch.zeros_like(success)
        easy = torch.zeros_like(success)
        for rows in group_rows(group_ids):
            idx = torch.tensor(rows, dtype=torch.long)
            judged = success[idx][ok[idx]]
            if judged.numel() == 0:
                continue
            if not bool(judged.any()):
                hard[idx] = True
            elif bool(judged.all()):
                easy[idx] = True
        return hard, easy

    def after_advantages(self, trainer: RLTrainer, rollout: Rollout, inputs: dict[str, Any]) -> None:
        self.hard_rows, self.easy_rows = self.route(inputs["rewards"], rollout.group_ids, rollout.scored)
        drop = self.easy_rows | self.hard_rows if self.mask_hard else self.easy_rows
        inputs["response_mask"] = inputs["response_mask"] & ~drop.unsqueeze(-1)

    def sft_nll(self, trainer: RLTrainer, rollout: Rollout, rows: list[int]) -> torch.Tensor:
        """NLL [len(rows)] of each row's teacher target (+ EOS) under the trainer's model (with grad),
        after the row's prompt tokens as the rollout sampled them."""
        tok = trainer.tokenizer
        eos_ids = eos_token_ids(trainer.model, tok)
        pad = pad_token_id(tok, eos_ids)
        batch = rollout.batch
        prompts = [batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist() for i in rows]
        targets = [
            tok(trainer.task.reference(rollout.prompts[i]), add_special_tokens=False)["input_ids"]
            + eos_ids[:1]
            for i in rows
        ]
        n, pw, tw = len(rows), max(map(len, prompts)), max(map(len, targets))
        prompt_ids = torch.full((n, pw), pad, dtype=torch.long)
        prompt_mask = torch.zeros((n, pw), dtype=torch.bool)
        target_ids = torch.full((n, tw), pad, dtype=torch.long)
        target_mask = torch.zeros((n, tw), dtype=torch.bool)
        for j, (p, t) in enumerate(zip(prompts, targets)):
            prompt_ids[j, pw - len(p) :] = torch.tensor(p, dtype=torch.long)
            prompt_mask[j, pw - len(p) :] = True
            target_ids[j, : len(t)] = torch.tensor(t, dtype=torch.long)
            target_mask[j, : len(t)] = True
        dev = trainer.device
        lp, _ = completion_logprobs(
            trainer.model,
            prompt_ids.to(dev),
            prompt_mask.to(dev),
            target_ids.to(dev),
            target_mask.to(dev),
            compute_entropy=False,
        )
        m = target_mask.to(dev).to(lp.dtype)
        nll = -(lp * m).sum(-1)
        return nll / m.sum(-1).clamp(min=1.0) if self.sft_reduction == "token-mean" else nll

    def extra_loss(
        self, trainer: RLTrainer, rollout: Rollout, rows: torch.Tensor, minibatch: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]] | None:
        if self.gamma == 0 or self.hard_rows.numel() != len(rollout):
            return None
        here: dict[int, int] = {}  # hard group id -> its rows in this micro-batch
        for r in rows.tolist():
            if bool(self.hard_rows[int(r)]):
                gid = int(rollout.group_ids[int(r)])
                here[gid] = here.get(gid, 0) + 1
        if not here:
            return None
        groups = {int(rollout.group_ids[rows_of[0]]): rows_of for rows_of in group_rows(rollout.group_ids)}
        nll = self.sft_nll(trainer, rollout, [groups[g][0] for g in here])
        share = torch.tensor([here[g] / len(groups[g]) for g in here], dtype=nll.dtype, device=nll.device)
        loss = self.gamma * (nll * share).sum() / rollout.prompt_count(minibatch)
        return loss, {
            "dypo/sft_loss": float(loss.detach()),
            "dypo/sft_nll": float(nll.detach().mean()),
            "dypo/sft_prompts": float(len(here)),
        }

    def after_step(
        self, trainer: RLTrainer, rollout: Rollout, inputs: dict[str, Any], metrics: dict[str, float]
    ) -> None:
        n = max(len(rollout), 1)
        metrics["dypo/hard_row_frac"] = float(self.hard_rows.sum()) / n
        metrics["dypo/easy_row_frac"] = float(self.easy_rows.sum()) / n
