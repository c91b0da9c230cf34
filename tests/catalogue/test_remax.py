"""ReMax's advantage: reward minus the greedy response's reward, hand-computed."""

from __future__ import annotations

import pytest
import torch

from tether.catalogue import get
from tether.errors import InvalidInputError

remax = get("advantage", "remax").fn
reinforce = get("advantage", "reinforce_baseline").fn


def test_remax_is_reward_minus_the_greedy_reward() -> None:
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.5], dtype=torch.float64)
    b = torch.tensor([1.0, 1.0, 0.0, 0.0, float("nan")], dtype=torch.float64)  # last: greedy unscored
    ids = torch.tensor([0, 0, 1, 1, 2])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1], [1, 1]], dtype=torch.bool)
    adv, metrics = remax(r, mask, ids, b)
    want = torch.tensor([0.0, -1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(adv, torch.where(mask, want[:, None], 0.0), rtol=0, atol=0)
    assert float(metrics["remax/baseline_mean"]) == pytest.approx(0.5)


def test_a_constant_greedy_reward_is_reinforce_with_that_constant() -> None:
    gen = torch.Generator().manual_seed(0)
    r = torch.rand(8, generator=gen, dtype=torch.float64)
    ids = torch.arange(2).repeat_interleave(4)
    mask = torch.ones(8, 3, dtype=torch.bool)
    got = remax(r, mask, ids, torch.full((8,), 0.3, dtype=torch.float64))[0]
    torch.testing.assert_close(got, reinforce(r, mask, ids, baseline="constant", baseline_value=0.3)[0])


def test_remax_checks_the_baseline() -> None:
    mask, ids = torch.ones(3, 1, dtype=torch.bool), torch.zeros(3, dtype=torch.long)
    with pytest.raises(InvalidInputError, match="baseline_rewards"):
        remax(torch.zeros(3), mask, ids, torch.zeros(2))
    with pytest.raises(InvalidInputError, match="finite"):
        remax(torch.zeros(3), mask, ids, torch.tensor([0.0, float("inf"), 0.0]))
