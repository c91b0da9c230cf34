"""DGPO (card adv#B11): MAD-balanced group advantages and difficulty-aware question weights."""

from __future__ import annotations

import math

import pytest
import torch

from tether.catalogue import get

dgpo = get("advantage", "dgpo").fn
F64 = torch.float64
R = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0], dtype=F64)
IDS = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
M = torch.ones(12, 3, dtype=torch.bool)


def test_dgae_total_magnitude_is_g_per_group() -> None:
    a = dgpo(R, M, IDS, question_weighting=False, rescale_valid_tokens=False)[0][:, 0]
    for q in range(2):
        sel = a[4 * q : 4 * q + 4]
        assert sel.abs().sum().item() == pytest.approx(4.0, rel=1e-3)
        assert sel.sum().item() == pytest.approx(0.0, abs=1e-12)
    p = 0.25
    assert a[0].item() == pytest.approx((1 - p) / (2 * p * (1 - p)), rel=1e-3)
    assert a[8:].abs().max().item() == 0.0


def test_question_weights_softmax_over_valid_groups() -> None:
    base = dgpo(R, M, IDS, question_weighting=False, rescale_valid_tokens=False)[0][:, 0]
    a = dgpo(R, M, IDS, rescale_valid_tokens=False)[0][:, 0]
    w = torch.softmax(torch.tensor([-0.25 / 2, -0.75 / 2], dtype=F64), 0) * 2
    assert torch.allclose(a[:4], w[0] * base[:4]) and torch.allclose(a[4:8], w[1] * base[4:8])
    assert w.mean().item() == pytest.approx(1.0)
    assert w[0] > w[1]  # the harder prompt weighs more
    hot = dgpo(R, M, IDS, temperature=1e9, rescale_valid_tokens=False)[0][:, 0]
    assert torch.allclose(hot, base)


def test_accuracy_input_all_zero_counts_as_easy() -> None:
    acc = torch.tensor([0.0] * 4 + [1.0, 1.0, 1.0, 0.0] + [1.0] * 4, dtype=F64)
    a = dgpo(R, M, IDS, accuracy=acc, rescale_valid_tokens=False)[0][:, 0]
    base = dgpo(R, M, IDS, question_weighting=False, rescale_valid_tokens=False)[0][:, 0]
    # group 0 accuracy all 0 -> acc := 1; group 1 acc 0.75
    w = torch.softmax(torch.tensor([-1.0 / 2, -0.75 / 2], dtype=F64), 0) * 2
    assert torch.allclose(a[:4], w[0] * base[:4])


def test_valid_token_rescaling() -> None:
    mask = torch.ones(12, 3, dtype=torch.bool)
    mask[8:, 1:] = False  # degenerate group has 4 tokens, valid groups 24
    a = dgpo(R, mask, IDS)[0]
    b = dgpo(R, mask, IDS, rescale_valid_tokens=False)[0]
    assert torch.allclose(a, b * (28 / 24))
    assert math.isfinite(dgpo(torch.ones(12, dtype=F64), M, IDS)[0].abs().sum().item())
