"""Evidence: the method cards' miniature claims, registered before running, checked across seeds.

Each :class:`Claim` states a card's claimed effect on a test-bed (settings and budget), the baseline
and treatment arms (a recipe, optionally with parameter overrides), the metric and the predicted
direction. ``tether evidence`` runs both arms for every seed (through the arena's executors: each run
is the subprocess ``python -m tether.cli evidence-run --claim C --arm A --seed S --out DIR``, which
writes a run directory with ``summary.json``), then compares them:

- per-seed metric values of both arms, their means with Student-t 95% CIs, the probability of
  improvement (rliable), and the paired t-interval of the treatment-minus-baseline difference (seed s
  of both arms shares the test-bed's initial logits);
- verdict: ``holds`` when that interval excludes 0 in the predicted direction, ``does not hold`` when
  it excludes 0 in the opposite direction, else ``inconclusive``;
- checks computed from the runs: the card's premise about the baseline (:class:`Premise`) and whether
  the treatment's own term acted at all (``Claim.active``).

The claims' settings (and seed counts, where a card gives one) come from the cards (lr 0.5, G = 16,
8 epochs ... where a card gives them) and were fixed before any run; they are not to be tuned until a
verdict agrees.

Every run's ``summary.json`` carries the fingerprint of what produced it (:func:`run_fingerprint`: the
claim's settings, the arm, the seed, the resolved test-bed config and recipe); a finished run is
reused only when its fingerprint is the current one, else refused before any work.
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

from tether.config import ConfigError, flatten, setting_changes
from tether.errors import TetherError, UnknownNameError
from tether.runs.rundir import check_directory_path

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
class Premise:
    """What the card says the *baseline* does (e.g. "GRPO collapses to one arm"), checked on every
    seed of the baseline arm: ``metric op threshold``. ``metric`` is ``final:KEY`` or ``change:KEY``
    (final minus initial value). A claim whose premise is not reproduced tests a situation the card
    did not describe; the table says so next to the verdict."""

    metric: str
    op: Literal["<", ">"]
    threshold: float
    text: str

    def holds(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        return value < self.threshold if self.op == "<" else value > self.threshold


@dataclass(frozen=True)
class Claim:
    """A card's miniature claim: treatment beats baseline on ``metric`` in ``direction``.

    ``metric`` is ``final:KEY`` (the last step's value), ``mean:KEY`` (mean over steps),
    ``gap:KEY:TARGET`` (|final - TARGET|), ``spike:KEY`` (max over steps / median over steps) or
    ``change:KEY`` (final minus the initial policy's value) of a per-step metric of the test-bed.

    ``seeds``: the card's seed count where it gives one, else 5. ``active``: a per-step metric of the
    treatment that is nonzero whenever the treatment's own term acts (the table says "treatment
    inactive" when it is 0 at every step of every seed: the arms then differ only by chance, if at
    all). ``premise``: the card's statement about the baseline, checked on the runs.
    ``diagnostics``: per-step metrics whose range over the runs the notes report. ``notes``: written
    with the claim, before it ran; ``caveats``: measured facts written after the runs (never a
    change of the claim).
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
    active: str = ""
    premise: Premise | None = None
    diagnostics: tuple[str, ...] = ()
    caveats: str = ""


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
    # Computed from the runs (see :func:`claim_checks`): flags shown next to the verdict, and the
    # measured lines of the notes.
    checks: list[str] = field(default_factory=list)
    diagnostics: list[str] = field(default_factory=list)
    premise_values: list[float] = field(default_factory=list)  # the baseline's premise metric per seed
    activity: list[float] = field(default_factory=list)  # the treatment's max |active| per seed


# ----------------------------------------------------------------------------- metrics
METRIC_KINDS = ("final", "mean", "gap", "spike", "change")


def metric_value(
    spec: str,
    metrics: Sequence[Mapping[str, float]],
    probe: bool = False,
    initial: Mapping[str, float] | None = None,
) -> float:
    """The value of a claim's metric on a run's per-step metrics (see :class:`Claim`); ``change:KEY``
    needs the initial policy's metrics ``initial``."""
    kind, _, rest = spec.partition(":")
    if kind not in METRIC_KINDS or not rest:
        raise TetherError(
            f"metric {spec!r}: use final:KEY, mean:KEY, gap:KEY:TARGET, spike:KEY or change:KEY"
        )
    key, target = rest, 0.0
    if kind == "gap":
        key, _, t = rest.rpartition(":")
        try:
            target = float(t)
        except ValueError:
            raise TetherError(f"metric {spec!r}: the target of gap:KEY:TARGET must be a number") from None
    if probe:
        return math.nan
    values = np.array([float(m.get(key, math.nan)) for m in metrics], dtype=np.float64)
    if values.size == 0 or not np.isfinite(values).any():
        return math.nan
    if kind == "final":
        return float(values[-1])
    if kind == "change":
        start = math.nan if initial is None else float(initial.get(key, math.nan))
        return float(values[-1]) - start
    if kind == "mean":
        return float(np.nanmean(values))
    if kind == "gap":
        return abs(float(values[-1]) - target)
    median = float(np.nanmedian(values))
    return float(np.nanmax(values)) / median if median > 0 else math.inf


# ----------------------------------------------------------------------------- statistics
def student_t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t with ``df`` (integer >= 1) degrees of freedom, in closed form.

    With theta = atan(x / sqrt(df)), A = P(|T| <= |x|) is (Abramowitz & Stegun 26.7.3-4):
    df odd:  (2/pi) [theta + sin(theta) cos(theta) (1 + 2/3 cos^2 + (2*4)/(3*5) cos^4 + ...
             + (2*4*...*(df-3))/(3*5*...*(df-2)) cos^(df-3))]   (the bracketed sum is absent for df = 1),
    df even: sin(theta) [1 + 1/2 cos^2 + (1*3)/(2*4) cos^4 + ... + (1*3*...*(df-3))/(2*4*...*(df-2)) cos^(df-2)],
    and P(T <= x) = 1/2 + sign(x) A / 2. Exact up to floating-point rounding (finite sums).
    """
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise TetherError(f"student_t_cdf: df must be an integer >= 1, got {df!r}")
    if math.isnan(x):
        return math.nan
    if math.isinf(x):
        return 1.0 if x > 0 else 0.0
    theta = math.atan(abs(x) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 1:
        total, term = 0.0, 1.0
        if df > 1:
            total = 1.0
            for k in range(1, (df - 3) // 2 + 1):  # term_k = term_{k-1} * (2k) / (2k + 1) * cos^2
                term *= (2 * k) / (2 * k + 1) * c2
                total += term
        a = (2.0 / math.pi) * (theta + s * math.cos(theta) * total)
    else:
        total, term = 1.0, 1.0
        for k in range(1, (df - 2) // 2 + 1):  # term_k = term_{k-1} * (2k - 1) / (2k) * cos^2
            term *= (2 * k - 1) / (2 * k) * c2
            total += term
        a = s * total
    a = min(max(a, 0.0), 1.0)
    return 0.5 + 0.5 * a if x >= 0 else 0.5 - 0.5 * a


def student_t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom: the root of
    ``student_t_cdf(x, df) = p``, found by bisection to the last representable digit (the CDF is
    continuous and strictly increasing)."""
    if not 0.0 < p < 1.0:
        raise TetherError(f"student_t_quantile: p must be in (0, 1), got {p!r}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < p:
        low, high = high, 2.0 * high
    for _ in range(2000):
        mid = 0.5 * (low + high)
        if mid in (low, high):
            break
        if student_t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


def t_interval(values: Sequence[float] | np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """The ``1 - alpha`` Student-t confidence interval of the mean: mean +- t_{1-alpha/2, n-1} s / sqrt(n)
    (s the sample standard deviation). NaN values are dropped; fewer than two give (nan, nan).
    Applied to seed-paired differences it is the paired t-interval: exact coverage when the
    differences are normal, unlike the percentile bootstrap, which cannot be wider than the seeds'
    range and at 5 seeds calls a null effect significant about 15% of the time."""
    a = np.asarray(values, dtype=np.float64)
    a = a[np.isfinite(a)]
    n = int(a.size)
    if n < 2:
        return math.nan, math.nan
    mean = float(a.mean())
    half = student_t_quantile(1.0 - alpha / 2.0, n - 1) * float(a.std(ddof=1)) / math.sqrt(n)
    return mean - half, mean + half


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
    if isinstance(claim.seeds, bool) or not isinstance(claim.seeds, int) or claim.seeds < 2:
        raise TetherError(f"claim {claim.name!r}: seeds must be an integer >= 2 (one seed gives no verdict)")
    metric_value(claim.metric, [{"step": 1.0}], probe=True)
    if claim.premise is not None:
        kind = claim.premise.metric.partition(":")[0]
        if kind not in ("final", "change") or claim.premise.op not in ("<", ">"):
            raise TetherError(
                f"claim {claim.name!r}: a premise is final:KEY or change:KEY, with op '<' or '>'"
            )
        metric_value(claim.premise.metric, [{"step": 1.0}], probe=True)
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
        premise=Premise("change:policy/entropy", "<", 0.0, "GRPO's entropy decays (card: to 0)"),
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
        active="reg/dph_loss",
        premise=Premise(
            "final:bandit/correct_arms_alive",
            "<",
            4.0,
            "GRPO (eta = 0) ends with fewer than 4 of the 5 correct arms alive (card: collapses to 1 arm)",
        ),
        diagnostics=("reg/dph_loss",),
        caveats="The card's premise is not reproduced on this test-bed: at eta = 0 (GRPO) all 5 correct "
        "arms still hold more than 1% mass at the end of every seed, so both arms end at the metric's "
        "maximum (5) and the claim cannot be tested here; the verdict says nothing about whether the term "
        "prevents a collapse. The term itself acts (reg/dph_loss above), at under 1e-4 per step.",
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
        active="lp_reg/selected_frac",
        premise=Premise(
            "final:bandit/log10_spark_mass",
            "<",
            -3.0,
            "the base loss (rho = 0) drives p(spark) below 1e-3 (card: toward 0)",
        ),
        diagnostics=("lp_reg/candidate_frac", "lp_reg/filtered_frac", "lp_reg/selected_frac"),
        caveats="Lp-Reg's term never fires here (lp_reg/selected_frac 0 at every step of every seed), so the "
        "two arms train identically (equal per-seed values). The term pulls a selected token toward a min-p "
        "proxy, pi_old renormalised over the answers with probability >= kappa (0.02) x the largest one, and "
        "selects a candidate only when its log-prob is below the proxy's, which needs the filter to have "
        "removed some answer of its prompt. It never did for a candidate (at the start no answer is below "
        "the threshold: the smallest initial mass, 0.025, is above 0.02 x 0.5). The base loss does not "
        "drive the spark toward 0 either (premise check): it ends near 10^-1.45 = 0.035 on both arms.",
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
        premise=Premise("change:bandit/conf_auc", "<", 0.0, "GRPO's AUC falls (card)"),
        caveats="Both arms end at the metric's ceiling (AUC 1: every correct answer above every wrong "
        "one), and GRPO's AUC rises, not falls (see the premise check); the difference rests on the "
        "fourth decimal of an AUC at its ceiling, so 'holds' means CAPO reaches the ceiling slightly "
        "more completely, not that GRPO's calibration degrades.",
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
        premise=Premise(
            "change:bandit/correct_evenness",
            "<",
            0.0,
            "GRPO amplifies the larger correct answer (evenness falls)",
        ),
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
        diagnostics=("r2vpo/lagrange_multiplier", "r2vpo/constraint_violation", "policy/clip_frac"),
        caveats="R2VPO's ratio-variance constraint never binds here: its Lagrange multiplier stays 0 at "
        "every step of every seed (the constraint's violation is negative throughout, diagnostics above), "
        "so the treatment is the unclipped ratio surrogate. PPO-clip does not stall either: its clipping "
        "engages on under 1% of samples per step and its pass@1 rises from 0.05 to 0.974; the arms end "
        "within 0.0005 of each other on every seed.",
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
        premise=Premise(
            "change:bandit/correct_evenness", "<", 0.0, "GRPO concentrates its correct mass (evenness falls)"
        ),
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
        seeds=40,  # the card's own run (ratio#8) used 40 seeds: its pre-registered count, not tuning
        notes="40 seeds, the card's count for this experiment (its numpy run: 0.50 vs 1.12 from 2.58).",
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


def check_seed(seed: Any, option: str = "--seed") -> int:
    """A seed in [0, 2**32), as the trainers' ``train.seed`` (a larger one overflows the seeding of
    numpy and the sampler; a negative one is not a seed)."""
    from tether.arena.testbeds.bandit import SEED_LIMIT

    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TetherError(f"{option} {seed!r}: a seed is an integer in [0, 2**32)")
    if not 0 <= int(seed) < SEED_LIMIT:
        raise TetherError(f"{option} {seed}: seeds must be in [0, 2**32) (0 .. {SEED_LIMIT - 1})")
    return int(seed)


def claim_seeds(claim: Claim, seeds: int | Sequence[int] | None = None) -> list[int]:
    """The seeds of a claim's runs: ``None`` the claim's count (its card's), an int ``n`` seeds
    0 .. n-1, or a list of distinct seeds. Refused before any work: fewer than one seed, a seed
    outside [0, 2**32), or a seed given twice (a repeated seed is the same run again: its paired
    difference would look certain)."""
    if seeds is None:
        return list(range(claim.seeds))
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        if seeds < 1:
            raise TetherError(
                f"--seeds {seeds}: run at least 1 seed per arm (at least 2 for a verdict; "
                f"claim {claim.name!r} registers {claim.seeds})"
            )
        check_seed(int(seeds) - 1, "--seeds")
        return list(range(int(seeds)))
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence):
        raise TetherError(f"seeds {seeds!r}: give a count or a list of seeds")
    listed = [check_seed(s, "seed") for s in seeds]
    if not listed:
        raise TetherError(f"claim {claim.name!r}: no seeds to run; give at least one")
    repeated = sorted({s for s in listed if listed.count(s) > 1})
    if repeated:
        raise TetherError(
            f"claim {claim.name!r}: seed(s) {repeated} given more than once; a repeated seed is the same "
            "run again (its paired difference would look certain): give distinct seeds"
        )
    return listed


def arm_config(claim: Claim, arm: ArmName, seed: int) -> Any:
    """The test-bed config of one run (a :class:`~tether.arena.testbeds.bandit.BanditConfig`)."""
    from tether.arena.testbeds.bandit import BanditConfig

    if claim.testbed != "bandit":
        raise TetherError(f"claim {claim.name!r}: unknown test-bed {claim.testbed!r}")
    a = arm_of(claim, arm)
    settings = {**claim.settings, **a.settings, "steps": claim.budget, "seed": check_seed(seed)}
    return BanditConfig().replace(**settings)


def run_fingerprint(claim: Claim, arm: ArmName, seed: int) -> dict[str, Any]:
    """What produced a run, as it is stored in its ``summary.json`` (``evidence.fingerprint``): the
    claim's settings (test-bed, settings, budget, metric), the arm (recipe, overrides, settings), the
    seed, the resolved test-bed config and the resolved recipe (every component and parameter, as
    the recipe files give them today). A finished run is reused only when this is unchanged."""
    from tether.arena.testbeds.bandit import resolve_recipe
    from tether.recipes.loader import recipe_dict

    a = arm_of(claim, arm)
    cfg = arm_config(claim, arm, seed)
    fingerprint = {
        "claim": {
            "name": claim.name,
            "testbed": claim.testbed,
            "settings": dict(claim.settings),
            "budget": claim.budget,
            "metric": claim.metric,
        },
        "arm": {
            "name": arm,
            "recipe": a.recipe,
            "overrides": {k: dict(v) for k, v in a.overrides.items()},
            "settings": dict(a.settings),
        },
        "seed": seed,
        "testbed_config": asdict(cfg),
        "recipe": recipe_dict(resolve_recipe(a.recipe, a.overrides)),
    }
    normalised: dict[str, Any] = json.loads(json.dumps(_jsonable_tree(fingerprint), allow_nan=False))
    return normalised


_MISSING = "<absent>"


def fingerprint_changes(saved: Any, now: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(setting, value in the run, value now)`` for every setting where two fingerprints differ."""
    before = flatten(saved) if isinstance(saved, dict) else {"fingerprint": saved}
    return setting_changes(before, flatten(dict(now)), _MISSING)


def _short_repr(v: Any, limit: int = 100) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_summary(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise TetherError(
            f"{path} cannot be read ({err}); delete the run directory {str(run_dir)!r} to run it again"
        ) from None
    if not isinstance(data, dict):
        raise TetherError(f"{path} is not a run summary; delete {str(run_dir)!r} to run it again")
    return data


def check_run_out(claim: Claim, arm: ArmName, seed: int, run_dir: str | Path) -> dict[str, Any] | None:
    """Every read-only check of one run's directory, before any work (the checks of
    :meth:`tether.runs.RunDir.check`: not a file, not under a file, not another program's
    directory). Returns the run's summary when it is finished by the same claim, arm, seed, test-bed
    config and recipe (its fingerprint); refuses a finished run with another fingerprint, naming
    the settings that differ, as ``tether compare`` refuses a run with other settings. A started,
    unfinished run (no summary) is run again from the start (a bandit run has no checkpoint)."""
    from tether.runs.rundir import RunDir

    d = Path(run_dir)
    RunDir(d).check(resume=True)
    summary = read_summary(d)
    if summary is None:
        return None
    evidence = summary.get("evidence")
    saved = evidence.get("fingerprint") if isinstance(evidence, dict) else None
    where = f"{str(d)!r} holds a finished evidence run"
    fix = f"use another --out, or delete {str(d)!r} to run it again"
    if saved is None:
        raise ConfigError(
            f"{where} without a fingerprint (written before runs recorded the settings that produced "
            f"them), so it cannot be told to be claim {claim.name!r}'s {arm} run of seed {seed}: {fix}"
        )
    changed = fingerprint_changes(saved, run_fingerprint(claim, arm, seed))
    if changed:
        shown = "; ".join(
            f"{key}: {_short_repr(old)} in the run, {_short_repr(new)} now" for key, old, new in changed[:6]
        )
        more = f"; and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise ConfigError(
            f"{where} with other settings than claim {claim.name!r} ({arm}, seed {seed}) asks "
            f"({shown}{more}); its result is not this claim's: {fix}"
        )
    return summary


def metric_ranges(metrics: Sequence[Mapping[str, float]]) -> dict[str, list[float]]:
    """``{key: [min, max]}`` over the steps of every per-step metric (NaN steps skipped)."""
    keys = sorted({k for m in metrics for k in m})
    out: dict[str, list[float]] = {}
    for k in keys:
        v = np.array([float(m.get(k, math.nan)) for m in metrics], dtype=np.float64)
        v = v[np.isfinite(v)]
        out[k] = [float(v.min()), float(v.max())] if v.size else [math.nan, math.nan]
    return out


def run_arm(claim: Claim, arm: ArmName, seed: int, out: str | Path | None = None) -> dict[str, Any]:
    """Train one arm of a claim for one seed in this process; write a run directory if ``out``.

    Returns the run's summary (``summary.json``'s content), with ``evidence.value`` the metric and
    ``evidence.fingerprint`` what produced it. ``out`` is checked before any work
    (:func:`check_run_out`); a finished run there with the same fingerprint is trained again and
    replaced (runs are deterministic), one with another fingerprint is refused. The directory is
    locked for this process while it trains: another process writing the same run is refused.
    """
    from tether.arena.testbeds.bandit import train_bandit

    a = arm_of(claim, arm)
    check_seed(seed)
    cfg = arm_config(claim, arm, seed)
    fingerprint = run_fingerprint(claim, arm, seed)
    if out is not None:
        from tether.runs.rundir import RunDir

        check_run_out(claim, arm, seed, out)
        RunDir(out).hold()  # one process per run directory: a second one is refused, not interleaved
    result = train_bandit(a.recipe, cfg, a.overrides)
    value = metric_value(claim.metric, result.metrics, initial=result.initial)
    final = result.final
    summary: dict[str, Any] = {
        "recipe": result.recipe,
        "task": claim.testbed,
        "seed": seed,
        "steps": claim.budget,
        "final": final,
        "initial": result.initial,
        "ranges": metric_ranges(result.metrics),
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
        "evidence": {
            "claim": claim.name,
            "arm": arm,
            "metric": claim.metric,
            "value": value,
            "fingerprint": fingerprint,
        },
    }
    if out is not None:
        _write_run(Path(out), claim, arm, seed, result.metrics, summary, fingerprint)
    return summary


def _write_run(
    d: Path,
    claim: Claim,
    arm: ArmName,
    seed: int,
    metrics: Sequence[Mapping[str, float]],
    summary: Mapping[str, Any],
    fingerprint: Mapping[str, Any],
) -> None:
    """Every file atomically (a kill leaves the old file or the new one); the run marker first, so
    that an interrupted run is recognised as one, and ``summary.json`` (which marks a finished
    run) last."""
    from tether.runs.files import atomic_write_text
    from tether.runs.rundir import RUN_MARKER

    a = arm_of(claim, arm)
    d.mkdir(parents=True, exist_ok=True)
    (d / "summary.json").unlink(missing_ok=True)  # a replaced run is unfinished until its new summary
    atomic_write_text(d / RUN_MARKER, "a tether run directory\n")
    config = {
        "recipe": a.recipe,
        "task": {"name": claim.testbed, "params": dict(fingerprint["testbed_config"])},
        "train": {"seed": seed, "steps": claim.budget},
        "method": {k: dict(v) for k, v in a.overrides.items()},
        "recipe_resolved": fingerprint["recipe"],
        "evidence": {"claim": claim.name, "arm": arm, "metric": claim.metric, "direction": claim.direction},
    }
    atomic_write_text(d / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    lines = [
        json.dumps({k: _jsonable(v) for k, v in m.items()} | {"step": int(m["step"])}, allow_nan=False)
        for m in metrics
    ]
    atomic_write_text(d / "metrics.jsonl", "".join(line + "\n" for line in lines))
    atomic_write_text(d / "alarms.jsonl", "")
    atomic_write_text(d / "summary.json", json.dumps(_jsonable_tree(summary), indent=1, allow_nan=False))


def _jsonable(v: Any) -> Any:
    """A non-finite float as the strings "nan" / "inf" / "-inf" of the run files (read back by
    :func:`tether.arena.runs.to_float`), so that every file is strict JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def _jsonable_tree(obj: Any, nonfinite: Any = _jsonable) -> Any:
    """``obj`` with every dict, list and tuple walked and every non-finite float replaced by
    ``nonfinite(value)`` (the run files' strings by default; :func:`_null` for ``evidence.json``)."""
    if isinstance(obj, dict):
        return {k: _jsonable_tree(v, nonfinite) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable_tree(v, nonfinite) for v in obj]
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else nonfinite(x)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _null(_: float) -> None:
    return None


def _float(value: Any) -> float:
    from tether.arena.runs import to_float

    v = to_float(value)
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


ARMS: tuple[ArmName, ArmName] = ("baseline", "treatment")


def check_claim_runs(
    claim: Claim, seeds: int | Sequence[int] | None, out: str | Path | None
) -> dict[tuple[ArmName, int], dict[str, Any]]:
    """Every check of a claim's runs before any of them starts: the seeds (:func:`claim_seeds`) and,
    with ``out``, each run directory (:func:`check_run_out`). Returns the finished runs to reuse."""
    seed_list = claim_seeds(claim, seeds)
    reuse: dict[tuple[ArmName, int], dict[str, Any]] = {}
    if out is None:
        return reuse
    root = check_directory_path(out)
    for a in ARMS:
        for s in seed_list:
            summary = check_run_out(claim, a, s, run_dir_of(root, claim, a, s))
            if summary is not None:
                reuse[(a, s)] = summary
    return reuse


def run_claim(
    claim: Claim,
    seeds: int | Sequence[int] | None = None,
    executor: Any | None = None,
    out: str | Path | None = None,
    board: Any | None = None,
) -> ClaimResult:
    """Run both arms of ``claim`` for every seed and compare them.

    ``seeds``: a count, a list of distinct seeds, or ``None`` for the claim's own count.
    ``executor`` is an arena executor (:class:`~tether.arena.executors.LocalExecutor`,
    :class:`~tether.arena.executors.RayExecutor`): each run is the subprocess ``tether evidence-run``
    writing ``out/<claim>/<arm>/seed<k>/summary.json``. Without an executor the runs train in this
    process (directories are written only when ``out`` is given). A finished run is reused only
    when its fingerprint is this claim's (:func:`check_run_out`); every run directory is checked
    before any run starts.
    """
    seed_list = claim_seeds(claim, seeds)
    reuse = check_claim_runs(claim, seed_list, out)
    summaries: dict[tuple[ArmName, int], dict[str, Any] | None] = {}
    errors: list[str] = []
    if executor is None:
        for a in ARMS:
            for s in seed_list:
                if (a, s) in reuse:
                    summaries[(a, s)] = reuse[(a, s)]
                    continue
                d = run_dir_of(Path(out), claim, a, s) if out is not None else None
                fresh = run_arm(claim, a, s, d)
                summaries[(a, s)] = json.loads(json.dumps(_jsonable_tree(fresh)))
    else:
        from tether.arena.compare import Job, RunSpec

        root = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="tether-evidence-"))
        jobs = []
        for a in ARMS:
            for s in seed_list:
                if (a, s) in reuse:
                    continue
                d = run_dir_of(root, claim, a, s)
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
        for a in ARMS:
            for s in seed_list:
                if (a, s) in reuse:
                    summaries[(a, s)] = reuse[(a, s)]
                    continue
                try:
                    summaries[(a, s)] = check_run_out(claim, a, s, run_dir_of(root, claim, a, s))
                except TetherError as err:  # written by another tether meanwhile: not this claim's
                    errors.append(str(err))
                    summaries[(a, s)] = None
    base = [summaries[("baseline", s)] for s in seed_list]
    treat = [summaries[("treatment", s)] for s in seed_list]
    result = compare_values(claim, seed_list, [_value(x) for x in base], [_value(x) for x in treat], errors)
    add_checks(result, base, treat)
    return result


