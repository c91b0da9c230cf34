"""Pass@k analytic advantages and verl's best-of-group variant (card adv#A7)."""

from __future__ import annotations

from math import comb, sqrt

import pytest
import torch

from tether.catalogue import get
from tether.errors import InvalidInputError

passk = get("advantage", "passk").fn
passk_max = get("advantage", "passk_max").fn
grpo = get("advantage", "grpo").fn
F64 = torch.float64


def run(fn: object, rewards: list[float], ids: list[int], **kw: object) -> torch.Tensor:
    r = torch.tensor(rewards, dtype=F64)
    m = torch.ones(len(rewards), 2, dtype=torch.bool)
    return fn(r, m, torch.tensor(ids), **kw)[0][:, 0]  # type: ignore[operator]


def test_hand_computed_and_zero_sum() -> None:
    rewards = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    a = run(passk, rewards, [0] * 8, k=4)
    n, neg, k = 8, 6, 4
    rbar = 1 - comb(neg, k) / comb(n, k)
    sig = sqrt(rbar * (1 - rbar))
    assert a[0].item() == pytest.approx((1 - rbar) / (sig + 1e-6))
    assert a[1].item() == pytest.approx((1 - rbar - comb(neg - 1, k - 1) / comb(n - 1, k - 1)) / (sig + 1e-6))
    assert a.sum().item() == pytest.approx(0.0, abs=1e-6)


def test_k1_is_grpo_with_population_std() -> None:
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    ids = [0, 0, 0, 0, 0, 1, 1, 1, 1]
    a = run(passk, rewards, ids, k=1)
    r = torch.tensor(rewards, dtype=F64)
    for sl in (slice(0, 5), slice(5, 9)):
        x = r[sl]
        ref = (x - x.mean()) / (x.std(unbiased=False) + 1e-6)
        assert torch.allclose(a[sl], ref)
    assert a[5:].abs().max().item() == 0.0  # all-wrong


def test_degenerate_groups_and_monotone_in_k() -> None:
    assert run(passk, [1.0] * 5, [0] * 5).abs().max().item() == 0.0
    assert run(passk, [0.0] * 5, [0] * 5).abs().max().item() == 0.0
    rewards = [1.0] + [0.0] * 7
    negs = [abs(run(passk, rewards, [0] * 8, k=k)[1].item()) for k in (1, 2, 4, 8)]
    assert negs[0] > negs[1] > negs[2] >= negs[3]
    # group smaller than k: k_eff = N, finite
    assert torch.isfinite(run(passk, [1.0, 0.0], [0, 0], k=4)).all()
    with pytest.raises(InvalidInputError, match="binary"):
        run(passk, [0.5, 0.0], [0, 0])


def test_passk_max_only_best_gets_gap() -> None:
    a = run(passk_max, [0.2, 0.9, 0.5, 0.1], [0] * 4, norm_by_std=False)
    assert a.tolist() == pytest.approx([0.0, 0.4, 0.0, 0.0])
    r = torch.tensor([0.2, 0.9, 0.5, 0.1], dtype=F64)
    a = run(passk_max, r.tolist(), [0] * 4)
    assert a[1].item() == pytest.approx(0.4 / (r.std().item() + 1e-6))
    assert run(passk_max, [1.0, 1.0, 0.0], [0] * 3).abs().max().item() == 0.0  # tie
    assert run(passk_max, [1.0, 0.0, 1.0], [3, 3, 8]).tolist()[2] == 0.0  # single-sample group
