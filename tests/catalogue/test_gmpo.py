"""GMPO: the geometric-mean ratio, its log-space token clip, hand-computed values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from tether.catalogue import get
from tether.errors import InvalidInputError

gmpo = get("policy_loss", "gmpo").fn
ppo_clip = get("policy_loss", "ppo_clip").fn


def grad_of(fn, lp: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    leaf = lp.clone().double().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(leaf), leaf)
    return g


def reference_gmpo(
    lp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, c: float
) -> torch.Tensor:
    """The authors' form, one sequence at a time: sgn = -1 if A >= 0 else 1, max in the flipped sign."""
    losses = []
    for i in range(lp.shape[0]):
        m = mask[i]
        if not bool(m.any()):
            continue
        sgn = -1.0 if float(adv[i]) >= 0 else 1.0
        d = sgn * (lp[i] - old[i])
        d_max = sgn * torch.maximum(d, torch.clamp(d, -c, c))
        ratio = torch.exp(d_max[m].sum() / m.sum())
        losses.append(-adv[i] * ratio)
    return torch.stack(losses).mean()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gmpo_equals_the_authors_form(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    lp = -torch.rand(5, 6, generator=gen, dtype=torch.float64) * 2
    old = lp + 0.6 * torch.randn(5, 6, generator=gen, dtype=torch.float64)  # many tokens past +-0.4
    mask = torch.arange(6)[None] < torch.tensor([6, 3, 1, 4, 0])[:, None]
    adv = torch.randn(5, generator=gen, dtype=torch.float64)
    value = gmpo(lp, old, adv, mask)[0]
    torch.testing.assert_close(value, reference_gmpo(lp, old, adv, mask, 0.4), rtol=1e-12, atol=1e-12)
    g = grad_of(lambda x: gmpo(x, old, adv, mask)[0], lp)
    g_ref = grad_of(lambda x: reference_gmpo(x, old, adv, mask, 0.4), lp)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_gmpo_hand_computed_and_clips_one_token_not_its_sequence() -> None:
    """A > 0, log-ratios (0.1, 0.6): the second is capped at 0.4; R = exp((0.1 + 0.4) / 2).

    Only the first token keeps a gradient, -A R / L (GSPO would zero the whole sequence or none).
    """
    old = torch.zeros(1, 2, dtype=torch.float64)
    lp = torch.tensor([[0.1, 0.6]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    adv = torch.tensor([2.0], dtype=torch.float64)
    r = math.exp(0.25)
    value, metrics = gmpo(lp, old, adv, mask)
    assert float(value) == pytest.approx(-2.0 * r, rel=1e-12)
    g = grad_of(lambda x: gmpo(x, old, adv, mask)[0], lp)
    torch.testing.assert_close(
        g, torch.tensor([[-2.0 * r / 2.0, 0.0]], dtype=torch.float64), rtol=1e-12, atol=0
    )
    assert float(metrics["policy/clip_frac_high"]) == pytest.approx(0.5)
    # A < 0: the cap is on the low side; a log-ratio of -0.6 is raised to -0.4, 0.6 stays.
    adv_neg = torch.tensor([-1.0], dtype=torch.float64)
    lp2 = torch.tensor([[0.6, -0.6]], dtype=torch.float64)
    value2, _ = gmpo(lp2, old, adv_neg, mask)
    assert float(value2) == pytest.approx(math.exp((0.6 - 0.4) / 2), rel=1e-12)


def test_gmpo_on_policy_gradient_equals_grpo() -> None:
    """At r = 1: d l / d lp = -A / (L N_seq), PPO's with seq-mean-token-mean."""
    gen = torch.Generator().manual_seed(3)
    lp = -torch.rand(3, 4, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    g = grad_of(lambda x: gmpo(x, lp, adv, mask)[0], lp)
    g_ppo = grad_of(lambda x: ppo_clip(x, lp, adv, mask, 0.2, 0.2, "seq-mean-token-mean")[0], lp)
    torch.testing.assert_close(g, g_ppo, rtol=1e-12, atol=1e-12)


def test_gmpo_geometric_mean_damps_one_outlier_token() -> None:
    """Unclipped (wide bounds), one token at log-ratio 3 among 9 on-policy ones moves R by e^0.3,
    while the arithmetic mean of the token ratios moves by (e^3 - 1) / 10 ~ 1.9."""
    old = torch.zeros(1, 10, dtype=torch.float64)
    lp = torch.zeros(1, 10, dtype=torch.float64)
    lp[0, 0] = 3.0
    mask = torch.ones(1, 10, dtype=torch.bool)
    adv = torch.tensor([1.0], dtype=torch.float64)
    value, _ = gmpo(lp, old, adv, mask, eps_low=10.0, eps_high=10.0)
    assert float(value) == pytest.approx(-math.exp(0.3), rel=1e-12)


def test_gmpo_rejects_negative_bounds() -> None:
    lp = torch.zeros(1, 2)
    with pytest.raises(InvalidInputError, match="log-space bounds"):
        gmpo(lp, lp, torch.ones(1), torch.ones(1, 2, dtype=torch.bool), eps_low=-0.1)
