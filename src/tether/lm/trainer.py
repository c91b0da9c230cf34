"""The RL loop for language models: prompts -> G samples -> rewards -> advantages -> loss -> update.

Read it top to bottom: :meth:`RLTrainer.step` is one RL step. The math (reward shaping,
advantages, the policy loss and its regularizers) comes from the recipe's catalogue entries
through :class:`~tether.recipes.Method`; this file never branches on a method's name.
"""

from __future__ import annotations

import dataclasses
import shlex
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from tether.catalogue import get
from tether.catalogue.aggregate import Aggregation, count_sequences, count_tokens
from tether.catalogue.mismatch import correction_metrics, importance_stats, sampler_importance_weights
from tether.catalogue.registry import Kind
from tether.config import to_dict
from tether.errors import TetherError
from tether.lm.chat import task_from_settings
from tether.lm.config import RUN_LOGGING, LMConfig
from tether.lm.evaluate import check_eval_context, check_test_split, eval_prompts, evaluate
from tether.lm.logprobs import (
    completion_distribution,
    completion_token_stats,
    resolve_share_prompts,
    sum_pi_squared,
)
from tether.lm.loop._groups import group_rows
from tether.lm.model import (
    check_model_source,
    check_policy_eos,
    load_policy,
    load_reference,
    load_tokenizer,
    save_model,
)
from tether.lm.plugins import LoopPlugin, Rollout, build_plugin, plugin_parameters
from tether.lm.precision import clipped_step, make_grad_scaler, restore_grad_scaler
from tether.lm.prompts import PromptStream
from tether.lm.rollout import RolloutBatch, check_context, context_length, longest_prompt, make_sampler
from tether.lm.tasks.base import Prompt, Task, safe_score_batch
from tether.lm.tasks.rewards import reward_parts
from tether.lm.vllm_backend import check_backend, check_vllm_sampling, engine_length
from tether.monitor import Monitor
from tether.monitor.memory import memory_metrics
from tether.monitor.updates import combine_micro_batch_metrics, combine_update_metrics
from tether.recipes import Method, load_recipe
from tether.recipes.loader import Recipe, recipe_dict
from tether.runs import Checkpoint, RunDir, save_checkpoint
from tether.runs.checkpoint import (
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    load_latest_checkpoint,
    restore_rng,
    restore_training_state,
    training_state,
)
from tether.runs.interrupt import NonFiniteError, StopRequest, interrupted
from tether.runs.resume import resolved_with
from tether.runs.rundir import check_run_dir as checked_run_dir
from tether.runs.rundir import free_run_dir, mark_model_step
from tether.userimports import import_user_code

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
        "logits",
        "old_logits",
        "reward_parts",
        "reward_weights",
        "sum_pi_squared",
    }
)
# The inputs above (and ``advantages``) that hold one value per rollout row: the trainer slices exactly
# these (and the per-row inputs loop plugins declare, ``LoopPlugin.per_row``) to the scored rows and
# to each micro-batch; every other input (``reward_weights``, a plugin's batch-level tensor such as
# RiskPO's quantile grid) passes whole, whatever its shape.
LM_ROW_INPUTS = frozenset(LM_INPUTS - {"reward_weights"}) | {"advantages"}
# Metrics that measure time, not math: excluded when comparing a resumed run with an unbroken one.
TIMING_PREFIXES = ("perf/", "time/")


def apply_method_overrides(recipe: Recipe, overrides: Mapping[str, Any]) -> Recipe:
    """``method.<slot or entry name>.<param>=value``: the slot ``advantage`` (the first estimator of
    the chain) or ``policy_loss``, or the name of any component or loop plugin of the recipe. A name
    shared by a component and a loop plugin (SPO's advantage ``spo`` and its plugin ``spo``) sets each
    parameter where it exists, in both where both have it."""
    if not overrides:
        return recipe
    advs = [{**a, "params": dict(a["params"])} for a in recipe.advantage]
    pol = {**recipe.policy_loss, "params": dict(recipe.policy_loss["params"])}
    regs = [{**r, "params": dict(r["params"])} for r in recipe.regularizers]
    rews = [{**r, "params": dict(r["params"])} for r in recipe.rewards]
    loop = [{**r, "params": dict(r["params"])} for r in recipe.loop]
    kinds: list[tuple[Kind, list[dict[str, Any]]]] = [
        ("advantage", advs),
        ("policy_loss", [pol]),
        ("regularizer", regs),
        ("reward", rews),
    ]
    for target, params in overrides.items():
        if not isinstance(params, Mapping):
            raise TetherError(f"method.{target} must be set per parameter: method.{target}.<param>=value")
        if target == "advantage":
            matches = advs[:1]
        elif target == "policy_loss":
            matches = [pol]
        else:
            matches = [c for c in (*advs, pol, *regs, *rews, *loop) if c["name"] == target]
        if not matches:
            slots = [
                "advantage",
                "policy_loss",
                *dict.fromkeys(c["name"] for c in (*advs, pol, *regs, *rews)),
            ]
            plugins = list(dict.fromkeys(c["name"] for c in loop))
            listed = f"; or one of its loop plugins: {', '.join(plugins)}" if plugins else ""
            raise TetherError(
                f"method.{target}: the recipe has no such component; use one of {', '.join(slots)}{listed}"
            )
        plugin_hits = [c for c in matches if any(c is x for x in loop)]
        if not plugin_hits or len(plugin_hits) == len(matches):
            for c in matches:
                c["params"].update(params)
            continue
        accepts: list[tuple[dict[str, Any], set[str]]] = [
            (c, set(plugin_parameters(c["name"]))) for c in plugin_hits
        ]
        for kind, group in kinds:
            accepts += [
                (c, set(get(kind, c["name"]).hyperparameters)) for c in group if any(c is m for m in matches)
            ]
        for key, value in params.items():
            takers = [c for c, names in accepts if key in names]
            if not takers:
                known = sorted(set().union(*(names for _, names in accepts)))
                raise TetherError(
                    f"method.{target}.{key}: neither the component {target!r} nor the loop plugin "
                    f"{target!r} has a parameter {key!r}; their parameters: {', '.join(known)}"
                )
            for c in takers:
                c["params"][key] = value
    return dataclasses.replace(
        recipe,
        advantage=tuple(advs),
        policy_loss=pol,
        regularizers=tuple(regs),
        rewards=tuple(rews),
        loop=tuple(loop),
    )


