"""DSDR local scale: distinctiveness-weighted, length-invariant entropy on correct samples (card ratio#15)."""

from __future__ import annotations

import math

import pytest
import torch

from tether.catalogue import get
from tether.catalogue.regularizers.dsdr import group_softmax

dsdr = get("regularizer", "dsdr_entropy").fn

GROUPS = torch.tensor([0, 0, 0, 1, 1])
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)


def run(
    rewards: list[float], d: list[float], **kw: float
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    h = torch.rand(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64).requires_grad_(True)
    value, m = dsdr(h, MASK, torch.tensor(rewards), GROUPS, torch.tensor(d, dtype=torch.float64), **kw)
    (g,) = torch.autograd.grad(value, h)
    return value, g, m


def test_incorrect_samples_get_no_gradient() -> None:
    _, g, _ = run([1.0, 0.0, 1.0, 0.0, 1.0], [0.3, 0.9, 0.6, 0.2, 0.1])
    assert g[1].abs().max().item() == 0.0 and g[3].abs().max().item() == 0.0
    assert (g[0][MASK[0]] < 0).all() and (g[4][MASK[4]] < 0).all()
    assert g[~MASK].abs().max().item() == 0.0


def test_equal_distinctiveness_gives_uniform_weights_and_length_invariance() -> None:
    _, g, _ = run([1.0, 1.0, 0.0, 1.0, 1.0], [0.0] * 5, coef=0.1)
    # two groups; group 0 has 2 correct (w = 1/2), group 1 has 2 correct (w = 1/2)
    assert g[0, 0].item() == pytest.approx(-0.1 / 2 * 0.5 / 4)
    assert g[1, 0].item() == pytest.approx(-0.1 / 2 * 0.5 / 2)
    assert g[3, 0].item() == pytest.approx(-0.1 / 2 * 0.5 / 1)
    # each correct response's tokens together weigh w_i, whatever its length
    assert g[0].sum().item() == pytest.approx(g[1].sum().item())


def test_softmax_weights_favour_distinctive_samples() -> None:
    w = group_softmax(
        torch.tensor([0.2, 0.8, 0.5, 0.1, 0.9], dtype=torch.float64) / 0.5,
        torch.tensor([True, True, False, True, True]),
        GROUPS,
    )
    e = math.exp(0.4), math.exp(1.6)
    assert w[0].item() == pytest.approx(e[0] / sum(e)) and w[1].item() == pytest.approx(e[1] / sum(e))
    assert w[2].item() == 0.0 and w[4].item() > w[3].item()
    assert w[:2].sum().item() == pytest.approx(1.0) and w[3:].sum().item() == pytest.approx(1.0)


def test_hand_computed_value() -> None:
    h = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    d = torch.tensor([0.0, math.log(3.0)], dtype=torch.float64)
    value, _ = dsdr(h, mask, torch.tensor([1.0, 1.0]), torch.tensor([7, 7]), d, coef=1.0, temperature=1.0)
    # weights (1/4, 3/4); mean entropies 2.0 and 2.0; one group
    assert value.item() == pytest.approx(-(0.25 * 2.0 + 0.75 * 2.0))


def test_zero_coef_and_no_correct_sample() -> None:
    value, g, _ = run([1.0, 1.0, 1.0, 1.0, 1.0], [0.5] * 5, coef=0.0)
    assert value.item() == 0.0 and g.abs().max().item() == 0.0
    value, g, m = run([0.0] * 5, [0.5] * 5)
    assert value.item() == 0.0 and g.abs().max().item() == 0.0 and m["dsdr/correct_frac"].item() == 0.0
