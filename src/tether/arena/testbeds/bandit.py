"""Test-bed T1 of the method cards: the "prompt bandit".

Q prompts, each a softmax policy over M answers (one logit per answer and prompt, the only
parameters); prompt q's correct set C_q holds its first ``correct`` answers; the difficulty of a
prompt is its initial probability mass on C_q. An episode is one answer, i.e. a response of length 1,
so every catalogue entry runs unchanged: ``logprobs`` [B, 1], ``response_mask`` ones, ``group_ids``
the prompt of each sample, ``rewards`` 1[a in C_q] (optionally flipped by a noisy verifier, or
replaced by Bernoulli(0.5) noise), ``ref_logprobs`` under the initial (reference) logits, ``entropy``
the full differentiable entropy of the prompt's softmax, ``logits``/``old_logits`` [B, 1, M].

The training loop composes a recipe with :class:`tether.recipes.Method` exactly as the language-model
trainer does (reward entries, advantage chain, K epochs of policy loss + regularizers, state updates
from the step's metrics) and never looks at the recipe's name. Evaluation is exact: pass@1 is the
policy's mass on C_q and pass@k = 1 - (1 - pass@1)^k.

Answer layout per prompt: ``[correct answers][spark answer?][wrong answers]``; the "spark" (Lp-Reg's
low-probability correct answer whose reward is noisy early) and the pre-boosted wrong answer (ACE)
are optional.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from tether.catalogue.aggregate import Aggregation
from tether.errors import TetherError
from tether.monitor.updates import combine_update_metrics
from tether.recipes import Method, Recipe, load_recipe

# Inputs the bandit can hand to catalogue entries (standard names of DEVELOPERS.md plus two
# world-level quantities: ``current_entropy`` (DCPO: token-mean -lp of the previous actor update)
# and the prompt's log-probs, 0 here: a prompt is given, not generated).
BANDIT_INPUTS = frozenset(
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
        "ref_logits",
        "prompt_logprobs",
        "prompt_mask",
        "current_entropy",
    }
)


@dataclass
class BanditConfig:
    """Test-bed and training settings of one bandit run."""

    prompts: int = 8
    arms: int = 20
    correct: int = 1  # |C_q|: answers 0 .. correct-1 are correct
    # Initial mass on C_q per prompt (a list is cycled over the prompts): the difficulty.
    correct_mass: float | list[float] = 0.2
    # How the correct mass is split over the correct answers (normalised; default: equally).
    correct_split: list[float] | None = None
    init_noise: float = 0.0  # std of Gaussian noise on the wrong answers' initial logits
    boost_wrong: float = 0.0  # log-factor added to the first wrong answer in the policy, not the reference
    spark_mass: float = 0.0  # > 0 adds a correct "spark" answer with this initial mass ...
    spark_reward_p: float = 1.0  # ... rewarded with this probability while step < spark_until
    spark_until: int = 0
    false_negative: float = 0.0  # verifier noise: P(r~=0 | correct)
    false_positive: float = 0.0  # P(r~=1 | wrong)
    random_rewards: bool = False  # rewards ~ Bernoulli(0.5), independent of the answer
    ratio_outlier_frac: float = 0.0  # fraction of samples whose old log-prob is lowered by log(factor)
    ratio_outlier_factor: float = 50.0
    hard_below: float = 0.1  # prompts whose initial correct mass is below this are "hard"
    group_size: int = 16
    steps: int = 200
    epochs: int = 1
    minibatches: int = 1  # per epoch, whole groups per mini-batch
    lr: float = 0.5
    optimizer: Literal["sgd", "adam"] = "sgd"
    seed: int = 0
    pass_k: tuple[int, ...] = (8, 32)
    probe_gradient: bool = False  # log grad/probe_cosine (one extra rollout and two gradients per step)

    def __post_init__(self) -> None:
        check_bandit_config(self)

    def replace(self, **changes: Any) -> BanditConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TetherError(f"bandit: unknown settings {sorted(unknown)}")
        return dataclasses.replace(self, **changes)


OPTIMIZERS = ("sgd", "adam")
SEED_LIMIT = 2**32  # seeds in [0, 2**32), as the trainers' (numpy's seed range)


def check_bandit_config(cfg: BanditConfig) -> None:
    """Refuse settings the test-bed cannot run as asked (before any work): an unknown optimizer
    (it would silently train with SGD), no steps, epochs or mini-batches, groups of one sample
    (every group-relative advantage is 0), probabilities outside [0, 1], a non-positive lr."""

    def bad(name: str, value: Any, allowed: str) -> TetherError:
        return TetherError(f"bandit: {name}={value!r} is not allowed; {allowed}")

    def integer(name: str, low: int, high: int | None = None) -> None:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad(name, v, "it must be an integer")
        if v < low or (high is not None and v >= high):
            raise bad(name, v, f"it must be >= {low}" + (f" and < {high}" if high is not None else ""))

    def number(name: str) -> float:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise bad(name, v, "it must be a finite number")
        return float(v)

    if cfg.optimizer not in OPTIMIZERS:
        raise bad("optimizer", cfg.optimizer, f"use one of {', '.join(OPTIMIZERS)}")
    integer("prompts", 1)
    integer("arms", 2)
    integer("correct", 1)
    integer("steps", 1)
    integer("epochs", 1)
    integer("minibatches", 1)
    integer("spark_until", 0)
    integer("seed", 0, SEED_LIMIT)
    integer("group_size", 2)  # one sample per group: every group-relative advantage is 0
    if number("lr") <= 0:
        raise bad("lr", cfg.lr, "it must be > 0")
    for name in ("spark_reward_p", "false_negative", "false_positive", "ratio_outlier_frac"):
        if not 0.0 <= number(name) <= 1.0:
            raise bad(name, getattr(cfg, name), "it is a probability: it must be in [0, 1]")
    if cfg.false_negative + cfg.false_positive >= 1.0:
        raise TetherError(
            f"bandit: false_negative + false_positive = {cfg.false_negative + cfg.false_positive} must be < 1 "
            "(at 1 the verifier's reward carries no information about correctness)"
        )
    if not 0.0 <= number("spark_mass") < 1.0:
        raise bad("spark_mass", cfg.spark_mass, "it must be in [0, 1)")
    for name in ("init_noise", "boost_wrong", "hard_below"):
        number(name)
    if cfg.init_noise < 0:
        raise bad("init_noise", cfg.init_noise, "it is a standard deviation: it must be >= 0")
    if number("ratio_outlier_factor") <= 0:
        raise bad("ratio_outlier_factor", cfg.ratio_outlier_factor, "it must be > 0")
    masses = cfg.correct_mass if isinstance(cfg.correct_mass, list) else [cfg.correct_mass]
    if not masses or any(
        isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 < m < 1.0 for m in masses
    ):
        raise bad("correct_mass", cfg.correct_mass, "each initial correct mass must be in (0, 1)")
    if cfg.correct_split is not None and (
        any(isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0 for w in cfg.correct_split)
        or not sum(cfg.correct_split) > 0
    ):
        raise bad("correct_split", cfg.correct_split, "weights must be >= 0 with a positive sum")
    if not cfg.pass_k or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in cfg.pass_k):
        raise bad("pass_k", cfg.pass_k, "each k must be an integer >= 1")


@dataclass
class BanditResult:
    config: BanditConfig
    recipe: str
    metrics: list[dict[str, float]] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    # The exact metrics of the initial policy, before any update (``change:KEY`` of the evidence).
    initial: dict[str, float] = field(default_factory=dict)
    per_prompt_success: list[float] = field(default_factory=list)


# ----------------------------------------------------------------------------- recipes
def resolve_recipe(recipe: str | Recipe, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Recipe:
    """A recipe by name, path or object, with ``{component: {param: value}}`` overrides.

    A component is ``advantage`` (the first estimator), ``policy_loss``, or the name of any entry
    of the recipe (e.g. ``kl_k3``).
    """
    from tether.arena.testbeds import TESTBED_RECIPES

    if isinstance(recipe, str):
        local = TESTBED_RECIPES / f"{recipe}.yaml"
        recipe = load_recipe(str(local) if local.is_file() else recipe)
    if not overrides:
        return recipe
    advs = [{**a, "params": dict(a["params"])} for a in recipe.advantage]
    pol = {**recipe.policy_loss, "params": dict(recipe.policy_loss["params"])}
    regs = [{**r, "params": dict(r["params"])} for r in recipe.regularizers]
    rews = [{**r, "params": dict(r["params"])} for r in recipe.rewards]
    for target, params in overrides.items():
        if target == "advantage":
            matches = advs[:1]
        elif target == "policy_loss":
            matches = [pol]
        else:
            matches = [c for c in (*advs, pol, *regs, *rews) if c["name"] == target]
        if not matches:
            raise TetherError(f"recipe {recipe.name!r} has no component {target!r}")
        for c in matches:
            c["params"].update(params)
    return dataclasses.replace(
        recipe, advantage=tuple(advs), policy_loss=pol, regularizers=tuple(regs), rewards=tuple(rews)
    )


# ----------------------------------------------------------------------------- the world
class PromptBandit:
    """Initial logits, correct sets and rewards of the test-bed (no training state)."""

    def __init__(self, cfg: BanditConfig, generator: torch.Generator) -> None:
        if cfg.correct < 1 or cfg.correct + (cfg.spark_mass > 0) + 1 > cfg.arms:
            raise TetherError("bandit: need 1 <= correct and at least one wrong answer")
        q, m, c = cfg.prompts, cfg.arms, cfg.correct
        masses = cfg.correct_mass if isinstance(cfg.correct_mass, list) else [cfg.correct_mass]
        self.init_mass = torch.tensor([float(masses[i % len(masses)]) for i in range(q)], dtype=torch.float64)
        split = torch.tensor(cfg.correct_split or [1.0] * c, dtype=torch.float64)
        if split.numel() != c:
            raise TetherError(f"bandit: correct_split needs {c} values")
        split = split / split.sum()
        self.spark = c if cfg.spark_mass > 0 else None
        self.first_wrong = c + (1 if self.spark is not None else 0)
        n_wrong = m - self.first_wrong
        wrong_total = 1.0 - self.init_mass - cfg.spark_mass
        if bool((wrong_total <= 0).any()):
            raise TetherError("bandit: correct_mass + spark_mass must leave mass for the wrong answers")
        wrong_logits = cfg.init_noise * torch.randn(q, n_wrong, generator=generator, dtype=torch.float64)
        wrong = torch.softmax(wrong_logits, -1) * wrong_total.unsqueeze(-1)
        parts = [self.init_mass.unsqueeze(-1) * split]
        if self.spark is not None:
            parts.append(torch.full((q, 1), cfg.spark_mass, dtype=torch.float64))
        parts.append(wrong)
        probs = torch.cat(parts, -1)
        self.ref_logits = torch.log(probs).float()
        init = self.ref_logits.clone()
        init[:, self.first_wrong] += cfg.boost_wrong
        self.init_logits = init
        self.correct = torch.zeros(q, m, dtype=torch.bool)
        self.correct[:, :c] = True
        if self.spark is not None:
            self.correct[:, self.spark] = True
        self.hard = self.init_mass < cfg.hard_below
        self.cfg = cfg

    def rewards(
        self, prompts: torch.Tensor, answers: torch.Tensor, step: int, g: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(training reward, clean reward) per sample."""
        cfg = self.cfg
        clean = self.correct[prompts, answers].float()
        n = clean.shape[0]
        if cfg.random_rewards:
            return (torch.rand(n, generator=g) < 0.5).float(), clean
        r = clean.clone()
        if self.spark is not None and step < cfg.spark_until:
            is_spark = answers == self.spark
            r = torch.where(is_spark, (torch.rand(n, generator=g) < cfg.spark_reward_p).float(), r)
        if cfg.false_negative > 0 or cfg.false_positive > 0:
            u = torch.rand(n, generator=g)
            flip = torch.where(r > 0.5, u < cfg.false_negative, u < cfg.false_positive)
            r = torch.where(flip, 1.0 - r, r)
        return r, clean

    def evaluate(self, logits: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
        """Exact metrics of the policy ``logits`` [Q, M]; also per-prompt pass@1."""
        cfg = self.cfg
        with torch.no_grad():
            p = torch.softmax(logits.double(), -1)
            logp = torch.log_softmax(logits.double(), -1)
            corr = self.correct.double()
            acc = (p * corr).sum(-1)
            ent = -(p * logp).sum(-1)
            out: dict[str, float] = {
                "eval/accuracy": float(acc.mean()),
                "policy/entropy": float(ent.mean()),
                "bandit/mass_correct": float(acc.mean()),
                "bandit/correct_arms_alive": float(((p > 0.01) & self.correct).sum(-1).double().mean()),
            }
            for k in cfg.pass_k:
                out[f"eval/pass@{k}"] = float((1 - (1 - acc) ** k).mean())
            # Evenness of the mass over C_q: normalised entropy of pi restricted to C_q.
            n_c = int(self.correct[0].sum())
            pc = (p * corr) / acc.unsqueeze(-1).clamp(min=1e-300)
            h_c = -(pc * torch.log(pc.clamp(min=1e-300))).sum(-1)
            out["bandit/correct_evenness"] = float((h_c / math.log(n_c)).mean()) if n_c > 1 else 1.0
            out["bandit/minor_correct_mass"] = float((acc - p[:, 0]).mean())
            out["bandit/spark_mass"] = float(p[:, self.spark].mean()) if self.spark is not None else math.nan
            out["bandit/log10_spark_mass"] = (
                float(torch.log10(p[:, self.spark]).mean()) if self.spark is not None else math.nan
            )
            out["bandit/boosted_mass"] = float(p[:, self.first_wrong].mean())
            out["bandit/accuracy_hard"] = float(acc[self.hard].mean()) if bool(self.hard.any()) else math.nan
            # Confidence AUC: P(pi(c) > pi(w)) for c ~ pi|C, w ~ pi|not C (ties 1/2), mean over prompts.
            wrong = 1.0 - corr
            pcw = (p * corr).unsqueeze(-1) * (p * wrong).unsqueeze(-2)  # [Q, c, w]
            above = (p.unsqueeze(-1) > p.unsqueeze(-2)).double() + 0.5 * (
                p.unsqueeze(-1) == p.unsqueeze(-2)
            ).double()
            auc = (pcw * above).sum((-1, -2)) / pcw.sum((-1, -2)).clamp(min=1e-300)
            out["bandit/conf_auc"] = float(auc.mean())
        return out, acc.float()


# ----------------------------------------------------------------------------- training
def _row_inputs(
    logits: torch.Tensor, rows_prompt: torch.Tensor, answers: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs [B,1], logits [B,1,M], entropy [B,1]) of the samples under ``logits`` [Q, M]."""
    lg = logits[rows_prompt].unsqueeze(1)
    logp = torch.log_softmax(lg, -1)
    lp = logp.gather(-1, answers.view(-1, 1, 1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, lg, ent


def train_bandit(
    recipe: str | Recipe,
    config: BanditConfig | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> BanditResult:
    """Train the bandit policy with a recipe; deterministic given ``config.seed``."""
    cfg = config or BanditConfig()
    rec = resolve_recipe(recipe, overrides)
    method = Method(rec)
    method.check_inputs(set(BANDIT_INPUTS), "bandit")
    g = torch.Generator().manual_seed(cfg.seed)
    world = PromptBandit(cfg, g)
    logits = torch.nn.Parameter(world.init_logits.clone())
    opt: torch.optim.Optimizer = (
        torch.optim.Adam([logits], lr=cfg.lr)
        if cfg.optimizer == "adam"
        else torch.optim.SGD([logits], lr=cfg.lr)
    )
    q, gs = cfg.prompts, cfg.group_size
    n = q * gs
    prompts_of_rows = torch.arange(q).repeat_interleave(gs)
    ones = torch.ones(n, 1, dtype=torch.bool)
    result = BanditResult(config=cfg, recipe=rec.name, initial=world.evaluate(logits.detach())[0])
    current_entropy: float | None = None

    def rollout(step: int) -> tuple[dict[str, Any], dict[str, float], torch.Tensor, torch.Tensor]:
        """Sample G answers per prompt and build the catalogue inputs and advantages."""
        with torch.no_grad():
            probs = torch.softmax(logits.detach(), -1)
            answers = torch.multinomial(probs, gs, replacement=True, generator=g).reshape(-1)
            rewards, clean = world.rewards(prompts_of_rows, answers, step, g)
            old_lp, old_lg, _ = _row_inputs(logits.detach(), prompts_of_rows, answers)
            ref_lp, ref_lg, _ = _row_inputs(world.ref_logits, prompts_of_rows, answers)
            behaviour_lp = old_lp.clone()
            if cfg.ratio_outlier_frac > 0:
                hit = torch.rand(n, generator=g) < cfg.ratio_outlier_frac
                behaviour_lp = behaviour_lp - hit.float().unsqueeze(-1) * math.log(cfg.ratio_outlier_factor)
        inputs: dict[str, Any] = {
            "rewards": rewards,
            "group_ids": prompts_of_rows.clone(),
            "response_mask": ones.clone(),
            "token_ids": answers.view(-1, 1),
            "truncated": torch.zeros(n, dtype=torch.bool),
            "response_lengths": torch.ones(n),
            "old_logprobs": behaviour_lp,
            "logprobs": behaviour_lp,  # before the update the current policy is the old one
            "old_logits": old_lg,
            "logits": old_lg,
            "ref_logprobs": ref_lp,
            "ref_logits": ref_lg,
            "prompt_logprobs": torch.zeros(n, 1),
            "prompt_mask": ones.clone(),
            "current_entropy": current_entropy if current_entropy is not None else float((-old_lp).mean()),
        }
        metrics: dict[str, float] = {k: float(v) for k, v in method.shape_rewards(inputs).items()}
        advantages, adv_metrics = method.compute_advantages(inputs)
        advantages = advantages.float()
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(-1)
        inputs["advantages"] = advantages
        metrics.update({k: float(v) for k, v in adv_metrics.items()})
        return inputs, metrics, rewards, clean

    def batch_loss(
        inputs: Mapping[str, Any], rows: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        answers = inputs["token_ids"][:, 0]
        lp, lg, ent = _row_inputs(logits, prompts_of_rows[rows], answers[rows])
        step_inputs = {
            k: (v[rows] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v)
            for k, v in inputs.items()
        }
        step_inputs.update(logprobs=lp, logits=lg, entropy=ent)
        agg = Aggregation(num_tokens=float(len(rows)), num_sequences=float(len(rows)), norm_length=1.0)
        loss, m = method.loss(step_inputs, agg)
        return loss, m, lp

    def first_gradient(inputs: Mapping[str, Any]) -> torch.Tensor:
        loss, _, _ = batch_loss(inputs, torch.arange(n))
        (grad,) = torch.autograd.grad(loss, logits, allow_unused=True)
        return torch.zeros_like(logits) if grad is None else grad

    for step in range(cfg.steps):
        inputs, metrics, rewards, clean = rollout(step)
        if current_entropy is None:
            current_entropy = float(inputs["current_entropy"])
        # Gradient-noise probe: cosine between the first-update gradients of this rollout and of a
        # second, independent rollout of the same policy (each with its own advantages). Scale-free,
        # so estimators of different scales compare; higher = lower relative variance.
        half_cos = math.nan
        if cfg.probe_gradient:
            probe_inputs, _, _, _ = rollout(step)
            g1, g2 = first_gradient(inputs), first_gradient(probe_inputs)
            norms = g1.norm() * g2.norm()
            if float(norms) > 0:
                half_cos = float((g1 * g2).sum() / norms)
        old_lp = inputs["old_logprobs"]

        records: list[dict[str, float]] = []
        grad_norms: list[float] = []
        ratio_max = 0.0
        last_lp = old_lp
        for _epoch in range(cfg.epochs):
            order = torch.randperm(q, generator=g)
            for chunk in order.chunk(cfg.minibatches):
                rows = (prompts_of_rows.unsqueeze(-1) == chunk.unsqueeze(0)).any(-1).nonzero().squeeze(-1)
                opt.zero_grad(set_to_none=True)
                loss, m, lp = batch_loss(inputs, rows)
                ratio_max = max(ratio_max, float((lp.detach() - inputs["old_logprobs"][rows]).abs().max()))
                if not torch.isfinite(loss):
                    raise TetherError(f"bandit: non-finite loss at step {step}")
                loss.backward()  # type: ignore[no-untyped-call]
                grad = logits.grad if logits.grad is not None else torch.zeros_like(logits)
                grad_norms.append(float(grad.norm()))
                opt.step()
                records.append({k: float(v) for k, v in m.items()})
                last_lp = lp.detach()
        current_entropy = float((-last_lp).mean())
        metrics.update(combine_update_metrics(records))
        ev, per_prompt = world.evaluate(logits.detach())
        metrics.update(ev)
        metrics.update(
            {
                "step": float(step + 1),
                "reward/mean": float(rewards.mean()),
                "reward/accuracy": float(clean.mean()),
                "policy/log_ratio_abs_max": ratio_max,
                "grad/norm": sum(grad_norms) / len(grad_norms),
                "grad/norm_max": max(grad_norms),
                "grad/probe_cosine": half_cos,
            }
        )
        method.update_state(metrics)
        result.metrics.append(metrics)
        result.per_prompt_success = [float(x) for x in per_prompt]
    result.final = dict(result.metrics[-1]) if result.metrics else {}
    return result
