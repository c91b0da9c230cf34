"""CISPO (card ratio#B7): clipped stop-gradient IS weight; both bound conventions."""

from __future__ import annotations

import math

import pytest
import torch

from tether.catalogue import get
from tether.errors import InvalidInputError

cispo = get("policy_loss", "cispo").fn
ppo = get("policy_loss", "ppo_clip").fn

D = torch.float64


def grad_at(log_r: float, adv: float, **kw: object) -> tuple[float, float]:
    lp = torch.tensor([[math.log(0.3) + log_r]], dtype=D, requires_grad=True)
    old = torch.tensor([[math.log(0.3)]], dtype=D)
    loss, _ = cispo(lp, old, torch.tensor([adv], dtype=D), torch.ones(1, 1, dtype=torch.bool), **kw)
    (g,) = torch.autograd.grad(loss, lp)
    return loss.item(), g.item()


def test_gradient_is_minus_a_times_clipped_weight_and_never_zero() -> None:
    for r, w in ((0.01, 0.01), (0.5, 0.5), (1.1, 1.1), (1.5, 1.2), (40.0, 1.2)):
        for adv in (-2.0, 0.7):
            _, g = grad_at(math.log(r), adv)
            assert g == pytest.approx(-adv * w, rel=1e-12)
            assert g != 0.0
    # PPO would drop this token (A > 0, r > 1 + eps); CISPO keeps it with weight 1.2.
    lp = torch.tensor([[math.log(0.45)]], dtype=D, requires_grad=True)
    old = torch.tensor([[math.log(0.3)]], dtype=D)
    args = (lp, old, torch.tensor([1.0], dtype=D), torch.ones(1, 1, dtype=torch.bool))
    assert torch.autograd.grad(ppo(*args)[0], lp)[0].item() == 0.0
    assert torch.autograd.grad(cispo(*args)[0], lp)[0].item() == pytest.approx(-1.2)


def test_reinforce_at_ratio_one() -> None:
    for adv in (1.7, -0.4):
        loss, g = grad_at(0.0, adv)
        assert g == pytest.approx(-adv)
        assert loss == pytest.approx(-adv * math.log(0.3))


def test_no_gradient_flows_through_the_weight() -> None:
    lp = torch.tensor([[-1.2, -0.7]], dtype=D, requires_grad=True)
    old = torch.tensor([[-1.0, -0.9]], dtype=D, requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, _ = cispo(lp, old, torch.tensor([1.5], dtype=D), mask)
    g_lp, g_old = torch.autograd.grad(loss, [lp, old], allow_unused=True)
    assert g_old is None or g_old.abs().max().item() == 0.0
    # If the weight carried gradient, d/dlp would be -A r (1 + lp) instead of -A r.
    r = torch.exp(lp.detach() - old.detach()).clamp(max=1.2)
    torch.testing.assert_close(g_lp, -1.5 * r / 2, rtol=1e-12, atol=0.0)
    # Perturbing lp_old only rescales the gradient (through the weight's value).
    old2 = (old.detach() + 0.05).requires_grad_(False)
    loss2, _ = cispo(lp, old2, torch.tensor([1.5], dtype=D), mask)
    (g2,) = torch.autograd.grad(loss2, lp)
    r2 = torch.exp(lp.detach() - old2).clamp(max=1.2)
    torch.testing.assert_close(g2, -1.5 * r2 / 2, rtol=1e-12, atol=0.0)


def test_absolute_bound_is_trl_convention() -> None:
    assert grad_at(math.log(3.0), 1.0, bound="absolute")[1] == pytest.approx(-3.0)
    assert grad_at(math.log(7.0), 1.0, bound="absolute")[1] == pytest.approx(-5.0)
    assert grad_at(math.log(0.01), -1.0, bound="absolute")[1] == pytest.approx(0.01)
    assert grad_at(math.log(7.0), 1.0, bound="absolute", eps_high=2.0)[1] == pytest.approx(-2.0)
    # relative convention with the same eps_high=2.0 means weight <= 3.0
    assert grad_at(math.log(7.0), 1.0, bound="relative", eps_high=2.0)[1] == pytest.approx(-3.0)
    # relative lower bound when it is set tight
    assert grad_at(math.log(0.5), 1.0, eps_low=0.2)[1] == pytest.approx(-0.8)


def test_clip_fraction_and_padding() -> None:
    lp = torch.log(torch.tensor([[0.6, 0.3, 0.5], [0.1, 0.2, 0.9]], dtype=D)).requires_grad_(True)
    old = torch.log(torch.tensor([[0.3, 0.3, 0.1], [0.1, 0.4, 0.9]], dtype=D))
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    loss, m = cispo(lp, old, torch.tensor([-1.0, 1.0], dtype=D), mask)
    # valid ratios 2.0 (clipped to 1.2), 1.0, 1.0, 0.5 -> one of four clipped, whatever A's sign
    assert m["cispo/clip_frac"].item() == pytest.approx(0.25)
    assert m["cispo/clip_frac_high"].item() == pytest.approx(0.25)
    assert m["cispo/clip_frac_low"].item() == 0.0
    (g,) = torch.autograd.grad(loss, lp)
    assert g[:, 2].abs().max().item() == 0.0
    assert g[0, 0].item() == pytest.approx(1.2 / 4)


def test_bad_bound_and_cap_are_rejected() -> None:
    lp = torch.zeros(1, 1, dtype=D)
    args = (lp, lp, torch.ones(1, dtype=D), torch.ones(1, 1, dtype=torch.bool))
    with pytest.raises(InvalidInputError, match="bound"):
        cispo(*args, bound="both")
    with pytest.raises(InvalidInputError, match="cap"):
        cispo(*args, bound="absolute", eps_high=0.0)
