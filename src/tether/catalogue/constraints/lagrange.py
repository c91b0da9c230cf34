"""Lagrange multipliers for a cost constraint J_c <= d: the penalized objective and three update rules.

World-agnostic: nothing here knows about environments or language models. A trainer measures the
mean episode (or per-sample) cost J_c, advances the multiplier with one of the update rules once per
epoch, and feeds the multiplier to the policy through :func:`lagrangian_advantage` (OmniSafe's
PPO-Lag / CPPO-PID form) or :func:`lagrangian_penalty` (a separate loss term).

States are small frozen dataclasses of floats; ``as_dict()`` / ``from_dict()`` round-trip them through
JSON so trainers can checkpoint them. Every update rule is a pure function: state in, state out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from tether.catalogue.aggregate import AggregationLike, aggregate
from tether.catalogue.contracts import (
    LossOutput,
    Metrics,
    check_2d,
    check_same_shape,
    detached,
    token_advantages,
)
from tether.catalogue.ratio import log_ratio
from tether.catalogue.registry import register
from tether.errors import InvalidInputError

PPO_LAG_PAPER = "Benchmarking Safe Exploration in Deep Reinforcement Learning"
PID_PAPER = "Responsive Safety in Reinforcement Learning by PID Lagrangian Methods"
OMNISAFE_ARXIV = "2305.09304"
PID_ARXIV = "2007.03964"

CostLike = float | int | torch.Tensor
MultiplierLike = float | int | torch.Tensor


def _scalar(name: str, value: CostLike) -> float:
    """A float from a Python number or a one-element tensor (detached); must be finite."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise InvalidInputError(f"{name} must be a scalar (one value), got shape {tuple(value.shape)}")
        out = float(value.detach().reshape(()).item())
    else:
        out = float(value)
    if not math.isfinite(out):
        raise InvalidInputError(f"{name} must be finite, got {out}")
    return out


def _multiplier(value: MultiplierLike) -> float:
    lam = _scalar("lagrange_multiplier", value)
    if lam < 0:
        raise InvalidInputError(
            f"lagrange_multiplier must be >= 0 (a multiplier is never negative), got {lam}"
        )
    return lam


def _check_limit(cost_limit: float, upper_bound: float | None) -> None:
    if not math.isfinite(cost_limit):
        raise InvalidInputError(f"cost_limit must be finite, got {cost_limit}")
    if upper_bound is not None and upper_bound < 0:
        raise InvalidInputError(f"upper bound on the multiplier must be >= 0, got {upper_bound}")


# ---------------------------------------------------------------------------------------------
# States


@dataclass(frozen=True)
class LagrangeState:
    """State of the gradient-ascent multiplier (plain or clipped).

    ``multiplier`` is lambda (card default lambda_init 0.001); ``adam_m``, ``adam_v`` and ``step`` are
    the Adam moments and step count, used only with ``optimizer="adam"``.
    """

    multiplier: float = 0.001
    adam_m: float = 0.0
    adam_v: float = 0.0
    step: int = 0

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LagrangeState:
        return cls(
            multiplier=float(data.get("multiplier", 0.001)),
            adam_m=float(data.get("adam_m", 0.0)),
            adam_v=float(data.get("adam_v", 0.0)),
            step=int(data.get("step", 0)),
        )


@dataclass(frozen=True)
class PIDLagrangeState:
    """State of the PID multiplier (OmniSafe ``PIDLagrangian``'s attributes).

    ``multiplier`` is the current penalty lambda (0 before the first update), ``integral`` the I term
    with K_i folded in (starts at I_0 = 0.001), ``delta_p`` the EMA of the error, ``cost_d`` the EMA
    of the cost, and ``cost_d_history`` the last ``delay`` values of ``cost_d`` (oldest first; starts
    as ``(0.0,)``).
    """

    multiplier: float = 0.0
    integral: float = 0.001
    delta_p: float = 0.0
    cost_d: float = 0.0
    cost_d_history: tuple[float, ...] = (0.0,)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["cost_d_history"] = list(self.cost_d_history)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PIDLagrangeState:
        history = tuple(float(v) for v in data.get("cost_d_history", (0.0,)))
        return cls(
            multiplier=float(data.get("multiplier", 0.0)),
            integral=float(data.get("integral", 0.001)),
            delta_p=float(data.get("delta_p", 0.0)),
            cost_d=float(data.get("cost_d", 0.0)),
            cost_d_history=history or (0.0,),
        )