def _value(summary: Mapping[str, Any] | None) -> float:
    if summary is None:
        return math.nan
    evidence = summary.get("evidence")
    return _float(evidence.get("value")) if isinstance(evidence, Mapping) else math.nan


def compare_values(
    claim: Claim,
    seeds: Sequence[int],
    baseline: Sequence[float],
    treatment: Sequence[float],
    errors: Sequence[str] = (),
) -> ClaimResult:
    """Statistics and verdict from per-seed values (seed-paired): Student-t 95% CIs of both means
    and the paired t-interval of the difference (:func:`t_interval`), whose sign gives the verdict."""
    from tether.arena.stats import probability_of_improvement

    b = np.asarray(baseline, dtype=np.float64)
    t = np.asarray(treatment, dtype=np.float64)
    if b.shape != t.shape or b.shape != (len(seeds),):
        raise TetherError(
            f"claim {claim.name!r}: {len(seeds)} seeds but {b.size} baseline and {t.size} treatment values"
        )
    both = np.isfinite(b) & np.isfinite(t)
    diff = (t - b)[both]
    sign = 1.0 if claim.direction == "higher" else -1.0
    bf, tf = b[np.isfinite(b)], t[np.isfinite(t)]
    diff_ci = t_interval(diff)
    poi = probability_of_improvement(sign * tf, sign * bf) if bf.size and tf.size else math.nan
    return ClaimResult(
        claim=claim,
        seeds=list(seeds),
        baseline=[float(x) for x in b],
        treatment=[float(x) for x in t],
        baseline_mean=float(bf.mean()) if bf.size else math.nan,
        baseline_ci=t_interval(bf),
        treatment_mean=float(tf.mean()) if tf.size else math.nan,
        treatment_ci=t_interval(tf),
        diff_mean=float(diff.mean()) if diff.size else math.nan,
        diff_ci=diff_ci,
        prob_improvement=float(poi),
        verdict=verdict(diff_ci, claim.direction) if diff.size >= 2 else "inconclusive",
        errors=list(errors),
    )


