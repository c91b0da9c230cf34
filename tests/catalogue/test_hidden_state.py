"""VERL hidden-state bonus (card ratio#19): effective rank, bounded bonus, gate, EMA state."""

from __future__ import annotations

import math

import pytest
import torch

from tether.catalogue import get
from tether.catalogue.advantages.hidden_state import effective_rank, rank_indicators

entry = get("advantage", "verl_er")
verl = entry.fn
D = torch.float64


def test_effective_rank_hand_values() -> None:
    assert effective_rank(torch.eye(4, dtype=D)).item() == pytest.approx(4.0)
    rank_one = torch.ones(5, 3, dtype=D)
    assert effective_rank(rank_one).item() == pytest.approx(1.0)
    m = torch.diag(torch.tensor([3.0, 1.0], dtype=D))
    p = torch.tensor([0.75, 0.25], dtype=D)
    assert effective_rank(m).item() == pytest.approx(math.exp(-(p * p.log()).sum().item()))


def test_indicators_for_short_and_long_sequences() -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 130, 16, generator=g, dtype=D)
    mask = torch.ones(2, 130, dtype=torch.bool)
    mask[1, 5:] = False
    ind = rank_indicators(h, mask, stride=40)
    assert torch.isfinite(ind).all()
    # long row: prefixes 40, 80, 120, 130 -> ERV is the mean first difference
    ers = torch.stack([effective_rank(h[0, :e]) for e in (40, 80, 120, 130)])
    assert ind[0, 1].item() == pytest.approx((ers[1:] - ers[:-1]).mean().item())
    # short row (5 tokens) still gets velocity from adapted windows
    assert ind[1, 1].item() != 0.0


def test_bonus_bounds_gate_and_zero_base() -> None:
    g = torch.Generator().manual_seed(1)
    h = torch.randn(8, 12, 6, generator=g, dtype=D)
    mask = torch.ones(8, 12, dtype=torch.bool)
    mask[3, 4:] = False
    a0 = torch.tensor([1.0, -1.0, 0.0, 2.0, -0.5, 0.0, 0.3, -2.0], dtype=D)
    for ema in (None, torch.tensor([3.0, 0.1, -0.05], dtype=D), torch.tensor([0.5, 1.0, 1.0], dtype=D)):
        out, m = verl(a0, h, mask, ema_means=ema)
        bonus = out - a0.unsqueeze(-1)
        bonus = torch.where(mask, bonus, torch.zeros_like(bonus))
        assert (bonus >= 0).all()
        assert (bonus <= a0.abs().unsqueeze(-1) / 2 + 1e-12).all()
        assert (bonus[a0 == 0] == 0).all()
        assert 0.0 < m["verl/gate_mean"].item() < 1.0


def test_bonus_appears_when_rank_exceeds_its_average() -> None:
    h = torch.zeros(2, 6, 6, dtype=D)
    h[0] = torch.eye(6, dtype=D)  # high effective rank
    h[1, :, 0] = 1.0  # rank one
    mask = torch.ones(2, 6, dtype=torch.bool)
    a0 = torch.tensor([1.0, 1.0], dtype=D)
    out, _ = verl(a0, h, mask, ema_means=torch.tensor([2.0, 0.0, 0.0], dtype=D))
    assert out[0, 0] > 1.0


def test_ema_state_update() -> None:
    g = torch.Generator().manual_seed(2)
    h = torch.randn(3, 9, 4, generator=g, dtype=D)
    mask = torch.ones(3, 9, dtype=torch.bool)
    assert entry.state_update is not None
    first = entry.state_update(None, h, mask)
    assert torch.allclose(first, rank_indicators(h, mask).mean(0))
    prev = torch.tensor([1.0, 2.0, 3.0], dtype=D)
    nxt = entry.state_update(prev, h, mask, ema_alpha=0.3)
    assert torch.allclose(nxt, 0.7 * prev + 0.3 * first)
