"""SAFE: entropy-gated KL penalty, PID threshold, soft-min critic (card ratio#11)."""

from __future__ import annotations

import pytest
import torch

from tether.catalogue import get
from tether.catalogue.regularizers.safe import (
    SafeControllerState,
    safe_phase,
    safe_threshold_update,
    soft_min_value,
)

safe = get("regularizer", "safe").fn


def batch(kl: float, h: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ref = torch.full((2, 3), -1.0, dtype=torch.float64)
    lp = (ref + kl).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    return lp, ref, torch.full((2, 3), h, dtype=torch.float64), mask


def test_soft_min_between_min_and_mean_and_limits() -> None:
    v1 = torch.tensor([0.0, 1.0, -2.0, 5.0], dtype=torch.float64)
    v2 = torch.tensor([1.0, 1.0, 3.0, -4.0], dtype=torch.float64)
    v = soft_min_value(v1, v2)
    assert (v >= torch.minimum(v1, v2) - 1e-12).all() and (v <= (v1 + v2) / 2 + 1e-12).all()
    torch.testing.assert_close(soft_min_value(v1, v2, alpha=1e-4), torch.minimum(v1, v2), atol=1e-3, rtol=0)
    torch.testing.assert_close(soft_min_value(v1, v2, alpha=1e6), (v1 + v2) / 2, atol=1e-3, rtol=0)
    assert soft_min_value(2.0, 2.0).item() == pytest.approx(2.0)


def test_penalty_zero_below_threshold() -> None:
    lp, ref, h, mask = batch(0.1, 1.0)
    value, m = safe(lp, ref, h, mask, 0.0)  # KL_s = 0.01 < 0.3
    (g,) = torch.autograd.grad(value, lp)
    assert value.item() == 0.0 and g.abs().max().item() == 0.0 and m["safe/active"].item() == 0.0


def test_penalty_quadratic_above_threshold_with_gradient() -> None:
    lp, ref, h, mask = batch(1.0, 1.9)  # KL = 1.0, H = 1.9 -> gate 2 / 2.0 = 1.0
    value, m = safe(lp, ref, h, mask, 0.5)  # KL_s = 0.45 + 0.1 = 0.55, excess 0.25
    assert m["safe/kl_smoothed"].item() == pytest.approx(0.55)
    assert value.item() == pytest.approx(0.1 * 0.25**2 * 1.0)
    (g,) = torch.autograd.grad(value, lp)
    torch.testing.assert_close(g[mask], torch.full((5,), 0.1 * 2 * 0.25 * 0.1 / 5, dtype=torch.float64))
    assert g[~mask].item() == 0.0
    value2, _ = safe(lp, ref, h, mask, 0.5, kl_threshold=0.05)  # excess 0.5: four times the value
    assert value2.item() == pytest.approx(4 * value.item())


def test_entropy_gate_grows_as_entropy_falls() -> None:
    gates = []
    for h_val in (10.0, 3.0, 1.0, 0.2, 0.0):
        lp, ref, h, mask = batch(1.0, h_val)
        gates.append(safe(lp, ref, h, mask, 1.0)[1]["safe/entropy_gate"].item())
    assert gates[0] == pytest.approx(0.5)  # floor
    assert gates == sorted(gates) and gates[-1] == pytest.approx(20.0)


def test_released_form_has_no_gradient() -> None:
    lp, ref, h, mask = batch(1.0, 1.0)
    diff, _ = safe(lp, ref, h, mask, 1.0)
    released, _ = safe(lp, ref, h, mask, 1.0, released_form=True)
    assert released.item() == pytest.approx(diff.item()) and diff.item() > 0
    assert diff.requires_grad and not released.requires_grad


def test_pid_threshold_update() -> None:
    state = SafeControllerState()
    tau, state = safe_threshold_update(state, 0.5)
    assert tau == pytest.approx(0.45)  # warm-up: 0.3 * 1.5, PID output 0 on the first call
    assert state.reward_ema == 0.5
    tau, state2 = safe_threshold_update(state, 0.7)
    ema = 0.95 * 0.5 + 0.05 * 0.7
    e = (ema - 0.5) - 0.001
    pid = 0.3 * e + 0.01 * e + 0.05 * e
    assert tau == pytest.approx((0.3 + pid) * 1.5)
    assert state2.integral == pytest.approx(e) and state2.prev_error == pytest.approx(e)
    tau_hi, _ = safe_threshold_update(state, 100.0)
    assert tau_hi == 0.6  # clipped


def test_phase_detector() -> None:
    assert safe_phase((0.1,) * 10) == "warmup"
    assert safe_phase((0.2,) * 50 + (0.5,) * 50) == "climbing"
    assert safe_phase((0.8,) * 100) == "converged"
    assert safe_phase((0.3,) * 100) == "plateau"
    assert get("regularizer", "safe").state_update is safe_threshold_update