def _range_of(summary: Mapping[str, Any] | None, key: str) -> tuple[float, float]:
    ranges = summary.get("ranges") if summary is not None else None
    pair = ranges.get(key) if isinstance(ranges, Mapping) else None
    if not isinstance(pair, list) or len(pair) != 2:
        return math.nan, math.nan
    return _float(pair[0]), _float(pair[1])


def premise_value(premise: Premise, summary: Mapping[str, Any] | None) -> float:
    """The premise's metric (``final:KEY`` or ``change:KEY``) of a run, from its summary."""
    if summary is None:
        return math.nan
    final, initial = summary.get("final"), summary.get("initial")
    final_d = {k: _float(v) for k, v in final.items()} if isinstance(final, Mapping) else {}
    initial_d = {k: _float(v) for k, v in initial.items()} if isinstance(initial, Mapping) else None
    return metric_value(premise.metric, [final_d] if final_d else [], initial=initial_d)


def add_checks(
    result: ClaimResult,
    baseline: Sequence[Mapping[str, Any] | None],
    treatment: Sequence[Mapping[str, Any] | None],
) -> ClaimResult:
    """The checks computed from the runs' summaries, into ``result``: the card's premise on the
    baseline (:class:`Premise`), whether the treatment's term acted (``Claim.active`` nonzero at some
    step), and the ranges of the claim's diagnostics per arm."""
    c = result.claim
    n = len(result.seeds)
    if c.premise is not None:
        p = c.premise
        result.premise_values = [premise_value(p, s) for s in baseline]
        vals = np.array(result.premise_values, dtype=np.float64)
        k = sum(p.holds(v) for v in result.premise_values)
        shown = f"baseline `{p.metric}` mean {_fmt(float(np.nanmean(vals)) if np.isfinite(vals).any() else math.nan)}"
        result.diagnostics.append(
            f'Premise "{p.text}" (`{p.metric}` {p.op} {_fmt(p.threshold)}): reproduced on {k} of {n} seeds ({shown}).'
        )
        if k < n:
            result.checks.append(f"premise not reproduced ({k}/{n} seeds): {p.text}")
    if c.active:
        result.activity = []
        for s in treatment:
            low, high = _range_of(s, c.active)
            result.activity.append(max(abs(low), abs(high)) if math.isfinite(low) else math.nan)
        acts = np.array(result.activity, dtype=np.float64)
        if not np.isfinite(acts).any():
            result.checks.append(f"treatment activity unknown (`{c.active}` not logged)")
        else:
            idle = int(((acts == 0) & np.isfinite(acts)).sum())
            if idle == n:
                result.checks.append(f"treatment inactive (`{c.active}` = 0 at every step of every seed)")
            elif idle:
                result.checks.append(
                    f"treatment inactive on {idle} of {n} seeds (`{c.active}` = 0 at every step)"
                )
            result.diagnostics.append(
                f"Treatment activity `{c.active}`: largest |value| over steps per seed "
                f"{[float(_round(x)) for x in result.activity]}."
            )
    for key in c.diagnostics:
        parts = []
        for arm, runs in (("baseline", baseline), ("treatment", treatment)):
            ranges = [_range_of(s, key) for s in runs]
            lows = [lo for lo, _ in ranges if math.isfinite(lo)]
            highs = [hi for _, hi in ranges if math.isfinite(hi)]
            if lows and highs:
                parts.append(f"{arm} [{_fmt(min(lows))}, {_fmt(max(highs))}]")
            else:
                parts.append(f"{arm} not logged")
        result.diagnostics.append(f"`{key}` over every step and seed: {', '.join(parts)}.")
    return result


