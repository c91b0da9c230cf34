"""OPMD loss of R^3L (card adv#B19): -A log pi / (1 + tau), token-mean, no ratio."""

from __future__ import annotations

import pytest
import torch

from tether.catalogue import get
from tether.errors import InvalidInputError

opmd = get("policy_loss", "opmd").fn

D = torch.float64


def test_gradient_is_scaled_reinforce() -> None:
    lp = torch.tensor([[-0.5, -1.0, -2.0], [-0.1, -30.0, -0.3]], dtype=D, requires_grad=True)
    adv = torch.tensor([1.5, -2.0], dtype=D)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    for tau in (1.0, 0.0, 3.0):
        loss, _ = opmd(lp, adv, mask, tau=tau)
        (g,) = torch.autograd.grad(loss, lp)
        expected = torch.where(mask, -adv.unsqueeze(-1) / (1 + tau) / 5, torch.zeros((), dtype=D))
        assert torch.allclose(g, expected)
        value = -(1.5 * (-0.5 - 1.0) - 2.0 * (-0.1 - 30.0 - 0.3)) / (1 + tau) / 5
        assert loss.item() == pytest.approx(value)


def test_no_ratio_gradient_independent_of_the_policy() -> None:
    adv = torch.tensor([0.7], dtype=D)
    mask = torch.ones(1, 1, dtype=torch.bool)
    grads = []
    for value in (-0.01, -5.0, -50.0):
        lp = torch.tensor([[value]], dtype=D, requires_grad=True)
        grads.append(torch.autograd.grad(opmd(lp, adv, mask)[0], lp)[0].item())
    assert grads == pytest.approx([-0.35] * 3)


def test_token_advantages_and_bad_tau() -> None:
    lp = torch.tensor([[-1.0, -2.0]], dtype=D, requires_grad=True)
    adv = torch.tensor([[1.0, 0.0]], dtype=D)  # pivotal credit: prefix token carries no advantage
    loss, _ = opmd(lp, adv, torch.ones(1, 2, dtype=torch.bool))
    (g,) = torch.autograd.grad(loss, lp)
    assert g[0, 1].item() == 0.0 and g[0, 0].item() == pytest.approx(-0.25)
    with pytest.raises(InvalidInputError, match="tau must be >= 0"):
        opmd(lp, adv, torch.ones(1, 2, dtype=torch.bool), tau=-1.0)
