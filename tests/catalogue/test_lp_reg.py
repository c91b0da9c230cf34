"""Lp-Reg (card ratio#7): min-p proxy, selection of low-probability negative tokens, k3 pull."""

from __future__ import annotations

import math

import pytest
import torch

from tether.catalogue import get
from tether.catalogue.losses.lp_reg import min_p_proxy_logprobs
from tether.errors import InvalidInputError

lp_reg = get("policy_loss", "lp_reg").fn
dual = get("policy_loss", "dual_clip").fn

D = torch.float64
# kappa * max = 0.016: tokens 0, 1, 2 are kept, 3 and 4 are min-p noise.
P_OLD = torch.tensor([0.80, 0.12, 0.0775, 0.002, 0.0005], dtype=D)
KEPT = 0.80 + 0.12 + 0.0775


def make(
    token: int, n: int, shift: torch.Tensor | float, adv: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row of n copies of ``token``; current lp = lp_old + shift."""
    old_logits = torch.log(P_OLD).expand(1, n, 5).clone()
    ids = torch.full((1, n), token)
    old = torch.log(P_OLD[token]).expand(1, n).clone()
    lp = (old + shift).requires_grad_(True)
    return lp, old, torch.tensor([adv], dtype=D), torch.ones(1, n, dtype=torch.bool), old_logits, ids


def call(
    args: tuple[torch.Tensor, ...], **kw: float
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    lp, old, adv, mask, old_logits, ids = args
    loss, m = lp_reg(lp, old, adv, mask, old_logits, ids, **kw)
    (g,) = torch.autograd.grad(loss, lp)
    return loss, g, m


def test_min_p_proxy_hand_computed() -> None:
    old_logits = torch.log(P_OLD).view(1, 1, 5).expand(1, 5, 5)
    proxy = min_p_proxy_logprobs(old_logits, torch.arange(5).view(1, 5), kappa=0.02)
    for v in range(3):
        assert proxy[0, v].item() == pytest.approx(math.log(P_OLD[v].item() / KEPT), rel=1e-12)
    assert proxy[0, 3].item() < -9000 and proxy[0, 4].item() < -9000
    same = min_p_proxy_logprobs(old_logits, torch.arange(5).view(1, 5), kappa=0.0)
    torch.testing.assert_close(same[0], torch.log(P_OLD), rtol=1e-12, atol=0.0)


def test_selected_tokens_are_pulled_up_toward_the_proxy() -> None:
    shift = -torch.linspace(0.05, 0.5, 10, dtype=D)  # last two tokens have the lowest lp
    args = make(1, 10, shift, -1.0)
    _, g, m = call(args, rho=0.2)  # k = int(0.2 * 10) = 2
    _, g0, _ = call(args, rho=0.0)
    assert m["lp_reg/selected_frac"].item() == pytest.approx(0.2)
    diff = (g - g0)[0]
    assert (diff[:8] == 0).all() and (diff[8:] < 0).all()  # descent raises lp of the selected tokens
    lp = args[0].detach()[0, 8:]
    lp_proxy = math.log(0.12 / KEPT)
    expected = (1.0 - torch.exp(lp_proxy - lp)) / 10
    torch.testing.assert_close(diff[8:], expected, rtol=1e-10, atol=0.0)


def test_needs_more_than_one_selected_token() -> None:
    args = make(1, 10, -torch.linspace(0.05, 0.5, 10, dtype=D), -1.0)
    l1, _, m = call(args, rho=0.1)  # k = 1: the released code applies nothing
    l0, _, _ = call(args, rho=0.0)
    assert m["lp_reg/selected_frac"].item() == 0.0 and l1.item() == l0.item()


def test_min_p_filtered_tokens_never_get_the_term() -> None:
    args = make(3, 10, -torch.linspace(0.1, 1.0, 10, dtype=D), -1.0)
    l1, g1, m = call(args, rho=1.0)
    l0, g0, _ = call(args, rho=0.0)
    assert m["lp_reg/candidate_frac"].item() == 1.0
    assert m["lp_reg/selected_frac"].item() == 0.0
    assert m["lp_reg/filtered_frac"].item() == 1.0
    assert l1.item() == l0.item()
    torch.testing.assert_close(g1, g0, rtol=0.0, atol=0.0)


def test_tokens_at_or_above_the_proxy_get_no_term() -> None:
    above = math.log(0.12 / KEPT) - math.log(0.12) + 0.05  # lp = lp_proxy + 0.05
    args = make(1, 10, above, -1.0)
    l1, _, m = call(args, rho=1.0)
    l0, _, _ = call(args, rho=0.0)
    assert m["lp_reg/selected_frac"].item() == 0.0 and l1.item() == l0.item()


def test_positive_advantages_are_never_selected() -> None:
    args = make(1, 10, -0.3, 1.0)
    _, _, m = call(args, rho=1.0)
    assert m["lp_reg/selected_frac"].item() == 0.0


def test_default_rho_selects_one_percent_of_negative_tokens() -> None:
    args = make(2, 300, -torch.linspace(0.01, 1.0, 300, dtype=D), -0.5)
    _, _, m = call(args)  # k = int(0.01 * 300) = 3
    assert m["lp_reg/selected_frac"].item() == pytest.approx(3 / 300)


def test_selected_policy_gradient_is_unclipped() -> None:
    # r = 20 > c = 10 with A < 0: the base loss is dual-clipped (no gradient); a selected token keeps -A r.
    lp = torch.log(torch.tensor([[0.01, 0.011, 0.012, 0.013]], dtype=D)).requires_grad_(True)
    old = lp.detach() - math.log(20.0)
    old_logits = torch.log(P_OLD).expand(1, 4, 5).clone()
    ids = torch.ones(1, 4, dtype=torch.long)
    mask = torch.ones(1, 4, dtype=torch.bool)
    adv = torch.tensor([-1.0], dtype=D)
    loss, _ = lp_reg(lp, old, adv, mask, old_logits, ids, rho=0.5)
    (g,) = torch.autograd.grad(loss, lp)
    base, _ = lp_reg(lp, old, adv, mask, old_logits, ids, rho=0.0)
    (g0,) = torch.autograd.grad(base, lp)
    assert (g0 == 0).all()
    assert (g[0, 2:] == 0).all()  # k = 2: only the two lowest-lp tokens are selected
    d = math.log(0.12 / KEPT) - math.log(0.01)
    k3_grad = 1.0 - math.exp(d) if math.exp(d) - d - 1 < 10 else 0.0
    assert g[0, 0].item() == pytest.approx((20.0 + k3_grad) / 4)
    assert g[0, 0].item() != 0.0


def test_rho_zero_is_the_dual_clip_base_loss() -> None:
    g = torch.Generator().manual_seed(0)
    lp = (-torch.rand(6, 5, generator=g, dtype=D) * 4).requires_grad_(True)
    old = lp.detach() + 3 * torch.randn(6, 5, generator=g, dtype=D)
    adv = torch.randn(6, generator=g, dtype=D)
    mask = torch.rand(6, 5, generator=g) > 0.2
    old_logits = torch.randn(6, 5, 7, generator=g, dtype=D)
    ids = torch.randint(0, 7, (6, 5), generator=g)
    l1, _ = lp_reg(lp, old, adv, mask, old_logits, ids, rho=0.0)
    l2, _ = dual(lp, old, adv, mask, eps_low=1.0, eps_high=9.0, clip_c=10.0)
    g1 = torch.autograd.grad(l1, lp)[0]
    g2 = torch.autograd.grad(l2, lp)[0]
    assert l1.item() == pytest.approx(l2.item(), rel=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=0.0)


def test_bad_hyperparameters_are_rejected() -> None:
    args = make(1, 2, 0.0, -1.0)
    with pytest.raises(InvalidInputError, match="kappa"):
        call(args, kappa=2.0)
    with pytest.raises(InvalidInputError, match="clip_c"):
        call(args, clip_c=0.5)
