"""Group statistics shared by the advantage estimators: arbitrary ids, conventions, no NaN gradients."""

from __future__ import annotations

import pytest
import torch

from tether.catalogue.advantages.group_stats import batch_mean_std, group_stats, groups_of, safe_sqrt
from tether.errors import InvalidInputError


def test_non_contiguous_ids_match_torch_reference() -> None:
    ids = torch.tensor([70, -3, 70, 5, -3, 70, 5])
    x = torch.tensor([1.0, 2.0, 3.0, 0.5, 4.0, 2.0, 0.5], dtype=torch.float64)
    g = groups_of(ids, 7)
    s = group_stats(x, g)
    pop = group_stats(x, g, unbiased=False)
    for gid in (70, -3, 5):
        sel = x[ids == gid]
        q = int(g.index[(ids == gid).nonzero()[0]].item())
        assert s.count[q].item() == sel.numel()
        assert s.mean[q].item() == pytest.approx(sel.mean().item())
        assert s.std[q].item() == pytest.approx(sel.std().item())
        assert pop.std[q].item() == pytest.approx(sel.std(unbiased=False).item())
    assert s.zero_std_frac().item() == pytest.approx(1 / 3)  # group 5 has equal values


def test_single_sample_and_weights() -> None:
    g = groups_of(torch.tensor([0, 1, 1, 1]), 4)
    x = torch.tensor([3.0, 1.0, 2.0, 9.0], dtype=torch.float64)
    s = group_stats(x, g, weights=torch.tensor([True, True, True, False]))
    assert s.std[0].item() == 0.0 and s.mean[0].item() == 3.0
    assert s.mean[1].item() == pytest.approx(1.5) and s.count[1].item() == 2


def test_std_gradient_finite_at_zero_spread() -> None:
    x = torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    g = groups_of(torch.tensor([0, 0, 1]), 3)
    (grad,) = torch.autograd.grad(group_stats(x, g).std.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum().item() == 0.0
    assert safe_sqrt(torch.tensor(-1.0)).item() == 0.0
    assert batch_mean_std(torch.tensor([2.0]))[1].item() == 0.0


def test_float_group_ids_rejected() -> None:
    with pytest.raises(InvalidInputError, match="group_ids"):
        groups_of(torch.tensor([0.0, 1.0]), 2)
    with pytest.raises(InvalidInputError, match="group_ids"):
        groups_of(torch.tensor([0, 1, 2]), 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_flat_group_has_its_value_as_mean_and_exactly_zero_spread(dtype: torch.dtype) -> None:
    """Eight float32 rewards of 0.9: their float sum / 8 is 3.6e-8 off 0.9, which gave a std of 6e-8
    and GRPO advantages of -0.056 (eps 1e-6) for a group without any signal."""
    from tether.catalogue import get
    from tether.catalogue.advantages.group_stats import grpo_scores

    x = torch.tensor([0.9] * 8 + [0.7] * 3 + [0.3, 0.3, 0.6], dtype=dtype)
    ids = torch.tensor([0] * 8 + [1] * 3 + [2] * 3)
    s = group_stats(x, groups_of(ids, len(x)))
    assert s.mean[0].item() == x[0].item() and s.mean[1].item() == x[8].item()
    assert s.std[0].item() == 0.0 and s.std[1].item() == 0.0 and s.std[2].item() > 0.0
    assert s.zero_std.tolist() == [True, True, False]
    scores = grpo_scores(x, ids)
    assert torch.all(scores[:11] == 0) and bool((scores[11:] != 0).all())
    mask = torch.ones(len(x), 3, dtype=torch.bool)
    adv, metrics = get("advantage", "grpo").fn(rewards=x, response_mask=mask, group_ids=ids)
    assert torch.all(adv[:11] == 0) and metrics["adv/zero_std_frac"].item() == pytest.approx(2 / 3)


def test_a_flat_groups_mean_keeps_the_gradient_of_a_mean() -> None:
    x = torch.tensor([0.9, 0.9, 0.9, 0.9, 0.1, 0.2], requires_grad=True)
    g = groups_of(torch.tensor([0, 0, 0, 0, 1, 1]), 6)
    (grad,) = torch.autograd.grad(group_stats(x, g).mean.sum(), x)
    torch.testing.assert_close(grad, torch.tensor([0.25, 0.25, 0.25, 0.25, 0.5, 0.5]))
    # with weights: only the selected samples are the group (their values all equal)
    w = torch.tensor([True, True, False, True, True, True])
    y = torch.tensor([0.9, 0.9, 5.0, 0.9, 0.1, 0.2])
    s = group_stats(y, g, weights=w)
    assert s.mean[0].item() == y[0].item() and s.std[0].item() == 0.0
