"""The RL loop for language models: prompts -> G samples -> rewards -> advantages -> loss -> update.

Read it top to bottom: :meth:`RLTrainer.step` is one RL step. The math (reward shaping,
advantages, the policy loss and its regularizers) comes from the recipe's catalogue entries
through :class:`~tether.recipes.Method`; this file never branches on a method's name.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tether.catalogue import get
from tether.catalogue.aggregate import Aggregation, count_sequences, count_tokens
from tether.config import to_dict
from tether.errors import TetherError
from tether.lm.config import LMConfig
from tether.lm.logprobs import completion_logprobs
from tether.lm.model import load_policy, load_reference
from tether.lm.prompts import PromptStream
from tether.lm.rollout import RolloutBatch, make_sampler
from tether.lm.tasks import get_task
from tether.lm.tasks.base import Prompt, Score, Task, safe_score
from tether.monitor import Monitor
from tether.recipes import Method, load_recipe
from tether.recipes.loader import Recipe
from tether.runs import Checkpoint, RunDir, latest_checkpoint, load_checkpoint, save_checkpoint
from tether.runs.checkpoint import capture_rng, optimizer_from_flat, optimizer_to_flat, restore_rng

# Inputs the language-model world can hand to catalogue entries (names of DEVELOPERS.md).
LM_INPUTS = frozenset(
    {
        "logprobs",
        "old_logprobs",
        "ref_logprobs",
        "response_mask",
        "rewards",
        "group_ids",
        "entropy",
        "token_ids",
        "truncated",
        "response_lengths",
    }
)
# Metrics that measure time, not math: excluded when comparing a resumed run with an unbroken one.
TIMING_PREFIXES = ("perf/", "time/")


class NonFiniteError(TetherError):
    """Training produced NaN or inf repeatedly; the run stopped with the last good checkpoint intact."""


def apply_method_overrides(recipe: Recipe, overrides: Mapping[str, Any]) -> Recipe:
    """``method.<slot or entry name>.<param>=value``: the slot ``advantage`` (the first estimator of
    the chain) or ``policy_loss``, or the name of any component of the recipe."""
    if not overrides:
        return recipe
    advs = [{**a, "params": dict(a["params"])} for a in recipe.advantage]
    pol = {**recipe.policy_loss, "params": dict(recipe.policy_loss["params"])}
    regs = [{**r, "params": dict(r["params"])} for r in recipe.regularizers]
    rews = [{**r, "params": dict(r["params"])} for r in recipe.rewards]
    for target, params in overrides.items():
        if not isinstance(params, Mapping):
            raise TetherError(f"method.{target} must be set per parameter: method.{target}.<param>=value")
        if target == "advantage":
            matches = advs[:1]
        elif target == "policy_loss":
            matches = [pol]
        else:
            matches = [c for c in (*advs, pol, *regs, *rews) if c["name"] == target]
        if not matches:
            slots = [
                "advantage",
                "policy_loss",
                *dict.fromkeys(c["name"] for c in (*advs, pol, *regs, *rews)),
            ]
            raise TetherError(
                f"method.{target}: the recipe has no such component; use one of {', '.join(slots)}"
            )
        for c in matches:
            c["params"].update(params)
    return dataclasses.replace(
        recipe, advantage=tuple(advs), policy_loss=pol, regularizers=tuple(regs), rewards=tuple(rews)
    )


@dataclass
class Rollout:
    """One step's samples and scores (after dynamic sampling)."""

    prompts: list[Prompt]  # one per sample
    batch: RolloutBatch
    scores: list[Score]
    group_ids: torch.Tensor
    rounds: int
    dropped_groups: int


