"""SAFE: an entropy-gated KL penalty above a PID-controlled threshold, and its soft-min critic (card ratio#11)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tether.catalogue.aggregate import AggregationLike, aggregate, masked_mean
from tether.catalogue.contracts import LossOutput, check_2d, check_same_shape, detached
from tether.catalogue.registry import register
from tether.errors import InvalidInputError

PHASE_MULTIPLIERS: dict[str, float] = {"warmup": 1.5, "climbing": 1.2, "plateau": 0.8, "converged": 1.0}


def soft_min_value(v1: torch.Tensor | float, v2: torch.Tensor | float, alpha: float = 0.3) -> torch.Tensor:
    """SAFE's double soft-min critic: V = -a [logsumexp(-v1/a, -v2/a) - log 2].

    A pessimistic blend of two value heads: min(v1, v2) <= V <= (v1 + v2)/2, V -> min as a -> 0
    and -> the mean as a -> infinity. a = 0.3 (config; the notebook's class default is 0.5).
    """
    if alpha <= 0:
        raise InvalidInputError(f"soft_min_value: alpha must be > 0, got {alpha}")
    a = torch.as_tensor(v1, dtype=torch.float64) if not isinstance(v1, torch.Tensor) else v1
    b = torch.as_tensor(v2, dtype=a.dtype, device=a.device) if not isinstance(v2, torch.Tensor) else v2
    x, y = -a / alpha, -b / alpha
    stacked = torch.stack((x + torch.zeros_like(y), y + torch.zeros_like(x)), dim=-1)
    return -alpha * (torch.logsumexp(stacked, dim=-1) - math.log(2.0))


@dataclass(frozen=True)
class SafeControllerState:
    """State of SAFE's threshold controller (PID on the reward-EMA velocity plus a phase detector)."""

    reward_ema: float | None = None
    integral: float = 0.0
    prev_error: float = 0.0
    reward_history: tuple[float, ...] = ()


def safe_phase(reward_history: tuple[float, ...]) -> str:
    """SAFE's phase detector: warmup (< 50 rewards), climbing, converged or plateau.

    recent = last 50 batch rewards, old = the 50 before (recent itself when fewer than 100):
    climbing if mean(recent) > mean(old) + 0.01; converged if std(recent) < 0.02 and
    mean(recent) > 0.7; plateau otherwise.
    """
    if len(reward_history) < 50:
        return "warmup"
    recent = reward_history[-50:]
    old = reward_history[-100:-50] if len(reward_history) >= 100 else recent
    recent_mean = sum(recent) / len(recent)
    old_mean = sum(old) / len(old)
    recent_std = math.sqrt(sum((r - recent_mean) ** 2 for r in recent) / len(recent))
    if recent_mean > old_mean + 0.01:
        return "climbing"
    if recent_std < 0.02 and recent_mean > 0.7:
        return "converged"
    return "plateau"


def safe_threshold_update(
    state: SafeControllerState,
    reward: float,
    base_threshold: float = 0.3,
    kp: float = 0.3,
    ki: float = 0.01,
    kd: float = 0.05,
    target_velocity: float = 0.001,
    ema_decay: float = 0.95,
    threshold_min: float = 0.1,
    threshold_max: float = 0.6,
) -> tuple[float, SafeControllerState]:
    """One step of SAFE's KL-threshold controller; returns (tau for this step, new state). Pure.

    ``reward`` is the mean raw reward of the batch. The phase is detected first on the reward
    history (``safe_phase``). PID: the first call only initialises the reward EMA (output 0);
    afterwards ema <- 0.95 ema + 0.05 reward, e = (ema - ema_prev) - 0.001,
    I <- clip(I + e, -1, 1), PID = kp e + ki I + kd (e - e_prev), gains (0.3, 0.01, 0.05).
    tau = clip((0.3 + PID) * phase_mult, 0.1, 0.6), phase_mult 1.5 / 1.2 / 0.8 / 1.0 for
    warmup / climbing / plateau / converged. Pass tau as ``kl_threshold`` to ``safe``.
    """
    history = (*state.reward_history, float(reward))[-100:]
    phase = safe_phase(history)
    if state.reward_ema is None:
        pid = 0.0
        new_state = SafeControllerState(float(reward), state.integral, state.prev_error, history)
    else:
        ema = ema_decay * state.reward_ema + (1.0 - ema_decay) * float(reward)
        error = (ema - state.reward_ema) - target_velocity
        integral = max(-1.0, min(1.0, state.integral + error))
        pid = kp * error + ki * integral + kd * (error - state.prev_error)
        new_state = SafeControllerState(ema, integral, error, history)
    tau = (base_threshold + pid) * PHASE_MULTIPLIERS[phase]
    return max(threshold_min, min(threshold_max, tau)), new_state


@register(
    "regularizer",
    "safe",
    paper="SAFE: Stable Alignment Finetuning with Entropy-Aware Predictive Control for RLHF",
    arxiv="2602.04651",
    status="exact",
    card="ratio#11",
    state_update=safe_threshold_update,
)
def safe(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
    smoothed_kl: float | torch.Tensor,
    kl_threshold: float = 0.3,
    kl_smoothing: float = 0.9,
    penalty_coef: float = 0.1,
    entropy_floor: float = 2.0,
    gate_min: float = 0.5,
    released_form: bool = False,
    aggregation: AggregationLike = "token-mean",
) -> LossOutput:
    """SAFE's entropy-gated KL penalty: quadratic above a threshold, amplified at low entropy.

    Paper: Maity, "SAFE: Stable Alignment Finetuning with Entropy-Aware Predictive Control for
    RLHF", arXiv 2602.04651. Exact code (github.com/ryyzn9/SAFE, notebooks/mainD.py), made
    differentiable: the released penalty is built from ``kl.item()`` and has NO gradient.

    KL = token-mean(lp - lp_ref) (k1, a tensor); KL_s = 0.9 * ``smoothed_kl`` + 0.1 * KL
    (``smoothed_kl`` = the previous KL_s, state, detached; start at 0);
    gate = max(0.5, 2.0 / (H + 0.1)) with H = token-mean of ``entropy`` (detached);
    term = 0.1 * (KL_s - tau)^2 * gate if KL_s > tau else 0, tau = ``kl_threshold``
    (from ``safe_threshold_update``, base 0.3). The gate and tau are constants; the gradient
    flows through KL. Store ``safe/kl_smoothed`` as the next ``smoothed_kl``.
    released_form=True reproduces the code: same value, no gradient. The rest of SAFE's loss
    (PPO clip 0.2, 0.5 Huber critic on ``soft_min_value``, -0.01 H) lives in other entries.
    """
    check_2d("logprobs", logprobs)
    check_same_shape(
        "logprobs", logprobs, ref_logprobs=ref_logprobs, entropy=entropy, response_mask=response_mask
    )
    if not 0.0 <= kl_smoothing <= 1.0:
        raise InvalidInputError(f"safe: kl_smoothing must be in [0, 1], got {kl_smoothing}")
    if penalty_coef < 0 or entropy_floor < 0:
        raise InvalidInputError(
            f"safe: penalty_coef and entropy_floor must be >= 0, got {penalty_coef}, {entropy_floor}"
        )
    valid = response_mask.bool()
    diff = torch.where(
        valid,
        logprobs - ref_logprobs.to(logprobs.dtype),
        torch.zeros((), dtype=logprobs.dtype, device=logprobs.device),
    )
    kl = aggregate(diff, response_mask, aggregation)
    prev = torch.as_tensor(smoothed_kl, dtype=kl.dtype, device=kl.device).detach().reshape(())
    kl_s = kl_smoothing * prev + (1.0 - kl_smoothing) * kl
    with torch.no_grad():
        h = masked_mean(entropy.detach(), response_mask).clamp(min=0.0)
        gate = torch.clamp(entropy_floor / (h + 0.1), min=gate_min)
    excess = torch.relu(kl_s - kl_threshold)
    term = penalty_coef * excess.square() * gate
    if released_form:
        term = term.detach()
    return term, {
        "safe/kl": detached(kl),
        "safe/kl_smoothed": detached(kl_s),
        "safe/threshold": detached(kl_threshold),
        "safe/entropy_gate": detached(gate),
        "safe/active": detached((kl_s > kl_threshold).float()),
        "reg/safe_loss": detached(term),
    }