def _round(x: float) -> float:
    return float(f"{x:.4g}") if math.isfinite(x) else x


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


DOCS_BEGIN = "<!-- BEGIN generated by `tether evidence --write-docs`: edit outside these markers -->"
DOCS_END = "<!-- END generated by `tether evidence --write-docs` -->"


def _seed_summary(results: Sequence[ClaimResult]) -> str:
    """ " (5 seeds per arm; 40 for X)": the most common seed count and the exceptions."""
    if not results:
        return ""
    counts = [len(r.seeds) for r in results]
    common = max(set(counts), key=counts.count)
    others = [f"{len(r.seeds)} for {r.claim.method}" for r in results if len(r.seeds) != common]
    return f" ({common} seeds per arm" + (f"; {', '.join(others)})" if others else ")")


def evidence_markdown(results: Sequence[ClaimResult], command: str, executor: str = "local") -> str:
    lines = [
        "# Evidence: the method cards' miniature claims on the prompt bandit",
        "",
        f"Produced by `{command}`",
        f"on {datetime.date.today().isoformat()}, {machine_description()}, executor: {executor}.",
        "",
        "Each claim (card, test-bed settings, budget, seed count, baseline, metric, predicted direction) was registered in",
        "`src/tether/arena/evidence.py` before it was run and has not been tuned since; the seed count is the card's where",
        "the card gives one (ratio#8: 40), else 5. Test-bed: T1 prompt bandit (`tether.arena.testbeds.bandit`; per-prompt",
        "softmax over 20 answers unless stated, G = 16, SGD lr 0.5 on the logits, 1 epoch per batch unless stated). Seeds",
        "are paired (seed s of both arms shares the initial logits). Means with Student-t 95% CIs over seeds",
        "(mean +- t_{0.975, n-1} s / sqrt(n)); the difference is treatment minus baseline, with the paired t-interval",
        "(the same formula on the per-seed differences). P(impr.) = probability of improvement in the predicted",
        "direction (rliable). Verdict: **holds** when the difference's interval excludes 0 in the predicted direction,",
        "**does not hold** when it excludes 0 in the opposite direction, else **inconclusive**. Next to a verdict, the",
        "checks computed from the runs: *premise not reproduced* (the card's statement about the baseline, e.g. \"GRPO",
        "collapses\", does not hold on every seed) and *treatment inactive* (the treatment's own term, named per claim,",
        "is 0 at every step). A verdict is about this miniature only, not about the paper.",
        "",
        "Until 2026-11-23 the verdicts used the percentile bootstrap of the paired differences; at 5 seeds it cannot be",
        "wider than the seeds' range and calls a null effect significant about 15% of the time (nominal 5%,",
        "`tests/arena/test_evidence_statistics.py::test_null_false_positive_rate_is_nominal_at_five_seeds`). The paired",
        "t-interval has the nominal rate when the differences are normal; at 5 seeds nothing weaker can be had: no",
        "distribution-free test reaches 5% (the exact sign-flip test's smallest two-sided p is 2/2^5 = 0.0625).",
        "",
        "| method | claim (card) | test-bed / budget | metric (better) | baseline | treatment | difference | P(impr.) | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r.claim
        setting = ", ".join(f"{k}={_short(v)}" for k, v in c.settings.items())
        bed = f"{c.testbed}: {setting}; {c.budget} steps; {len(r.seeds)} seeds"
        flags = "".join(f"; *{x}*" for x in r.checks)
        lines.append(
            f"| {c.method} | {c.statement} ({c.card}) | {bed} | `{c.metric}` ({c.direction}) | "
            f"{c.baseline.label()}: {_ci(r.baseline_mean, r.baseline_ci)} | "
            f"{c.treatment.label()}: {_ci(r.treatment_mean, r.treatment_ci)} | {_ci(r.diff_mean, r.diff_ci)} | "
            f"{_fmt(r.prob_improvement)} | **{r.verdict}**{flags} |"
        )
    counts = {v: sum(r.verdict == v for r in results) for v in ("holds", "does not hold", "inconclusive")}
    flagged = [r.claim.method for r in results if r.checks]
    lines += [
        "",
        f"Summary: {counts['holds']} hold, {counts['does not hold']} do not hold, "
        f"{counts['inconclusive']} inconclusive, of {len(results)} claims{_seed_summary(results)}."
        + (f" Flagged by a check: {', '.join(flagged)}." if flagged else ""),
        "",
        "## Notes",
        "",
        "Metrics: `final:K` = value of K after the last step, `mean:K` = mean over steps, `gap:K:T` = |final K - T|,",
        "`spike:K` = max over steps / median over steps, `change:K` = final K minus K of the initial policy. `eval/*` and",
        "`bandit/*` are exact functions of the policy (pass@k = 1 - (1 - pass@1)^k, mean over prompts);",
        "`grad/probe_cosine` is the cosine between the first-update gradients of two independent rollouts of the same",
        "policy; `grad/norm_max` is the largest update gradient norm of a step. Per-seed values are in the run directories",
        "(`<out>/<claim>/<arm>/seed<k>/summary.json`, with the fingerprint of the settings that produced each run).",
        "Each claim's notes give: the per-seed values, the notes written with the claim, the computed checks, and the",
        "caveats written after the runs (measured facts that bear on the verdict).",
        "",
    ]
    for r in results:
        c = r.claim
        parts = [
            f"- **{c.method}** ({c.paper}{', arXiv ' + c.arxiv if c.arxiv else ''}): baseline per seed "
            f"{[round(x, 4) for x in r.baseline]}, treatment {[round(x, 4) for x in r.treatment]}."
        ]
        if c.notes:
            parts.append(c.notes)
        parts += r.diagnostics
        if c.caveats:
            parts.append(f"Caveat (measured): {c.caveats}")
        if r.errors:
            parts.append(f"Failed runs: {'; '.join(r.errors)}.")
        lines.append(" ".join(parts))
    lines.append("")
    return "\n".join(lines)


def splice_generated(existing: str | None, generated: str, path: str | Path) -> str:
    """The document with its generated part replaced: ``generated`` between :data:`DOCS_BEGIN` and
    :data:`DOCS_END`, the hand-written text around the markers kept as it is. A new document is
    the markers and ``generated``; an existing one without exactly one pair of markers is refused
    (writing it whole would delete its hand-written sections)."""
    block = f"{DOCS_BEGIN}\n{generated.rstrip()}\n{DOCS_END}\n"
    if existing is None:
        return block
    begin, end = existing.count(DOCS_BEGIN), existing.count(DOCS_END)
    i, j = existing.find(DOCS_BEGIN), existing.find(DOCS_END)
    if begin != 1 or end != 1 or j < i:
        raise TetherError(
            f"--write-docs {str(path)!r} exists and does not hold exactly one pair of the markers\n  {DOCS_BEGIN}\n"
            f"  {DOCS_END}\nin that order; tether replaces only the text between them (the rest is hand-written "
            "and kept): add them around the generated table, or give a new path"
        )
    after = existing[j + len(DOCS_END) :]
    return existing[:i] + block + after.removeprefix("\n")


def check_docs_path(path: str | Path) -> Path:
    """Read-only, before any work: ``--write-docs`` can be written (not a directory, not under a
    file) and, when it exists, holds the markers of its generated part."""
    p = Path(path)
    if p.is_dir():
        raise TetherError(f"--write-docs {str(p)!r} is a directory; give the path of a markdown file")
    blocking = next((a for a in p.parents if a.exists() and not a.is_dir()), None)
    if blocking is not None:
        raise TetherError(
            f"--write-docs {str(p)!r} lies under {str(blocking)!r}, which is a file; choose another path"
        )
    if p.is_file():
        splice_generated(p.read_text(encoding="utf-8"), "", p)
    return p


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list) and len(v) > 6:
        return "[" + ", ".join(_short(x) for x in v[:3]) + f", ... ({len(v)})]"
    if isinstance(v, list):
        return "[" + ", ".join(_short(x) for x in v) + "]"
    return str(v)