def _combine(batches: list[RolloutBatch], pad_id: int) -> RolloutBatch:
    if len(batches) == 1:
        return batches[0]

    def cat(name: str, left: bool, fill: float | int | bool) -> torch.Tensor:
        ts = [getattr(b, name) for b in batches]
        width = max(t.shape[1] for t in ts)
        out = []
        for t in ts:
            pad = width - t.shape[1]
            if pad:
                filler = torch.full((t.shape[0], pad), fill, dtype=t.dtype)
                t = torch.cat([filler, t] if left else [t, filler], dim=1)
            out.append(t)
        return torch.cat(out)

    return RolloutBatch(
        prompt_ids=cat("prompt_ids", True, pad_id),
        prompt_mask=cat("prompt_mask", True, False),
        completion_ids=cat("completion_ids", False, pad_id),
        completion_mask=cat("completion_mask", False, False),
        sampler_logprobs=cat("sampler_logprobs", False, 0.0),
        truncated=torch.cat([b.truncated for b in batches]),
        completion_texts=[t for b in batches for t in b.completion_texts],
        prompt_texts=[t for b in batches for t in b.prompt_texts],
    )


def _select(batch: RolloutBatch, keep: torch.Tensor) -> RolloutBatch:
    idx = keep.nonzero().squeeze(-1)
    rows = idx.tolist()
    return RolloutBatch(
        prompt_ids=batch.prompt_ids[idx],
        prompt_mask=batch.prompt_mask[idx],
        completion_ids=batch.completion_ids[idx],
        completion_mask=batch.completion_mask[idx],
        sampler_logprobs=batch.sampler_logprobs[idx],
        truncated=batch.truncated[idx],
        completion_texts=[batch.completion_texts[i] for i in rows],
        prompt_texts=[batch.prompt_texts[i] for i in rows],
    )


def _reduce_metrics(records: list[dict[str, float]]) -> dict[str, float]:
    """Mean over mini-batch updates; extremes for ``*_max`` / ``*_min``."""
    out: dict[str, float] = {}
    keys = {k for r in records for k in r}
    for k in sorted(keys):
        values = [r[k] for r in records if k in r]
        if k.endswith("_max"):
            out[k] = max(values)
        elif k.endswith("_min"):
            out[k] = min(values)
        else:
            out[k] = sum(values) / len(values)
    return out


