"""PAPO: implicit perception KL (maximised) and double entropy loss (card ratio#21)."""

from __future__ import annotations

import math

import pytest
import torch

from tether.catalogue import get

papo = get("regularizer", "papo").fn
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lp = (-torch.rand(2, 3, generator=g, dtype=torch.float64) * 2 - 0.1).requires_grad_(True)
    aug = -torch.rand(2, 3, generator=g, dtype=torch.float64) * 2 - 0.1
    return lp, aug


def test_identical_inputs_give_zero_kl() -> None:
    lp, _ = inputs()
    value, m = papo(lp, lp.detach(), MASK, eta_o=0.0, eta_a=0.0)
    (g,) = torch.autograd.grad(value, lp)
    assert m["papo/kl_prcp"].item() == 0.0 and value.item() == 0.0 and g.abs().max().item() == 0.0


def test_hand_computed_value() -> None:
    lp, aug = inputs(1)
    value, m = papo(lp, aug, MASK)
    x = (aug - lp.detach())[MASK]
    kl = (x.exp() - x - 1).mean()
    ent_o, ent_a = (-lp.detach()[MASK]).mean(), (-aug[MASK]).mean()
    assert value.item() == pytest.approx((-0.01 * kl + 0.05 * ent_o + 0.05 * ent_a).item())
    assert m["papo/kl_prcp"].item() == pytest.approx(kl.item(), rel=1e-6)


def test_descent_step_increases_the_perception_kl() -> None:
    lp, aug = inputs(2)
    value, m = papo(lp, aug, MASK, eta_o=0.0, eta_a=0.0)
    (g,) = torch.autograd.grad(value, lp)
    assert g.abs().max().item() > 0
    _, m2 = papo(lp.detach() - 5.0 * g, aug, MASK, eta_o=0.0, eta_a=0.0)
    assert m2["papo/kl_prcp"].item() > m["papo/kl_prcp"].item()


def test_zero_coefficients_give_zero_term() -> None:
    lp, aug = inputs(3)
    value, _ = papo(lp, aug, MASK, gamma=0.0, eta_o=0.0, eta_a=0.0)
    (g,) = torch.autograd.grad(value, lp)
    assert value.item() == 0.0 and g.abs().max().item() == 0.0


def test_aug_entropy_term_has_gradient_only_when_recomputed() -> None:
    lp, aug = inputs(4)
    (g_with,) = torch.autograd.grad(papo(lp, aug, MASK, eta_a=0.05)[0], lp)
    (g_without,) = torch.autograd.grad(papo(lp, aug, MASK, eta_a=0.0)[0], lp)
    torch.testing.assert_close(g_with, g_without)  # precomputed lp_aug: eta_a acts on nothing
    aug_r = aug.clone().requires_grad_(True)
    (g_aug,) = torch.autograd.grad(papo(lp, aug_r, MASK, gamma=0.0, eta_o=0.0)[0], aug_r)
    torch.testing.assert_close(g_aug[MASK], torch.full((4,), -0.05 / 4, dtype=torch.float64))


def test_kl_clip_bounds_the_kl_and_stops_its_gradient() -> None:
    lp = torch.tensor([[-0.1]], dtype=torch.float64, requires_grad=True)
    aug = torch.tensor([[-3.0]], dtype=torch.float64)
    one = torch.ones(1, 1, dtype=torch.bool)
    value, m = papo(lp, aug, one, eta_o=0.0, eta_a=0.0, kl_clip=0.2)
    (g,) = torch.autograd.grad(value, lp)
    assert m["papo/kl_prcp"].item() == pytest.approx(0.2) and g.item() == 0.0
    unclipped, _ = papo(lp, aug, one, eta_o=0.0, eta_a=0.0)
    x = -2.9
    assert unclipped.item() == pytest.approx(-0.01 * (math.exp(x) - x - 1))
