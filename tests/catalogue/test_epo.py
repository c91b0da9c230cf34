"""EPO entropy regularisation with the band (smoothing) penalty (card ratio#10)."""

from __future__ import annotations

import math

import pytest
import torch

from tether.catalogue import get
from tether.catalogue.regularizers.epo import epo_history_update, epo_phase_weight
from tether.errors import InvalidInputError

epo = get("regularizer", "epo").fn
bonus = get("regularizer", "entropy_bonus").fn

# history 1.0, band (0.8, 1.2): tokens below, inside, above the band, one padded
H = [[0.5, 1.0, 1.5, 0.1]]
MASK = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)


def grad(**kw: object) -> tuple[float, torch.Tensor]:
    h = torch.tensor(H, dtype=torch.float64, requires_grad=True)
    value, _ = epo(h, MASK, 1.0, **kw)
    (g,) = torch.autograd.grad(value, h)
    return value.item(), g


def test_released_form_smoothing_has_no_gradient() -> None:
    """Documents the released-code bug: the smoothing mask is a constant."""
    _, with_smoothing = grad(released_form=True, smooth_coef=1.0)
    _, without = grad(released_form=True, smooth_coef=0.0)
    torch.testing.assert_close(with_smoothing, without)
    value, _ = grad(released_form=True)
    # value still carries the constant: -c_H mean(H) + c_H * 0.1 * 2/3
    assert value == pytest.approx(-0.001 * 1.0 + 0.001 * 0.1 * 2 / 3)


def test_differentiable_band_pushes_back_toward_the_band() -> None:
    value, g = grad()
    n, c = 3, 0.001
    assert g[0, 1].item() == pytest.approx(-c / n)  # inside: bonus only
    assert g[0, 0].item() == pytest.approx(-c / n - c / n)  # below: a descent step raises H
    assert g[0, 2].item() == pytest.approx(-c / n + c / n)  # above: the bonus is cancelled
    assert g[0, 3].item() == 0.0
    assert value == pytest.approx(-c * 1.0 + c * ((0.8 - 0.5) + (1.5 - 1.2)) / 3)


def test_smooth_coef_zero_is_the_entropy_bonus() -> None:
    h = torch.tensor(H, dtype=torch.float64, requires_grad=True)
    v1, _ = epo(h, MASK, 1.0, smooth_coef=0.0)
    v2, _ = bonus(h, MASK, coef=0.001)
    (g1,) = torch.autograd.grad(v1, h)
    (g2,) = torch.autograd.grad(v2, h)
    assert v1.item() == pytest.approx(v2.item())
    torch.testing.assert_close(g1, g2)


def test_per_sample_history_and_phase_weight() -> None:
    h = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 2, dtype=torch.bool)
    value, _ = epo(h, mask, torch.tensor([1.0, 2.0], dtype=torch.float64), phase_weight=0.5)
    # row 2: band (1.6, 2.4), each token 0.6 below it
    assert value.item() == pytest.approx(-0.001 + 0.001 * 0.5 * (0.6 * 2) / 4)
    with pytest.raises(InvalidInputError, match="historical_entropy"):
        epo(h, mask, torch.tensor([1.0, 2.0, 3.0]))


def test_phase_weight_schedule_and_history() -> None:
    assert epo_phase_weight(0) == 1.0
    assert epo_phase_weight(74) == pytest.approx(1 - 0.2 * (1 - math.exp(-2 * 74 / 75)))
    assert epo_phase_weight(75) == pytest.approx(0.8)
    assert epo_phase_weight(150) == pytest.approx(0.8 * math.exp(-3))
    mean, n = epo_history_update(None, 0, 2.0)
    mean, n = epo_history_update(mean, n, 4.0)
    mean, n = epo_history_update(mean, n, torch.tensor(6.0))
    assert (mean, n) == (pytest.approx(4.0), 3)
