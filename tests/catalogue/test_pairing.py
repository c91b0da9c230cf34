"""Rare-event amplification / bidirectional pairing (card adv#B7)."""

from __future__ import annotations

import math

import pytest
import torch

from tether.catalogue import get

pairing = get("advantage", "pairing_weights").fn
D = torch.float64


def test_lone_success_and_lone_failure_closed_forms() -> None:
    G = 8
    r = torch.zeros(2 * G, dtype=D)
    r[0] = 1.0  # group 0: one success (p = 1/8 <= 0.25 -> q+)
    r[G:] = 1.0
    r[G] = 0.0  # group 1: one failure (p = 7/8 >= 0.75 -> q-)
    ids = torch.arange(2).repeat_interleave(G)
    mask = torch.ones(2 * G, 2, dtype=torch.bool)
    out1, m = pairing(r, ids, mask, lambda_plus=1.0, lambda_minus=1.0)
    assert out1[0, 0].item() == pytest.approx((G - 1) / math.sqrt(G), rel=1e-5)
    assert out1[G, 0].item() == pytest.approx(-(G - 1) / math.sqrt(G), rel=1e-5)
    out, _ = pairing(r, ids, mask, lambda_plus=3.0, lambda_minus=0.5)
    assert torch.allclose(out[:G], 3.0 * out1[:G])
    assert torch.allclose(out[G:], 0.5 * out1[G:])
    assert m["pairing/hard_frac"].item() == 0.5


def test_middle_and_degenerate_groups_unweighted() -> None:
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0], dtype=D)
    ids = torch.tensor([0, 0, 0, 0, 1, 1])
    out, _ = pairing(r, ids, torch.ones(6, 1, dtype=torch.bool), lambda_plus=5.0, lambda_minus=5.0)
    base = (r[:4] - 0.5) / (r[:4].std() + 1e-6)
    assert torch.allclose(out[:4, 0], base)
    assert (out[4:] == 0).all()
