"""Entropy bonus and TRL's adaptive entropy coefficient."""

from __future__ import annotations

import pytest
import torch

from tether.catalogue import get
from tether.catalogue.regularizers.entropy import entropy_coef_update
from tether.errors import InvalidInputError

bonus = get("regularizer", "entropy_bonus").fn


def test_gradient_is_minus_coef_over_valid_tokens() -> None:
    h = torch.rand(3, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    value, m = bonus(h, mask, coef=0.01)
    (g,) = torch.autograd.grad(value, h)
    torch.testing.assert_close(g[mask], torch.full((5,), -0.01 / 5, dtype=torch.float64))
    assert g[~mask].abs().max().item() == 0.0
    assert value.item() == pytest.approx(-0.01 * h[mask].mean().item())
    assert m["reg/entropy"].item() == pytest.approx(h[mask].mean().item(), rel=1e-6)


def test_bonus_not_scaled_by_the_policy_loss_normaliser() -> None:
    """Regression for TRL PR #6648 (lessons.md item 2): the bonus kept the policy loss's normaliser
    (e.g. Dr.GRPO's B * max_completion_length), which made it several times too small. Here the
    per-token gradient stays -coef / N_valid however wide the padding (max length) is."""
    short = torch.rand(2, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    wide = torch.cat([short.detach(), torch.rand(2, 96, dtype=torch.float64)], -1).requires_grad_(True)
    wide_mask = torch.cat([mask, torch.zeros(2, 96, dtype=torch.bool)], -1)
    (g_short,) = torch.autograd.grad(bonus(short, mask, coef=0.001)[0], short)
    (g_wide,) = torch.autograd.grad(bonus(wide, wide_mask, coef=0.001)[0], wide)
    torch.testing.assert_close(g_wide[:, :4], g_short)
    assert g_wide[0, 0].item() == pytest.approx(-0.001 / 5)
    assert g_wide[0, 0].item() != pytest.approx(-0.001 / (2 * 100))  # the buggy Dr.GRPO normaliser


def test_adaptive_coefficient_update() -> None:
    assert entropy_coef_update(0.01, 0.1, target=0.2, delta=0.005) == pytest.approx(0.015)
    assert entropy_coef_update(0.01, 0.2, target=0.2, delta=0.005) == pytest.approx(0.015)
    assert entropy_coef_update(0.01, 0.5, target=0.2, delta=0.005) == pytest.approx(0.005)
    assert entropy_coef_update(0.002, 0.5, delta=0.005, coef_min=0.0) == 0.0
    assert entropy_coef_update(0.998, 0.0, delta=0.005, coef_max=1.0) == 1.0
    assert entropy_coef_update(0.01, torch.tensor([0.1, 0.2]), target=0.2) == pytest.approx(0.015)
    assert get("regularizer", "entropy_bonus").state_update is entropy_coef_update
    with pytest.raises(InvalidInputError, match="coef_min"):
        entropy_coef_update(0.1, 0.1, coef_min=1.0, coef_max=0.5)


def test_coef_zero_and_negative() -> None:
    h = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 3, dtype=torch.bool)
    v, _ = bonus(h, mask, coef=0.0)
    assert v.item() == 0.0
    with pytest.raises(InvalidInputError, match="coef"):
        bonus(h, mask, coef=-0.1)
