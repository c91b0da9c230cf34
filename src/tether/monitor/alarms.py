"""Alarms on the metrics of a step: the early warnings users of TRL and verl ask for.

The monitor reads a flat metric dict (slash-separated names) and returns the alarms that
fire. It never touches tensors or models, so the language-model and control trainers share
it. Its running state (initial entropy, grad-norm EMA, KL history) is a JSON dict saved in
checkpoints, so a resumed run raises the same alarms as one that never stopped.

Alarms and the metrics they read:

- ``nan``: any metric that is NaN or inf (verl #721, #2626).
- ``entropy_collapse``: ``policy/entropy`` below ``entropy_floor`` or below
  ``entropy_collapse_frac`` x its first value (TRL #5584, verl #5953).
- ``ratio_blowup``: ``policy/ratio_max`` above ``ratio_max`` (TRL #4159).
- ``all_truncated``: ``response/truncation_rate`` equal to 1 (TRL #5697).
- ``all_zero_variance``: ``reward/zero_std_frac`` equal to 1: no group carries a signal.
- ``grad_norm_spike``: ``grad/norm`` above ``grad_spike_factor`` x its running EMA (verl #1066).
- ``kl_runaway``: ``policy/kl_ref`` above ``kl_max``.
- ``sampler_mismatch``: ``rollout/is_ess`` (effective sample size of the trainer/sampler
  importance ratios, as a fraction) below ``is_ess_min``: the samples come from a distribution
  far from the trainer's (TRL #4159, #6789; Yao et al. 2025).
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


@dataclass
class MonitorConfig:
    """Thresholds of the alarms (all optional to disable with null where it makes sense)."""

    entropy_floor: float = field(default=0.01, metadata={"min": 0.0, "help": "absolute entropy floor (nats)"})
    entropy_collapse_frac: float = field(
        default=0.1, metadata={"min": 0.0, "max": 1.0, "help": "alarm when entropy < frac x its first value"}
    )
    ratio_max: float = field(
        default=10.0, metadata={"min": 1.0, "help": "alarm when max token ratio exceeds this"}
    )
    grad_spike_factor: float = field(
        default=5.0, metadata={"min": 1.0, "help": "spike = norm > factor x EMA"}
    )
    grad_ema_decay: float = field(default=0.9, metadata={"min": 0.0, "max": 1.0})
    grad_warmup_steps: int = field(default=3, metadata={"min": 0, "help": "steps before spikes are judged"})
    kl_max: float = field(
        default=1.0, metadata={"min": 0.0, "help": "alarm when KL to reference exceeds this"}
    )
    is_ess_min: float = field(
        default=0.5,
        metadata={
            "min": 0.0,
            "max": 1.0,
            "help": "alarm when the importance-sampling ESS of sampler vs trainer log-probs falls below this",
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

    def check(self, step: int, metrics: Mapping[str, float]) -> list[Alarm]:
        c = self.config
        alarms: list[Alarm] = []

        def fire(kind: str, message: str, value: float) -> None:
            alarms.append(Alarm(step, kind, message, value))

        bad = sorted(
            k for k, v in metrics.items() if isinstance(v, float | int) and not math.isfinite(float(v))
        )
        if bad:
            fire("nan", f"non-finite metrics: {', '.join(bad[:6])}", float("nan"))

        ent = _finite(metrics.get(ENTROPY))
        if ent is not None:
            if self.initial_entropy is None:
                self.initial_entropy = ent
            limit = max(c.entropy_floor, c.entropy_collapse_frac * self.initial_entropy)
            if ent < limit:
                fire(
                    "entropy_collapse",
                    f"entropy {ent:.4f} fell below {limit:.4f} (first value {self.initial_entropy:.4f})",
                    ent,
                )
        rmax = _finite(metrics.get(RATIO_MAX))
        if rmax is not None and rmax > c.ratio_max:
            fire("ratio_blowup", f"max importance ratio {rmax:.3g} exceeds {c.ratio_max:g}", rmax)
        trunc = _finite(metrics.get(TRUNCATION))
        if trunc is not None and trunc >= 1.0:
            fire("all_truncated", "every completion hit the length limit: raise max_new_tokens", trunc)
        zstd = _finite(metrics.get(ZERO_STD))
        if zstd is not None and zstd >= 1.0:
            fire("all_zero_variance", "every group has identical rewards: no learning signal this step", zstd)
        gnorm = _finite(metrics.get(GRAD_NORM))
        if gnorm is not None:
            if (
                self.grad_ema is not None
                and self.grad_steps >= c.grad_warmup_steps
                and gnorm > c.grad_spike_factor * max(self.grad_ema, 1e-12)
            ):
                fire(
                    "grad_norm_spike", f"grad norm {gnorm:.3g} is {gnorm / self.grad_ema:.1f}x its EMA", gnorm
                )
            self.grad_ema = (
                gnorm
                if self.grad_ema is None
                else c.grad_ema_decay * self.grad_ema + (1 - c.grad_ema_decay) * gnorm
            )
            self.grad_steps += 1
        kl = _finite(metrics.get(KL_REF))
        if kl is not None and kl > c.kl_max:
            fire("kl_runaway", f"KL to reference {kl:.3g} exceeds {c.kl_max:g}", kl)
        ess = _finite(metrics.get(IS_ESS))
        if ess is not None and ess < c.is_ess_min:
            fire(
                "sampler_mismatch",
                f"importance-sampling ESS {ess:.3g} is below {c.is_ess_min:g}: the sampler's distribution is far "
                "from the trainer's (see train.sampler_correction)",
                ess,
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
