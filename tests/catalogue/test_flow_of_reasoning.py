"""Flow of Reasoning (cards ratio#18, adv#B31): VarGrad trajectory balance."""

from __future__ import annotations

import math

import pytest
import torch

from tether.catalogue import get
from tether.errors import InvalidInputError

fr = get("policy_loss", "flow_of_reasoning").fn

D = torch.float64


def test_optimising_vargrad_makes_the_tabular_policy_proportional_to_reward() -> None:
    """Enumerable toy tree: 3 first steps x 2 second steps = 6 leaves; every trajectory is in the batch."""
    torch.manual_seed(0)
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.5, 5.5], dtype=D)
    root = torch.zeros(3, dtype=D, requires_grad=True)
    child = torch.zeros(3, 2, dtype=D, requires_grad=True)
    opt = torch.optim.Adam([root, child], lr=0.2)
    first = torch.tensor([0, 0, 1, 1, 2, 2])
    second = torch.tensor([0, 1, 0, 1, 0, 1])
    mask = torch.ones(6, 2, dtype=torch.bool)
    groups = torch.zeros(6, dtype=torch.long)

    def logprobs() -> torch.Tensor:
        lp1 = torch.log_softmax(root, -1)[first]
        lp2 = torch.log_softmax(child, -1)[first, second]
        return torch.stack([lp1, lp2], dim=-1)

    for _ in range(150):
        opt.zero_grad()
        loss, _ = fr(logprobs(), rewards, groups, mask)
        loss.backward()
        opt.step()
    p_f = logprobs().sum(-1).exp().detach()
    assert torch.allclose(p_f, rewards / rewards.sum(), atol=2e-4)
    assert fr(logprobs(), rewards, groups, mask)[0].item() < 1e-6


def test_hand_computed_value_and_gradient() -> None:
    lp = torch.tensor([[-1.0, -0.5], [-2.0, -0.2], [-0.3, -0.3]], dtype=D, requires_grad=True)
    r = torch.tensor([1.0, 2.0, 0.5], dtype=D)
    mask = torch.ones(3, 2, dtype=torch.bool)
    loss, _ = fr(lp, r, torch.zeros(3, dtype=torch.long), mask)
    s = lp.detach().sum(-1) - torch.log(r)
    assert loss.item() == pytest.approx(float(((s - s.mean()) ** 2).mean()))
    (g,) = torch.autograd.grad(loss, lp)
    expected = (2 * (s - s.mean()) / 3).unsqueeze(-1).expand(3, 2)
    assert torch.allclose(g, expected)


def test_invariant_to_a_constant_in_log_reward() -> None:
    gen = torch.Generator().manual_seed(1)
    lp = -torch.rand(4, 3, generator=gen, dtype=D) * 2
    lp.requires_grad_(True)
    r = torch.tensor([1.0, 0.3, 2.0, 4.0], dtype=D)
    mask = torch.ones(4, 3, dtype=torch.bool)
    g = torch.zeros(4, dtype=torch.long)
    a, _ = fr(lp, r, g, mask)
    b, _ = fr(lp, r * 7.5, g, mask)
    assert a.item() == pytest.approx(b.item())
    (ga,) = torch.autograd.grad(a, lp)
    (gb,) = torch.autograd.grad(b, lp)
    assert torch.allclose(ga, gb)


def test_zero_gradient_when_every_s_is_equal() -> None:
    r = torch.tensor([1.0, 2.0, 4.0], dtype=D)
    lp = (torch.log(r) - 3.0).unsqueeze(-1).repeat(1, 2) / 2  # log P_F = log R - 3 for all
    lp.requires_grad_(True)
    loss, metrics = fr(lp, r, torch.zeros(3, dtype=torch.long), torch.ones(3, 2, dtype=torch.bool))
    (g,) = torch.autograd.grad(loss, lp)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert g.abs().max().item() == pytest.approx(0.0, abs=1e-12)
    assert metrics["for/log_z_mean"].item() == pytest.approx(3.0)


