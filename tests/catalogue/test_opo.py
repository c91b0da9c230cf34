"""OPO: the length-weighted group baseline, hand-computed, and its reductions."""

from __future__ import annotations

import pytest
import torch

from tether.catalogue import get

opo = get("advantage", "opo").fn
reinforce = get("advantage", "reinforce_baseline").fn


def test_opo_hand_computed_length_weighted_baseline() -> None:
    # group 7: lengths 1, 3 with rewards 1, 0 -> b = (1*1 + 3*0) / 4 = 0.25
    # group 9: lengths 2, 2, 4 with rewards 0, 1, 1 -> b = (0 + 2 + 4) / 8 = 0.75
    # group 4: one sample -> b = 0 (verl)
    mask = torch.tensor(
        [[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool
    )
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    group_ids = torch.tensor([7, 7, 9, 9, 9, 4])
    adv, metrics = opo(rewards, mask, group_ids)
    expected = torch.tensor([0.75, -0.25, -0.75, 0.25, 0.25, 0.5], dtype=torch.float64)
    torch.testing.assert_close(adv, torch.where(mask, expected[:, None], 0.0), rtol=1e-12, atol=0)
    assert float(metrics["adv/reward_mean"]) == pytest.approx(float(rewards.mean()))


def test_opo_equal_lengths_is_the_group_mean_baseline() -> None:
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(8, generator=gen, dtype=torch.float64)
    mask = torch.ones(8, 5, dtype=torch.bool)
    group_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    torch.testing.assert_close(opo(rewards, mask, group_ids)[0], reinforce(rewards, mask, group_ids)[0])


def test_opo_longer_responses_pull_the_baseline() -> None:
    """Lengthening the rewarded response raises the baseline, lowering every advantage of its group."""
    rewards = torch.tensor([1.0, 0.0], dtype=torch.float64)
    group_ids = torch.tensor([0, 0])
    short = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    long = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    a_short = opo(rewards, short, group_ids)[0][:, 0]
    a_long = opo(rewards, long, group_ids)[0][:, 0]
    assert bool((a_long < a_short).all())
    assert float(a_long[1]) == pytest.approx(-4.0 / 6.0)
