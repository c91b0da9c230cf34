"""HeRL (card adv#B22): bounded off-policy weight on hindsight rewrites, PPO clip on the other rows."""

from __future__ import annotations

import math

import pytest
import torch

from tether.catalogue import get
from tether.errors import InvalidInputError

herl = get("policy_loss", "herl").fn
ppo = get("policy_loss", "ppo_clip").fn

D = torch.float64


def rewrite_token(log_rho: float, adv: float, gamma: float = 1.0) -> tuple[float, float]:
    lp = torch.tensor([[-1.0 + log_rho]], dtype=D, requires_grad=True)
    old = torch.tensor([[-7.0]], dtype=D)  # ignored on rewrite rows
    behavior = torch.tensor([[-1.0]], dtype=D)
    loss, _ = herl(
        lp,
        old,
        behavior,
        torch.tensor([adv], dtype=D),
        torch.tensor([True]),
        torch.ones(1, 1, dtype=torch.bool),
        gamma=gamma,
    )
    (g,) = torch.autograd.grad(loss, lp)
    return loss.item(), g.item()


def test_off_policy_weight_in_open_unit_interval() -> None:
    for log_rho in torch.linspace(-30, 30, 61).tolist():
        loss, _ = rewrite_token(log_rho, 1.0)
        assert 0.0 < -loss < 1.0
        rho = math.exp(log_rho)
        assert -loss == pytest.approx(rho / (rho + 1.0))


def test_gradient_formula_and_no_clip() -> None:
    for log_rho, adv, gamma in ((0.0, 1.0, 1.0), (2.0, 1.0, 1.0), (-1.0, -0.5, 0.5), (3.0, -2.0, 2.0)):
        rho = math.exp(log_rho)
        _, g = rewrite_token(log_rho, adv, gamma)
        assert g == pytest.approx(-adv * gamma * rho / (rho + gamma) ** 2)
    # PPO would give zero gradient at ratio e^2 with A > 0; the rewrite weight still moves
    assert rewrite_token(2.0, 1.0)[1] < 0


def test_on_policy_rows_are_plain_ppo_and_ignore_behavior_logprobs() -> None:
    gen = torch.Generator().manual_seed(0)
    lp = (-torch.rand(3, 4, generator=gen, dtype=D) * 2).requires_grad_(True)
    old = lp.detach() + 0.5 * torch.randn(3, 4, generator=gen, dtype=D)
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=D)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    none = torch.zeros(3, dtype=torch.bool)
    a, _ = herl(lp, old, torch.zeros(3, 4, dtype=D), adv, none, mask)
    b, _ = ppo(lp, old, adv, mask)
    assert a.item() == pytest.approx(b.item())
    c, _ = herl(lp, old, torch.full((3, 4), -9.0, dtype=D), adv, none, mask)
    assert c.item() == pytest.approx(a.item())


def test_mixed_batch_shares_one_token_mean() -> None:
    lp = torch.tensor([[-1.0, -1.0], [-2.0, -2.0]], dtype=D)
    old = torch.tensor([[-1.0, -1.0], [-9.0, -9.0]], dtype=D)
    behavior = torch.tensor([[0.0, 0.0], [-2.0, -3.0]], dtype=D)
    adv = torch.tensor([1.0, 2.0], dtype=D)
    mask = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)
    loss, m = herl(lp, old, behavior, adv, torch.tensor([False, True]), mask)
    w = [0.5, math.e / (math.e + 1)]
    expected = (-1.0 - 2.0 * w[0] - 2.0 * w[1]) / 3
    assert loss.item() == pytest.approx(expected)
    assert m["herl/off_policy_token_frac"].item() == pytest.approx(2 / 3)
    assert m["herl/off_policy_weight_mean"].item() == pytest.approx(sum(w) / 2)


def test_rejects_bad_mask_and_gamma() -> None:
    lp = torch.zeros(2, 2, dtype=D)
    mask = torch.ones(2, 2, dtype=torch.bool)
    adv = torch.zeros(2, dtype=D)
    with pytest.raises(InvalidInputError, match="off_policy_mask"):
        herl(lp, lp, lp, adv, torch.zeros(2, 2, dtype=torch.bool), mask)
    with pytest.raises(InvalidInputError, match="gamma must be > 0"):
        herl(lp, lp, lp, adv, torch.zeros(2, dtype=torch.bool), mask, gamma=0.0)
