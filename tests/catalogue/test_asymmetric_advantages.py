"""NGRPO (adv#B3), A-GRAE (adv#B4), R^3L (adv#B19), and the zero-sum test that separates them from GRPO.

In a one-step softmax policy the gradient of sum_i A_i log pi(a_i) w.r.t. the logit of an
UNSAMPLED action a' is -pi(a') sum_i A_i: zero for zero-sum estimators (GRPO, RLOO, Dr.GRPO,
BNPO, DGPO, Pass@k), non-zero for the three methods that break the symmetry on purpose.
"""

from __future__ import annotations

import math

import pytest
import torch

from tether.catalogue import get

ngrpo = get("advantage", "ngrpo").fn
a_grae = get("advantage", "a_grae").fn
r3l = get("advantage", "r3l").fn
grpo = get("advantage", "grpo").fn
F64 = torch.float64


def adv(fn: object, rewards: list[float], ids: list[int], **kw: object) -> torch.Tensor:
    r = torch.tensor(rewards, dtype=F64)
    m = torch.ones(len(rewards), 2, dtype=torch.bool)
    return fn(r, m, torch.tensor(ids), **kw)[0][:, 0]  # type: ignore[operator]


def unsampled_logit_grad(fn: object, rewards: list[float], actions: list[int], **kw: object) -> float:
    logits = torch.zeros(6, dtype=F64, requires_grad=True)
    a = adv(fn, rewards, [0] * len(rewards), **kw)
    obj = (a * torch.log_softmax(logits, -1)[torch.tensor(actions)]).sum()
    (g,) = torch.autograd.grad(obj, logits)
    unsampled = next(j for j in range(6) if j not in actions)
    assert g[unsampled].item() == pytest.approx(-(1 / 6) * a.sum().item(), abs=1e-12)
    return g[unsampled].item()


def test_zero_sum_families_leave_unsampled_logits_alone() -> None:
    for name in ("grpo", "rloo", "dr_grpo", "bnpo", "passk", "dgpo"):
        fn = get("advantage", name).fn
        assert unsampled_logit_grad(fn, [1.0, 0.0, 0.0, 1.0], [0, 1, 2, 3]) == pytest.approx(0.0, abs=1e-9)


def test_ngrpo_all_wrong_raises_unsampled_logits() -> None:
    assert unsampled_logit_grad(ngrpo, [0.0, 0.0, 0.0, 0.0], [0, 1, 2, 3]) > 0
    assert unsampled_logit_grad(grpo, [0.0, 0.0, 0.0, 0.0], [0, 1, 2, 3]) == 0.0


def test_ngrpo_closed_forms() -> None:
    for g in (2, 3, 5, 8):
        a = adv(ngrpo, [0.0] * g, [0] * g)
        assert torch.allclose(a, torch.full((g,), -1 / math.sqrt(g + 1), dtype=F64), atol=1e-6)
        assert adv(ngrpo, [1.0] * g, [0] * g).abs().max().item() == 0.0
    assert adv(ngrpo, [0.0] * 8, [0] * 8)[0].item() == pytest.approx(-1 / 3, rel=1e-5)
    rewards, ids = [1.0, 0.0, 0.0, 1.0, 0.5, 0.0], [0, 0, 0, 1, 1, 1]
    assert torch.allclose(adv(ngrpo, rewards, ids, num_virtual=0), adv(grpo, rewards, ids))
    mixed = adv(ngrpo, [1.0, 0.0, 0.0, 0.0], [0] * 4)
    assert mixed.sum().item() < 0
    # hand check: {1,0,0,0} + virtual 1 -> mean 0.4, unbiased std sqrt(0.3)
    assert mixed[0].item() == pytest.approx(0.6 / (math.sqrt(0.3) + 1e-6))


def test_a_grae_quarter_accuracy_and_positive_damping() -> None:
    # both groups mu_q = 1/4 -> A_hard = A_easy = A0; mu_bar = 1/4 -> positives x 1/4
    rewards, ids = [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0], [0] * 4 + [1] * 4
    a, m = get("advantage", "a_grae").fn(
        torch.tensor(rewards, dtype=F64), torch.ones(8, 1, dtype=torch.bool), torch.tensor(ids)
    )
    a0 = adv(grpo, rewards, ids)
    expect = torch.where(a0 > 0, 0.25 * a0, a0)
    assert torch.allclose(a[:, 0], expect, rtol=1e-5)
    assert m["a_grae/batch_accuracy"].item() == pytest.approx(0.25)
    assert a[:, 0].sum().item() < 0
    assert unsampled_logit_grad(a_grae, [1.0, 0.0, 0.0, 0.0], [0, 1, 2, 3]) > 0


def test_a_grae_degenerate_and_curriculum() -> None:
    assert adv(a_grae, [1.0, 1.0, 0.0, 0.0], [0, 0, 1, 1]).abs().max().item() == 0.0
    # mu_bar = alpha_s: no damping; the mix leans to A_hard for hard (low mu_q) prompts
    rewards, ids = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0], [0] * 4 + [1] * 4
    a = adv(a_grae, rewards, ids, alpha_s=0.5)
    a0 = adv(grpo, rewards, ids)
    mu_bar = (0.25 + 1.0) / 2
    expect = (1 - mu_bar) * a0 / (2 * (1 - 0.5 + 1e-6)) + mu_bar * a0 / (2 * (0.5 + 1e-6))
    assert torch.allclose(a[:4], expect[:4], rtol=1e-6)


def test_r3l_positive_amplification() -> None:
    a = adv(r3l, [1.0, 0.5, 0.25, 0.0], [0] * 4)
    mean = 1.75 / 4
    assert a.tolist() == pytest.approx([1.0, 3 * (0.5 - mean), 0.25 - mean, -mean])
    assert adv(r3l, [1.0, 1.0], [0, 0]).tolist() == [1.0, 1.0]
    assert adv(r3l, [0.0, 0.0], [0, 0]).tolist() == [0.0, 0.0]
    assert unsampled_logit_grad(r3l, [1.0, 0.0, 0.0, 0.0], [0, 1, 2, 3]) < 0
