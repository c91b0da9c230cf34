"""MHPO (card ratio#1, reconstructed): LFM modulator, detached hazard decay, bounded gradient."""

from __future__ import annotations

import math

import pytest
import torch

from tether.catalogue import get
from tether.errors import InvalidInputError

mhpo = get("policy_loss", "mhpo").fn

D = torch.float64


def grid_grads(x: torch.Tensor, adv: float, **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss and gradient (token-sum) on a row of log-ratios x."""
    old = torch.full((1, x.numel()), -3.0, dtype=D)
    lp = (old + x.unsqueeze(0)).requires_grad_(True)
    mask = torch.ones_like(lp, dtype=torch.bool)
    loss, _ = mhpo(lp, old, torch.tensor([adv], dtype=D), mask, aggregation="token-sum", **kw)
    (g,) = torch.autograd.grad(loss, lp)
    return loss.detach(), g[0]


def zeta_ref(psi: torch.Tensor, centred: bool = False) -> torch.Tensor:
    def h(u: torch.Tensor) -> torch.Tensor:
        sp = torch.log1p(torch.exp(u))
        return torch.clamp(sp - math.log(2), min=0) if centred else sp

    return (h(psi) / 1.0) ** 1.5 + (h(-psi) / 0.8) ** 2.0


def test_no_dead_zone() -> None:
    x = torch.linspace(-19.0, 19.0, 381, dtype=D)
    for adv in (-1.0, 2.0):
        _, g = grid_grads(x, adv)
        assert (g != 0).all()


@pytest.mark.parametrize("centred", [False, True])
def test_gradient_is_the_analytic_multiplier_so_zeta_carries_no_gradient(centred: bool) -> None:
    x = torch.linspace(-6.0, 6.0, 97, dtype=D)
    _, g = grid_grads(x, 1.3, center_hazard=centred)
    psi = 1.5 * torch.tanh(x / 1.5)
    expected = -1.3 * torch.exp(psi - zeta_ref(psi, centred)) / torch.cosh(x / 1.5) ** 2
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-15)


def test_gradient_multiplier_bound() -> None:
    """sup exp(psi) sech^2(x/c) = e^{c u*} (1 - u*^2), u* = (sqrt(1 + c^2) - 1)/c: 1.5926 for c = 1.5."""
    c = 1.5
    u = (math.sqrt(1 + c * c) - 1) / c
    sup = math.exp(c * u) * (1 - u * u)
    assert sup == pytest.approx(1.5926, abs=1e-4)
    assert sup <= math.exp(c)
    x = torch.linspace(-20.0, 20.0, 40001, dtype=D)
    envelope = torch.exp(c * torch.tanh(x / c)) / torch.cosh(x / c) ** 2
    assert envelope.max().item() == pytest.approx(sup, rel=1e-6)
    for centred in (False, True):
        for adv in (-2.5, 1.0):
            _, g = grid_grads(x[::10], adv, center_hazard=centred)
            assert g.abs().max().item() <= abs(adv) * sup + 1e-12


def test_hazard_weight_at_ratio_one() -> None:
    """Open issue: as written the decay is about 0.265 at r = 1; the centred hazard makes it 1."""
    z0 = math.log(2) ** 1.5 + (math.log(2) / 0.8) ** 2
    loss, g = grid_grads(torch.zeros(1, dtype=D), 1.0)
    assert loss.item() == pytest.approx(-math.exp(-z0))
    assert math.exp(-z0) == pytest.approx(0.265, abs=1e-3)
    assert g.item() == pytest.approx(-math.exp(-z0))
    loss_c, g_c = grid_grads(torch.zeros(1, dtype=D), 1.0, center_hazard=True)
    assert loss_c.item() == pytest.approx(-1.0) and g_c.item() == pytest.approx(-1.0)


def test_hand_computed_value_and_asymmetry() -> None:
    x = torch.tensor([0.5, -0.5], dtype=D)
    loss, _ = grid_grads(x, 1.0, center_hazard=True)
    psi = 1.5 * math.tanh(0.5 / 1.5)
    up = (math.log1p(math.exp(psi)) - math.log(2)) ** 1.5  # only the positive-shift term
    down = ((math.log1p(math.exp(psi)) - math.log(2)) / 0.8) ** 2  # only the negative-shift term
    assert loss.item() == pytest.approx(-(math.exp(psi - up) + math.exp(-psi - down)))


def test_limit_is_unclipped_policy_gradient() -> None:
    x = torch.tensor([-1.0, -0.2, 0.0, 0.4, 1.5], dtype=D)
    loss, g = grid_grads(x, -0.7, c=1e5, lam_p=1e9, lam_n=1e9)
    r = torch.exp(x)
    assert loss.item() == pytest.approx((0.7 * r).sum().item(), rel=1e-6)
    torch.testing.assert_close(g, 0.7 * r, rtol=1e-6, atol=0.0)


def test_extreme_ratios_are_finite() -> None:
    x = torch.tensor([-50.0, 50.0], dtype=D)
    loss, g = grid_grads(x, 1.0)
    assert torch.isfinite(loss) and torch.isfinite(g).all()


def test_nonpositive_c_is_rejected() -> None:
    with pytest.raises(InvalidInputError, match="c must be > 0"):
        grid_grads(torch.zeros(1, dtype=D), 1.0, c=0.0)
