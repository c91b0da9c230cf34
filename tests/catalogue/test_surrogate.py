"""is_surrogate: the unclipped TRPO/CPO surrogate -r A."""

from __future__ import annotations

import math

import torch

from tether.catalogue import get


def test_hand_value_and_policy_gradient_at_old_policy() -> None:
    fn = get("policy_loss", "is_surrogate").fn
    old = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]], dtype=torch.float64)
    new = old + torch.tensor([[0.1, 0.0], [-0.2, 0.3]], dtype=torch.float64)
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, False]])
    loss, metrics = fn(new, old, adv, mask)
    expected = -(2.0 * math.exp(0.1) + 2.0 * 1.0 - 1.0 * math.exp(-0.2)) / 3
    assert abs(float(loss) - expected) < 1e-12
    # At the old policy the gradient is the plain policy gradient -A / N per valid token.
    lp = old.clone().requires_grad_(True)
    fn(lp, old, adv, mask)[0].backward()
    assert lp.grad is not None
    assert torch.allclose(lp.grad, torch.tensor([[-2 / 3, -2 / 3], [1 / 3, 0.0]], dtype=torch.float64))
    assert float(metrics["policy/ratio_mean"]) > 0


def test_equals_ppo_clip_inside_the_clip_range_and_differs_outside() -> None:
    surrogate, ppo = get("policy_loss", "is_surrogate").fn, get("policy_loss", "ppo_clip").fn
    old = torch.zeros(4, 1, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0], dtype=torch.float64)
    mask = torch.ones(4, 1, dtype=torch.bool)
    inside = torch.tensor([[0.1], [-0.1], [0.05], [0.15]], dtype=torch.float64)
    assert torch.allclose(surrogate(inside, old, adv, mask)[0], ppo(inside, old, adv, mask)[0])
    outside = torch.tensor([[1.0], [0.0], [0.0], [0.0]], dtype=torch.float64)  # r = e for A > 0
    assert float(surrogate(outside, old, adv, mask)[0]) < float(ppo(outside, old, adv, mask)[0])
