"""CalibRL (card adv#B20): dual-clip PPO plus the LeakyReLU expert-calibrated guidance term."""

from __future__ import annotations

import pytest
import torch

from tether.catalogue import get
from tether.errors import InvalidInputError

calibrl = get("policy_loss", "calibrl").fn
dual = get("policy_loss", "dual_clip").fn

D = torch.float64


def guide_grad(lp_value: float, expert_value: float, reward: float, adv: float) -> float:
    """Gradient of the guidance term alone for a one-token batch (PPO part subtracted)."""
    lp = torch.tensor([[lp_value]], dtype=D, requires_grad=True)
    old = torch.tensor([[lp_value]], dtype=D)
    a = torch.tensor([adv], dtype=D)
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss, _ = calibrl(
        lp, old, a, torch.tensor([reward], dtype=D), torch.tensor([[expert_value]], dtype=D), mask
    )
    (g,) = torch.autograd.grad(loss, lp)
    return g.item() - (-adv)  # on-policy PPO gradient is -A


def test_correct_samples_pushed_up_full_rate_below_expert_half_above() -> None:
    for adv in (0.6, -0.4):  # |A| is what scales the guidance
        assert guide_grad(-2.0, -1.0, 1.0, adv) == pytest.approx(-0.1 * abs(adv))
        assert guide_grad(-0.5, -1.0, 1.0, adv) == pytest.approx(-0.05 * abs(adv))


def test_wrong_samples_pushed_down_full_rate_above_expert_half_below() -> None:
    for adv in (0.6, -0.4):
        assert guide_grad(-0.5, -1.0, 0.0, adv) == pytest.approx(0.1 * abs(adv))
        assert guide_grad(-2.0, -1.0, 0.0, adv) == pytest.approx(0.05 * abs(adv))
    # the success threshold is 0.1: a reward of 0.05 counts as wrong
    assert guide_grad(-0.5, -1.0, 0.05, 0.5) == pytest.approx(0.05)
    assert guide_grad(-0.5, -1.0, 0.2, 0.5) == pytest.approx(-0.025)


def test_hand_computed_value() -> None:
    lp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], dtype=D)
    expert = torch.tensor([[-1.5, -1.0], [-1.0, -1.0]], dtype=D)
    adv = torch.tensor([0.5, -1.0], dtype=D)
    r = torch.tensor([1.0, 0.0], dtype=D)
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    loss, m = calibrl(lp, lp, adv, r, expert, mask)
    # z: row 0 (+0.5, -1.0), row 1 (+0.5); correct row: LReLU(-z), wrong row: LReLU(z)
    g = [0.5 * -0.5 * 0.5, 1.0 * 0.5, 0.5 * 1.0]
    ppo_part = (-0.5 - 0.5 + 1.0) / 3
    assert loss.item() == pytest.approx(ppo_part + 0.1 * sum(g) / 3)
    assert m["calibrl/guide_loss"].item() == pytest.approx(sum(g) / 3)


def test_zero_guide_weight_is_dual_clip_ppo() -> None:
    gen = torch.Generator().manual_seed(0)
    lp = (-torch.rand(4, 3, generator=gen, dtype=D) * 3).requires_grad_(True)
    old = lp.detach() + torch.randn(4, 3, generator=gen, dtype=D)
    adv = torch.randn(4, generator=gen, dtype=D)
    r = (adv > 0).to(D)
    expert = -torch.rand(4, 3, generator=gen, dtype=D)
    mask = torch.ones(4, 3, dtype=torch.bool)
    a, _ = calibrl(lp, old, adv, r, expert, mask, guide_weight=0.0)
    b, _ = dual(lp, old, adv, mask, clip_c=3.0)
    assert a.item() == pytest.approx(b.item())
    full, _ = calibrl(lp, old, adv, r, expert, mask)
    assert full.item() != pytest.approx(b.item())


def test_single_expert_row_broadcasts_and_expert_mask() -> None:
    lp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], dtype=D)
    expert_row = torch.tensor([-1.5, -1.0], dtype=D)
    adv = torch.tensor([0.5, -1.0], dtype=D)
    r = torch.tensor([1.0, 0.0], dtype=D)
    mask = torch.ones(2, 2, dtype=torch.bool)
    a, _ = calibrl(lp, lp, adv, r, expert_row, mask)
    b, _ = calibrl(lp, lp, adv, r, expert_row.expand(2, 2), mask)
    assert a.item() == pytest.approx(b.item())
    short = torch.tensor([True, False])  # the expert has a single token
    _, m = calibrl(lp, lp, adv, r, expert_row, mask, expert_mask=short)
    guided = (0.5 * -0.5 * 0.5 + 1.0 * 1.0) / 2  # t = 0 only: z = +0.5 (correct row), +1.0 (wrong row)
    assert m["calibrl/guide_loss"].item() == pytest.approx(guided)
    with pytest.raises(InvalidInputError, match="expert_old_logprobs"):
        calibrl(lp, lp, adv, r, torch.zeros(3, dtype=D), mask)
