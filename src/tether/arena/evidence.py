"""Evidence: the method cards' miniature claims, registered before running, checked across seeds.

Each :class:`Claim` states a card's claimed effect on a test-bed (settings and budget), the baseline
and treatment arms (a recipe, optionally with parameter overrides), the metric and the predicted
direction. ``tether evidence`` runs both arms for every seed (through the arena's executors: each run
is the subprocess ``python -m tether.cli evidence-run --claim C --arm A --seed S --out DIR``, which
writes a run directory with ``summary.json``), then compares them:

- per-seed metric values of both arms, their means with percentile-bootstrap 95% CIs, the
  probability of improvement (rliable), and the CI of the paired treatment-minus-baseline difference
  (seed s of both arms shares the test-bed's initial logits);
- verdict: ``holds`` when that CI excludes 0 in the predicted direction, ``does not hold`` when it
  excludes 0 in the opposite direction, else ``inconclusive``.

The claims' settings come from the cards (lr 0.5, G = 16, 8 epochs ... where a card gives them) and
were fixed before any run; they are not to be tuned until a verdict agrees.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from tether.errors import TetherError, UnknownNameError

Direction = Literal["higher", "lower"]
Verdict = Literal["holds", "does not hold", "inconclusive"]
ArmName = Literal["baseline", "treatment"]


@dataclass(frozen=True)
class Arm:
    """A recipe (name, test-bed recipe name or path) with ``{component: {param: value}}`` overrides
    and test-bed settings of this arm only."""

    recipe: str
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        parts = [self.recipe]
        for comp, params in self.overrides.items():
            parts.append(", ".join(f"{comp}.{k}={v}" for k, v in params.items()))
        parts += [f"{k}={v}" for k, v in self.settings.items()]
        return parts[0] + (f" ({'; '.join(parts[1:])})" if len(parts) > 1 else "")


@dataclass(frozen=True)
class Claim:
    """A card's miniature claim: treatment beats baseline on ``metric`` in ``direction``.

    ``metric`` is ``final:KEY`` (the last step's value), ``mean:KEY`` (mean over steps),
    ``gap:KEY:TARGET`` (|final - TARGET|) or ``spike:KEY`` (max over steps / median over steps) of
    a per-step metric of the test-bed.
    """

    name: str
    method: str
    paper: str
    arxiv: str
    card: str
    statement: str
    settings: Mapping[str, Any]
    budget: int
    baseline: Arm
    treatment: Arm
    metric: str
    direction: Direction
    seeds: int = 5
    testbed: str = "bandit"
    notes: str = ""


@dataclass
class ClaimResult:
    claim: Claim
    seeds: list[int]
    baseline: list[float]
    treatment: list[float]
    baseline_mean: float
    baseline_ci: tuple[float, float]
    treatment_mean: float
    treatment_ci: tuple[float, float]
    diff_mean: float
    diff_ci: tuple[float, float]
    prob_improvement: float
    verdict: Verdict
    errors: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- metrics
def metric_value(spec: str, metrics: Sequence[Mapping[str, float]], probe: bool = False) -> float:
    """The value of a claim's metric on a run's per-step metrics (see :class:`Claim`)."""
    kind, _, rest = spec.partition(":")
    if kind not in ("final", "mean", "gap", "spike") or not rest:
        raise TetherError(f"metric {spec!r}: use final:KEY, mean:KEY, gap:KEY:TARGET or spike:KEY")
    key, target = rest, 0.0
    if kind == "gap":
        key, _, t = rest.rpartition(":")
        target = float(t)
    if probe:
        return math.nan
    values = np.array([float(m.get(key, math.nan)) for m in metrics], dtype=np.float64)
    if values.size == 0 or not np.isfinite(values).any():
        return math.nan
    if kind == "final":
        return float(values[-1])
    if kind == "mean":
        return float(np.nanmean(values))
    if kind == "gap":
        return abs(float(values[-1]) - target)
    median = float(np.nanmedian(values))
    return float(np.nanmax(values)) / median if median > 0 else math.inf


def verdict(diff_ci: tuple[float, float], direction: Direction) -> Verdict:
    """``holds`` if the treatment-minus-baseline CI excludes 0 on the predicted side, ``does not
    hold`` if it excludes 0 on the other side, else ``inconclusive``."""
    low, high = diff_ci
    if not (math.isfinite(low) and math.isfinite(high)):
        return "inconclusive"
    if direction == "higher":
        return "holds" if low > 0 else ("does not hold" if high < 0 else "inconclusive")
    return "holds" if high < 0 else ("does not hold" if low > 0 else "inconclusive")


# ----------------------------------------------------------------------------- registry
CLAIMS: dict[str, Claim] = {}


def register_claim(claim: Claim) -> Claim:
    if claim.name in CLAIMS:
        raise TetherError(f"claim {claim.name!r} is registered twice")
    if claim.direction not in ("higher", "lower"):
        raise TetherError(f"claim {claim.name!r}: direction must be 'higher' or 'lower'")
    metric_value(claim.metric, [{"step": 1.0}], probe=True)
    CLAIMS[claim.name] = claim
    return claim


def get_claim(name: str) -> Claim:
    key = name.lower().replace("-", "_").replace(".", "_")
    if key in CLAIMS:
        return CLAIMS[key]
    by_method = [c for c in CLAIMS.values() if c.method.lower() == name.lower()]
    if len(by_method) == 1:
        return by_method[0]
    raise UnknownNameError(f"unknown claim {name!r}; claims: {', '.join(sorted(CLAIMS))}")


NO_KL = {"kl_k3": {"coef": 0.0}}  # GRPO with the clipped surrogate only (the cards' "GRPO"/"PPO-clip")
GRPO = Arm("grpo", NO_KL)
MIXED = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6]

register_claim(
    Claim(
        name="dcpo",
        method="DCPO",
        paper="Distribution-Centric Policy Optimization Dominates Exploration-Exploitation Trade-off",
        arxiv="2601.12730",
        card="ratio#9",
        statement="With an entropy target H0 = 0.5, DCPO holds the policy entropy near H0 while GRPO's decays.",
        settings={"correct": 3, "correct_mass": 0.3},
        budget=200,
        baseline=GRPO,
        treatment=Arm("dcpo"),
        metric="gap:policy/entropy:0.5",
        direction="lower",
    )
)
register_claim(
    Claim(
        name="dph_rl",
        method="DPH-RL",
        paper="The Choice of Divergence: A Neglected Key to Mitigating Diversity Collapse in RLVR",
        arxiv="2509.07430",
        card="ratio#6",
        statement="On a 5-correct-arm bandit with pi_0 uniform over the correct arms, the forward-KL "
        "rehearsal term (eta 0.01) keeps more correct arms alive (>= 4 of 5 with mass > 1%) than eta = 0 (GRPO).",
        settings={"correct": 5, "correct_mass": 0.95},
        budget=300,
        baseline=Arm("dph_rl", {"dph_rl": {"coef": 0.0}}),
        treatment=Arm("dph_rl"),
        metric="final:bandit/correct_arms_alive",
        direction="higher",
        notes="The term is estimated on the policy's own samples (no pre-sampled pi_0 replay set).",
    )
)
register_claim(
    Claim(
        name="lp_reg",
        method="Lp-Reg",
        paper="Low-probability Tokens Sustain Exploration in RLVR",
        arxiv="2510.03222",
        card="ratio#7",
        statement="A low-probability 'spark' answer (initial mass 0.05) whose reward is noisy (1 w.p. 0.1) "
        "keeps more mass under Lp-Reg (kappa 0.02, rho 1%, beta 1) than with rho = 0 (base loss), "
        "where it is driven toward 0 (card: stays > 1e-3).",
        settings={
            "prompts": 64,
            "correct_mass": 0.5,
            "spark_mass": 0.05,
            "spark_reward_p": 0.1,
            "spark_until": 150,
        },
        budget=150,
        baseline=Arm("lp_reg", {"policy_loss": {"rho": 0.0}}),
        treatment=Arm("lp_reg"),
        metric="final:bandit/log10_spark_mass",
        direction="higher",
    )
)
register_claim(
    Claim(
        name="ace",
        method="ACE",
        paper="Overconfident Errors Need Stronger Correction: Asymmetric Confidence Penalties for RL",
        arxiv="2602.21420",
        card="ratio#12",
        statement="A wrong answer pre-boosted 5x relative to pi_ref loses mass faster under ACE "
        "(alpha 0.5) than under alpha = 0 (GRPO).",
        settings={"correct_mass": 0.3, "boost_wrong": math.log(5.0)},
        budget=50,
        baseline=Arm("ace", {"ace": {"alpha": 0.0}}),
        treatment=Arm("ace"),
        metric="final:bandit/boosted_mass",
        direction="lower",
    )
)
register_claim(
    Claim(
        name="capo",
        method="CAPO",
        paper="Calibration-Aware Policy Optimization for Reasoning LLMs",
        arxiv="2604.12632",
        card="ratio#13",
        statement="The AUC of confidence (answer probability) against correctness ends higher under CAPO "
        "than under GRPO (card: GRPO's falls, CAPO's rises).",
        settings={"correct": 3, "correct_mass": 0.3, "correct_split": [0.8, 0.1, 0.1]},
        budget=200,
        baseline=GRPO,
        treatment=Arm("capo"),
        metric="final:bandit/conf_auc",
        direction="higher",
    )
)
register_claim(
    Claim(
        name="progrpo",
        method="ProGRPO / ARM",
        paper="Back to Basics: Revisiting Exploration in RL for LLM Reasoning via Generative Probabilities",
        arxiv="2602.05281",
        card="ratio#16",
        statement="With two correct answers of unequal initial mass (0.32 vs 0.08), ProGRPO (alpha 0.1) "
        "ends with a more even split between them than alpha = 0 (GRPO), which amplifies the larger.",
        settings={"correct": 2, "correct_mass": 0.4, "correct_split": [0.8, 0.2]},
        budget=200,
        baseline=Arm("progrpo", {"progrpo": {"alpha": 0.0}}),
        treatment=Arm("progrpo"),
        metric="final:bandit/correct_evenness",
        direction="higher",
        notes="The prompt's log-prob is 0 on the bandit, so c(q) = 1 and the shift is alpha (1 - pi(a)).",
    )
)
register_claim(
    Claim(
        name="bnpo",
        method="BNPO",
        paper="BNPO: Beta Normalization Policy Optimization",
        arxiv="",
        card="adv#B1",
        statement="On mixed difficulties, BNPO's policy-gradient estimate varies less across independent "
        "batches than GRPO's: higher mean cosine between the gradients of two independent rollouts.",
        settings={"prompts": 8, "correct_mass": MIXED, "probe_gradient": True},
        budget=100,
        baseline=GRPO,
        treatment=Arm("bnpo"),
        metric="mean:grad/probe_cosine",
        direction="higher",
    )
)
register_claim(
    Claim(
        name="ngrpo",
        method="NGRPO",
        paper="NGRPO: Negative-enhanced Group Relative Policy Optimization",
        arxiv="",
        card="adv#B3",
        statement="With 40% of prompts at p ~ 0 (0.005), NGRPO (one virtual max-reward sample) solves more of "
        "them (higher mean pass@1 on those prompts) than m = 0 (GRPO).",
        settings={"prompts": 10, "correct_mass": [0.005] * 4 + [0.3] * 6, "hard_below": 0.1},
        budget=200,
        baseline=Arm("ngrpo", {"advantage": {"num_virtual": 0}}),
        treatment=Arm("ngrpo"),
        metric="final:bandit/accuracy_hard",
        direction="higher",
    )
)
register_claim(
    Claim(
        name="a_grae",
        method="A-GRAE",
        paper="Unveiling Implicit Advantage Symmetry: Why GRPO Struggles with Exploration and Difficulty Adaptation",
        arxiv="",
        card="adv#B4",
        statement="With 3 correct answers, one dominant at init (mass 0.288 vs 0.006 each), the mass on the "
        "two initially-unsampled correct answers grows more under A-GRAE than under GRPO.",
        settings={"correct": 3, "correct_mass": 0.3, "correct_split": [0.96, 0.02, 0.02]},
        budget=200,
        baseline=GRPO,
        treatment=Arm("a_grae"),
        metric="final:bandit/minor_correct_mass",
        direction="higher",
    )
)
register_claim(
    Claim(
        name="dgpo",
        method="DGPO",
        paper="Harder Is Better: Boosting Mathematical Reasoning via Difficulty-Aware GRPO and Multi-Aspect "
        "Question Reformulation",
        arxiv="",
        card="adv#B11",
        statement="On a difficulty ladder (initial pass@1 0.02 .. 0.64), DGPO (T = 2) improves the hardest "
        "bin (initial pass@1 < 0.05) more than GRPO.",
        settings={"prompts": 12, "correct_mass": [0.02, 0.04, 0.08, 0.16, 0.32, 0.64], "hard_below": 0.05},
        budget=100,
        baseline=GRPO,
        treatment=Arm("dgpo"),
        metric="final:bandit/accuracy_hard",
        direction="higher",
    )
)
register_claim(
    Claim(
        name="r2vpo",
        method="R2VPO",
        paper="Ratio-Variance Regularized Policy Optimization for Efficient LLM Fine-tuning",
        arxiv="2601.03320",
        card="ratio#4",
        statement="Reusing each batch for 8 epochs, R2VPO keeps improving where PPO-clip stalls: higher "
        "pass@1 after the budget.",
        settings={"correct_mass": 0.05, "epochs": 8},
        budget=50,
        baseline=GRPO,
        treatment=Arm("r2vpo"),
        metric="final:eval/accuracy",
        direction="higher",
    )
)
register_claim(
    Claim(
        name="pacs",
        method="PACS",
        paper="Implicit Actor Critic Coupling via a Supervised Learning Framework for RLVR",
        arxiv="",
        card="adv#B10",
        statement="PACS reaches a higher pass@32 than GRPO (card: large pass@k gain, pass@1 matched).",
        settings={"prompts": 8, "correct_mass": MIXED},
        budget=100,
        baseline=GRPO,
        treatment=Arm("pacs"),
        metric="final:eval/pass@32",
        direction="higher",
    )
)
register_claim(
    Claim(
        name="real",
        method="REAL",
        paper="Rewards as Labels: Revisiting RLVR from a Classification Perspective",
        arxiv="",
        card="adv#B8",
        statement="With rare correct answers (initial pass@1 0.03), REAL has smaller gradient-norm spikes "
        "than GRPO at equal lr (max / median of the per-step gradient norm).",
        settings={"correct_mass": 0.03},
        budget=100,
        baseline=GRPO,
        treatment=Arm("real"),
        metric="spike:grad/norm_max",
        direction="lower",
    )
)
register_claim(
    Claim(
        name="mhpo",
        method="MHPO",
        paper="MHPO: Modulated Hazard-aware Policy Optimization for Stable Reinforcement Learning",
        arxiv="2603.16929",
        card="ratio#1",
        statement="With ratio outliers injected (1% of samples' probabilities x50 against the behaviour "
        "policy), MHPO's gradient-norm spikes (max / median) stay below PPO-clip's.",
        settings={"correct_mass": 0.2, "ratio_outlier_frac": 0.01, "ratio_outlier_factor": 50.0},
        budget=100,
        baseline=GRPO,
        treatment=Arm("mhpo"),
        metric="spike:grad/norm_max",
        direction="lower",
    )
)
register_claim(
    Claim(
        name="flow_of_reasoning",
        method="FoR",
        paper="Flow of Reasoning: Efficient Training of LLM Policy with Divergent Thinking",
        arxiv="2406.05673",
        card="ratio#18",
        statement="With 4 equal-reward correct answers (initial split 0.4/0.3/0.2/0.1), FoR spreads its "
        "correct mass more evenly than GRPO, which concentrates on one.",
        settings={"correct": 4, "correct_mass": 0.4, "correct_split": [0.4, 0.3, 0.2, 0.1]},
        budget=200,
        baseline=GRPO,
        treatment=Arm("flow_of_reasoning"),
        metric="final:bandit/correct_evenness",
        direction="higher",
    )
)
register_claim(
    Claim(
        name="noisy_verifier",
        method="Noisy-verifier correction",
        paper="Reinforcement Learning with Verifiable yet Noisy Rewards under Imperfect Verifiers",
        arxiv="2510.00915",
        card="adv#B16",
        statement="Under 30% false negatives and 5% false positives, the backward correction (with RLOO) "
        "reaches a higher clean pass@1 than uncorrected RLOO, approaching noise-free training.",
        settings={"correct_mass": 0.1, "false_negative": 0.3, "false_positive": 0.05},
        budget=100,
        baseline=Arm("rloo"),
        treatment=Arm("noisy_backward"),
        metric="final:eval/accuracy",
        direction="higher",
        notes="Under RLOO the correction is an advantage rescale by 1/(1 - rho0 - rho1) (affine in R~).",
    )
)
register_claim(
    Claim(
        name="clipping_bias",
        method="Clipping-bias probe",
        paper="Exploration v.s. Exploitation: Rethinking RLVR through Clipping, Entropy, and Spurious Reward",
        arxiv="",
        card="ratio#8",
        statement="Under random Bernoulli(0.5) rewards (20 arms, G 16, 8 epochs, lr 0.5, 300 steps), entropy "
        "falls faster with clipping on (eps 0.2, baseline) than off (treatment): card regression 0.50 vs 1.12.",
        settings={"prompts": 1, "correct_mass": 0.05, "init_noise": 1.0, "random_rewards": True, "epochs": 8},
        budget=300,
        baseline=GRPO,
        treatment=Arm("grpo", {**NO_KL, "policy_loss": {"eps_low": 1.0e9, "eps_high": 1.0e9}}),
        metric="final:policy/entropy",
        direction="higher",
    )
)
register_claim(
    Claim(
        name="passk",
        method="Pass@k training",
        paper="Pass@k Training for Adaptively Balancing Exploration and Exploitation of Large Reasoning Models",
        arxiv="2508.10751",
        card="adv#A7",
        statement="Pass@k advantages (k = 4) reach a higher pass@32 than GRPO on mixed difficulties.",
        settings={"prompts": 8, "correct_mass": MIXED},
        budget=100,
        baseline=GRPO,
        treatment=Arm("passk"),
        metric="final:eval/pass@32",
        direction="higher",
    )
)


# ----------------------------------------------------------------------------- one run
def arm_of(claim: Claim, arm: ArmName) -> Arm:
    if arm not in ("baseline", "treatment"):
        raise TetherError(f"arm must be 'baseline' or 'treatment', got {arm!r}")
    return claim.baseline if arm == "baseline" else claim.treatment


def run_arm(claim: Claim, arm: ArmName, seed: int, out: str | Path | None = None) -> dict[str, Any]:
    """Train one arm of a claim for one seed in this process; write a run directory if ``out``.

    Returns the run's summary (``summary.json``'s content), with ``evidence.value`` the metric.
    """
    from tether.arena.testbeds.bandit import BanditConfig, train_bandit

    if claim.testbed != "bandit":
        raise TetherError(f"claim {claim.name!r}: unknown test-bed {claim.testbed!r}")
    a = arm_of(claim, arm)
    settings = {**claim.settings, **a.settings, "steps": claim.budget, "seed": seed}
    cfg = BanditConfig().replace(**settings)
    result = train_bandit(a.recipe, cfg, a.overrides)
    value = metric_value(claim.metric, result.metrics)
    final = result.final
    summary: dict[str, Any] = {
        "recipe": result.recipe,
        "task": claim.testbed,
        "seed": seed,
        "steps": claim.budget,
        "final": final,
        "alarms": {},
        "alarm_count": 0,
        "nan_skips": 0,
        "verifier_errors": 0,
        "eval": {
            "accuracy": final.get("eval/accuracy"),
            **{f"pass@{k}": final.get(f"eval/pass@{k}") for k in cfg.pass_k},
            "entropy": final.get("policy/entropy"),
            "prompts": cfg.prompts,
            "k": max(cfg.pass_k),
            "per_prompt_success": result.per_prompt_success,
        },
        "evidence": {"claim": claim.name, "arm": arm, "metric": claim.metric, "value": value},
    }
    if out is not None:
        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        config = {
            "recipe": a.recipe,
            "task": {
                "name": claim.testbed,
                "params": {k: v for k, v in settings.items() if k not in ("seed", "steps")},
            },
            "train": {"seed": seed, "steps": claim.budget},
            "method": {k: dict(v) for k, v in a.overrides.items()},
            "evidence": {
                "claim": claim.name,
                "arm": arm,
                "metric": claim.metric,
                "direction": claim.direction,
            },
        }
        (d / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        with (d / "metrics.jsonl").open("w") as fh:
            for m in result.metrics:
                fh.write(
                    json.dumps({k: _jsonable(v) for k, v in m.items()} | {"step": int(m["step"])}) + "\n"
                )
        (d / "alarms.jsonl").write_text("")
        tmp = d / "summary.json.tmp"
        tmp.write_text(json.dumps(_jsonable_tree(summary), indent=1))
        tmp.replace(d / "summary.json")  # summary.json marks a finished run: write it last, atomically
    return summary


def _jsonable(v: float) -> float | str:
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def _jsonable_tree(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable_tree(v) for v in obj]
    if isinstance(obj, float):
        return _jsonable(obj)
    return obj


def _read_value(run_dir: Path) -> float:
    from tether.arena.runs import to_float

    data = json.loads((run_dir / "summary.json").read_text())
    v = to_float(data.get("evidence", {}).get("value"))
    return math.nan if v is None else v


# ----------------------------------------------------------------------------- a claim
def run_dir_of(out: Path, claim: Claim, arm: ArmName, seed: int) -> Path:
    return out / claim.name / arm / f"seed{seed}"


def evidence_command(claim: Claim, arm: ArmName, seed: int, run_dir: Path) -> list[str]:
    """Arguments after ``python -m tether.cli`` of one evidence run."""
    return ["evidence-run", "--claim", claim.name, "--arm", arm, "--seed", str(seed), "--out", str(run_dir)]


class _QuietBoard:
    def update(self, spec: Any, status: str, error: str | None = None) -> None:
        if status == "failed":
            print(f"  failed: {spec.run_dir}: {error}", file=sys.stderr)


def run_claim(
    claim: Claim,
    seeds: int | Sequence[int] | None = None,
    executor: Any | None = None,
    out: str | Path | None = None,
    board: Any | None = None,
) -> ClaimResult:
    """Run both arms of ``claim`` for every seed and compare them.

    ``executor`` is an arena executor (:class:`~tether.arena.executors.LocalExecutor`,
    :class:`~tether.arena.executors.RayExecutor`): each run is the subprocess ``tether evidence-run``
    writing ``out/<claim>/<arm>/seed<k>/summary.json`` (finished runs are reused). Without an
    executor the runs train in this process (directories are written only when ``out`` is given).
    """
    seed_list = (
        list(range(claim.seeds if seeds is None else seeds))
        if not isinstance(seeds, Sequence)
        else list(seeds)
    )
    arms: tuple[ArmName, ArmName] = ("baseline", "treatment")
    values: dict[str, list[float]] = {a: [] for a in arms}
    errors: list[str] = []
    if executor is None:
        for a in arms:
            for s in seed_list:
                d = run_dir_of(Path(out), claim, a, s) if out is not None else None
                if d is not None and (d / "summary.json").is_file():
                    values[a].append(_read_value(d))
                    continue
                values[a].append(float(run_arm(claim, a, s, d)["evidence"]["value"]))
    else:
        from tether.arena.compare import Job, RunSpec

        root = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="tether-evidence-"))
        jobs = []
        for a in arms:
            for s in seed_list:
                d = run_dir_of(root, claim, a, s)
                if (d / "summary.json").is_file():
                    continue
                spec = RunSpec(
                    recipe=arm_of(claim, a).recipe,
                    task=claim.testbed,
                    seed=s,
                    steps=claim.budget,
                    overrides=[],
                    run_dir=d,
                    command=evidence_command(claim, a, s, d),
                )
                jobs.append(Job(spec, resume=False))
        results = executor.run(jobs, board or _QuietBoard()) if jobs else []
        errors = [
            f"{r.spec.run_dir}: {(r.error or '').strip().splitlines()[0] if r.error else ''}"
            for r in results
            if not r.ok
        ]
        for a in arms:
            for s in seed_list:
                d = run_dir_of(root, claim, a, s)
                values[a].append(_read_value(d) if (d / "summary.json").is_file() else math.nan)
    return compare_values(claim, seed_list, values["baseline"], values["treatment"], errors)


def compare_values(
    claim: Claim,
    seeds: Sequence[int],
    baseline: Sequence[float],
    treatment: Sequence[float],
    errors: Sequence[str] = (),
    n_boot: int = 2000,
) -> ClaimResult:
    """Statistics and verdict from per-seed values (seed-paired)."""
    from tether.arena.stats import bootstrap_ci, probability_of_improvement

    b = np.asarray(baseline, dtype=np.float64)
    t = np.asarray(treatment, dtype=np.float64)
    both = np.isfinite(b) & np.isfinite(t)
    diff = (t - b)[both]
    sign = 1.0 if claim.direction == "higher" else -1.0
    bf, tf = b[np.isfinite(b)], t[np.isfinite(t)]
    diff_ci = bootstrap_ci(diff, n_boot=n_boot) if diff.size else (math.nan, math.nan)
    poi = probability_of_improvement(sign * tf, sign * bf) if bf.size and tf.size else math.nan
    return ClaimResult(
        claim=claim,
        seeds=list(seeds),
        baseline=[float(x) for x in b],
        treatment=[float(x) for x in t],
        baseline_mean=float(bf.mean()) if bf.size else math.nan,
        baseline_ci=bootstrap_ci(bf, n_boot=n_boot) if bf.size else (math.nan, math.nan),
        treatment_mean=float(tf.mean()) if tf.size else math.nan,
        treatment_ci=bootstrap_ci(tf, n_boot=n_boot) if tf.size else (math.nan, math.nan),
        diff_mean=float(diff.mean()) if diff.size else math.nan,
        diff_ci=diff_ci,
        prob_improvement=float(poi),
        verdict=verdict(diff_ci, claim.direction) if diff.size >= 2 else "inconclusive",
        errors=list(errors),
    )


# ----------------------------------------------------------------------------- documents
def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "nan"
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.3e}"


def _ci(mean: float, ci: tuple[float, float]) -> str:
    return f"{_fmt(mean)} [{_fmt(ci[0])}, {_fmt(ci[1])}]"


def machine_description() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    return (
        f"{platform.system()} {platform.release()} ({cpu}, {os.cpu_count()} cores), "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def evidence_markdown(results: Sequence[ClaimResult], command: str, executor: str = "local") -> str:
    lines = [
        "# Evidence: the method cards' miniature claims on the prompt bandit",
        "",
        f"Produced by `{command}`",
        f"on {datetime.date.today().isoformat()}, {machine_description()}, executor: {executor}.",
        "",
        "Each claim (card, test-bed settings, budget, baseline, metric, predicted direction) was registered in",
        "`src/tether/arena/evidence.py` before it was run and has not been tuned since. Test-bed: T1 prompt bandit",
        "(`tether.arena.testbeds.bandit`; per-prompt softmax over 20 answers unless stated, G = 16, SGD lr 0.5 on the",
        "logits, 1 epoch per batch unless stated). Seeds are paired (seed s of both arms shares the initial logits).",
        "Means with percentile-bootstrap 95% CIs over seeds; the difference is treatment minus baseline (paired);",
        "P(impr.) = probability of improvement in the predicted direction (rliable). Verdict: **holds** when the",
        "difference's CI excludes 0 in the predicted direction, **does not hold** when it excludes 0 in the",
        "opposite direction, else **inconclusive**. A verdict is about this miniature only, not about the paper.",
        "",
        "| method | claim (card) | test-bed / budget | metric (better) | baseline | treatment | difference | P(impr.) | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r.claim
        setting = ", ".join(f"{k}={_short(v)}" for k, v in c.settings.items())
        bed = f"{c.testbed}: {setting}; {c.budget} steps; {len(r.seeds)} seeds"
        lines.append(
            f"| {c.method} | {c.statement} ({c.card}) | {bed} | `{c.metric}` ({c.direction}) | "
            f"{c.baseline.label()}: {_ci(r.baseline_mean, r.baseline_ci)} | "
            f"{c.treatment.label()}: {_ci(r.treatment_mean, r.treatment_ci)} | {_ci(r.diff_mean, r.diff_ci)} | "
            f"{_fmt(r.prob_improvement)} | **{r.verdict}** |"
        )
    counts = {v: sum(r.verdict == v for r in results) for v in ("holds", "does not hold", "inconclusive")}
    lines += [
        "",
        f"Summary: {counts['holds']} hold, {counts['does not hold']} do not hold, "
        f"{counts['inconclusive']} inconclusive, of {len(results)} claims.",
        "",
        "## Notes",
        "",
        "Metrics: `final:K` = value of K after the last step, `mean:K` = mean over steps, `gap:K:T` = |final K - T|,",
        "`spike:K` = max over steps / median over steps. `eval/*` and `bandit/*` are exact functions of the policy",
        "(pass@k = 1 - (1 - pass@1)^k, mean over prompts); `grad/probe_cosine` is the cosine between the first-update",
        "gradients of two independent rollouts of the same policy; `grad/norm_max` is the largest update gradient norm",
        "of a step. Per-seed values are in the run directories (`<out>/<claim>/<arm>/seed<k>/summary.json`).",
        "",
    ]
    for r in results:
        c = r.claim
        extra = f" {c.notes}" if c.notes else ""
        errs = f" Failed runs: {'; '.join(r.errors)}." if r.errors else ""
        lines.append(
            f"- **{c.method}** ({c.paper}{', arXiv ' + c.arxiv if c.arxiv else ''}): baseline per seed "
            f"{[round(x, 4) for x in r.baseline]}, treatment {[round(x, 4) for x in r.treatment]}.{extra}{errs}"
        )
    lines.append("")
    return "\n".join(lines)


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list) and len(v) > 6:
        return "[" + ", ".join(_short(x) for x in v[:3]) + f", ... ({len(v)})]"
    if isinstance(v, list):
        return "[" + ", ".join(_short(x) for x in v) + "]"
    return str(v)


def result_dict(r: ClaimResult) -> dict[str, Any]:
    d = asdict(r)
    d["claim"] = {**asdict(r.claim)}
    out: dict[str, Any] = _jsonable_tree(d)
    return out


# ----------------------------------------------------------------------------- CLI
def _make_executor(args: argparse.Namespace) -> tuple[Any | None, str]:
    if args.in_process:
        return None, "in-process"
    if args.executor == "ray" or args.ray:
        from tether.arena.executors import RayExecutor

        return RayExecutor(args.ray or "auto"), f"ray ({args.ray or 'auto'})"
    from tether.arena.executors import LocalExecutor

    return LocalExecutor(args.workers), "local"


def cmd_evidence(args: argparse.Namespace) -> int:
    if args.list:
        for c in CLAIMS.values():
            print(f"{c.name:20s} {c.method:28s} {c.card:10s} {c.metric} ({c.direction})")
        return 0
    claims = [get_claim(m) for m in args.methods] if args.methods else list(CLAIMS.values())
    executor, label = _make_executor(args)
    out = Path(args.out)
    results = []
    for c in claims:
        r = run_claim(c, args.seeds, executor, out)
        results.append(r)
        print(
            f"{c.method:28s} {c.metric:34s} baseline {_ci(r.baseline_mean, r.baseline_ci):28s} "
            f"treatment {_ci(r.treatment_mean, r.treatment_ci):28s} diff {_ci(r.diff_mean, r.diff_ci):28s} {r.verdict}"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "evidence.json").write_text(json.dumps([result_dict(r) for r in results], indent=1))
    command = "tether " + shlex.join(sys.argv[1:])
    text = evidence_markdown(results, command, label)
    (out / "evidence.md").write_text(text)
    if args.write_docs:
        Path(args.write_docs).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write_docs).write_text(text)
        print(f"wrote {args.write_docs}")
    return 0


def cmd_evidence_run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)
    summary = run_arm(get_claim(args.claim), args.arm, args.seed, args.out)
    print(json.dumps(summary["evidence"]))
    return 0


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--claim", required=True, help="registered claim name")
    p.add_argument("--arm", required=True, choices=("baseline", "treatment"))
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", required=True, help="run directory (summary.json is written last)")


def add_evidence_command(sub: Any) -> None:
    """``tether evidence [METHOD ...]`` and the per-run ``tether evidence-run``."""
    p = sub.add_parser(
        "evidence",
        help="run the method cards' registered miniature claims and write the evidence table",
        description="Run baseline and treatment of each registered claim over seeds (through the arena "
        "executors), then write OUT/evidence.md (and --write-docs) with CIs and verdicts.",
    )
    p.add_argument("methods", nargs="*", help="claim or method names (default: every registered claim)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm (default: the claim's, 5)")
    p.add_argument("--out", default="runs/evidence", help="directory of the runs (default runs/evidence)")
    p.add_argument("--executor", choices=("local", "ray"), default="local")
    p.add_argument("--ray", default=None, metavar="auto|ADDRESS", help="run on Ray (implies --executor ray)")
    p.add_argument("--workers", type=int, default=None, help="local runs at once (default: the cores)")
    p.add_argument("--in-process", action="store_true", help="train in this process (no executor)")
    p.add_argument("--write-docs", default=None, metavar="PATH", help="also write the table here")
    p.add_argument("--list", action="store_true", help="list the registered claims and exit")
    p.set_defaults(func=cmd_evidence)
    r = sub.add_parser(
        "evidence-run", help="one arm of one evidence claim for one seed (used by the executors)"
    )
    _add_run_arguments(r)
    r.set_defaults(func=cmd_evidence_run)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tether.arena.evidence run --claim C --arm A --seed S --out DIR``."""
    parser = argparse.ArgumentParser(prog="python -m tether.arena.evidence")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_arguments(sub.add_parser("run", help="one arm of one claim for one seed"))
    args = parser.parse_args(argv)
    return cmd_evidence_run(args)


if __name__ == "__main__":
    raise SystemExit(main())