def _rows_of(name: str, value: Any, rows: torch.Tensor, n: int, per_row: frozenset[str]) -> Any:
    """Input ``name`` for the rows ``rows``: a per-row input (named in ``per_row``: a tensor with
    ``n`` rows) sliced to them; every other input passes whole."""
    if name not in per_row:
        return value
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != n:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise TetherError(f"input {name!r} is declared per-row but is {shape}, not a tensor of the {n} rows")
    return value[rows]


def whole_group_components(method: Method, plugins: list[LoopPlugin]) -> list[str]:
    """What needs every row of a group in the same mini-batch and micro-batch: the policy loss and
    regularizers that take ``group_ids`` (they compute statistics within each group of a call) and the
    loop plugins that declare ``whole_groups``."""
    needs = [
        f"{c.kind} {c.name!r}"
        for c in (method.policy_loss, *method.regularizers)
        if "group_ids" in c.entry.inputs
    ]
    return needs + [f"loop plugin {p.name!r}" for p in plugins if p.whole_groups]


def check_plugins(cfg: LMConfig, method: Method, plugins: list[LoopPlugin]) -> None:
    """The loop plugins' checks against the run's settings and the method's components."""
    for plugin in plugins:
        if cfg.train.dynamic_sampling and plugin.dynamic_sampling_conflict:
            raise TetherError(
                f"loop plugin {plugin.name!r} cannot run with train.dynamic_sampling=true: "
                f"{plugin.dynamic_sampling_conflict}. Set train.dynamic_sampling=false."
            )
        for param, names in plugin.shared_params.items():
            mine = getattr(plugin, param)
            for c in method.components:
                if c.name not in names or param not in c.entry.hyperparameters:
                    continue
                theirs = c.params.get(param, c.entry.hyperparameters[param])
                if theirs != mine:
                    raise TetherError(
                        f"method.{plugin.name}.{param}={mine!r} and method.{c.name}.{param}={theirs!r} "
                        f"disagree: the loop plugin {plugin.name!r} and the {c.kind} {c.name!r} must use "
                        f"the same {param}; set both (e.g. method.{plugin.name}.{param}=v "
                        f"method.{c.name}.{param}=v)"
                    )
        plugin.check_config(cfg)


def check_group_split(cfg: LMConfig, needs: list[str]) -> None:
    """Mini-batches and micro-batches of whole groups: refuse settings that would cut a group."""
    if not needs:
        return
    t = cfg.train
    why = f"{', '.join(needs)} need(s) every sample of a group in the same mini-batch and micro-batch"
    if t.prompts_per_step % t.minibatches:
        divisors = [d for d in range(1, t.prompts_per_step + 1) if t.prompts_per_step % d == 0]
        raise TetherError(
            f"train.minibatches={t.minibatches} cannot split the {t.prompts_per_step} groups of a step "
            f"(train.prompts_per_step) into equal mini-batches of whole groups: {why}. Choose "
            f"train.minibatches among {', '.join(map(str, divisors))}"
        )
    if t.micro_batch_size and t.micro_batch_size % t.group_size:
        raise TetherError(
            f"train.micro_batch_size={t.micro_batch_size} would cut groups of train.group_size="
            f"{t.group_size}: {why}. Set train.micro_batch_size to a multiple of {t.group_size} "
            f"(or 0 for the whole mini-batch)"
        )


