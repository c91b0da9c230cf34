"""REINFORCE baseline, RLOO, GRPO, Dr.GRPO, Lite PPO: properties of cards adv#A1-A4 and ratio#14."""

from __future__ import annotations

import math

import pytest
import torch

from tether.catalogue import get
from tether.errors import InvalidInputError

reinforce = get("advantage", "reinforce_baseline").fn
rloo = get("advantage", "rloo").fn
grpo = get("advantage", "grpo").fn
dr_grpo = get("advantage", "dr_grpo").fn
lite_ppo = get("advantage", "lite_ppo").fn

F64 = torch.float64


def batch(
    rewards: list[float], ids: list[int], tokens: int = 3
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r = torch.tensor(rewards, dtype=F64)
    mask = torch.ones(len(rewards), tokens, dtype=torch.bool)
    return r, mask, torch.tensor(ids)


def seq(adv: torch.Tensor) -> torch.Tensor:
    return adv[:, 0]


def test_grpo_closed_form_one_success() -> None:
    for g in (2, 3, 5, 8):
        r, m, ids = batch([1.0] + [0.0] * (g - 1), [7] * g)
        a = seq(grpo(r, m, ids)[0])
        assert a[0].item() == pytest.approx((g - 1) / math.sqrt(g), rel=1e-5)
        assert a[1].item() == pytest.approx(-1 / math.sqrt(g), rel=1e-5)
        r, m, ids = batch([0.0] + [1.0] * (g - 1), [7] * g)
        assert seq(grpo(r, m, ids)[0])[0].item() == pytest.approx(-(g - 1) / math.sqrt(g), rel=1e-5)


def test_grpo_zero_sum_unit_std_degenerate_and_affine_invariance() -> None:
    gen = torch.Generator().manual_seed(0)
    r = torch.rand(12, generator=gen, dtype=F64)
    r[8:] = 0.7  # degenerate group
    ids = torch.tensor([3] * 4 + [11] * 4 + [-2] * 4)
    m = torch.ones(12, 2, dtype=torch.bool)
    a, metrics = grpo(r, m, ids)
    s = seq(a)
    for q in (3, 11):
        sel = s[ids == q]
        assert sel.sum().item() == pytest.approx(0.0, abs=1e-9)
        assert sel.std().item() == pytest.approx(1.0, rel=1e-4)
    assert s[ids == -2].abs().max().item() == 0.0
    assert metrics["adv/zero_std_frac"].item() == pytest.approx(1 / 3)
    a2 = seq(grpo(3.0 * r + 5.0, m, ids)[0])
    assert torch.allclose(a2, s, atol=1e-5)


def test_grpo_single_sample_group_uses_mean_zero_std_one() -> None:
    r, m, ids = batch([0.8, 1.0, 0.0], [0, 1, 1])
    assert seq(grpo(r, m, ids)[0])[0].item() == pytest.approx(0.8 / (1 + 1e-6))


def test_padding_and_all_padding_rows_are_zero() -> None:
    r, _, ids = batch([1.0, 0.0, 1.0, 0.0], [0, 0, 1, 1])
    m = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    for fn in (grpo, rloo, dr_grpo, lite_ppo, reinforce):
        a, _ = fn(r, m, ids)
        assert a[~m].abs().max().item() == 0.0
        assert a[m].abs().min().item() > 0.0


def test_rloo_is_scaled_dr_grpo_and_leave_one_out() -> None:
    r, m, ids = batch([1.0, 0.0, 0.5, 0.25, 2.0, 1.0], [4, 4, 4, 4, 9, 9])
    a_rloo = seq(rloo(r, m, ids)[0])
    a_dr = seq(dr_grpo(r, m, ids)[0])
    assert torch.allclose(a_rloo[:4], 4 / 3 * a_dr[:4])
    assert torch.allclose(a_rloo[4:], 2.0 * a_dr[4:])
    assert a_rloo[0].item() == pytest.approx(1.0 - (0.0 + 0.5 + 0.25) / 3)
    assert a_rloo[:4].sum().item() == pytest.approx(0.0, abs=1e-12)
    r, m, ids = batch([0.6, 1.0, 1.0], [0, 1, 1])
    a = seq(rloo(r, m, ids)[0])
    assert a[0].item() == pytest.approx(0.6) and a[1:].abs().max().item() == 0.0


def test_dr_grpo_scales_linearly_with_reward_scale() -> None:
    r, m, ids = batch([1.0, 0.0, 0.0, 0.5], [0, 0, 0, 0])
    assert torch.allclose(seq(dr_grpo(5 * r, m, ids)[0]), 5 * seq(dr_grpo(r, m, ids)[0]))
    assert not torch.allclose(seq(grpo(5 * r, m, ids)[0]), 5 * seq(grpo(r, m, ids)[0]))


def test_reinforce_baselines() -> None:
    r, m, ids = batch([1.0, 0.0, 1.0, 1.0], [0, 0, 1, 1])
    assert torch.allclose(seq(reinforce(r, m, ids)[0]), seq(dr_grpo(r, m, ids)[0]))
    assert torch.allclose(seq(reinforce(r, m, ids, baseline="batch_mean")[0]), r - 0.75)
    a = seq(reinforce(r, m, ids, baseline="constant", baseline_value=0.5)[0])
    assert torch.allclose(a, r - 0.5)
    # shifting rewards and the matched constant baseline leaves A unchanged
    a2 = seq(reinforce(r + 2.0, m, ids, baseline="constant", baseline_value=2.5)[0])
    assert torch.allclose(a, a2)
    with pytest.raises(InvalidInputError, match="baseline"):
        reinforce(r, m, ids, baseline="ema")


def test_lite_ppo_group_mean_batch_std() -> None:
    r, m, ids = batch([1.0, 0.0, 0.0, 0.0, 1.0, 1.0], [0, 0, 0, 1, 1, 1])
    a = seq(lite_ppo(r, m, ids)[0])
    bstd = r.std().item()
    assert a[0].item() == pytest.approx((1 - 1 / 3) / (bstd + 1e-6))
    assert a[3].item() == pytest.approx((0 - 2 / 3) / (bstd + 1e-6))
    assert a[:3].sum().item() == pytest.approx(0.0, abs=1e-12)
    r, m, ids = batch([1.0, 1.0, 0.0, 1.0], [0, 0, 1, 1])
    a = seq(lite_ppo(r, m, ids)[0])
    assert a[:2].abs().max().item() == 0.0  # degenerate group, batch std > 0
    # differs from GRPO only in the denominator
    g = seq(grpo(r, m, ids)[0])
    ratio = (a[2:] / g[2:]).tolist()
    assert ratio[0] == pytest.approx(ratio[1])


def test_bad_shapes_raise() -> None:
    r, m, ids = batch([1.0, 0.0], [0, 0])
    with pytest.raises(InvalidInputError, match="rewards"):
        grpo(r[:1], m, ids)
    with pytest.raises(InvalidInputError, match="group_ids"):
        grpo(r, m, ids[:1])