def test_per_group_baseline_versus_batch_baseline() -> None:
    r = torch.tensor([1.0, 2.0, 1.0, 2.0], dtype=D)
    offsets = torch.tensor([0.0, 0.0, -4.0, -4.0], dtype=D)  # prompt 1 has a larger partition function
    lp = (torch.log(r) + offsets).unsqueeze(-1)
    groups = torch.tensor([0, 0, 1, 1])
    mask = torch.ones(4, 1, dtype=torch.bool)
    per_group, _ = fr(lp, r, groups, mask)
    batch, _ = fr(lp, r, groups, mask, per_group=False)
    assert per_group.item() == pytest.approx(0.0, abs=1e-12)
    assert batch.item() == pytest.approx(4.0)  # s = 0, 0, -4, -4 around a mean of -2


def test_learned_log_z_trajectory_balance() -> None:
    lp = torch.tensor([[-1.0], [-2.0]], dtype=D, requires_grad=True)
    r = torch.tensor([1.0, 3.0], dtype=D)
    log_z = torch.tensor(0.5, dtype=D, requires_grad=True)
    loss, _ = fr(lp, r, torch.zeros(2, dtype=torch.long), torch.ones(2, 1, dtype=torch.bool), log_z=log_z)
    res = torch.tensor([0.5 - 1.0, 0.5 - 2.0 - math.log(3.0)], dtype=D)
    assert loss.item() == pytest.approx(float((res**2).mean()))
    gz, glp = torch.autograd.grad(loss, [log_z, lp])
    assert gz.item() == pytest.approx(float(res.mean() * 2))
    assert torch.allclose(glp.squeeze(-1), res)


def test_beta_r_and_backward_logprobs() -> None:
    lp = torch.tensor([[-1.0], [-2.0], [-0.5]], dtype=D)
    r = torch.tensor([1.0, 3.0, 2.0], dtype=D)
    pb = torch.tensor([0.0, -0.7, -0.1], dtype=D)
    loss, _ = fr(
        lp,
        r,
        torch.zeros(3, dtype=torch.long),
        torch.ones(3, 1, dtype=torch.bool),
        beta_r=2.0,
        backward_logprobs=pb,
    )
    s = lp.squeeze(-1) - 2.0 * torch.log(r) - pb
    assert loss.item() == pytest.approx(float(((s - s.mean()) ** 2).mean()))


def test_reward_positivity() -> None:
    lp = torch.tensor([[-1.0], [-2.0]], dtype=D)
    mask = torch.ones(2, 1, dtype=torch.bool)
    g = torch.zeros(2, dtype=torch.long)
    with pytest.raises(InvalidInputError, match="rewards must be > 0"):
        fr(lp, torch.tensor([1.0, 0.0], dtype=D), g, mask, reward_floor=None)
    with pytest.raises(InvalidInputError, match="rewards must be >= 0"):
        fr(lp, torch.tensor([1.0, -1.0], dtype=D), g, mask)
    loss, _ = fr(lp, torch.tensor([1.0, 0.0], dtype=D), g, mask)  # floored at 1e-4
    s = torch.tensor([-1.0, -2.0 - math.log(1e-4)], dtype=D)
    assert loss.item() == pytest.approx(float(((s - s.mean()) ** 2).mean()))


def test_padding_rows_and_tokens() -> None:
    lp = torch.tensor([[-1.0, 50.0], [-2.0, -0.5], [9.0, 9.0]], dtype=D, requires_grad=True)
    mask = torch.tensor([[1, 0], [1, 1], [0, 0]], dtype=torch.bool)
    r = torch.tensor([1.0, 1.0, 1.0], dtype=D)
    loss, _ = fr(lp, r, torch.zeros(3, dtype=torch.long), mask)
    assert loss.item() == pytest.approx(((-1.0 + 1.75) ** 2 + (-2.5 + 1.75) ** 2) / 2)
    (g,) = torch.autograd.grad(loss, lp)
    assert g[~mask].abs().max().item() == 0.0
