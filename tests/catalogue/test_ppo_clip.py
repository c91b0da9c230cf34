"""PPO clip, dual clip and clip-higher: the properties of cards ratio#B1, #B2, #B5."""

from __future__ import annotations

import math

import pytest
import torch

from tether.catalogue import get
from tether.errors import InvalidInputError

ppo = get("policy_loss", "ppo_clip").fn
dual = get("policy_loss", "dual_clip").fn
higher = get("policy_loss", "clip_higher").fn


def one_token(log_r: float, adv: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    lp = torch.tensor([[math.log(0.5) + log_r]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[math.log(0.5)]], dtype=torch.float64)
    return lp, old, torch.tensor([adv], dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool)


def grad_of(fn: object, log_r: float, adv: float, **kw: float) -> tuple[float, float]:
    lp, old, a, m = one_token(log_r, adv)
    loss, _ = fn(lp, old, a, m, **kw)  # type: ignore[operator]
    (g,) = torch.autograd.grad(loss, lp)
    return loss.item(), g.item()


def test_reinforce_at_ratio_one() -> None:
    for adv in (1.7, -0.4):
        _, g = grad_of(ppo, 0.0, adv)
        assert g == pytest.approx(-adv)


def test_clipped_regions_have_zero_gradient() -> None:
    assert grad_of(ppo, math.log(1.3), 1.0)[1] == 0.0
    assert grad_of(ppo, math.log(0.7), -1.0)[1] == 0.0


def test_clipping_is_one_sided() -> None:
    loss, g = grad_of(ppo, math.log(0.7), 2.0)
    assert g == pytest.approx(-2.0 * 0.7)
    assert loss == pytest.approx(-2.0 * 0.7)
    _, g = grad_of(ppo, math.log(1.5), -1.0)
    assert g == pytest.approx(1.5)


def test_hand_computed_batch_and_metrics() -> None:
    lp = torch.log(torch.tensor([[0.6, 0.3], [0.5, 0.5]], dtype=torch.float64))
    old = torch.log(torch.tensor([[0.4, 0.3], [0.5, 0.25]], dtype=torch.float64))
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    loss, m = ppo(lp, old, adv, mask)
    # ratios 1.5 (A=1 -> clipped to 1.2), 1.0, 1.0 (A=-1), padded 2.0
    assert loss.item() == pytest.approx((-1.2 - 1.0 + 1.0) / 3)
    assert m["policy/clip_frac_high"].item() == pytest.approx(1 / 3)
    assert m["policy/clip_frac_low"].item() == 0.0
    assert m["policy/ratio_max"].item() == pytest.approx(1.5)
    assert m["policy/ratio_min"].item() == pytest.approx(1.0)


def test_dual_clip_caps_negative_advantage_loss() -> None:
    loss, g = grad_of(dual, math.log(5.0), -2.0, clip_c=3.0)
    assert g == 0.0 and loss == pytest.approx(2.0 * 3.0)
    assert grad_of(dual, math.log(1.1), 0.7) == pytest.approx(grad_of(ppo, math.log(1.1), 0.7))
    assert grad_of(dual, math.log(9.0), 0.7) == pytest.approx(grad_of(ppo, math.log(9.0), 0.7))
    for log_r in torch.linspace(-5, 5, 41).tolist():
        for adv in (-3.0, -0.5, 0.5, 3.0):
            assert abs(grad_of(dual, log_r, adv)[0]) <= abs(adv) * max(3.0, 1.2) + 1e-9


def test_dual_clip_requires_c_above_one() -> None:
    lp, old, a, m = one_token(0.0, 1.0)
    with pytest.raises(InvalidInputError, match="clip_c must be > 1"):
        dual(lp, old, a, m, clip_c=0.5)


def test_clip_higher_bounds() -> None:
    assert grad_of(higher, math.log(1.25), 1.0)[1] == pytest.approx(-1.25)
    assert grad_of(higher, math.log(1.29), 1.0)[1] == 0.0
    assert grad_of(higher, math.log(0.79), -1.0)[1] == 0.0


def test_token_mean_weights_long_sequences_more() -> None:
    """DAPO test (2): under token-mean a sequence's share of the gradient grows with its length."""
    lp = torch.full((2, 4), -1.0, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    loss, _ = higher(lp, lp.detach(), torch.ones(2, dtype=torch.float64), mask)
    (g,) = torch.autograd.grad(loss, lp)
    assert g[1].sum().item() == pytest.approx(2 * g[0].sum().item())