def result_dict(r: ClaimResult) -> dict[str, Any]:
    """A result as strict JSON data: every non-finite number is ``null``."""
    d = asdict(r)
    d["claim"] = {**asdict(r.claim)}
    out: dict[str, Any] = _jsonable_tree(d, _null)
    return out


def evidence_json(results: Sequence[ClaimResult]) -> str:
    """``evidence.json``: strict JSON (``null`` for NaN; ``allow_nan=False`` refuses anything else)."""
    return json.dumps([result_dict(r) for r in results], indent=1, allow_nan=False) + "\n"


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
    from tether.runs.files import atomic_write_text

    if args.list:
        for c in CLAIMS.values():
            print(f"{c.name:20s} {c.method:28s} {c.card:10s} {c.seeds:3d} seeds  {c.metric} ({c.direction})")
        return 0
    claims = (
        list({c.name: c for c in map(get_claim, args.methods)}.values())
        if args.methods
        else list(CLAIMS.values())
    )
    # Every check before any run: seeds, the output directory and every run in it, --write-docs.
    if args.seeds is not None and args.seeds < 1:
        raise TetherError(
            f"--seeds {args.seeds}: run at least 1 seed per arm (2 or more for a verdict); leave it out "
            "for each claim's registered count"
        )
    out = check_directory_path(args.out)
    for c in claims:
        check_claim_runs(c, args.seeds, out)
    docs = check_docs_path(args.write_docs) if args.write_docs else None
    if args.seeds == 1:
        print(
            "warning: --seeds 1 gives no verdict (one paired difference has no interval): every claim will "
            "be inconclusive",
            file=sys.stderr,
        )
    executor, label = _make_executor(args)
    if executor is None:
        import torch

        torch.set_num_threads(1)  # as every ``tether evidence-run``: the same numbers either way
    results = []
    for c in claims:
        r = run_claim(c, args.seeds, executor, out)
        results.append(r)
        flags = "".join(f"; {x}" for x in r.checks)
        print(
            f"{c.method:28s} {c.metric:34s} baseline {_ci(r.baseline_mean, r.baseline_ci):28s} "
            f"treatment {_ci(r.treatment_mean, r.treatment_ci):28s} diff {_ci(r.diff_mean, r.diff_ci):28s} "
            f"{r.verdict}{flags}"
        )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "evidence.json", evidence_json(results))
    command = "tether " + shlex.join(sys.argv[1:])
    text = evidence_markdown(results, command, label)
    atomic_write_text(out / "evidence.md", text)
    if docs is not None:
        existing = docs.read_text(encoding="utf-8") if docs.is_file() else None
        atomic_write_text(docs, splice_generated(existing, text, docs))
        print(f"wrote {docs}")
    return 0


