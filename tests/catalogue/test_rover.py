"""ROVER (card adv#B9): Q-regression onto reward plus the uniform-policy value of the next state."""

from __future__ import annotations

import math

import pytest
import torch

from tether.catalogue import get
from tether.errors import InvalidInputError

rover = get("policy_loss", "rover").fn

D = torch.float64


def vocab_mean_logsoftmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, -1).mean(-1)


def test_on_policy_gradient_is_reinforce_on_rewards() -> None:
    gen = torch.Generator().manual_seed(0)
    b, t, v = 3, 4, 5
    logits = torch.randn(b, t, v, generator=gen, dtype=D)
    lp = torch.randn(b, t, generator=gen, dtype=D).clamp(max=-0.1).requires_grad_(True)
    adv = torch.tensor([1.5, -0.5, 0.25], dtype=D)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    loss, metrics = rover(lp, lp.detach(), logits, logits.clone(), adv, mask)
    (g,) = torch.autograd.grad(loss, lp)
    n_tok = mask.sum().item()
    expected = torch.where(mask, -2.0 * adv.unsqueeze(-1) / n_tok, torch.zeros(()))
    assert torch.allclose(g, expected)
    # Q = V_uni = 0, so the loss is the token-mean of r~^2
    assert loss.item() == pytest.approx(float((adv.unsqueeze(-1).expand(b, t)[mask] ** 2).mean()))
    assert metrics["rover/v_uni_mean"].item() == 0.0


def test_v_uni_is_the_vocabulary_mean_of_the_next_state() -> None:
    logits = torch.zeros(1, 2, 4, dtype=D)
    old_logits = torch.zeros(1, 2, 4, dtype=D)
    logits[0, 1, 3] = 2.0  # change an unsampled token's logit at state s_1
    token = 0
    lp_all = torch.log_softmax(logits, -1)[..., token]
    old_all = torch.log_softmax(old_logits, -1)[..., token]
    lp = old_all.clone().requires_grad_(True)  # Q = 0 at both positions
    adv = torch.tensor([0.7], dtype=D)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, _ = rover(lp, old_all, logits, old_logits, adv, mask)
    v1 = (vocab_mean_logsoftmax(logits[0, 1]) - vocab_mean_logsoftmax(old_logits[0, 1])).item()
    sampled = (lp_all[0, 1] - old_all[0, 1]).item()
    assert v1 != pytest.approx(sampled)  # the sampled token's log-ratio is not what enters
    expected = ((0.0 - (0.7 + v1)) ** 2 + (0.0 - 0.7) ** 2) / 2
    assert loss.item() == pytest.approx(expected)
    # V_uni does not carry a gradient (the target is stop-gradient)
    (g,) = torch.autograd.grad(loss, lp)
    assert g[0, 0].item() == pytest.approx(2 * (0.0 - (0.7 + v1)) / 2)


def test_last_valid_token_target_is_the_reward() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 4, 6, generator=gen, dtype=D)
    old_logits = torch.randn(1, 4, 6, generator=gen, dtype=D)  # V_uni != 0 everywhere
    old = torch.full((1, 4), -1.0, dtype=D)
    lp = torch.tensor([[-0.9, -1.2, -0.8, -5.0]], dtype=D, requires_grad=True)
    adv = torch.tensor([2.0], dtype=D)
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)  # last valid token at t = 2
    loss, _ = rover(lp, old, logits, old_logits, adv, mask)
    (g,) = torch.autograd.grad(loss, lp)
    q_last = -0.8 - (-1.0)
    assert g[0, 2].item() == pytest.approx(2 * (q_last - 2.0) / 3)
    assert g[0, 3].item() == 0.0
    v = vocab_mean_logsoftmax(logits[0]) - vocab_mean_logsoftmax(old_logits[0])
    q0 = -0.9 + 1.0
    assert g[0, 0].item() == pytest.approx(2 * (q0 - (2.0 + v[1].item())) / 3)


def test_rho_scales_q_and_v() -> None:
    logits = torch.zeros(1, 2, 3, dtype=D)
    old_logits = torch.zeros(1, 2, 3, dtype=D)
    old_logits[0, 1, 0] = 1.0
    old = torch.full((1, 2), -1.0, dtype=D)
    lp = torch.tensor([[-0.5, -1.5]], dtype=D)
    adv = torch.tensor([1.0], dtype=D)
    mask = torch.ones(1, 2, dtype=torch.bool)
    rho = 2.0
    loss, _ = rover(lp, old, logits, old_logits, adv, mask, rho=rho)
    v1 = rho * (vocab_mean_logsoftmax(logits[0, 1]) - vocab_mean_logsoftmax(old_logits[0, 1])).item()
    expected = ((rho * 0.5 - (1.0 + v1)) ** 2 + (rho * -0.5 - 1.0) ** 2) / 2
    assert loss.item() == pytest.approx(expected)


def test_optional_clip_freezes_tokens_past_the_bound() -> None:
    logits = torch.zeros(1, 1, 3, dtype=D)
    old = torch.full((1, 1), -1.0, dtype=D)
    lp = torch.tensor([[-1.0 + 0.5]], dtype=D, requires_grad=True)  # log-ratio 0.5 > log 1.2
    mask = torch.ones(1, 1, dtype=torch.bool)
    adv_up = torch.tensor([2.0], dtype=D)  # target 2 > Q = 0.5: clipped
    loss, m = rover(lp, old, logits, logits, adv_up, mask, clip_eps=0.2)
    (g,) = torch.autograd.grad(loss, lp)
    assert g.item() == 0.0 and m["policy/clip_frac"].item() == 1.0
    assert loss.item() == pytest.approx((math.log(1.2) - 2.0) ** 2)
    adv_down = torch.tensor([-1.0], dtype=D)  # target below Q: moving down is allowed
    loss, _ = rover(lp, old, logits, logits, adv_down, mask, clip_eps=0.2)
    (g,) = torch.autograd.grad(loss, lp)
    assert g.item() == pytest.approx(2 * (0.5 + 1.0))
    unclipped, _ = rover(lp, old, logits, logits, adv_up, mask)
    assert unclipped.item() == pytest.approx((0.5 - 2.0) ** 2)


def test_rejects_bad_shapes_and_values() -> None:
    lp = torch.zeros(2, 3, dtype=D)
    mask = torch.ones(2, 3, dtype=torch.bool)
    adv = torch.zeros(2, dtype=D)
    with pytest.raises(InvalidInputError, match="logits must be"):
        rover(lp, lp, torch.zeros(2, 4, 5, dtype=D), torch.zeros(2, 4, 5, dtype=D), adv, mask)
    logits = torch.zeros(2, 3, 5, dtype=D)
    with pytest.raises(InvalidInputError, match="clip_eps"):
        rover(lp, lp, logits, logits, adv, mask, clip_eps=1.5)
