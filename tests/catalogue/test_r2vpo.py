"""R2VPO (card ratio#4, reconstructed): ratio-variance Lagrangian and its dual update."""

from __future__ import annotations

import math

import pytest
import torch

from tether.catalogue import get
from tether.catalogue.losses.r2vpo import r2vpo_dual_update
from tether.errors import InvalidInputError

entry = get("policy_loss", "r2vpo")
r2vpo = entry.fn

D = torch.float64


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lp = (-torch.rand(5, 4, generator=g, dtype=D) * 2).requires_grad_(True)
    old = lp.detach() + 0.5 * torch.randn(5, 4, generator=g, dtype=D)
    adv = torch.randn(5, generator=g, dtype=D)
    mask = torch.arange(4).unsqueeze(0) < torch.tensor([4, 2, 3, 1, 0]).unsqueeze(1)
    return lp, old, adv, mask


def test_zero_multiplier_is_unclipped_policy_gradient() -> None:
    lp, old, adv, mask = batch(0)
    loss, _ = r2vpo(lp, old, adv, mask, lagrange_multiplier=0.0)
    (g,) = torch.autograd.grad(loss, lp)
    r = torch.exp(lp.detach() - old)
    n = mask.sum().item()
    a = adv.unsqueeze(-1).expand_as(r)
    expected = torch.where(mask, -a * r / n, torch.zeros((), dtype=D))
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=0.0)
    assert loss.item() == pytest.approx((-a * r)[mask].mean().item(), rel=1e-12)


def test_penalty_gradient_is_zero_for_constant_ratio() -> None:
    old = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.5, -9.0]], dtype=D)
    lp = (old + 0.3).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -0.5], dtype=D)
    l0, _ = r2vpo(lp, old, adv, mask, lagrange_multiplier=0.0)
    l1, m1 = r2vpo(lp, old, adv, mask, lagrange_multiplier=2.0, delta=0.05)
    g0 = torch.autograd.grad(l0, lp)[0]
    g1 = torch.autograd.grad(l1, lp)[0]
    torch.testing.assert_close(g0, g1, rtol=1e-12, atol=1e-15)
    assert m1["r2vpo/ratio_var"].item() == pytest.approx(0.0, abs=1e-12)
    assert l1.item() == pytest.approx(l0.item() - 2.0 * 0.05)


def test_hand_computed_variance_and_penalty_gradient() -> None:
    old = torch.log(torch.tensor([[0.2, 0.2, 0.2]], dtype=D))
    lp = torch.log(torch.tensor([[0.2, 0.4, 0.6]], dtype=D)).requires_grad_(True)  # r = 1, 2, (3 padded)
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    lam, delta = 0.5, 0.1
    loss, m = r2vpo(lp, old, torch.tensor([0.0], dtype=D), mask, lagrange_multiplier=lam, delta=delta)
    assert m["r2vpo/ratio_var"].item() == pytest.approx(0.25)
    assert m["r2vpo/constraint_violation"].item() == pytest.approx(0.15)
    assert loss.item() == pytest.approx(lam * (0.25 - delta))
    (g,) = torch.autograd.grad(loss, lp)
    # d Var / d lp_t = 2 (r_t - r_bar) r_t / N
    assert g[0, 0].item() == pytest.approx(lam * 2 * (1 - 1.5) * 1 / 2)
    assert g[0, 1].item() == pytest.approx(lam * 2 * (2 - 1.5) * 2 / 2)
    assert g[0, 2].item() == 0.0


def test_no_token_has_a_zero_policy_gradient() -> None:
    lp, old, adv, mask = batch(1)
    old = old.clone()
    old[0, 0] = lp[0, 0].detach() - 3.0  # a stale token PPO would clip
    loss, _ = r2vpo(lp, old, adv, mask, lagrange_multiplier=0.3)
    (g,) = torch.autograd.grad(loss, lp)
    assert (g[mask] != 0).all()
    assert (g[~mask] == 0).all()


def test_dual_update_is_projected_ascent() -> None:
    assert entry.state_update is r2vpo_dual_update
    assert r2vpo_dual_update(0.0, 0.2, delta=0.05, lr=0.1) == pytest.approx(0.015)
    assert r2vpo_dual_update(0.5, 0.2, delta=0.05, lr=0.1) > 0.5
    assert r2vpo_dual_update(0.5, 0.01, delta=0.05, lr=0.1) < 0.5
    assert r2vpo_dual_update(0.001, 0.0, delta=0.05, lr=0.1) == 0.0
    assert r2vpo_dual_update(0.2, torch.tensor(0.15), delta=0.05, lr=1.0) == pytest.approx(0.3)
    for lam in (0.0, 0.01, 1.0):
        for var in (0.0, 0.03, 10.0):
            assert r2vpo_dual_update(lam, var) >= 0.0


def test_metric_feeds_the_dual_update() -> None:
    lp, old, adv, mask = batch(2)
    _, m = r2vpo(lp, old, adv, mask)
    var = m["r2vpo/ratio_var"]
    assert var.item() > 0.05
    assert r2vpo_dual_update(0.0, var, delta=0.05, lr=0.1) == pytest.approx(0.1 * (var.item() - 0.05))


def test_extreme_ratios_are_finite() -> None:
    lp = torch.tensor([[-1.0, -60.0]], dtype=D, requires_grad=True)
    old = torch.tensor([[-51.0, -10.0]], dtype=D)
    loss, m = r2vpo(lp, old, torch.tensor([1.0], dtype=D), torch.ones(1, 2, dtype=torch.bool), 1.0)
    (g,) = torch.autograd.grad(loss, lp)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    assert math.isfinite(m["r2vpo/ratio_var"].item())


def test_negative_multiplier_is_rejected() -> None:
    lp, old, adv, mask = batch(0)
    with pytest.raises(InvalidInputError, match="lagrange_multiplier"):
        r2vpo(lp, old, adv, mask, lagrange_multiplier=-1.0)
    with pytest.raises(InvalidInputError, match="lr"):
        r2vpo_dual_update(0.0, 0.1, lr=0.0)