class RLTrainer:
    """RL on a language model with any recipe of the catalogue."""

    def __init__(self, config: LMConfig, resume: bool = False, out: str | Path | None = None) -> None:
        self.config = config
        cfg = config
        self.recipe = apply_method_overrides(load_recipe(cfg.recipe), cfg.method)
        self.method = Method(self.recipe)
        self.task: Task = get_task(cfg.task.name, **cfg.task.params)
        needs_ref = "ref_logprobs" in self.method.required_inputs()
        self.use_ref = cfg.train.reference == "always" or (cfg.train.reference == "auto" and needs_ref)
        if needs_ref and not self.use_ref:
            raise TetherError(
                f"recipe {self.recipe.name!r} needs a reference model; set train.reference=auto"
            )
        available = set(LM_INPUTS) if self.use_ref else set(LM_INPUTS) - {"ref_logprobs"}
        self.method.check_inputs(available, "language-model")
        train_prompts = self.task.prompts("train", None, seed=cfg.train.seed)
        if not train_prompts:
            raise TetherError(f"task {cfg.task.name!r} has no train prompts")

        run_path = out or cfg.run.out or f"runs/{self.recipe.name}-{cfg.task.name}-s{cfg.train.seed}"
        self.run = RunDir(run_path)
        self.run.prepare(resume)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)

        torch.manual_seed(cfg.train.seed)
        self.model, self.tokenizer = load_policy(cfg.model)
        self.device = next(self.model.parameters()).device
        self.ref_model = load_reference(cfg.model, self.model) if self.use_ref else None
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params,
            lr=cfg.train.lr,
            betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
            weight_decay=cfg.train.weight_decay,
        )
        warm = cfg.train.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0
        )
        self.sampler = make_sampler(self.model, self.tokenizer, cfg.sampling)
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.prompts = PromptStream(train_prompts, seed=cfg.train.seed)
        self.monitor = Monitor(cfg.monitor)
        self.step_idx = 0
        self.nan_skips = 0
        self.total_nan_skips = 0
        self.verifier_errors = 0
        self.tb: Any = None
        self.on_step: Callable[[int, dict[str, float]], None] | None = None
        if resume:
            self._restore()
        else:
            self.run.write_config({"recipe_resolved": _recipe_dict(self.recipe), **to_dict(cfg)})

    # ----------------------------------------------------------------------------- rollout
    def _generate(self, prompts: list[Prompt]) -> tuple[RolloutBatch, list[Score]]:
        g = self.config.train.group_size
        texts = [p.text for p in prompts for _ in range(g)]
        batch = self.sampler.generate(texts, generator=self.generator)
        per_sample = [p for p in prompts for _ in range(g)]
        scores = [safe_score(self.task, p, c) for p, c in zip(per_sample, batch.completion_texts)]
        return batch, scores

    def rollout(self) -> Rollout:
        """Sample G completions for each prompt and score them; refill zero-variance groups (DAPO)."""
        cfg = self.config.train
        g = cfg.group_size
        prompts = self.prompts.next(cfg.prompts_per_step)
        batch, scores = self._generate(prompts)
        if not cfg.dynamic_sampling:
            group_ids = torch.arange(len(prompts)).repeat_interleave(g)
            return Rollout([p for p in prompts for _ in range(g)], batch, scores, group_ids, 1, 0)
        keep_fn = get("selection", "dynamic_sampling").fn
        kept_prompts: list[Prompt] = []
        kept_batches: list[RolloutBatch] = []
        kept_scores: list[Score] = []
        dropped = 0
        rounds = 0
        while True:
            rounds += 1
            rewards = torch.tensor([s.reward for s in scores], dtype=torch.float64)
            gids = torch.arange(len(prompts)).repeat_interleave(g)
            keep, _ = keep_fn(rewards, gids)
            keep_groups = keep.view(len(prompts), g)[:, 0]
            dropped += int((~keep_groups).sum())
            room = cfg.prompts_per_step - len(kept_prompts)
            chosen = keep_groups.nonzero().squeeze(-1)[:room].tolist()
            if chosen:
                rows = torch.zeros(len(prompts) * g, dtype=torch.bool)
                for i in chosen:
                    rows[i * g : (i + 1) * g] = True
                kept_batches.append(_select(batch, rows))
                kept_scores += [scores[r] for r in rows.nonzero().squeeze(-1).tolist()]
                kept_prompts += [prompts[i] for i in chosen]
            if len(kept_prompts) >= cfg.prompts_per_step or rounds > cfg.max_refill_rounds:
                break
            prompts = self.prompts.next(cfg.prompts_per_step - len(kept_prompts))
            batch, scores = self._generate(prompts)
        if not kept_prompts:  # nothing with signal: train on the last round anyway (advantages are 0)
            kept_prompts, kept_batches, kept_scores = prompts, [batch], scores
        pad = int(self.tokenizer.pad_token_id or 0)
        merged = _combine(kept_batches, pad)
        group_ids = torch.arange(len(kept_prompts)).repeat_interleave(g)
        return Rollout(
            [p for p in kept_prompts for _ in range(g)], merged, kept_scores, group_ids, rounds, dropped
        )

    # ----------------------------------------------------------------------------- log-probs
    def _logprobs(
        self, model: torch.nn.Module, batch: RolloutBatch, rows: torch.Tensor | slice, grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = self.config.sampling
        with torch.set_grad_enabled(grad):
            return completion_logprobs(
                model,
                batch.prompt_ids[rows].to(self.device),
                batch.prompt_mask[rows].to(self.device),
                batch.completion_ids[rows].to(self.device),
                batch.completion_mask[rows].to(self.device),
                temperature=s.temperature,
                top_k=s.top_k,
                top_p=s.top_p,
                compute_entropy=grad,
            )

    def _no_grad_logprobs(self, model: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
        n = len(batch)
        size = self.config.train.micro_batch_size or n
        parts = []
        was_training = model.training
        model.eval()
        for start in range(0, n, size):
            lp, _ = self._logprobs(model, batch, slice(start, start + size), grad=False)
            parts.append(lp.detach().float().cpu())
        model.train(was_training)
        return torch.cat(parts)

    # ----------------------------------------------------------------------------- one RL step
    def step(self) -> dict[str, float]:
        cfg = self.config
        t0 = time.perf_counter()
        ro = self.rollout()
        t_rollout = time.perf_counter() - t0
        batch = ro.batch
        n = len(batch)
        mask = batch.completion_mask
        rewards = torch.tensor([s.reward for s in ro.scores], dtype=torch.float32)
        errors = torch.tensor([s.error is not None for s in ro.scores])
        self.verifier_errors += int(errors.sum())

        # Inputs for the catalogue, by standard name.
        t1 = time.perf_counter()
        old_logprobs = self._no_grad_logprobs(self.model, batch)
        ref_logprobs = self._no_grad_logprobs(self.ref_model, batch) if self.ref_model is not None else None
        response_mask = mask.clone()
        if cfg.train.mask_truncated:
            response_mask &= ~batch.truncated.unsqueeze(-1)
        inputs: dict[str, Any] = {
            "rewards": rewards,
            "group_ids": ro.group_ids,
            "response_mask": response_mask,
            "token_ids": batch.completion_ids,
            "truncated": batch.truncated,
            "response_lengths": mask.sum(-1),
            "old_logprobs": old_logprobs,
            "logprobs": old_logprobs,  # the current policy equals the old one before the update
        }
        if ref_logprobs is not None:
            inputs["ref_logprobs"] = ref_logprobs
        metrics: dict[str, float] = {k: float(v) for k, v in self.method.shape_rewards(inputs).items()}
        advantages, adv_metrics = self.method.compute_advantages(inputs)
        advantages = advantages.float()
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(-1).expand_as(mask)
        advantages = torch.where(errors.unsqueeze(-1), torch.zeros_like(advantages), advantages)
        metrics.update({k: float(v) for k, v in adv_metrics.items()})
        t_prep = time.perf_counter() - t1

        # K epochs of mini-batch updates.
        t2 = time.perf_counter()
        self.model.train()
        records: list[dict[str, float]] = []
        grad_norms: list[float] = []
        skipped = 0
        micro = cfg.train.micro_batch_size or n
        entropies: list[float] = []
        for _epoch in range(cfg.train.epochs):
            order = torch.randperm(n, generator=self.generator)
            for mb in order.chunk(cfg.train.minibatches):
                agg = Aggregation(
                    num_tokens=max(count_tokens(response_mask[mb]), 1.0),
                    num_sequences=max(count_sequences(response_mask[mb]), 1.0),
                    norm_length=float(cfg.sampling.max_new_tokens),
                )
                finite = True
                mb_metrics: dict[str, float] = {}
                for rows in mb.split(micro):
                    lp, ent = self._logprobs(self.model, batch, rows, grad=True)
                    step_inputs = {
                        k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()
                    }
                    step_inputs = {
                        k: (v.to(self.device) if isinstance(v, torch.Tensor) else v)
                        for k, v in step_inputs.items()
                    }
                    step_inputs.update(logprobs=lp, entropy=ent, advantages=advantages[rows].to(self.device))
                    loss, m = self.method.loss(step_inputs, agg)
                    if not torch.isfinite(loss):
                        finite = False
                        break
                    loss.backward()
                    share = len(rows) / len(mb)
                    for k, v in m.items():
                        mb_metrics[k] = mb_metrics.get(k, 0.0) + float(v) * share
                    if ent is not None:
                        rm = step_inputs["response_mask"]
                        entropies.append(float((ent.detach() * rm).sum() / rm.sum().clamp(min=1)))
                norm = torch.nn.utils.clip_grad_norm_(
                    [p for p in self.model.parameters() if p.requires_grad], cfg.train.max_grad_norm
                )
                if not finite or not math.isfinite(float(norm)):
                    self.optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    continue
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                grad_norms.append(float(norm))
                records.append(mb_metrics)
        self.scheduler.step()
        t_update = time.perf_counter() - t2

        # Non-finite steps never reach the weights; repeated ones stop the run.
        if skipped:
            self.nan_skips += 1
            self.total_nan_skips += skipped
        else:
            self.nan_skips = 0

        metrics.update(_reduce_metrics(records))
        metrics.update(self._rollout_metrics(ro, rewards, old_logprobs, ref_logprobs, response_mask))
        n_tokens = float(mask.sum())
        step_time = time.perf_counter() - t0
        metrics.update(
            {
                "policy/entropy": sum(entropies) / max(len(entropies), 1),
                "grad/norm": sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
                "train/lr": float(self.scheduler.get_last_lr()[0]),
                "train/nan_skips": float(self.total_nan_skips),
                "time/rollout_s": t_rollout,
                "time/logprobs_s": t_prep,
                "time/update_s": t_update,
                "time/step_s": step_time,
                "perf/tokens_per_s": n_tokens / max(step_time, 1e-9),
                "perf/rollout_tokens_per_s": n_tokens / max(t_rollout, 1e-9),
            }
        )
        self.method.update_state(metrics)
        return metrics

    def _rollout_metrics(
        self,
        ro: Rollout,
        rewards: torch.Tensor,
        old_logprobs: torch.Tensor,
        ref_logprobs: torch.Tensor | None,
        response_mask: torch.Tensor,
    ) -> dict[str, float]:
        batch = ro.batch
        mask = batch.completion_mask
        g = self.config.train.group_size
        grouped = rewards.view(-1, g)
        m = mask.float()
        gap = ((old_logprobs - batch.sampler_logprobs.float()).abs() * m).sum() / m.sum().clamp(min=1)
        out = {
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "reward/accuracy": sum(s.correct for s in ro.scores) / len(ro.scores),
            "reward/format": sum(s.format_ok for s in ro.scores) / len(ro.scores),
            "reward/zero_std_frac": float((grouped.std(dim=1) == 0).float().mean()),
            "reward/verifier_errors": float(sum(s.error is not None for s in ro.scores)),
            "response/length_mean": float(mask.sum(-1).float().mean()),
            "response/length_max": float(mask.sum(-1).max()),
            "response/truncation_rate": float(batch.truncated.float().mean()),
            "rollout/logprob_gap": float(gap),
            "rollout/rounds": float(ro.rounds),
            "rollout/dropped_groups": float(ro.dropped_groups),
            "cost/mean": sum(s.cost for s in ro.scores) / len(ro.scores),
        }
        if ref_logprobs is not None:
            d = old_logprobs - ref_logprobs
            k3 = torch.expm1(-d) + d
            out["policy/kl_ref"] = float((k3 * m).sum() / m.sum().clamp(min=1))
        return out

    # ----------------------------------------------------------------------------- loop
    def train(self) -> dict[str, Any]:
        cfg = self.config
        from tether.lm.progress import TrainProgress

        progress = TrainProgress(total=cfg.train.steps, start=self.step_idx, enabled=cfg.run.progress)
        if cfg.run.tensorboard:
            self.tb = _tensorboard_writer(self.run.path / "tensorboard")
        last: dict[str, float] = {}
        with progress:
            while self.step_idx < cfg.train.steps:
                metrics = self.step()
                self.step_idx += 1
                alarms = self.monitor.check(self.step_idx, metrics)
                if self.nan_skips >= cfg.train.max_nan_skips:
                    self.run.alarms.append(
                        {"step": self.step_idx, "kind": "stopped", "message": "repeated NaN"}
                    )
                    raise NonFiniteError(
                        f"{self.nan_skips} consecutive steps produced NaN/inf losses or gradients; the run stopped. "
                        f"The last good checkpoint in {str(self.run.path)!r} is intact: lower train.lr or "
                        "train.max_grad_norm and resume with --resume."
                    )
                record = {"step": self.step_idx, **metrics, "alarms": len(alarms)}
                self.run.metrics.append(record)
                for a in alarms:
                    self.run.alarms.append(a.as_dict())
                    progress.alarm(a.kind, a.message)
                if self.tb is not None:
                    for k, v in metrics.items():
                        self.tb.add_scalar(k, v, self.step_idx)
                progress.update(self.step_idx, metrics)
                if self.on_step is not None:
                    self.on_step(self.step_idx, metrics)
                last = metrics
                if self.step_idx % cfg.run.checkpoint_every == 0 or self.step_idx == cfg.train.steps:
                    self.save()
        if self.tb is not None:
            self.tb.close()
        summary = {
            "recipe": self.recipe.name,
            "task": cfg.task.name,
            "seed": cfg.train.seed,
            "steps": self.step_idx,
            "final": {k: v for k, v in last.items() if not k.startswith(TIMING_PREFIXES)},
            "alarms": dict(self.monitor.counts),
            "alarm_count": sum(self.monitor.counts.values()),
            "nan_skips": self.total_nan_skips,
            "verifier_errors": self.verifier_errors,
        }
        self.run.write_summary(summary)
        return summary

    # ----------------------------------------------------------------------------- checkpoints
    def save(self) -> Path:
        o_tensors, o_meta = optimizer_to_flat(self.optimizer.state_dict())
        r_tensors, r_state = capture_rng()
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update(o_tensors)
        tensors.update(r_tensors)
        tensors["rng.sampler"] = self.generator.get_state()
        state = {
            "optim": o_meta,
            "scheduler": self.scheduler.state_dict(),
            "prompts": self.prompts.state_dict(),
            "method": self.method.state_dict(),
            "monitor": self.monitor.state_dict(),
            "nan_skips": self.nan_skips,
            "total_nan_skips": self.total_nan_skips,
            "verifier_errors": self.verifier_errors,
            **r_state,
        }
        path = save_checkpoint(
            self.run.path, Checkpoint(self.step_idx, tensors, state), keep=self.config.run.keep_checkpoints
        )
        self.save_pretrained(self.run.path / "model")
        return path

    def save_pretrained(self, directory: Path) -> None:
        """The policy in Hugging Face format (loadable with from_pretrained / model.name_or_path)."""
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    def _restore(self) -> None:
        path = latest_checkpoint(self.run.path)
        if path is None:
            raise TetherError(f"nothing to resume in {str(self.run.path)!r}: it has no checkpoint")
        ck = load_checkpoint(path)
        self.model.load_state_dict({k[6:]: v for k, v in ck.tensors.items() if k.startswith("model.")})
        self.optimizer.load_state_dict(optimizer_from_flat(ck.tensors, ck.state["optim"]))
        self.scheduler.load_state_dict(ck.state["scheduler"])
        self.prompts.load_state_dict(ck.state["prompts"])
        self.method.load_state_dict(ck.state["method"])
        self.monitor.load_state_dict(ck.state["monitor"])
        self.nan_skips = int(ck.state["nan_skips"])
        self.total_nan_skips = int(ck.state["total_nan_skips"])
        self.verifier_errors = int(ck.state["verifier_errors"])
        restore_rng(ck.tensors, ck.state)
        self.generator.set_state(ck.tensors["rng.sampler"])
        self.step_idx = ck.step
        self.run.truncate_logs(ck.step)


def _recipe_dict(recipe: Recipe) -> dict[str, Any]:
    return {
        "name": recipe.name,
        "advantage": list(recipe.advantage),
        "policy_loss": recipe.policy_loss,
        "regularizers": list(recipe.regularizers),
        "rewards": list(recipe.rewards),
    }


def _tensorboard_writer(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TetherError(
            "run.tensorboard=true needs TensorBoard: pip install 'tether[tensorboard]'"
        ) from None
    return SummaryWriter(log_dir=str(path))