def pack_groups(groups: list[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """Consecutive whole groups (row indices), packed in order into micro-batches of at most ``limit``
    rows (0: one micro-batch). Groups of ``train.group_size`` rows with a ``limit`` that is a multiple
    of it give ``limit // group_size`` groups per micro-batch; groups of other sizes (Knapsack's
    budgets) fill each micro-batch as far as it goes, and a group larger than ``limit`` is never cut:
    it runs as a micro-batch of its own."""
    if not limit:
        return [groups] if groups else []
    packs: list[list[torch.Tensor]] = []
    rows = 0
    for g in groups:
        if packs and rows + len(g) <= limit:
            packs[-1].append(g)
            rows += len(g)
        else:
            packs.append([g])
            rows = len(g)
    return packs


def _take(ro: Rollout, rows: torch.Tensor) -> Rollout:
    idx = rows.nonzero().squeeze(-1).tolist()
    return Rollout(
        prompts=[ro.prompts[i] for i in idx],
        batch=ro.batch.select(rows),
        scores=[ro.scores[i] for i in idx],
        group_ids=ro.group_ids[rows],
    )


#: Settings a resumed run may change (see tether.runs.resume): the step budget, and what only
#: logs, checkpoints or evaluates.
RESUME_MAY_CHANGE = (
    "train.steps",
    *RUN_LOGGING,
    "eval",
    "monitor",
    "sampling.vllm_gpu_memory_utilization",
    "sampling.vllm_max_model_len",
)


def default_run_dir(recipe_name: str, task: str, seed: int) -> str:
    """The run directory when neither ``out`` nor ``run.out`` gives one."""
    return f"runs/{recipe_name}-{task}-s{seed}"


@dataclasses.dataclass
class RunPlan:
    """What a run of ``config`` will do, resolved and checked without any work (:func:`plan_run`)."""

    recipe: Recipe
    method: Method
    task: Task
    plugins: list[LoopPlugin]
    use_ref: bool
    needs_distribution: bool
    train_prompts: list[Prompt]
    run_dir: str
    whole_groups: list[str] = dataclasses.field(default_factory=list)  # what needs whole groups
    row_inputs: frozenset[str] = LM_ROW_INPUTS  # inputs sliced by rows

    def describe(self, config: LMConfig) -> dict[str, Any]:
        """The resolved settings and plan, as ``tether train --dry-run`` prints them."""
        return {
            "recipe_resolved": recipe_dict(self.recipe),
            **to_dict(config),
            "plan": {
                "run_dir": config.run.out or self.run_dir,
                "train_prompts": len(self.train_prompts),
                "reference_model": self.use_ref,
                "rollout_rows_per_step": config.train.prompts_per_step * config.train.group_size,
                "loop_plugins": [p.name for p in self.plugins],
                "inputs_needed": sorted(self.method.required_inputs()),
                "batches_of_whole_groups": self.whole_groups,
            },
        }


def plan_run(cfg: LMConfig) -> RunPlan:
    """Resolve ``cfg``'s recipe, method, task and plugins, with every check that needs no model:
    the user's imports first, then an unknown recipe, component or parameter, a task's name,
    parameters, rewards or chat template, inputs the language-model world cannot give."""
    import_user_code(cfg.imports)  # first: the user's modules may register what the run names
    check_model_source(cfg.model)
    check_backend(cfg.sampling.backend, cfg.model.lora_rank)
    check_vllm_sampling(
        cfg.sampling.backend,
        {"sampling.temperature": cfg.sampling.temperature, "eval.temperature": cfg.eval.temperature},
        cfg.sampling,
        cfg.train.sampler_correction,
    )
    check_policy_eos(cfg.model)
    recipe = apply_method_overrides(load_recipe(cfg.recipe), cfg.method)
    method = Method(recipe)
    if method.constraint is not None:
        raise TetherError(
            f"recipe {recipe.name!r} has a cost constraint, which the language-model trainer "
            "does not drive yet; run it in the control world (tether control train --recipe ...)"
        )
    task = task_from_settings(cfg.task, lambda: load_tokenizer(cfg.model))
    plugins = [build_plugin(c["name"], c["params"]) for c in recipe.loop]
    check_plugins(cfg, method, plugins)
    whole_groups = whole_group_components(method, plugins)
    check_group_split(cfg, whole_groups)
    needs_ref = "ref_logprobs" in method.required_inputs()
    use_ref = cfg.train.reference == "always" or (cfg.train.reference == "auto" and needs_ref)
    if needs_ref and not use_ref:
        raise TetherError(f"recipe {recipe.name!r} needs a reference model; set train.reference=auto")
    available = set(LM_INPUTS) if use_ref else set(LM_INPUTS) - {"ref_logprobs"}
    available |= {name for plugin in plugins for name in plugin.provides}
    method.check_inputs(available, "language-model")
    needs_distribution = bool({"logits", "old_logits"} & method.required_inputs())
    train_prompts = task.prompts("train", None, seed=cfg.train.seed)
    if not train_prompts:
        raise TetherError(
            f"task {cfg.task.name!r} has no train prompts; give it a train split (for the file task: task.params.test_fraction below 1, or the held-out rows in task.params.test_path)"
        )
    run_dir = default_run_dir(recipe.name, cfg.task.name, cfg.train.seed)
    row_inputs = LM_ROW_INPUTS | {name for plugin in plugins for name in plugin.per_row}
    return RunPlan(
        recipe,
        method,
        task,
        plugins,
        use_ref,
        needs_distribution,
        train_prompts,
        run_dir,
        whole_groups,
        frozenset(row_inputs),
    )


def check_run_dir(cfg: LMConfig, plan: RunPlan, run_path: str | Path, resume: bool) -> RunDir:
    """The run directory's read-only checks for an RL run (also for --dry-run; see
    :func:`tether.runs.rundir.check_run_dir`)."""
    return checked_run_dir(
        run_path, resume, to_dict(cfg), RESUME_MAY_CHANGE, resolved_with(LMConfig), recipe_dict(plan.recipe)
    )


def preflight(cfg: LMConfig, plan: RunPlan, run_path: str | Path, resume: bool, evaluates: bool) -> RunDir:
    """Every check of an RL run that needs no model, after :func:`plan_run`: the run directory
    (:func:`check_run_dir`) and, for a run that evaluates at its end (``evaluates``), a test split to
    evaluate on. :class:`RLTrainer` and ``tether train --dry-run`` run exactly these, so that a dry
    run passes only what the real run accepts (the checks that need the model, such as the context
    length, run only in the real run)."""
    run = check_run_dir(cfg, plan, run_path, resume)
    if evaluates:  # a task with no test split fails now, not after training
        check_test_split(plan.task, cfg.task.name)
    return run


class RLTrainer:
    """RL on a language model with any recipe of the catalogue."""

    def __init__(
        self, config: LMConfig, resume: bool = False, out: str | Path | None = None, evaluates: bool = False
    ) -> None:
        self.config = config
        cfg = config
        plan = plan_run(cfg)  # everything a user can get wrong, checked before any work
        self.recipe, self.method, self.task = plan.recipe, plan.method, plan.task
        self.plugins: list[LoopPlugin] = plan.plugins
        self.use_ref, self.needs_distribution = plan.use_ref, plan.needs_distribution
        # OTB's sum_pi_squared comes from the old-policy pass, which then always runs
        self.needs_sum_pi_squared = "sum_pi_squared" in self.method.required_inputs()
        self.whole_groups, self.row_inputs = bool(plan.whole_groups), plan.row_inputs
        train_prompts = plan.train_prompts

        run_path = out or cfg.run.out or plan.run_dir
        self.evaluates = evaluates  # the caller evaluates at the end (see train's summary)
        self.run = preflight(cfg, plan, run_path, resume, evaluates)
        cfg.run.apply()

        torch.manual_seed(cfg.train.seed)
        self.model, self.tokenizer = load_policy(cfg.model)
        self.device = next(self.model.parameters()).device
        longest = longest_prompt(self.tokenizer, [p.text for p in train_prompts])
        check_context(self.model, longest, cfg.sampling.max_new_tokens, where="the train prompts")
        if evaluates:  # the test prompts fit the context too, or the final evaluation would fail
            check_eval_context(
                self.model, self.tokenizer, self.task, cfg.eval, cfg.sampling, seed=cfg.train.seed
            )
        # a vLLM engine is sized for the longest prompt it will see: the train prompts and the eval's
        self.prompt_budget: int | None = None
        if cfg.sampling.backend == "vllm":
            tested = eval_prompts(self.task, cfg.eval, cfg.train.seed) if self.task.prompts("test") else []
            self.prompt_budget = max(longest, longest_prompt(self.tokenizer, [p.text for p in tested]))
            engine_length(cfg.sampling, context_length(self.model), self.prompt_budget)
        self.share_prompts = resolve_share_prompts(cfg.train.share_prompts, self.device)
        self.ref_model = load_reference(cfg.model, self.model) if self.use_ref else None
        # Only now, with the models loaded, is the run directory touched. A --resume of a run
        # killed before its first checkpoint lost nothing but the logs of the unsaved steps, so it
        # starts again from scratch (dropping those logs).
        resume = resume and self.run.resumable()
        self.run.prepare(resume)
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
        # float16 forward passes: dynamic loss scaling (see tether.lm.precision.make_grad_scaler)
        self.grad_scaler = make_grad_scaler(self.model)
        self.sampler = make_sampler(
            self.model, self.tokenizer, cfg.sampling, max_prompt_tokens=self.prompt_budget
        )
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.prompts = PromptStream(train_prompts, seed=cfg.train.seed)
        self.monitor = Monitor(cfg.monitor)
        self.step_idx = 0
        self.nan_skips = 0
        self.total_nan_skips = 0
        self.verifier_errors = 0
        self.tb: Any = None
        self.last_rollout: Rollout | None = None
        self.on_step: Callable[[int, dict[str, float]], None] | None = None
        if resume:
            self._restore()
        # Also on resume: a later plain --resume must see this resume's budget (an extended run).
        self.run.write_config({"recipe_resolved": recipe_dict(self.recipe), **to_dict(cfg)})

    # ----------------------------------------------------------------------------- rollout
    def _plan(self, n: int) -> list[tuple[Prompt, int]]:
        """Prompts for a rollout and samples per prompt: a loop plugin's plan, else the stream."""
        g = self.config.train.group_size
        for plugin in self.plugins:
            plan = plugin.plan(self, n, g)
            if plan is not None:
                return plan
        return [(p, g) for p in self.prompts.next(n)]

    def _generate(self, plan: list[tuple[Prompt, int]], first_group: int) -> Rollout:
        per_row = [p for p, k in plan for _ in range(k)]
        batch = self.sampler.generate([p.text for p in per_row], generator=self.generator)
        scores = safe_score_batch(self.task, per_row, batch.completion_texts)
        group_ids = torch.cat(
            [torch.full((k,), first_group + i, dtype=torch.long) for i, (_, k) in enumerate(plan)]
        )
        return Rollout(per_row, batch, scores, group_ids)

    def rollout(self) -> Rollout:
        """Sample completions for each planned prompt and score them; with dynamic sampling, drop
        groups whose rewards are all equal and refill the batch (DAPO)."""
        cfg = self.config.train
        self.sampler.sync_weights(self.model)  # a vLLM engine holds its own copy of the weights
        ro = self._generate(self._plan(cfg.prompts_per_step), 0)
        if cfg.dynamic_sampling:
            ro = self._refill(ro)
        for plugin in self.plugins:
            ro = plugin.after_rollout(self, ro)
        return ro

    def _refill(self, ro: Rollout) -> Rollout:
        cfg = self.config.train
        keep_fn = get("selection", "dynamic_sampling").fn
        kept: list[Rollout] = []
        n_groups = 0
        dropped = 0
        rounds = 0
        next_group = int(ro.group_ids.max()) + 1
        while True:
            rounds += 1
            # Failed verifications carry no reward: a group's spread is that of its scored samples.
            scored = ro.scored
            rewards = torch.tensor([sc.reward for sc in ro.scores], dtype=torch.float64)[scored]
            keep, _ = keep_fn(rewards, ro.group_ids[scored])
            good = sorted(set(ro.group_ids[scored][keep].tolist()), key=ro.group_ids.tolist().index)
            dropped += len(set(ro.group_ids.tolist())) - len(good)
            good = good[: cfg.prompts_per_step - n_groups]
            if good:
                rows = torch.isin(ro.group_ids, torch.tensor(good))
                kept.append(_take(ro, rows))
                n_groups += len(good)
            if n_groups >= cfg.prompts_per_step or rounds > cfg.max_refill_rounds:
                break
            ro = self._generate(self._plan(cfg.prompts_per_step - n_groups), next_group)
            next_group += cfg.prompts_per_step
        if not kept:  # nothing with signal: train on the last round anyway (its advantages are 0)
            kept = [ro]
        pad = int(self.tokenizer.pad_token_id or 0)
        merged = Rollout(
            prompts=[p for r in kept for p in r.prompts],
            batch=RolloutBatch.concat([r.batch for r in kept], pad),
            scores=[sc for r in kept for sc in r.scores],
            group_ids=torch.cat([r.group_ids for r in kept]),
            rounds=rounds,
            dropped_groups=dropped,
        )
        return merged

    # ----------------------------------------------------------------------------- log-probs
    def _logprobs(
        self,
        model: torch.nn.Module,
        batch: RolloutBatch,
        rows: torch.Tensor | slice,
        grad: bool,
        sum_sq: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Log-probs, entropy, the full distribution when a component needs ``logits``, and
        ``sum_v pi(v)^2`` per position when ``sum_sq`` (OTB's ``sum_pi_squared``)."""
        s = self.config.sampling
        share = self.share_prompts
        args = (
            model,
            batch.prompt_ids[rows].to(self.device),
            batch.prompt_mask[rows].to(self.device),
            batch.completion_ids[rows].to(self.device),
            batch.completion_mask[rows].to(self.device),
        )
        with torch.set_grad_enabled(grad):
            if self.needs_distribution:
                lp, ent, dist = completion_distribution(
                    *args, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, share_prompts=share
                )
                # dist holds the processed log-probs (padding 0, truncated entries -1e4: exp -> 0)
                sq = torch.where(args[4].bool(), sum_pi_squared(dist), 0.0) if sum_sq else None
                return lp, ent, dist, sq
            stats = completion_token_stats(
                *args,
                temperature=s.temperature,
                top_k=s.top_k,
                top_p=s.top_p,
                compute_entropy=grad,
                share_prompts=share,
                compute_sum_pi_squared=sum_sq,
            )
            return stats.logprobs, stats.entropy, None, stats.sum_pi_squared

    def _no_grad_logprobs(
        self, model: torch.nn.Module, batch: RolloutBatch, sum_sq: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(log-probs, full distribution or None, sum_pi_squared or None)`` of ``model``, no grad,
        in eval mode, by micro-batches."""
        n = len(batch)
        size = self.config.train.micro_batch_size or n
        parts, dists, sqs = [], [], []
        was_training = model.training
        model.eval()
        for start in range(0, n, size):
            lp, _, dist, sq = self._logprobs(
                model, batch, slice(start, start + size), grad=False, sum_sq=sum_sq
            )
            parts.append(lp.detach().float().cpu())
            if dist is not None:
                dists.append(dist.detach().float().cpu())
            if sq is not None:
                sqs.append(sq.detach().float().cpu())
        model.train(was_training)
        return (
            torch.cat(parts),
            (torch.cat(dists) if dists else None),
            (torch.cat(sqs) if sqs else None),
        )

    def _advantages(
        self, inputs: dict[str, Any], scored: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Advantages [N, T] from the samples whose verifier did not fail (``scored``); 0 elsewhere.

        A sample whose verifier raised is left out of the estimate, not scored 0: its group's
        baseline and spread, batch whitening and the advantage metrics see only scored samples,
        so an error moves no other sample's advantage.
        """
        mask = inputs["response_mask"]
        n = mask.shape[0]
        if bool(scored.all()):
            part, adv_metrics = self.method.compute_advantages(inputs)
        elif bool(scored.any()):
            rows = scored.nonzero().squeeze(-1)
            subset = {k: _rows_of(k, v, rows, n, self.row_inputs) for k, v in inputs.items()}
            part, adv_metrics = self.method.compute_advantages(subset)
        else:
            return torch.zeros(mask.shape, dtype=torch.float32), {}
        part = part.float()
        if part.dim() == 1:
            part = part.unsqueeze(-1).expand(part.shape[0], mask.shape[1])
        if bool(scored.all()):
            return part, adv_metrics
        full = torch.zeros(mask.shape, dtype=torch.float32)
        full.index_copy_(0, scored.nonzero().squeeze(-1), part.contiguous())
        return full, adv_metrics

    def _update_batches(self, ro: Rollout) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        """One epoch's mini-batches (row indices) and the micro-batches of each, shuffled by
        ``self.generator``.

        By rows (exactly ``train.minibatches`` updates, ``train.micro_batch_size`` rows per forward
        pass), unless the method needs whole groups (:func:`whole_group_components`): then the order of
        the groups is shuffled, each group's rows stay together, the groups are split into
        ``train.minibatches`` mini-batches (fewer updates when a step has fewer groups, e.g. Knapsack's
        skipped prompts or an unfilled dynamic-sampling batch) and each mini-batch into micro-batches
        of whole groups, at most ``train.micro_batch_size`` rows each (:func:`pack_groups`; plan_run
        checks that the settings split groups of ``train.group_size`` at group boundaries).
        """
        cfg = self.config.train
        n = len(ro)
        if not self.whole_groups:
            micro = cfg.micro_batch_size or n
            order = torch.randperm(n, generator=self.generator)
            return [(mb, list(mb.split(micro))) for mb in order.tensor_split(cfg.minibatches)]
        groups = [torch.tensor(rows, dtype=torch.long) for rows in group_rows(ro.group_ids)]
        order = torch.randperm(len(groups), generator=self.generator)
        batches = []
        for chunk in order.tensor_split(cfg.minibatches):
            ids = chunk.tolist()
            if not ids:
                continue
            micro_batches = [
                torch.cat(part) for part in pack_groups([groups[g] for g in ids], cfg.micro_batch_size)
            ]
            batches.append((torch.cat(micro_batches), micro_batches))
        return batches

    # ----------------------------------------------------------------------------- one RL step
    def step(self) -> dict[str, float]:
        cfg = self.config
        t0 = time.perf_counter()
        ro = self.rollout()
        self.last_rollout = ro
        t_rollout = time.perf_counter() - t0
        batch = ro.batch
        n = len(batch)
        mask = batch.completion_mask
        rewards = torch.tensor([s.reward for s in ro.scores], dtype=torch.float32)
        errors = ~ro.scored
        self.verifier_errors += int(errors.sum())

        # Inputs for the catalogue, by standard name.
        t1 = time.perf_counter()
        # One epoch over one mini-batch never moves the policy before its single update, so the
        # old log-probs are the training pass's own (detached), as in TRL; before the update the
        # sampler's log-probs stand in for them (equal up to float error for the built-in sampler).
        reuse_old = (
            cfg.train.old_logprobs == "reuse"
            or (
                cfg.train.old_logprobs == "auto"
                and cfg.train.epochs == 1
                and cfg.train.minibatches == 1
                and cfg.sampling.backend == "hf"
                and cfg.train.sampler_correction == "none"
            )
        ) and not (self.needs_distribution or self.needs_sum_pi_squared)
        old_sq: torch.Tensor | None = None
        if reuse_old:
            old_logprobs, old_dist = batch.sampler_logprobs.float(), None
        else:
            old_logprobs, old_dist, old_sq = self._no_grad_logprobs(
                self.model, batch, sum_sq=self.needs_sum_pi_squared
            )
        ref_logprobs = (
            self._no_grad_logprobs(self.ref_model, batch)[0] if self.ref_model is not None else None
        )
        response_mask = mask.clone()
        if cfg.train.mask_truncated:
            response_mask &= ~batch.truncated.unsqueeze(-1)
        # A failed verification has no reward: its row takes no part in the update (no gradient from
        # any term, no place in a loss's normaliser, no pair or label in a loss that reads rewards).
        response_mask &= ~errors.unsqueeze(-1)
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
        inputs["reward_parts"], inputs["reward_weights"] = reward_parts(self.task, ro.scores)
        if ref_logprobs is not None:
            inputs["ref_logprobs"] = ref_logprobs
        if old_sq is not None:
            inputs["sum_pi_squared"] = old_sq
        if old_dist is not None:
            inputs["old_logits"] = old_dist
            inputs["logits"] = old_dist  # before the update the current distribution is the old one
        for plugin in self.plugins:
            plugin.extra_inputs(self, ro, inputs)
        metrics: dict[str, float] = {k: float(v) for k, v in self.method.shape_rewards(inputs).items()}
        advantages, adv_metrics = self._advantages(inputs, ~errors)
        metrics.update({k: float(v) for k, v in adv_metrics.items()})
        inputs["advantages"] = advantages
        for plugin in self.plugins:
            plugin.after_advantages(self, ro, inputs)
        advantages = inputs["advantages"]
        response_mask = inputs["response_mask"]
        if cfg.train.sampler_correction != "none":  # weights the policy-gradient term only
            weights = sampler_importance_weights(
                old_logprobs,
                batch.sampler_logprobs.float(),
                response_mask,
                cfg.train.sampler_correction,
                cfg.train.sampler_correction_min,
                cfg.train.sampler_correction_max,
            )
            advantages = advantages * weights
            metrics.update(correction_metrics(weights, response_mask))
        t_prep = time.perf_counter() - t1

        # K epochs of mini-batch updates.
        t2 = time.perf_counter()
        lr = float(self.scheduler.get_last_lr()[0])  # the rate this step's updates use
        self.model.train()
        records: list[dict[str, float]] = []
        trainer_lp = old_logprobs.clone()  # filled by the training pass when old log-probs are reused
        grad_norms: list[float] = []
        skipped = 0
        overflows = 0  # updates the loss scaler skipped (float16), not counted as non-finite
        ent_sum, ent_tokens = 0.0, 0.0  # token-mean over every update: independent of micro-batching
        for _epoch in range(cfg.train.epochs):
            for mb, micro_batches in self._update_batches(ro):
                agg = Aggregation(
                    num_tokens=max(count_tokens(response_mask[mb]), 1.0),
                    num_sequences=max(count_sequences(response_mask[mb]), 1.0),
                    norm_length=float(cfg.sampling.max_new_tokens),
                )
                # Counts of the whole mini-batch for every update call (entries such as dypo, real and
                # pacs take them as optional parameters so that their micro-batch losses add up to the
                # mini-batch's): the prompts with a scored sample, the rows with a valid token.
                counts = {"num_prompts": ro.prompt_count(mb), "num_samples": agg.num_sequences}
                finite = True
                parts: list[tuple[float, float, dict[str, float]]] = []  # (valid tokens, rows, metrics)
                for rows in micro_batches:
                    lp, ent, dist, _ = self._logprobs(self.model, batch, rows, grad=True)
                    # Per-row inputs are sliced to the micro-batch; batch-level ones pass whole.
                    step_inputs = {k: _rows_of(k, v, rows, n, self.row_inputs) for k, v in inputs.items()}
                    step_inputs = {
                        k: (v.to(self.device) if isinstance(v, torch.Tensor) else v)
                        for k, v in step_inputs.items()
                    }
                    step_inputs.update(counts)
                    step_inputs.update(logprobs=lp, entropy=ent, advantages=advantages[rows].to(self.device))
                    if reuse_old:
                        step_inputs["old_logprobs"] = lp.detach()
                        trainer_lp[rows] = lp.detach().float().cpu()
                    if dist is not None:
                        step_inputs["logits"] = dist
                    loss, m = self.method.loss(step_inputs, agg)
                    for plugin in self.plugins:
                        extra = plugin.extra_loss(self, ro, rows, mb)
                        if extra is not None:  # already the micro-batch's share of the mini-batch term
                            loss = loss + extra[0]
                            m = {**m, **{k: torch.tensor(v) for k, v in extra[1].items()}}
                    if not torch.isfinite(loss):
                        finite = False
                        break
                    (loss if self.grad_scaler is None else self.grad_scaler.scale(loss)).backward()
                    # Metrics ending in "loss" are partial sums under the mini-batch's global
                    # aggregation; the others describe this micro-batch (see aggregate.local) and are
                    # combined by max / min (``_max`` / ``_min``) or weighted by its valid tokens.
                    parts.append(
                        (
                            count_tokens(step_inputs["response_mask"]),
                            float(len(rows)),
                            {k: float(v) for k, v in m.items()},
                        )
                    )
                    if ent is not None:
                        rm = step_inputs["response_mask"]
                        ent_sum += float((ent.detach() * rm).sum())
                        ent_tokens += float(rm.sum())
                if not finite:
                    self.optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    continue
                norm, outcome = clipped_step(
                    self.optimizer,
                    [p for p in self.model.parameters() if p.requires_grad],
                    cfg.train.max_grad_norm,
                    self.grad_scaler,
                )
                self.optimizer.zero_grad(set_to_none=True)
                if outcome != "stepped":
                    skipped += outcome == "nonfinite"
                    overflows += outcome == "overflow"
                    continue
                grad_norms.append(norm)
                # An update over no valid token (every row masked: failed verifications, truncations
                # with train.mask_truncated) measured nothing: its placeholders (a ratio mean of 0, a
                # max of 1) stay out of the step's metrics, which then lack what no update measured.
                if any(tokens > 0 for tokens, _, _ in parts):
                    records.append(combine_micro_batch_metrics(parts))
        if grad_norms:  # the schedule advances with the optimizer, not on fully skipped steps
            self.scheduler.step()
        t_update = time.perf_counter() - t2

        # Non-finite steps never reach the weights; repeated ones stop the run.
        if skipped:
            self.nan_skips += 1
            self.total_nan_skips += skipped
        else:
            self.nan_skips = 0

        metrics.update(combine_update_metrics(records))
        metrics.update(
            self._rollout_metrics(
                ro, rewards, trainer_lp if reuse_old else old_logprobs, ref_logprobs, response_mask
            )
        )
        n_tokens = float(mask.sum())
        step_time = time.perf_counter() - t0
        if grad_norms:
            metrics["grad/norm"] = sum(grad_norms) / len(grad_norms)
        elif skipped:  # every update non-finite: NaN (0 would read as a collapse); the nan alarm fires
            metrics["grad/norm"] = float("nan")
        # (every update skipped by the loss scaler's routine overflows: no norm was measured)
        if self.grad_scaler is not None:
            metrics["train/overflow_skips"] = float(overflows)
            metrics["train/loss_scale"] = float(self.grad_scaler.get_scale())
        if ent_tokens:
            metrics["policy/entropy"] = ent_sum / ent_tokens
        elif skipped:  # every update skipped: nothing was measured (0 would read as a collapse)
            metrics["policy/entropy"] = float("nan")
        # (no valid token in the whole step, e.g. every verification failed: no entropy to report, and
        # no NaN that would raise a false "nan" alarm; the verifier_errors alarm names the cause)
        metrics.update(
            {
                "train/lr": lr,
                "train/nan_skips": float(self.total_nan_skips),
                # this step's updates skipped for a non-finite loss or gradient (alarm "nan")
                "train/skipped_updates": float(skipped),
                "time/rollout_s": t_rollout,
                "time/logprobs_s": t_prep,
                "time/update_s": t_update,
                "time/step_s": step_time,
                "perf/tokens_per_s": n_tokens / max(step_time, 1e-9),
                "perf/rollout_tokens_per_s": n_tokens / max(t_rollout, 1e-9),
                **memory_metrics(self.device),
            }
        )
        for plugin in self.plugins:
            plugin.after_step(self, ro, inputs, metrics)
        # A step whose every update was skipped (NaN) or held no valid token leaves the method's state as is.
        if records:
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
        m = mask.float()
        # Reward statistics over the scored samples: a failed verification has no reward.
        scored = ro.scored
        rewards, groups = rewards[scored], ro.group_ids[scored]
        # A group without spread: all its scored rewards equal (max == min, as dynamic sampling
        # judges; a float std of equal values need not be 0). Only groups of two or more scored
        # samples can have a spread at all: one sample per prompt (SPO) is no flat group.
        zero_std = [
            bool(group.max() == group.min())
            for group in (rewards[groups == gid] for gid in groups.unique().tolist())
            if len(group) >= 2
        ]
        gap = ((old_logprobs - batch.sampler_logprobs.float()).abs() * m).sum() / m.sum().clamp(min=1)
        errors = sum(s.error is not None for s in ro.scores)
        out = {
            "reward/accuracy": sum(s.correct for s in ro.scores) / len(ro.scores),
            "reward/format": sum(s.format_ok for s in ro.scores) / len(ro.scores),
            "reward/verifier_errors": float(errors),
            # the share of the step's samples whose verifier raised (alarm "verifier_errors")
            "reward/verifier_error_rate": errors / len(ro.scores),
            "response/length_mean": float(mask.sum(-1).float().mean()),
            "response/length_max": float(mask.sum(-1).max()),
            "response/truncation_rate": float(batch.truncated.float().mean()),
            "rollout/logprob_gap": float(gap),
            "rollout/rounds": float(ro.rounds),
            "rollout/dropped_groups": float(ro.dropped_groups),
            "cost/mean": sum(s.cost for s in ro.scores) / len(ro.scores),
        }
        if len(rewards):  # left out when no sample was scored: a mean of 0 would read as a real reward
            out["reward/mean"] = float(rewards.mean())
            out["reward/std"] = float(rewards.std()) if len(rewards) > 1 else 0.0
        if zero_std:  # left out (no alarm) when no group has two scored samples
            out["reward/zero_std_frac"] = sum(zero_std) / len(zero_std)
        for label in dict.fromkeys(k for s in ro.scores for k in s.parts):  # task.rewards, each alone
            values = [s.parts[label] for s in ro.scores if label in s.parts]
            out[f"reward_fn/{label}"] = sum(values) / len(values)
        out.update(importance_stats(old_logprobs, batch.sampler_logprobs, mask))
        if ref_logprobs is not None:
            d = old_logprobs - ref_logprobs
            k3 = torch.expm1(-d) + d
            out["policy/kl_ref"] = float((k3 * m).sum() / m.sum().clamp(min=1))
        return out

    def evaluate(self) -> dict[str, Any]:
        """Held-out accuracy, pass@k and entropy of the current policy (``eval.*`` settings),
        sampled with the trainer's own backend and seeded by ``train.seed``."""
        return evaluate(
            self.model,
            self.tokenizer,
            self.task,
            self.config.eval,
            self.config.sampling,
            seed=self.config.train.seed,
            sampler=self.sampler,
        )

    # ----------------------------------------------------------------------------- loop
    def train(self) -> dict[str, Any]:
        """Train to ``train.steps`` and write ``summary.json`` (see :meth:`summary`)."""
        cfg = self.config
        start = self.step_idx
        from tether.lm.progress import TrainProgress

        progress = TrainProgress(total=cfg.train.steps, start=self.step_idx, enabled=cfg.run.progress)
        if cfg.run.tensorboard:
            self.tb = _tensorboard_writer(self.run.path / "tensorboard", self.step_idx)
        last: dict[str, Any] = self.run.metrics_at(self.step_idx)  # a resume with no step left to run
        try:
            with progress, StopRequest() as stop:
                while self.step_idx < cfg.train.steps:
                    metrics = self.step()
                    self.step_idx += 1
                    alarms = self.monitor.check(self.step_idx, metrics, self._alarm_details())
                    record = {"step": self.step_idx, **metrics, "alarms": len(alarms)}
                    self.run.metrics.append(record)
                    self._log_samples()
                    for a in alarms:
                        self.run.alarms.append(a.as_dict())
                        progress.alarm(a.kind, a.message, step=a.step)
                    if self.tb is not None:
                        for k, v in metrics.items():
                            self.tb.add_scalar(k, v, self.step_idx)
                    progress.update(self.step_idx, metrics)
                    if self.on_step is not None:
                        self.on_step(self.step_idx, metrics)
                    last = metrics
                    if self.nan_skips >= cfg.train.max_nan_skips:  # logged, never checkpointed
                        error = self._stop_for_nan()
                        progress.alarm(
                            "stopped",
                            "repeated NaN/inf steps: the run stopped (see the error)",
                            step=self.step_idx,
                        )
                        raise error
                    saved = self.step_idx % cfg.run.checkpoint_every == 0 or self.step_idx == cfg.train.steps
                    if saved:
                        self.save()
                    if stop.requested:  # Ctrl-C: stop here, at a step boundary, with this step saved
                        if not saved:
                            self.save()
                        raise interrupted(
                            "training", self.step_idx, cfg.train.steps, str(self.run.path), "tether train"
                        )
        finally:
            if self.tb is not None:
                self.tb.close()
        summary = self.summary(last, trained=self.step_idx > start)
        self.run.write_summary(summary)
        return summary

    def summary(self, last: Mapping[str, Any], trained: bool) -> dict[str, Any]:
        """The run's summary after :meth:`train`: its final metrics (``last``, timings left out),
        alarms, NaN skips and verifier errors.

        The held-out results (``eval``, with ``eval_step``, the step of the model it scored) of the
        summary already in the run are kept when this call trained nothing (``trained`` false: a
        resume of a finished run) or when no evaluation follows (``evaluates`` false, ``--no-eval``):
        a summary never loses its ``eval`` unless a new one replaces it. Only a run that trained further
        and evaluates next leaves the older ``eval`` out, for the caller's new one (with ``eval_step``,
        :meth:`add_eval`): until that is written the summary has no ``eval`` (``tether compare`` then
        sees the run as unfinished), never one of an older model in its place.
        """
        out: dict[str, Any] = {
            "recipe": self.recipe.name,
            "task": self.config.task.name,
            "seed": self.config.train.seed,
            "steps": self.step_idx,
            "final": {k: v for k, v in last.items() if not k.startswith(TIMING_PREFIXES)},
            "alarms": dict(self.monitor.counts),
            "alarm_count": sum(self.monitor.counts.values()),
            "nan_skips": self.total_nan_skips,
            "verifier_errors": self.verifier_errors,
        }
        previous = self.run.read_summary() if not trained or not self.evaluates else None
        if previous is not None and isinstance(previous.get("eval"), dict):
            out["eval"] = previous["eval"]
            # a summary of an older tether has no eval_step: its eval scored the model of its last step
            out["eval_step"] = previous.get("eval_step", previous.get("steps"))
        return out

    def add_eval(self, summary: dict[str, Any]) -> dict[str, Any]:
        """``summary`` with the held-out results of the current policy (:meth:`evaluate`) as its
        ``eval`` and this step as its ``eval_step``, written to ``summary.json``."""
        summary = {**summary, "eval": self.evaluate(), "eval_step": self.step_idx}
        self.run.write_summary(summary)
        return summary

    def _stop_for_nan(self) -> NonFiniteError:
        """The ``stopped`` record of a run that hit ``train.max_nan_skips`` consecutive non-finite
        steps, and the error that says how to go on.

        A resume continues with the run's own settings (it refuses a changed ``train.lr``), so the
        way on is a new run: ``restart.yaml`` in the run directory holds this run's settings with a
        new ``run.out`` and, when a checkpoint exists, ``model.name_or_path`` set to ``model/``
        (rewritten from the last good checkpoint's weights) and ``train.steps`` to the steps left.
        """
        cfg = self.config
        path = self.run.path
        kept = latest_checkpoint(path)
        settings = to_dict(cfg)
        if kept is not None:
            ck = load_checkpoint(kept)
            self.model.load_state_dict({k[6:]: v for k, v in ck.tensors.items() if k.startswith("model.")})
            model_dir = path / "model"
            self.save_pretrained(model_dir, ck.step)  # model/ holds exactly the checkpoint's weights
            settings["model"]["name_or_path"] = str(model_dir.resolve())
            settings["train"]["steps"] = cfg.train.steps - ck.step
            new_out = free_run_dir(path, f"from-step{ck.step}")
        else:
            new_out = free_run_dir(path, "again")
        settings["run"]["out"] = str(new_out)
        restart = self.run.write_restart_config(settings)
        lr, clip = cfg.train.lr, cfg.train.max_grad_norm
        command = f"tether train --config {shlex.quote(str(restart))} train.lr={lr / 10:g}"
        lower = f"a lower train.lr (now {lr:g}) or train.max_grad_norm (now {clip:g})"
        if kept is not None:
            where = (
                f"The last good checkpoint ({kept.name} in {str(path)!r}) is intact and its weights are in "
                f"{str(path / 'model')!r}. A --resume would continue with the same settings (it refuses a "
                f"changed train.lr), so start a new run from those weights with {lower}: {command} "
                f"({restart} holds this run's settings with model.name_or_path set to those weights, "
                f"train.steps={cfg.train.steps - ck.step}, the steps left, and run.out={str(new_out)!r}; "
                "the new run's optimizer, learning-rate schedule and reference model start afresh)."
            )
        else:
            where = (
                f"No checkpoint had been written yet ({str(path)!r}): start the run again in a new directory "
                f"with {lower}: {command} ({restart} holds this run's settings with "
                f"run.out={str(new_out)!r})."
            )
        message = (
            f"{self.nan_skips} consecutive steps produced NaN/inf losses or gradients (train.max_nan_skips="
            f"{cfg.train.max_nan_skips}); the run stopped at step {self.step_idx}. {where}"
        )
        self.run.alarms.append(
            {"step": self.step_idx, "kind": "stopped", "message": message, "value": float(self.nan_skips)}
        )
        return NonFiniteError(message)

    def _alarm_details(self) -> dict[str, str]:
        """What the monitor's alarms quote beyond the metrics: the step's first verifier error, with
        the task it came from (see :meth:`tether.monitor.Monitor.check`)."""
        ro = self.last_rollout
        first = next((s.error for s in ro.scores if s.error is not None), None) if ro is not None else None
        if first is None:
            return {}
        rewards = self.config.task.rewards
        where = f"task {self.config.task.name!r}" + (f" with rewards {', '.join(rewards)}" if rewards else "")
        return {"verifier_error": f"{where}: {first}"}

    def _log_samples(self) -> None:
        """The first ``run.log_samples`` completions of the step to ``samples.jsonl``."""
        ro = self.last_rollout
        if ro is None:
            return
        for i in range(min(self.config.run.log_samples, len(ro.scores))):
            score = ro.scores[i]
            record: dict[str, Any] = {
                "step": self.step_idx,
                "prompt": ro.prompts[i].text,
                "completion": ro.batch.completion_texts[i],
                "answer": ro.prompts[i].answer,
                "reward": float(score.reward),
                "correct": bool(score.correct),
            }
            if score.error is not None:
                record["error"] = score.error
            self.run.samples.append(record)

    # ----------------------------------------------------------------------------- checkpoints
    def save(self) -> Path:
        tensors, o_meta = training_state(self.model, self.optimizer)
        r_tensors, r_state = capture_rng()
        tensors.update(r_tensors)
        tensors["rng.sampler"] = self.generator.get_state()
        state = {
            "optim": o_meta,
            "scheduler": self.scheduler.state_dict(),
            "prompts": self.prompts.state_dict(),
            "method": self.method.state_dict(),
            "monitor": self.monitor.state_dict(),
            "plugins": [p.state_dict() for p in self.plugins],
            "nan_skips": self.nan_skips,
            "total_nan_skips": self.total_nan_skips,
            "verifier_errors": self.verifier_errors,
            **r_state,
        }
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        path = save_checkpoint(
            self.run.path, Checkpoint(self.step_idx, tensors, state), keep=self.config.run.keep_checkpoints
        )
        self.save_pretrained(self.run.path / "model", self.step_idx)
        return path

    def save_pretrained(self, directory: Path, step: int | None = None) -> None:
        """The policy in Hugging Face format (see :func:`~tether.lm.model.save_model`), with the
        ``step`` whose weights it holds recorded beside them (:func:`~tether.runs.rundir.mark_model_step`)."""
        save_model(self.model, self.tokenizer, directory)
        if step is not None:
            mark_model_step(directory, step)

    def _restore(self) -> None:
        ck = load_latest_checkpoint(self.run.path)
        restore_training_state(ck, self.model, self.optimizer)
        self.scheduler.load_state_dict(ck.state["scheduler"])
        self.prompts.load_state_dict(ck.state["prompts"])
        self.method.load_state_dict(ck.state["method"])
        self.monitor.load_state_dict(ck.state["monitor"])
        for plugin, state in zip(self.plugins, ck.state["plugins"]):
            plugin.load_state_dict(state)
        self.nan_skips = int(ck.state["nan_skips"])
        self.total_nan_skips = int(ck.state["total_nan_skips"])
        self.verifier_errors = int(ck.state["verifier_errors"])
        restore_grad_scaler(self.grad_scaler, ck.state)
        restore_rng(ck.tensors, ck.state)
        self.generator.set_state(ck.tensors["rng.sampler"])
        self.step_idx = ck.step
        self.run.truncate_logs(ck.step)


def _tensorboard_writer(path: Path, step: int) -> Any:
    """A TensorBoard writer; a resumed run (``step`` > 0) purges events logged after its checkpoint,
    as the JSONL logs are truncated there, so that no step appears twice."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TetherError(
            "run.tensorboard=true needs TensorBoard: pip install 'tether[tensorboard]'"
        ) from None
    return SummaryWriter(log_dir=str(path), purge_step=step + 1 if step > 0 else None)
