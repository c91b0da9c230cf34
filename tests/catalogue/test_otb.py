"""OTB's per-token baseline: hand-computed values, the logit-gradient proxy, reductions and optimality."""

from __future__ import annotations

import math

import pytest
import torch

from tether.catalogue import get
from tether.errors import InvalidInputError
from tether.lm.logprobs import sum_pi_squared

otb = get("advantage", "otb").fn
reinforce = get("advantage", "reinforce_baseline").fn

F64 = torch.float64


def _hand_batch() -> tuple[torch.Tensor, ...]:
    # sample 0: 2 tokens, p = 0.5, 0.25 and sum p^2 = 0.5, 0.25 -> w = 0.5, 0.75 -> W = 0.5, 1.25
    # sample 1: 3 tokens, p = 0.8, 0.5, 0.9 and sum p^2 = 0.68, 0.5, 0.82 -> w = 0.08, 0.5, 0.02
    #           -> W = 0.08, 0.58, 0.60
    p = torch.tensor([[0.5, 0.25, 1.0], [0.8, 0.5, 0.9]], dtype=F64)
    sq = torch.tensor([[0.5, 0.25, 1.0], [0.68, 0.5, 0.82]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    return torch.tensor([0.0, 1.0], dtype=F64), mask, torch.tensor([0, 0]), p.log(), sq


def test_otb_hand_computed() -> None:
    r, mask, ids, lp, sq = _hand_batch()
    b0 = 0.08 / (0.5 + 0.08)  # (0 * 0.5 + 1 * 0.08) / (0.5 + 0.08)
    b1 = 0.58 / (1.25 + 0.58)
    want = torch.tensor([[-b0, -b1, 0.0], [1 - b0, 1 - b1, 1.0]], dtype=F64)
    adv, metrics = otb(r, mask, ids, lp, sq, eps=1e-12)
    torch.testing.assert_close(adv, want, rtol=0, atol=1e-12)
    assert float(metrics["otb/energy_mean"]) == pytest.approx((1.25 + 0.60) / 2)
    # Without the zero-tail rule, the longest response is alone at t = 2: its baseline is its own
    # reward (up to eps) and its advantage 0.
    adv_raw = otb(r, mask, ids, lp, sq, handle_zero_tail=False, eps=1e-12)[0]
    torch.testing.assert_close(adv_raw[:, :2], want[:, :2], rtol=0, atol=1e-12)
    assert abs(float(adv_raw[1, 2])) < 1e-10


def test_the_proxy_is_the_squared_norm_of_the_logit_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    for temperature in (1.0, 0.7):
        z = (torch.randn(6, 13, generator=gen, dtype=F64) * 3).requires_grad_(True)
        y = torch.randint(0, 13, (6,), generator=gen)
        logp = torch.log_softmax(z / temperature, -1)
        chosen = logp.gather(-1, y[:, None]).squeeze(-1)
        grads = [torch.autograd.grad(chosen[i] * temperature, z, retain_graph=True)[0][i] for i in range(6)]
        norm2 = torch.stack([(g**2).sum() for g in grads])
        proxy = 1 - 2 * chosen.detach().exp() + sum_pi_squared(logp.detach())
        torch.testing.assert_close(proxy, norm2, rtol=1e-10, atol=1e-12)


def test_equal_energies_reduce_to_the_group_mean_baseline() -> None:
    gen = torch.Generator().manual_seed(1)
    r = torch.rand(8, generator=gen, dtype=F64)
    ids = torch.arange(2).repeat_interleave(4)
    mask = torch.ones(8, 5, dtype=torch.bool)
    lp = torch.log(torch.rand(1, 5, generator=gen, dtype=F64)).expand(8, 5)  # the same at each position
    sq = lp.exp() ** 2 + 0.1
    got = otb(r, mask, ids, lp, sq, eps=1e-300)[0]
    torch.testing.assert_close(got, reinforce(r, mask, ids, baseline="group_mean")[0], rtol=0, atol=1e-12)


def test_the_baseline_minimises_the_energy_weighted_squared_error() -> None:
    gen = torch.Generator().manual_seed(2)
    r = torch.rand(6, generator=gen, dtype=F64)
    ids, mask = torch.zeros(6, dtype=torch.long), torch.ones(6, 4, dtype=torch.bool)
    lp = torch.log(torch.rand(6, 4, generator=gen, dtype=F64) * 0.9 + 0.05)
    sq = lp.exp() ** 2 + (1 - lp.exp()) ** 2 * torch.rand(6, 4, generator=gen, dtype=F64)
    adv = otb(r, mask, ids, lp, sq, eps=1e-300)[0]
    w = (1 - 2 * lp.exp() + sq).cumsum(-1)
    for t in range(4):
        b = float(r[0] - adv[0, t])

        def loss(x: float, t: int = t) -> float:
            return float((w[:, t] * (r - x) ** 2).sum())

        assert loss(b) < min(loss(b + 1e-3), loss(b - 1e-3))
        assert not math.isclose(b, float(r.mean()), rel_tol=1e-6)  # not the plain mean


def test_single_sample_groups_and_padding() -> None:
    r = torch.tensor([1.0, 0.5, 0.0], dtype=F64)
    mask = torch.tensor([[1, 1], [1, 0], [0, 0]], dtype=torch.bool)
    lp = torch.full((3, 2), math.log(0.5), dtype=F64)
    sq = torch.full((3, 2), 0.5, dtype=F64)
    adv = otb(r, mask, torch.tensor([0, 1, 1]), lp, sq)[0]
    assert adv[0].tolist() == [1.0, 1.0]  # alone in its group: baseline 0
    assert adv[1, 1] == 0 and adv[2].tolist() == [0.0, 0.0]  # padding and an empty response stay 0


def test_otb_checks_its_inputs() -> None:
    r, mask, ids, lp, sq = _hand_batch()
    with pytest.raises(InvalidInputError, match="sum_pi_squared"):
        otb(r, mask, ids, lp, sq[:, :2])
    with pytest.raises(InvalidInputError, match="eps"):
        otb(r, mask, ids, lp, sq, eps=0.0)
