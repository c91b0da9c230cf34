"""ETR (card ratio#3, reconstructed): clip bounds that widen with |A|."""

from __future__ import annotations

import math

import pytest
import torch

from tether.catalogue import get
from tether.catalogue.losses.etr import etr_bounds
from tether.errors import InvalidInputError

etr = get("policy_loss", "etr").fn
higher = get("policy_loss", "clip_higher").fn

D = torch.float64


def grad_at(fn: object, r: float, adv: float, **kw: float) -> float:
    lp = torch.tensor([[math.log(0.3) + math.log(r)]], dtype=D, requires_grad=True)
    old = torch.tensor([[math.log(0.3)]], dtype=D)
    loss, _ = fn(lp, old, torch.tensor([adv], dtype=D), torch.ones(1, 1, dtype=torch.bool), **kw)  # type: ignore[operator]
    return torch.autograd.grad(loss, lp)[0].item()


def test_lam_zero_is_clip_higher() -> None:
    g = torch.Generator().manual_seed(0)
    lp = (-torch.rand(8, 6, generator=g, dtype=D) * 2).requires_grad_(True)
    old = lp.detach() + 0.4 * torch.randn(8, 6, generator=g, dtype=D)
    adv = 2 * torch.randn(8, generator=g, dtype=D)
    mask = torch.rand(8, 6, generator=g) > 0.3
    l1, m1 = etr(lp, old, adv, mask, lam=0.0)
    l2, m2 = higher(lp, old, adv, mask)
    g1 = torch.autograd.grad(l1, lp)[0]
    g2 = torch.autograd.grad(l2, lp)[0]
    assert l1.item() == pytest.approx(l2.item(), rel=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=0.0)
    for key in ("policy/clip_frac", "policy/clip_frac_low", "policy/clip_frac_high"):
        assert m1[key].item() == pytest.approx(m2[key].item())
    assert 0 < m1["policy/clip_frac"].item()


def test_bounds_are_monotone_in_abs_advantage_and_capped() -> None:
    a = torch.linspace(0.0, 20.0, 201, dtype=D)
    for sign in (1.0, -1.0):
        low, high = etr_bounds(sign * a, 0.2, 0.28, 0.5, 1.0)
        assert (low.diff() >= 0).all() and (high.diff() >= 0).all()
        assert low[0].item() == pytest.approx(0.2) and high[0].item() == pytest.approx(0.28)
        assert low.max().item() == 1.0 and high.max().item() == 1.0
    low, high = etr_bounds(torch.tensor([2.0], dtype=D), 0.2, 0.28, 0.5, 1.0)
    assert high.item() == pytest.approx(0.56) and low.item() == pytest.approx(0.4)


def test_large_advantages_keep_gradient_further_out() -> None:
    # A = 2: e_high = 0.28 * 2 = 0.56, so r = 1.5 still has gradient; clip-higher cuts it.
    assert grad_at(etr, 1.5, 2.0) == pytest.approx(-3.0)
    assert grad_at(higher, 1.5, 2.0) == 0.0
    # A = -2: e_low = 0.4, so r = 0.65 keeps gradient; clip-higher clips at 0.8.
    assert grad_at(etr, 0.65, -2.0) == pytest.approx(1.3)
    assert grad_at(higher, 0.65, -2.0) == 0.0
    # A = 1: e_high = 0.42 < 0.5 -> clipped
    assert grad_at(etr, 1.5, 1.0) == 0.0
    # the cap: e_high <= 1, so r = 2.1 is clipped however large A is, r = 1.9 is not
    assert grad_at(etr, 2.1, 100.0) == 0.0
    assert grad_at(etr, 1.9, 100.0) == pytest.approx(-190.0)


def test_zero_advantage_gives_no_update() -> None:
    assert grad_at(etr, 1.3, 0.0) == 0.0


def test_negative_lam_is_rejected() -> None:
    with pytest.raises(InvalidInputError, match="lam"):
        grad_at(etr, 1.0, 1.0, lam=-1.0)
