"""Alarms on the metrics of a step: the early warnings users of TRL and verl ask for.

The monitor reads a flat metric dict (slash-separated names) and returns the alarms that
fire. It never touches tensors or models, so the language-model and control trainers share
it. Its running state (initial entropy, grad-norm EMA, KL history) is a JSON dict saved in
checkpoints, so a resumed run raises the same alarms as one that never stopped.

Alarms and the metrics they read:

- ``nan``: any metric that is NaN or inf, or ``train/skipped_updates`` above 0: an optimizer
  update of the step was skipped for a non-finite loss or gradient, even when the step's other
  updates went through (verl #721, #2626).
- ``entropy_collapse``: ``policy/entropy`` below ``entropy_floor`` or below
  ``entropy_collapse_frac`` x its first value (TRL #5584, verl #5953).
- ``ratio_blowup``: ``policy/ratio_max`` above ``ratio_max``, +inf included (TRL #4159).
- ``all_truncated``: ``response/truncation_rate`` equal to 1 (TRL #5697).
- ``all_zero_variance``: ``reward/zero_std_frac`` equal to 1: no group carries a signal.
- ``grad_norm_spike``: ``grad/norm`` above ``grad_spike_factor`` x its running EMA (verl #1066),
  once ``grad_warmup_steps`` steps have fed the EMA. Steps without a learning signal
  (``reward/zero_std_frac`` equal to 1, or a grad norm of exactly 0) are judged but never enter the
  EMA: their near-zero norms would make the first real step look like a spike.
- ``kl_runaway``: ``policy/kl_ref`` above ``kl_max``, +inf included.
- ``sampler_mismatch``: ``rollout/is_ess`` (effective sample size of the trainer/sampler
  importance ratios, as a fraction) below ``is_ess_min``: the samples come from a distribution
  far from the trainer's (TRL #4159, #6789; Yao et al. 2025).
- ``verifier_errors``: ``reward/verifier_error_rate`` (the share of the step's samples whose
  verifier or reward function raised) above ``verifier_error_max``; a failed verification has no
  reward and its sample takes no part in the update, so a step whose every verification failed
  learns nothing. The message quotes the first error (``details["verifier_error"]`` of
  :meth:`Monitor.check`).

A metric that a step could not measure is absent from its dict, never NaN or a placeholder (a step
whose every row is masked logs no ``policy/entropy`` and no loss metrics): an absent metric raises
no alarm. NaN is kept for what went wrong (a skipped update), which the ``nan`` alarm reports.

A threshold set to null (``monitor.kl_max=null``) turns its alarm off; ``entropy_collapse`` is off
only when both of its thresholds are null. The trainers add one more record to ``alarms.jsonl``
that is not a monitor alarm: ``stopped``, when repeated non-finite steps stop the run
(``train.max_nan_skips``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ENTROPY = "policy/entropy"
RATIO_MAX = "policy/ratio_max"
TRUNCATION = "response/truncation_rate"
ZERO_STD = "reward/zero_std_frac"
GRAD_NORM = "grad/norm"
KL_REF = "policy/kl_ref"
IS_ESS = "rollout/is_ess"
SKIPPED = "train/skipped_updates"
VERIFIER_ERROR_RATE = "reward/verifier_error_rate"


@dataclass
class MonitorConfig:
    """Thresholds of the alarms. Each threshold may be null, which turns its alarm off
    (``entropy_collapse`` needs both of its thresholds null to be off)."""

    entropy_floor: float | None = field(
        default=0.01, metadata={"min": 0.0, "help": "absolute entropy floor (nats); null: none"}
    )
    entropy_collapse_frac: float | None = field(
        default=0.1,
        metadata={"min": 0.0, "max": 1.0, "help": "alarm when entropy < frac x its first value; null: none"},
    )
    ratio_max: float | None = field(
        default=10.0, metadata={"min": 1.0, "help": "alarm when max token ratio exceeds this; null: off"}
    )
    grad_spike_factor: float | None = field(
        default=5.0, metadata={"min": 1.0, "help": "spike = norm > factor x EMA; null: off"}
    )
    grad_ema_decay: float = field(default=0.9, metadata={"min": 0.0, "max": 1.0})
    grad_warmup_steps: int = field(default=3, metadata={"min": 0, "help": "steps before spikes are judged"})
    kl_max: float | None = field(
        default=1.0, metadata={"min": 0.0, "help": "alarm when KL to reference exceeds this; null: off"}
    )
    is_ess_min: float | None = field(
        default=0.5,
        metadata={
            "min": 0.0,
            "max": 1.0,
            "help": "alarm when the importance-sampling ESS of sampler vs trainer log-probs falls below "
            "this; null: off",
        },
    )
    verifier_error_max: float | None = field(
        default=0.5,
        metadata={
            "min": 0.0,
            "max": 1.0,
            "help": "alarm when the share of a step's samples whose verifier raised exceeds this "
            "(0: any error; every sample failing exceeds anything below 1); null: off",
        },
    )


@dataclass(frozen=True)
class Alarm:
    step: int
    kind: str
    message: str
    value: float

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "kind": self.kind, "message": self.message, "value": self.value}


class Monitor:
    def __init__(self, config: MonitorConfig | None = None) -> None:
        self.config = config or MonitorConfig()
        self.initial_entropy: float | None = None
        self.grad_ema: float | None = None
        self.grad_steps = 0
        self.counts: dict[str, int] = {}

    def check(
        self, step: int, metrics: Mapping[str, float], details: Mapping[str, str] | None = None
    ) -> list[Alarm]:
        """The alarms that ``metrics`` (the step's) raise. ``details``: text that the metrics cannot
        carry, quoted by the alarm it explains: ``verifier_error``, the step's first verifier error."""
        c = self.config
        details = details or {}
        alarms: list[Alarm] = []

        def fire(kind: str, message: str, value: float) -> None:
            alarms.append(Alarm(step, kind, message, value))

        bad = sorted(
            k for k, v in metrics.items() if isinstance(v, float | int) and not math.isfinite(float(v))
        )
        skipped = _finite(metrics.get(SKIPPED)) or 0.0
        if bad or skipped > 0:
            parts = [f"non-finite metrics: {', '.join(bad[:6])}"] if bad else []
            if skipped > 0:
                parts.append(f"{skipped:g} optimizer update(s) skipped for a non-finite loss or gradient")
            fire("nan", "; ".join(parts), skipped if skipped > 0 else float("nan"))

        ent = _finite(metrics.get(ENTROPY))
        if ent is not None:
            if self.initial_entropy is None:
                self.initial_entropy = ent
            limits = [c.entropy_floor] if c.entropy_floor is not None else []
            if c.entropy_collapse_frac is not None:
                limits.append(c.entropy_collapse_frac * self.initial_entropy)
            limit = max(limits) if limits else None
            if limit is not None and ent < limit:
                fire(
                    "entropy_collapse",
                    f"entropy {ent:.4f} fell below {limit:.4f} (first value {self.initial_entropy:.4f})",
                    ent,
                )
        rmax = _not_nan(metrics.get(RATIO_MAX))  # +inf is over any limit
        if rmax is not None and c.ratio_max is not None and rmax > c.ratio_max:
            fire("ratio_blowup", f"max importance ratio {rmax:.3g} exceeds {c.ratio_max:g}", rmax)
        trunc = _finite(metrics.get(TRUNCATION))
        if trunc is not None and trunc >= 1.0:
            fire("all_truncated", "every completion hit the length limit: raise max_new_tokens", trunc)
        zstd = _finite(metrics.get(ZERO_STD))
        if zstd is not None and zstd >= 1.0:
            fire("all_zero_variance", "every group has identical rewards: no learning signal this step", zstd)
        gnorm = _finite(metrics.get(GRAD_NORM))
        if gnorm is not None:
            ema = self.grad_ema
            # Judged only against a positive EMA: nothing is a spike over no signal at all.
            if (
                c.grad_spike_factor is not None
                and ema is not None
                and ema > 0
                and self.grad_steps >= c.grad_warmup_steps
                and gnorm > c.grad_spike_factor * ema
            ):
                fire("grad_norm_spike", f"grad norm {gnorm:.3g} is {gnorm / ema:.1f}x its EMA", gnorm)
            # A step without a learning signal (every group flat, or no gradient at all) stays out
            # of the EMA: its near-zero norm is no baseline for the steps that learn.
            no_signal = gnorm == 0.0 or (zstd is not None and zstd >= 1.0)
            if not no_signal:
                self.grad_ema = (
                    gnorm
                    if ema is None or ema <= 0
                    else c.grad_ema_decay * ema + (1 - c.grad_ema_decay) * gnorm
                )
                self.grad_steps += 1
        kl = _not_nan(metrics.get(KL_REF))  # +inf is over any limit
        if kl is not None and c.kl_max is not None and kl > c.kl_max:
            fire("kl_runaway", f"KL to reference {kl:.3g} exceeds {c.kl_max:g}", kl)
        ess = _finite(metrics.get(IS_ESS))
        if ess is not None and c.is_ess_min is not None and ess < c.is_ess_min:
            fire(
                "sampler_mismatch",
                f"importance-sampling ESS {ess:.3g} is below {c.is_ess_min:g}: the sampler's distribution is far "
                "from the trainer's (see train.sampler_correction)",
                ess,
            )
        errors = _finite(metrics.get(VERIFIER_ERROR_RATE))
        if errors is not None and c.verifier_error_max is not None and errors > c.verifier_error_max:
            first = details.get("verifier_error")
            fire(
                "verifier_errors",
                f"the verifier raised on {errors:.0%} of the step's samples (monitor.verifier_error_max="
                f"{c.verifier_error_max:g}); failed samples get no reward and take no part in the update"
                + (f". First error: {first}" if first else "")
                + "; see the 'error' of each sample in samples.jsonl and fix the task or reward function",
                errors,
            )
        for a in alarms:
            self.counts[a.kind] = self.counts.get(a.kind, 0) + 1
        return alarms

    def state_dict(self) -> dict[str, Any]:
        return {
            "initial_entropy": self.initial_entropy,
            "grad_ema": self.grad_ema,
            "grad_steps": self.grad_steps,
            "counts": dict(self.counts),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.initial_entropy = state["initial_entropy"]
        self.grad_ema = state["grad_ema"]
        self.grad_steps = int(state["grad_steps"])
        self.counts = dict(state["counts"])


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _not_nan(value: Any) -> float | None:
    """``value`` as a float, inf included; None when missing or NaN."""
    if value is None:
        return None
    v = float(value)
    return None if math.isnan(v) else v