def _lagrange_state(state: LagrangeState | Mapping[str, Any]) -> LagrangeState:
    s = state if isinstance(state, LagrangeState) else LagrangeState.from_dict(state)
    if not math.isfinite(s.multiplier) or s.multiplier < 0:
        raise InvalidInputError(f"lagrange_state.multiplier must be a finite value >= 0, got {s.multiplier}")
    return s


def _pid_state(state: PIDLagrangeState | Mapping[str, Any]) -> PIDLagrangeState:
    s = state if isinstance(state, PIDLagrangeState) else PIDLagrangeState.from_dict(state)
    if s.integral < 0 or s.multiplier < 0:
        raise InvalidInputError(
            f"pid_lagrange_state: integral and multiplier must be >= 0, got {s.integral}, {s.multiplier}"
        )
    return s


def _update_metrics(lam_old: float, lam_new: float, mean_cost: float, cost_limit: float) -> Metrics:
    return {
        "lagrange/multiplier": detached(lam_new),
        "lagrange/multiplier_delta": detached(lam_new - lam_old),
        "lagrange/mean_cost": detached(mean_cost),
        "lagrange/constraint_violation": detached(mean_cost - cost_limit),
    }


# ---------------------------------------------------------------------------------------------
# Update rules


def lagrange_multiplier_step(
    lagrange_multiplier: MultiplierLike,
    mean_cost: CostLike,
    cost_limit: float = 25.0,
    lr: float = 0.035,
    upper_bound: float | None = None,
) -> float:
    """Projected dual ascent on a bare multiplier: lam <- clip(lam + lr (J_c - d), 0, upper_bound).

    The float-in/float-out ``state_update`` of :func:`lagrangian_advantage` and
    :func:`lagrangian_penalty` (recipes advance ``lagrange_multiplier`` with it from a cost metric).
    This is the card's SGD form of PPO-Lag's multiplier update; :func:`lagrange_update` also has
    OmniSafe's Adam form.
    """
    lam = _multiplier(lagrange_multiplier)
    cost = _scalar("mean_cost", mean_cost)
    _check_limit(cost_limit, upper_bound)
    if lr <= 0:
        raise InvalidInputError(f"lagrange_multiplier_step: lr must be > 0, got {lr}")
    new = max(0.0, lam + lr * (cost - cost_limit))
    return new if upper_bound is None else min(new, upper_bound)