def cmd_evidence_run(args: argparse.Namespace) -> int:
    import torch

    claim = get_claim(args.claim)
    seed = check_seed(args.seed)
    check_run_out(claim, args.arm, seed, args.out)  # before any work
    torch.set_num_threads(1)
    summary = run_arm(claim, args.arm, seed, args.out)
    shown = {k: v for k, v in summary["evidence"].items() if k != "fingerprint"}
    print(json.dumps(_jsonable_tree(shown), allow_nan=False))
    return 0


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--claim", required=True, help="registered claim name")
    p.add_argument("--arm", required=True, choices=("baseline", "treatment"))
    p.add_argument("--seed", type=int, required=True, help="seed in [0, 2**32)")
    p.add_argument("--out", required=True, help="run directory (summary.json is written last)")


def add_evidence_command(sub: Any) -> None:
    """``tether evidence [METHOD ...]`` and the per-run ``tether evidence-run``."""
    p = sub.add_parser(
        "evidence",
        help="run the method cards' registered miniature claims and write the evidence table",
        description="Run baseline and treatment of each registered claim over seeds (through the arena "
        "executors), then write OUT/evidence.md and OUT/evidence.json (and the generated part of "
        "--write-docs) with CIs, verdicts and checks.",
    )
    p.add_argument("methods", nargs="*", help="claim or method names (default: every registered claim)")
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="seeds per arm for every claim (default: each claim's registered count, the card's where it "
        "gives one: 5, 40 for the clipping-bias probe)",
    )
    p.add_argument("--out", default="runs/evidence", help="directory of the runs (default runs/evidence)")
    p.add_argument("--executor", choices=("local", "ray"), default="local")
    p.add_argument("--ray", default=None, metavar="auto|ADDRESS", help="run on Ray (implies --executor ray)")
    p.add_argument("--workers", type=int, default=None, help="local runs at once (default: the cores)")
    p.add_argument("--in-process", action="store_true", help="train in this process (no executor)")
    p.add_argument(
        "--write-docs",
        default=None,
        metavar="PATH",
        help="also write the table into PATH, between its generated-part markers (a new file gets them)",
    )
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
    try:
        return cmd_evidence_run(args)
    except TetherError as err:
        print(f"tether: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
