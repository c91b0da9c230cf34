"""Card properties of the Lagrange multipliers (control card A2, A3) and the penalized objective."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tether.catalogue import get
from tether.catalogue.constraints.lagrange import (
    LagrangeState,
    PIDLagrangeState,
    clipped_lagrange_update,
    lagrange_multiplier_step,
    lagrange_update,
    lagrangian_advantage,
    lagrangian_penalty,
    pid_lagrange_update,
)
from tether.errors import InvalidInputError

D = torch.float64
COSTS = [40.0, 31.0, 12.0, 0.0, 26.0, 25.0, 60.0, 3.0, 18.0, 24.0, 27.0, 1.0]


def test_registered_as_constraints() -> None:
    for name in (
        "lagrangian_advantage",
        "lagrangian_penalty",
        "lagrange_update",
        "pid_lagrange_update",
        "clipped_lagrange_update",
    ):
        assert get("constraint", name).kind == "constraint"
    assert get("constraint", "ppo_lag_update").fn is lagrange_update
    assert get("constraint", "cppo_pid_update").fn is pid_lagrange_update
    assert get("constraint", "lagrangian_advantage").state_update is lagrange_multiplier_step


def test_card_defaults() -> None:
    h = get("constraint", "pid_lagrange_update").hyperparameters
    assert (h["pid_kp"], h["pid_ki"], h["pid_kd"], h["pid_d_delay"]) == (0.1, 0.01, 0.01, 10)
    assert h["pid_delta_p_ema_alpha"] == h["pid_delta_d_ema_alpha"] == 0.95
    assert (h["penalty_max"], h["sum_norm"], h["cost_limit"]) == (100.0, True, 25.0)
    assert PIDLagrangeState().integral == 0.001
    h = get("constraint", "lagrange_update").hyperparameters
    assert (h["cost_limit"], h["lr"], h["optimizer"]) == (25.0, 0.035, "adam")
    assert LagrangeState().multiplier == 0.001


# ---- update rules -------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_lambda_rises_above_limit_and_falls_below(optimizer: str) -> None:
    s = LagrangeState(multiplier=1.0)
    up, m = lagrange_update(s, 40.0, optimizer=optimizer)  # type: ignore[arg-type]
    assert up.multiplier > 1.0 and m["lagrange/multiplier_delta"].item() > 0
    down, _ = lagrange_update(s, 10.0, optimizer=optimizer)  # type: ignore[arg-type]
    assert down.multiplier < 1.0
    # never below zero, however long the cost stays under the limit
    for _ in range(500):
        s, _ = lagrange_update(s, 0.0, optimizer=optimizer)  # type: ignore[arg-type]
        assert s.multiplier >= 0.0
    assert s.multiplier == 0.0


def test_sgd_is_projected_ascent_and_matches_float_step() -> None:
    s, _ = lagrange_update(LagrangeState(multiplier=0.3), 35.0, optimizer="sgd", lr=0.01)
    assert s.multiplier == pytest.approx(0.3 + 0.01 * 10.0)
    assert lagrange_multiplier_step(0.3, 35.0, lr=0.01) == pytest.approx(s.multiplier)
    s, _ = lagrange_update(LagrangeState(multiplier=0.05), 0.0, optimizer="sgd", lr=0.01)
    assert s.multiplier == 0.0
    assert lagrange_multiplier_step(5.0, 1000.0, upper_bound=6.0) == 6.0


def test_adam_matches_torch_adam() -> None:
    """OmniSafe: Adam on a parameter with loss -lam (J_c - d), then clamp to [0, inf)."""
    lam = torch.nn.Parameter(torch.tensor(0.001, dtype=D))
    opt = torch.optim.Adam([lam], lr=0.035)
    s = LagrangeState()
    for cost in COSTS:
        opt.zero_grad()
        (-lam * (cost - 25.0)).backward()
        opt.step()
        lam.data.clamp_(min=0.0)
        s, _ = lagrange_update(s, cost)
        assert s.multiplier == pytest.approx(lam.item(), abs=1e-12)


def test_state_round_trips_through_json() -> None:
    s, _ = lagrange_update(LagrangeState(), 40.0)
    again = LagrangeState.from_dict(json.loads(json.dumps(s.as_dict())))
    assert again == s
    p = PIDLagrangeState()
    for cost in COSTS:
        p, _ = pid_lagrange_update(p, cost)
    assert PIDLagrangeState.from_dict(json.loads(json.dumps(p.as_dict()))) == p
    # a dict state is accepted and gives the same result as the dataclass
    a, _ = pid_lagrange_update(p.as_dict(), 30.0)
    b, _ = pid_lagrange_update(p, 30.0)
    assert a == b


def test_pid_with_kp_kd_zero_is_the_integral_only_lagrangian() -> None:
    p = PIDLagrangeState(integral=0.001)
    lam = 0.001
    for cost in COSTS:
        p, _ = pid_lagrange_update(p, cost, pid_kp=0.0, pid_kd=0.0, pid_ki=0.01)
        lam = lagrange_multiplier_step(lam, cost, lr=0.01)
        s, _ = lagrange_update(LagrangeState(multiplier=lam), 25.0, optimizer="sgd")
        assert p.multiplier == pytest.approx(lam, abs=1e-12)
        assert s.multiplier == pytest.approx(lam)  # at the limit SGD leaves it unchanged


def test_pid_derivative_is_nonnegative_and_lambda_nonnegative() -> None:
    p = PIDLagrangeState()
    rising_then_falling = [float(c) for c in range(0, 100, 7)] + [float(c) for c in range(100, 0, -9)]
    for cost in rising_then_falling:
        p, m = pid_lagrange_update(p, cost, pid_kp=1.0, pid_kd=1.0)
        assert m["lagrange/pid_d"].item() >= 0.0
        assert p.multiplier >= 0.0 and p.integral >= 0.0
        assert len(p.cost_d_history) <= 10
    # falling cost: D is exactly 0 (only increases count)
    _, m = pid_lagrange_update(p, 0.0)
    assert m["lagrange/pid_d"].item() == 0.0


def test_pid_hand_computed_first_step() -> None:
    p, m = pid_lagrange_update(PIDLagrangeState(), 45.0)
    e = 20.0
    integral = 0.001 + 0.01 * e
    delta_p = 0.05 * e
    cost_d = 0.05 * 45.0
    d = cost_d - 0.0
    assert p.integral == pytest.approx(integral)
    assert p.delta_p == pytest.approx(delta_p)
    assert m["lagrange/pid_d"].item() == pytest.approx(d)
    assert p.multiplier == pytest.approx(0.1 * delta_p + integral + 0.01 * d)
    assert p.cost_d_history == (0.0, pytest.approx(cost_d))


def test_pid_constant_cost_at_limit_keeps_lambda_constant() -> None:
    steady = PIDLagrangeState(
        multiplier=0.7, integral=0.7, delta_p=0.0, cost_d=25.0, cost_d_history=(25.0,) * 10
    )
    p = steady
    for _ in range(30):
        p, _ = pid_lagrange_update(p, 25.0)
        assert p.multiplier == pytest.approx(0.7)
    # from a cold start, lambda converges to the integral once the EMAs settle
    p = PIDLagrangeState()
    for _ in range(400):
        p, _ = pid_lagrange_update(p, 25.0)
    before = p.multiplier
    p, _ = pid_lagrange_update(p, 25.0)
    assert p.multiplier == pytest.approx(before, abs=1e-6) and before == pytest.approx(0.001, abs=1e-6)


def test_pid_rises_above_limit_and_falls_below() -> None:
    p = PIDLagrangeState()
    for _ in range(20):
        nxt, _ = pid_lagrange_update(p, 50.0)
        assert nxt.multiplier >= p.multiplier
        p = nxt
    high = p.multiplier
    for _ in range(200):
        p, _ = pid_lagrange_update(p, 0.0)
        assert p.multiplier >= 0.0
    assert p.multiplier < high and p.multiplier == 0.0


def test_pid_caps() -> None:
    p = PIDLagrangeState(integral=50.0)
    capped, _ = pid_lagrange_update(p, 1e4, sum_norm=False, penalty_max=100.0)
    assert capped.multiplier == 100.0
    uncapped, _ = pid_lagrange_update(p, 1e4)  # sum_norm: no cap
    assert uncapped.multiplier > 100.0
    diff, _ = pid_lagrange_update(p, 1e4, diff_norm=True)
    assert diff.multiplier == 1.0 and diff.integral == 1.0


def test_clipped_variant_respects_lambda_max_and_step_clip() -> None:
    s = LagrangeState(multiplier=0.0)
    for _ in range(1000):
        nxt, m = clipped_lagrange_update(s, 1e6, lambda_max=3.0, max_step=0.5)
        assert nxt.multiplier - s.multiplier <= 0.5 + 1e-12
        assert 0.0 <= nxt.multiplier <= 3.0
        s = nxt
    assert s.multiplier == 3.0
    down, m = clipped_lagrange_update(s, -1e6, lambda_max=3.0, max_step=0.5)
    assert down.multiplier == pytest.approx(2.5) and m["lagrange/step_clipped"].item() == 1.0
    small, m = clipped_lagrange_update(LagrangeState(multiplier=1.0), 26.0, lr=0.1)
    assert small.multiplier == pytest.approx(1.1) and m["lagrange/step_clipped"].item() == 0.0
    nostep, _ = clipped_lagrange_update(LagrangeState(multiplier=1.0), 45.0, lr=1.0, max_step=None)
    assert nostep.multiplier == 21.0


def test_invalid_inputs_raise() -> None:
    with pytest.raises(InvalidInputError, match="lagrange_multiplier"):
        lagrangian_advantage(torch.zeros(3), torch.zeros(3), -0.1)
    with pytest.raises(InvalidInputError, match="mean_cost"):
        lagrange_update(LagrangeState(), math.nan)
    with pytest.raises(InvalidInputError, match="cost_advantages"):
        lagrangian_advantage(torch.zeros(3), torch.zeros(4), 0.1)
    with pytest.raises(InvalidInputError, match="optimizer"):
        lagrange_update(LagrangeState(), 1.0, optimizer="rmsprop")  # type: ignore[arg-type]


# ---- penalized objective ------------------------------------------------------------------


def test_lagrangian_advantage_reduces_to_reward_advantage_at_zero() -> None:
    g = torch.Generator().manual_seed(0)
    a_r, a_c = torch.randn(5, 4, generator=g, dtype=D), torch.randn(5, 4, generator=g, dtype=D)
    for normalize in (True, False):
        out, _ = lagrangian_advantage(a_r, a_c, 0.0, normalize=normalize)
        assert torch.equal(out, a_r)


def test_lagrangian_advantage_values_and_bound() -> None:
    a_r = torch.tensor([1.0, -2.0, 0.5], dtype=D)
    a_c = torch.tensor([3.0, 1.0, -4.0], dtype=D)
    out, _ = lagrangian_advantage(a_r, a_c, 2.0)
    assert torch.allclose(out, (a_r - 2.0 * a_c) / 3.0)
    raw, _ = lagrangian_advantage(a_r, a_c, 2.0, normalize=False)
    assert torch.allclose(raw, a_r - 2.0 * a_c)
    bound = torch.maximum(a_r.abs(), a_c.abs())
    for lam in (0.0, 0.1, 1.0, 10.0, 1e6):
        out, _ = lagrangian_advantage(a_r, a_c, torch.tensor(lam))
        assert (out.abs() <= bound + 1e-9).all()
    big, _ = lagrangian_advantage(a_r, a_c, 1e9)
    assert torch.allclose(big, -a_c, atol=1e-6)


def test_penalty_gradient_is_lambda_times_cost_surrogate_gradient() -> None:
    g = torch.Generator().manual_seed(1)
    lp = (-torch.rand(4, 5, generator=g, dtype=D)).requires_grad_(True)
    old = lp.detach() + 0.2 * torch.randn(4, 5, generator=g, dtype=D)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 3:] = False
    a_c = torch.randn(4, generator=g, dtype=D)
    lam = 0.7
    penalty, m = lagrangian_penalty(lp, old, a_c, mask, lam)
    (grad_pen,) = torch.autograd.grad(penalty, lp)
    surrogate = ((lp - old).exp() * a_c[:, None])[mask].mean()
    (grad_sur,) = torch.autograd.grad(surrogate, lp)
    assert torch.allclose(grad_pen, lam * grad_sur)
    assert m["lagrange/cost_surrogate"].item() == pytest.approx(surrogate.item())
    assert penalty.item() == pytest.approx(lam * surrogate.item())
    assert (grad_pen[~mask] == 0).all()
    zero, _ = lagrangian_penalty(lp, old, a_c, mask, 0.0)
    assert zero.item() == 0.0


def test_advantage_gradient_form_matches_penalty_form_at_ratio_one() -> None:
    """At r = 1, the PG gradient with A_R - lam A_C equals grad(-S_r) + grad(lam S_c)."""
    g = torch.Generator().manual_seed(2)
    lp = (-torch.rand(3, 4, generator=g, dtype=D)).requires_grad_(True)
    old = lp.detach()
    mask = torch.ones(3, 4, dtype=torch.bool)
    a_r, a_c = torch.randn(3, generator=g, dtype=D), torch.randn(3, generator=g, dtype=D)
    lam = 1.5
    adv, _ = lagrangian_advantage(a_r, a_c, lam, normalize=False)
    combined = -((lp - old).exp() * adv[:, None]).mean()
    separate = -((lp - old).exp() * a_r[:, None]).mean() + lagrangian_penalty(lp, old, a_c, mask, lam)[0]
    (g1,) = torch.autograd.grad(combined, lp)
    (g2,) = torch.autograd.grad(separate, lp)
    assert torch.allclose(g1, g2)
