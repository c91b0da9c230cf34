"""GPG: the rescaled group-mean advantage and the plain policy-gradient loss, against hand values,
the authors' form of the loss, and their reductions."""

from __future__ import annotations

import pytest
import torch

from tether.catalogue import get
from tether.errors import InvalidInputError

gpg_adv = get("advantage", "gpg").fn
gpg_loss = get("policy_loss", "gpg").fn
reinforce = get("advantage", "reinforce_baseline").fn
ppo_clip = get("policy_loss", "ppo_clip").fn


def test_gpg_advantage_hand_computed_alpha() -> None:
    # 3 groups of 4; the middle one is flat (M = 4), so alpha = 12 / 8 = 1.5.
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1, 0, 1, 1, 0], dtype=torch.float64)
    ids = torch.arange(3).repeat_interleave(4)
    mask = torch.ones(12, 2, dtype=torch.bool)
    mask[0, 1] = False
    adv, metrics = gpg_adv(r, mask, ids)
    want = 1.5 * torch.tensor(
        [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0, -0.5, 0.5, 0.5, -0.5], dtype=torch.float64
    )
    torch.testing.assert_close(adv, torch.where(mask, want[:, None], 0.0), rtol=1e-12, atol=0)
    assert float(metrics["gpg/alpha"]) == 1.5


def test_gpg_std_normalisation_divides_by_the_group_std() -> None:
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    ids = torch.tensor([0, 0, 0, 0, 1, 1])  # group 1 flat: alpha = 6 / 4
    mask = torch.ones(6, 1, dtype=torch.bool)
    std = float(torch.tensor([1.0, 0.0, 0.0, 0.0]).std())
    adv = gpg_adv(r, mask, ids, f_norm="std", eps=1e-4)[0][:, 0]
    want = [1.5 * (v - 0.25) / (std + 1e-4) for v in (1.0, 0.0, 0.0, 0.0)] + [0.0, 0.0]
    torch.testing.assert_close(adv, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)


def test_gpg_without_flat_groups_is_the_group_mean_baseline() -> None:
    gen = torch.Generator().manual_seed(0)
    r = torch.rand(12, generator=gen, dtype=torch.float64)
    ids = torch.arange(3).repeat_interleave(4)
    mask = torch.ones(12, 3, dtype=torch.bool)
    adv, metrics = gpg_adv(r, mask, ids)
    torch.testing.assert_close(adv, reinforce(r, mask, ids)[0])
    assert float(metrics["gpg/alpha"]) == 1.0


def test_gpg_all_flat_and_singletons_give_zero() -> None:
    r = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.7], dtype=torch.float64)
    ids = torch.tensor([0, 0, 1, 1, 2])  # a single-sample group is flat too (its own mean)
    adv, metrics = gpg_adv(r, torch.ones(5, 2, dtype=torch.bool), ids)
    assert bool((adv == 0).all()) and float(metrics["gpg/alpha"]) == 1.0


def test_gpg_loss_value_and_gradient_are_the_policy_gradient() -> None:
    gen = torch.Generator().manual_seed(1)
    lp = (-torch.rand(4, 5, generator=gen, dtype=torch.float64)).requires_grad_()
    old = lp.detach() - 0.3 * torch.rand(4, 5, generator=gen, dtype=torch.float64)  # off-policy: no ratio
    adv = torch.tensor([1.0, -0.5, 2.0, 0.0], dtype=torch.float64)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 3:] = False
    loss, metrics = gpg_loss(lp, old, adv, mask)
    n = float(mask.sum())
    want = -(adv[:, None] * lp.detach() * mask).sum() / n
    assert float(loss.detach()) == pytest.approx(float(want), abs=1e-12)
    (grad,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(grad, torch.where(mask, -adv[:, None] / n, 0.0))
    assert float(metrics["policy/ratio_max"]) > 1.0  # the drift shows in the metrics, not the loss


def test_gpg_loss_gradient_equals_ppo_at_ratio_one() -> None:
    gen = torch.Generator().manual_seed(2)
    lp0 = -torch.rand(6, 4, generator=gen, dtype=torch.float64)
    adv = torch.randn(6, generator=gen, dtype=torch.float64)
    mask = torch.rand(6, 4, generator=gen) > 0.2
    a = lp0.clone().requires_grad_()
    b = lp0.clone().requires_grad_()
    (g1,) = torch.autograd.grad(gpg_loss(a, lp0, adv, mask)[0], a)
    (g2,) = torch.autograd.grad(ppo_clip(b, lp0, adv, mask, aggregation="token-mean")[0], b)
    torch.testing.assert_close(g1, g2)


def test_gpg_equals_the_authors_adjusted_loss() -> None:
    """AMAP-ML/GPG (open-r1 gpg_trainer): advantages = r - group mean (scale_rewards False); loss =
    token-mean of -lp * A over the batch, divided by inverse_alpha = valid groups / groups."""
    g = 4
    r = torch.tensor([1.0, 0, 1, 0, 0, 0, 0, 0, 1, 1, 1, 0], dtype=torch.float64)
    ids = torch.arange(3).repeat_interleave(g)
    gen = torch.Generator().manual_seed(3)
    lp = -torch.rand(12, 6, generator=gen, dtype=torch.float64)
    mask = torch.rand(12, 6, generator=gen) > 0.3
    grouped = r.view(-1, g)
    authors_adv = (grouped - grouped.mean(1, keepdim=True)).reshape(-1)
    inverse_alpha = float((grouped.std(1) > 0).sum()) / grouped.shape[0]
    authors = (-lp * authors_adv[:, None] * mask).sum() / mask.sum() / inverse_alpha
    ours = gpg_loss(lp, lp, gpg_adv(r, mask, ids)[0], mask)[0]
    assert float(ours) == pytest.approx(float(authors), rel=1e-12)


def test_gpg_rejects_bad_settings() -> None:
    r, mask, ids = torch.zeros(2), torch.ones(2, 1, dtype=torch.bool), torch.zeros(2, dtype=torch.long)
    with pytest.raises(InvalidInputError, match="f_norm"):
        gpg_adv(r, mask, ids, f_norm="batch")
    with pytest.raises(InvalidInputError, match="eps"):
        gpg_adv(r, mask, ids, eps=0.0)