@register(
    "constraint",
    "lagrange_update",
    paper=PPO_LAG_PAPER,
    arxiv="",
    status="exact",
    card="control#A2",
    aliases=("ppo_lag_update",),
)
def lagrange_update(
    lagrange_state: LagrangeState | Mapping[str, Any],
    mean_cost: CostLike,
    cost_limit: float = 25.0,
    lr: float = 0.035,
    optimizer: Literal["adam", "sgd"] = "adam",
    upper_bound: float | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> tuple[LagrangeState, Metrics]:
    """PPO-Lagrangian multiplier update: one gradient step on -lam (J_c - d), then clamp lam to [0, upper].

    Paper: Ray, Achiam, Amodei, "Benchmarking Safe Exploration in Deep Reinforcement Learning" (2019,
    OpenAI; no arXiv id); implementation as in OmniSafe (Ji et al., "OmniSafe: An Infrastructure for
    Accelerating Safe Reinforcement Learning Research", arXiv 2305.09304, ``common/lagrange.py``).
    Exact (card A2, checked against OmniSafe's Lagrange module).

    Multiplier loss L(lam) = -lam (J_c - d), gradient g = -(J_c - d), J_c = mean episode cost of the
    last epoch, d = ``cost_limit``.
    - ``optimizer="adam"`` (OmniSafe, default): torch-Adam step on lam with ``lr``, ``betas``, ``eps``
      (m <- b1 m + (1-b1) g; v <- b2 v + (1-b2) g^2; lam <- lam - lr m_hat / (sqrt(v_hat) + eps)), the
      moments live in the state.
    - ``optimizer="sgd"``: the card's equivalent plain form lam <- lam + lr (J_c - d).
    Then lam <- clip(lam, 0, upper_bound) (no upper bound when None, OmniSafe's default).
    Defaults (card): d = 25, lr = 0.035, lam_init = 0.001 (``LagrangeState()``).
    lam rises while J_c > d and falls (never below 0) while J_c < d. Call once per epoch; the result is
    the new state (``state.as_dict()`` is JSON).
    """
    s = _lagrange_state(lagrange_state)
    cost = _scalar("mean_cost", mean_cost)
    _check_limit(cost_limit, upper_bound)
    if lr <= 0:
        raise InvalidInputError(f"lagrange_update: lr must be > 0 (card: 0.035), got {lr}")
    grad = -(cost - cost_limit)
    if optimizer == "sgd":
        lam, m, v, step = s.multiplier - lr * grad, s.adam_m, s.adam_v, s.step + 1
    elif optimizer == "adam":
        b1, b2 = betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1) or eps <= 0:
            raise InvalidInputError(
                f"lagrange_update: betas must be in [0, 1) and eps > 0, got {betas}, {eps}"
            )
        step = s.step + 1
        m = b1 * s.adam_m + (1 - b1) * grad
        v = b2 * s.adam_v + (1 - b2) * grad * grad
        m_hat = m / (1 - b1**step)
        v_hat = v / (1 - b2**step)
        lam = s.multiplier - lr * m_hat / (math.sqrt(v_hat) + eps)
    else:
        raise InvalidInputError(f"lagrange_update: optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    lam = max(0.0, lam)
    if upper_bound is not None:
        lam = min(lam, upper_bound)
    new = LagrangeState(multiplier=lam, adam_m=m, adam_v=v, step=step)
    return new, _update_metrics(s.multiplier, lam, cost, cost_limit)


@register(
    "constraint",
    "clipped_lagrange_update",
    paper=PPO_LAG_PAPER,
    arxiv="",
    status="reconstructed",
    card="control#A2",
)
def clipped_lagrange_update(
    lagrange_state: LagrangeState | Mapping[str, Any],
    mean_cost: CostLike,
    cost_limit: float = 25.0,
    lr: float = 0.035,
    lambda_max: float = 100.0,
    max_step: float | None = 0.5,
) -> tuple[LagrangeState, Metrics]:
    """Clipped projected dual ascent: lam <- clip(lam + clip(lr (J_c - d), -max_step, max_step), 0, lambda_max).

    Paper: Ray et al., "Benchmarking Safe Exploration in Deep Reinforcement Learning" (2019, no arXiv id);
    the bound follows OmniSafe's ``lagrangian_upper_bound`` / CPPO-PID's ``penalty_max`` (OmniSafe,
    arXiv 2305.09304; PID Lagrangian, arXiv 2007.03964). Reconstructed: the card has no separate clipped
    variant (only "clamp lam to [0, upper]" in A2 and "capped at penalty_max" in A3), so the step clip is
    our addition. lambda_max = 100 is the card's penalty_max; max_step = 0.5 is our choice (None turns
    the step clip off, leaving the card's projected update with an upper bound).

    The step clip bounds how far one epoch's cost estimate can move lam (a noisy J_c far from d would
    otherwise jump lam by lr |J_c - d|); the projection keeps 0 <= lam <= lambda_max always.
    """
    s = _lagrange_state(lagrange_state)
    cost = _scalar("mean_cost", mean_cost)
    _check_limit(cost_limit, lambda_max)
    if lr <= 0:
        raise InvalidInputError(f"clipped_lagrange_update: lr must be > 0, got {lr}")
    if max_step is not None and max_step <= 0:
        raise InvalidInputError(f"clipped_lagrange_update: max_step must be > 0 or None, got {max_step}")
    raw = lr * (cost - cost_limit)
    delta = raw if max_step is None else min(max(raw, -max_step), max_step)
    lam = min(max(0.0, s.multiplier + delta), lambda_max)
    new = LagrangeState(multiplier=lam, adam_m=s.adam_m, adam_v=s.adam_v, step=s.step + 1)
    metrics = _update_metrics(s.multiplier, lam, cost, cost_limit)
    metrics["lagrange/step_clipped"] = detached(float(delta != raw))
    return new, metrics


@register(
    "constraint",
    "pid_lagrange_update",
    paper=PID_PAPER,
    arxiv=PID_ARXIV,
    status="exact",
    card="control#A3",
    aliases=("cppo_pid_update",),
)
def pid_lagrange_update(
    pid_lagrange_state: PIDLagrangeState | Mapping[str, Any],
    mean_cost: CostLike,
    cost_limit: float = 25.0,
    pid_kp: float = 0.1,
    pid_ki: float = 0.01,
    pid_kd: float = 0.01,
    pid_d_delay: int = 10,
    pid_delta_p_ema_alpha: float = 0.95,
    pid_delta_d_ema_alpha: float = 0.95,
    penalty_max: float = 100.0,
    sum_norm: bool = True,
    diff_norm: bool = False,
) -> tuple[PIDLagrangeState, Metrics]:
    """PID Lagrangian: set lam by a PID controller on the constraint error, damping PPO-Lag's oscillations.

    Paper: Stooke, Achiam, Abbeel, "Responsive Safety in Reinforcement Learning by PID Lagrangian
    Methods", arXiv 2007.03964; as in OmniSafe CPPO-PID (arXiv 2305.09304, ``common/pid_lagrange.py``).
    Exact (card A3, checked against OmniSafe's PIDLagrangian).

    Per epoch, with J = mean episode cost and e = J - d:
      I <- max(0, I + K_i e)                       (integral, clamped at 0; also <= 1 with diff_norm)
      P <- a_p P + (1 - a_p) e                     (EMA of the error)
      D_ema <- a_d D_ema + (1 - a_d) J             (EMA of the cost)
      D = max(0, D_ema - oldest of the last ``pid_d_delay`` D_ema values)  (only cost increases count)
      lam = max(0, K_p P + I + K_d D); lam <= 1 with diff_norm; lam <= penalty_max unless sum_norm or
      diff_norm; then D_ema is pushed onto the history.
    sum_norm (default) means the policy uses (A_R - lam A_C) / (1 + lam) (:func:`lagrangian_advantage`
    with ``normalize=True``); diff_norm means (1 - lam) A_R - lam A_C with lam in [0, 1].
    K_p = K_d = 0 gives lam = I: the integral-only (plain Lagrangian, SGD) update with lr = K_i.
    Defaults (card): K_p 0.1, K_i 0.01, K_d 0.01, delay 10, a_p = a_d = 0.95, I_0 0.001
    (``PIDLagrangeState()``), penalty_max 100, sum_norm true, d = 25.
    """
    s = _pid_state(pid_lagrange_state)
    cost = _scalar("mean_cost", mean_cost)
    _check_limit(cost_limit, penalty_max)
    if pid_d_delay < 1:
        raise InvalidInputError(f"pid_lagrange_update: pid_d_delay must be >= 1, got {pid_d_delay}")
    for name, alpha in (
        ("pid_delta_p_ema_alpha", pid_delta_p_ema_alpha),
        ("pid_delta_d_ema_alpha", pid_delta_d_ema_alpha),
    ):
        if not 0 <= alpha <= 1:
            raise InvalidInputError(f"pid_lagrange_update: {name} must be in [0, 1], got {alpha}")
    if min(pid_kp, pid_ki, pid_kd) < 0:
        raise InvalidInputError(f"pid_lagrange_update: gains must be >= 0, got {pid_kp}, {pid_ki}, {pid_kd}")

    error = cost - cost_limit
    integral = max(0.0, s.integral + pid_ki * error)
    if diff_norm:
        integral = min(1.0, integral)
    delta_p = pid_delta_p_ema_alpha * s.delta_p + (1 - pid_delta_p_ema_alpha) * error
    cost_d = pid_delta_d_ema_alpha * s.cost_d + (1 - pid_delta_d_ema_alpha) * cost
    history = s.cost_d_history[-pid_d_delay:] or (0.0,)
    derivative = max(0.0, cost_d - history[0])
    lam = max(0.0, pid_kp * delta_p + integral + pid_kd * derivative)
    if diff_norm:
        lam = min(1.0, lam)
    if not (sum_norm or diff_norm):
        lam = min(lam, penalty_max)
    new_history = (*history, cost_d)[-pid_d_delay:]
    new = PIDLagrangeState(
        multiplier=lam, integral=integral, delta_p=delta_p, cost_d=cost_d, cost_d_history=new_history
    )
    metrics = _update_metrics(s.multiplier, lam, cost, cost_limit)
    metrics["lagrange/pid_p"] = detached(delta_p)
    metrics["lagrange/pid_i"] = detached(integral)
    metrics["lagrange/pid_d"] = detached(derivative)
    return new, metrics


# ---------------------------------------------------------------------------------------------
# Penalized objective


@register(
    "constraint",
    "lagrangian_advantage",
    paper=PPO_LAG_PAPER,
    arxiv="",
    status="exact",
    card="control#A2",
    state_update=lagrange_multiplier_step,
)
def lagrangian_advantage(
    advantages: torch.Tensor,
    cost_advantages: torch.Tensor,
    lagrange_multiplier: MultiplierLike,
    normalize: bool = True,
) -> tuple[torch.Tensor, Metrics]:
    """PPO-Lag's policy advantage: A_hat = (A_R - lam A_C) / (1 + lam), used inside the PPO clip loss.

    Paper: Ray et al., "Benchmarking Safe Exploration in Deep Reinforcement Learning" (2019, no arXiv
    id); OmniSafe PPO-Lag / CPPO-PID ``_compute_adv_surrogate`` (arXiv 2305.09304; PID Lagrangian
    arXiv 2007.03964 calls the division "sum_norm"). Exact (card A2/A3).

    ``normalize=True`` (OmniSafe) divides by 1 + lam so |A_hat| <= max(|A_R|, |A_C|) however large lam
    gets; ``normalize=False`` gives the raw Lagrangian A_R - lam A_C. lam = 0 returns A_R exactly (plain
    PPO). lam is state (a float or a detached scalar; never differentiated): advance it with
    ``lagrange_update`` / ``pid_lagrange_update`` (or the float ``lagrange_multiplier_step``). Works on
    any shape ([B], [B, T], [N] control steps) as long as both advantages match; zeros stay zeros, so
    padding stays zero.
    """
    if advantages.shape != cost_advantages.shape:
        raise InvalidInputError(
            f"cost_advantages has shape {tuple(cost_advantages.shape)} but advantages has shape "
            f"{tuple(advantages.shape)}; compute both over the same samples (or tokens)"
        )
    lam = _multiplier(lagrange_multiplier)
    adv_c = cost_advantages.to(advantages.dtype)
    combined = advantages - lam * adv_c
    if normalize:
        combined = combined / (1.0 + lam)
    metrics: Metrics = {
        "lagrange/multiplier": detached(lam),
        "lagrange/adv_mean": detached(combined.detach().float().mean() if combined.numel() else 0.0),
        "lagrange/cost_adv_mean": detached(adv_c.detach().float().mean() if adv_c.numel() else 0.0),
    }
    return combined, metrics


@register(
    "constraint",
    "lagrangian_penalty",
    paper=PPO_LAG_PAPER,
    arxiv="",
    status="reconstructed",
    card="control#A2",
    state_update=lagrange_multiplier_step,
)
def lagrangian_penalty(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    cost_advantages: torch.Tensor,
    response_mask: torch.Tensor,
    lagrange_multiplier: MultiplierLike,
    aggregation: AggregationLike = "token-mean",
) -> LossOutput:
    """Lagrangian cost term the policy minimizes: lam * S_c with S_c = agg(r A_C), r = pi_theta / pi_old.

    Paper: Ray et al., "Benchmarking Safe Exploration in Deep Reinforcement Learning" (2019, no arXiv
    id); PPO-Lag in OmniSafe (arXiv 2305.09304). Reconstructed: the card gives PPO-Lag only in the
    combined-advantage form (see ``lagrangian_advantage``); this is the same Lagrangian written as a
    separate term, L = L_PPO(A_R) + lam * S_c, with the cost surrogate unclipped (its gradient at
    r = 1 is the cost policy gradient). To get OmniSafe's 1/(1 + lam) scaling, use
    ``lagrangian_advantage`` instead (scaling this term alone would not rescale the reward part).

    lam is state (float or detached scalar): grad L = lam grad S_c. r uses log r clamped to +-20.
    ``cost_advantages`` is [B] (broadcast over tokens) or [B, T]; for control pass [N, 1] tensors.
    """
    check_2d("logprobs", logprobs)
    check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, response_mask=response_mask)
    lam = _multiplier(lagrange_multiplier)
    adv_c = token_advantages(cost_advantages, response_mask).to(logprobs.dtype).detach()
    ratio = torch.exp(log_ratio(logprobs, old_logprobs))
    surrogate = aggregate(ratio * adv_c, response_mask, aggregation)
    penalty = lam * surrogate
    metrics: Metrics = {
        "lagrange/multiplier": detached(lam),
        "lagrange/cost_surrogate": detached(surrogate),
        "lagrange/penalty": detached(penalty),
    }
    return penalty, metrics
