"""DPH-RL f-divergence terms on pi_0 samples (card ratio#6)."""

from __future__ import annotations

import math

import pytest
import torch

from tether.catalogue import get
from tether.errors import InvalidInputError

dph = get("regularizer", "dph_rl").fn
ONE = torch.ones(1, 1, dtype=torch.bool)


def toy() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    theta = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    lp0 = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64) * 1.5, -1)
    return theta, lp0


def expectation_under_pi0(
    theta: torch.Tensor, lp0: torch.Tensor, divergence: str
) -> tuple[float, torch.Tensor]:
    logp = torch.log_softmax(theta, -1)
    pi0 = lp0.exp()
    value, grad = 0.0, torch.zeros(6, dtype=torch.float64)
    for a in range(6):
        v, _ = dph(logp[a].reshape(1, 1), lp0[a].reshape(1, 1), ONE, divergence=divergence, coef=1.0)
        (g,) = torch.autograd.grad(v, theta, retain_graph=True)
        value += pi0[a].item() * v.item()
        grad += pi0[a] * g
    return value, grad


def test_zero_at_pi0_for_every_divergence() -> None:
    lp = torch.log(torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64)).requires_grad_(True)
    mask = torch.ones(1, 3, dtype=torch.bool)
    for div in ("forward_kl", "js", "alpha"):
        v, _ = dph(lp, lp.detach(), mask, divergence=div)
        (g,) = torch.autograd.grad(v, lp)
        assert v.item() == pytest.approx(0.0, abs=1e-15) and g.abs().max().item() < 1e-15


def test_forward_kl_expected_value_and_gradient_exact() -> None:
    theta, lp0 = toy()
    value, grad = expectation_under_pi0(theta, lp0, "forward_kl")
    logp = torch.log_softmax(theta, -1)
    kl = (lp0.exp() * (lp0 - logp)).sum()
    (g_true,) = torch.autograd.grad(kl, theta)
    assert value == pytest.approx(kl.item(), rel=1e-12)
    torch.testing.assert_close(grad, g_true, atol=1e-14, rtol=0)


def test_js_expectation_is_twice_js_and_bounded() -> None:
    theta, lp0 = toy()
    value, _ = expectation_under_pi0(theta, lp0, "js")
    p, q = torch.softmax(theta.detach(), -1), lp0.exp()
    m = (p + q) / 2
    js = 0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()
    assert value == pytest.approx(2 * js.item(), rel=1e-10)
    # nearly disjoint supports approach the 2 log 2 bound but never exceed it
    far = torch.tensor([8.0, -8.0, -8.0, -8.0, -8.0, -8.0], dtype=torch.float64, requires_grad=True)
    lp0_far = torch.log_softmax(torch.tensor([-8.0, 8.0, -8, -8, -8, -8], dtype=torch.float64), -1)
    v_far, _ = expectation_under_pi0(far, lp0_far, "js")
    assert 2 * math.log(2) - 1e-5 < v_far <= 2 * math.log(2) + 1e-12


def test_alpha_divergence_nonnegative_with_closed_form_gradient() -> None:
    lp0 = torch.full((1, 9), -1.0, dtype=torch.float64)
    d = torch.linspace(-3, 3, 9, dtype=torch.float64).reshape(1, 9)
    lp = (lp0 + d).requires_grad_(True)
    mask = torch.ones(1, 9, dtype=torch.bool)
    v, _ = dph(lp, lp0, mask, divergence="alpha", alpha=0.2, coef=1.0, aggregation="token-sum")
    (g,) = torch.autograd.grad(v, lp)
    u = d.exp()
    torch.testing.assert_close(g, (u - u.pow(0.8)) / 0.2)
    per = (u.pow(0.8) - 0.8 * u - 0.2) / (0.2 * -0.8)
    assert (per >= 0).all() and v.item() == pytest.approx(per.sum().item())


def test_forward_kl_token_gradient_and_coef() -> None:
    lp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    lp0 = torch.tensor([[-1.5, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    v, _ = dph(lp, lp0, mask)  # eta = 0.01, token-mean
    (g,) = torch.autograd.grad(v, lp)
    u = (lp.detach() - lp0).exp()
    torch.testing.assert_close(g, 0.01 * (u - 1) / 2)
    v0, _ = dph(lp, lp0, mask, coef=0.0)
    assert v0.item() == 0.0


def test_bad_arguments() -> None:
    lp = torch.zeros(1, 1)
    with pytest.raises(InvalidInputError, match="divergence"):
        dph(lp, lp, ONE, divergence="reverse_kl")
    with pytest.raises(InvalidInputError, match="alpha"):
        dph(lp, lp, ONE, divergence="alpha", alpha=1.0)
