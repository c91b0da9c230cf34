"""SAPO and VESPO: hand-computed values and gradients, reductions to the policy gradient on-policy.

(Agreement with TRL's ``loss_type="sapo"`` / ``"vespo"`` is in test_trl_differential.py.)
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tether.catalogue import get
from tether.errors import InvalidInputError

sapo = get("policy_loss", "sapo").fn
vespo = get("policy_loss", "vespo").fn
ppo_clip = get("policy_loss", "ppo_clip").fn
cispo = get("policy_loss", "cispo").fn


def grad_of(fn, lp: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    leaf = lp.clone().double().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(leaf), leaf)
    return g


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lp = -torch.rand(4, 5, generator=gen, dtype=torch.float64) * 3 - 0.1
    mask = torch.tensor(
        [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.bool
    )
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=torch.float64)
    return lp, mask, adv


# --------------------------------------------------------------------------- SAPO


def test_sapo_on_policy_is_the_policy_gradient() -> None:
    """At r = 1 the gate's slope is 1: SAPO's gradient equals PPO's (and GRPO's) exactly."""
    lp, mask, adv = batch()
    g_sapo = grad_of(lambda x: sapo(x, lp, adv, mask)[0], lp)
    g_ppo = grad_of(lambda x: ppo_clip(x, lp, adv, mask, 0.2, 0.2, "seq-mean-token-mean")[0], lp)
    torch.testing.assert_close(g_sapo, g_ppo, rtol=1e-12, atol=1e-12)
    value, metrics = sapo(lp, lp, adv, mask)
    # l_t = -(4 / tau) * 0.5 * A per token; seq-mean-token-mean of a per-row constant is its mean.
    expected = sum(-2.0 / (1.0 if a > 0 else 1.05) * a for a in adv.tolist()) / 4
    assert float(value) == pytest.approx(expected, rel=1e-12)
    assert float(metrics["sapo/gate_mean"]) == pytest.approx(1.0)


def test_sapo_hand_computed_gradient_off_policy() -> None:
    """One token, r = 1.5: d l / d lp = -A r 4 s (1 - s), s = sigmoid(tau (r - 1))."""
    old = torch.tensor([[0.0]], dtype=torch.float64)
    lp = torch.tensor([[math.log(1.5)]], dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    for a, tau in ((2.0, 1.0), (-2.0, 1.05)):
        adv = torch.tensor([a], dtype=torch.float64)
        s = 1.0 / (1.0 + math.exp(-tau * 0.5))
        value, _ = sapo(lp, old, adv, mask)
        assert float(value) == pytest.approx(-(4.0 / tau) * s * a, rel=1e-12)
        g = grad_of(lambda x: sapo(x, old, adv, mask)[0], lp)  # noqa: B023
        assert float(g) == pytest.approx(-a * 1.5 * 4.0 * s * (1.0 - s), rel=1e-12)


def test_sapo_decays_smoothly_and_faster_for_negative_advantages() -> None:
    """No cliff: the gradient weight falls continuously with |r - 1|; tau_neg > tau_pos decays faster."""
    old = torch.zeros(1, 1, dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)

    def weight(r: float, a: float) -> float:
        lp = torch.tensor([[math.log(r)]], dtype=torch.float64)
        adv = torch.tensor([a], dtype=torch.float64)
        return float(grad_of(lambda x: sapo(x, old, adv, mask)[0], lp)) / (-a * r)

    pos = [weight(r, 1.0) for r in (1.0, 1.5, 2.0, 4.0)]
    assert pos[0] == pytest.approx(1.0) and all(b < a for a, b in itertools.pairwise(pos)) and pos[-1] > 0
    # PPO would give exactly 0 at r = 1.5 for A > 0; SAPO keeps a part of it.
    assert 0.5 < pos[1] < 1.0
    assert weight(3.0, -1.0) < weight(3.0, 1.0)


def test_sapo_rejects_nonpositive_temperature() -> None:
    lp, mask, adv = batch()
    with pytest.raises(InvalidInputError, match="tau_pos and tau_neg must be > 0"):
        sapo(lp, lp, adv, mask, tau_neg=0.0)


# --------------------------------------------------------------------------- VESPO


def test_vespo_on_policy_is_reinforce_token_mean() -> None:
    """w = 1 gives phi = 1: the gradient is -A / N_tokens per token, CISPO's at r = 1."""
    lp, mask, adv = batch()
    g = grad_of(lambda x: vespo(x, lp, adv, mask)[0], lp)
    n = float(mask.sum())
    torch.testing.assert_close(g, torch.where(mask, -adv[:, None] / n, 0.0), rtol=1e-12, atol=1e-12)
    g_cispo = grad_of(lambda x: cispo(x, lp, adv, mask)[0], lp)
    torch.testing.assert_close(g, g_cispo, rtol=1e-12, atol=1e-12)


def test_vespo_kernel_uses_the_product_ratio_hand_computed() -> None:
    """Row of 3 valid tokens with log-ratios 0.1, 0.2, 0.2: log w = 0.5 (a sum, not a mean)."""
    old = torch.zeros(2, 3, dtype=torch.float64)
    lp = torch.tensor([[0.1, 0.2, 0.2], [0.1, 0.2, 0.2]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    g = grad_of(lambda x: vespo(x, old, adv, mask)[0], lp)
    w = math.exp(0.5)
    phi_pos = math.exp(3.0 + 2.0 * 0.5 - 3.0 * w)  # k_pos = 2, lambda_pos = 3
    phi_neg = math.exp(2.0 + 3.0 * 0.5 - 2.0 * w)  # k_neg = 3, lambda_neg = 2
    torch.testing.assert_close(
        g[0], torch.full((3,), -phi_pos / 6.0, dtype=torch.float64), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(g[1], torch.full((3,), phi_neg / 6.0, dtype=torch.float64), rtol=1e-12, atol=0)
    _, metrics = vespo(lp, old, adv, mask)
    assert float(metrics["vespo/seq_weight_mean"]) == pytest.approx(w)


def test_vespo_kernel_peaks_at_k_over_lambda_and_vanishes_far_off_policy() -> None:
    """phi(w) = e^lambda w^k e^(-lambda w) is maximal at w = k / lambda and -> 0 as w -> 0 or large."""
    old = torch.zeros(1, 1, dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    adv = torch.tensor([1.0], dtype=torch.float64)

    def phi(w: float) -> float:
        lp = torch.tensor([[math.log(w)]], dtype=torch.float64)
        return -float(grad_of(lambda x: vespo(x, old, adv, mask)[0], lp))

    peak = 2.0 / 3.0
    assert phi(peak) > phi(peak * 1.05) and phi(peak) > phi(peak / 1.05)
    assert phi(1.0) == pytest.approx(1.0)
    assert phi(1e-3) < 1e-4 and phi(8.0) < 1e-6


def test_vespo_rejects_bad_kernel_parameters() -> None:
    lp, mask, adv = batch()
    with pytest.raises(InvalidInputError, match="lambda_pos, lambda_neg > 0"):
        vespo(lp, lp, adv, mask, lambda_neg=0.0)
