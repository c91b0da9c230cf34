"""PACS (card adv#B10): weighted BCE on an RLOO-centred policy score."""

from __future__ import annotations

import math

import pytest
import torch

from tether.catalogue import get
from tether.errors import InvalidInputError

pacs = get("policy_loss", "pacs").fn

D = torch.float64


def rows(psi: list[float], tokens: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows whose summed log-ratio is psi (split evenly over `tokens` tokens)."""
    b = len(psi)
    old = torch.full((b, tokens), -1.0, dtype=D)
    lp = (old + torch.tensor(psi, dtype=D).unsqueeze(-1) / tokens).requires_grad_(True)
    return lp, old, torch.ones(b, tokens, dtype=torch.bool)


def psi_grads(loss: torch.Tensor, lp: torch.Tensor, tokens: int = 2) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, lp)
    return g[:, 0]  # dL/dpsi_i = dL/dlp_{i,t} for every t (psi is a token sum)


def test_on_policy_gradient_is_rloo_policy_gradient() -> None:
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0], dtype=D)
    g = torch.zeros(5, dtype=torch.long)
    lp, old, m = rows([0.0] * 5)
    loss, _ = pacs(lp, old, r, g, m, class_weights=False)
    got = psi_grads(loss, lp)
    big_g, b = 5, 5
    expected = big_g * (r.mean() - r) / ((big_g - 1) * b)
    assert torch.allclose(got, expected)


def test_class_weights_rescale_the_group_gradient_uniformly() -> None:
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0], dtype=D)
    g = torch.zeros(5, dtype=torch.long)
    lp, old, m = rows([0.0] * 5)
    unweighted = psi_grads(pacs(lp, old, r, g, m, class_weights=False)[0], lp)
    weighted = psi_grads(pacs(lp, old, r, g, m)[0], lp)
    n_pos, n_neg = 2, 3
    assert torch.allclose(weighted, unweighted * 25 / (4 * n_pos * n_neg))


def test_hand_computed_value() -> None:
    psi = [0.6, -0.3, 0.9]
    r = torch.tensor([1.0, 0.0, 0.0], dtype=D)
    lp, old, m = rows(psi)
    loss, metrics = pacs(lp, old, r, torch.zeros(3, dtype=torch.long), m)
    logits = [psi[i] - sum(psi[j] for j in range(3) if j != i) / 2 for i in range(3)]
    assert sum(logits) == pytest.approx(0.0)
    weights = [3 / (2 * 1), 3 / (2 * 2), 3 / (2 * 2)]
    bce = [math.log1p(math.exp(-logits[0]))] + [math.log1p(math.exp(x)) for x in logits[1:]]
    assert loss.item() == pytest.approx(sum(w * v for w, v in zip(weights, bce)) / 3)
    assert metrics["pacs/logit_mean"].item() == pytest.approx(0.0, abs=1e-7)


def test_logits_sum_to_zero_within_each_group() -> None:
    gen = torch.Generator().manual_seed(0)
    psi = (torch.randn(6, generator=gen, dtype=D) * 3).tolist()
    lp, old, m = rows(psi)
    r = torch.tensor([1.0, 0, 0, 1, 1, 0], dtype=D)
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    # the mean logit is 0 in any batch made of whole groups
    _, metrics = pacs(lp, old, r, g, m)
    assert metrics["pacs/logit_mean"].item() == pytest.approx(0.0, abs=1e-6)
    _, metrics = pacs(lp[:3].detach(), old[:3], r[:3], g[:3], m[:3])
    assert metrics["pacs/logit_mean"].item() == pytest.approx(0.0, abs=1e-6)


def test_single_class_group_has_zero_gradient_at_zero_score() -> None:
    lp, old, m = rows([0.0] * 4)
    for label in (0.0, 1.0):
        r = torch.full((4,), label, dtype=D)
        loss, _ = pacs(lp, old, r, torch.zeros(4, dtype=torch.long), m)
        assert psi_grads(loss, lp).abs().max().item() == pytest.approx(0.0, abs=1e-12)
        assert loss.item() == pytest.approx(math.log(2))


def test_beta_scales_the_score_and_mean_logprob_option() -> None:
    lp, old, m = rows([0.4, -0.4])
    r = torch.tensor([1.0, 0.0], dtype=D)
    g = torch.zeros(2, dtype=torch.long)
    loss2, _ = pacs(lp, old, r, g, m, beta=2.0)
    # logits +-(2*0.4 + 2*0.4) = +-1.6, both correctly classified, weights 1
    assert loss2.item() == pytest.approx(math.log1p(math.exp(-1.6)))
    lp2 = torch.tensor([[-0.2, -0.4], [-1.0, -3.0]], dtype=D)
    loss_m, _ = pacs(lp2, lp2, r, g, m, score="mean_logprob")
    diff = -0.3 - (-2.0)
    assert loss_m.item() == pytest.approx(math.log1p(math.exp(-diff)))


def test_padding_rows_are_not_samples() -> None:
    lp, old, m = rows([0.5, -0.5, 0.0])
    m[2] = False
    with torch.no_grad():
        lp[2] = 1e3
    r = torch.tensor([1.0, 0.0, 1.0], dtype=D)
    loss, _ = pacs(lp, old, r, torch.zeros(3, dtype=torch.long), m)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)))
    (grad,) = torch.autograd.grad(loss, lp)
    assert grad[2].abs().max().item() == 0.0


def test_rejects_bad_beta() -> None:
    lp, old, m = rows([0.0, 0.0])
    with pytest.raises(InvalidInputError, match="beta must be > 0"):
        pacs(lp, old, torch.zeros(2, dtype=D), torch.zeros(2, dtype=torch.long), m, beta=0.0)
