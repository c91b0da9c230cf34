"""DYPO (card ratio#17): GRPO plus the Group Alignment Loss on mixed groups."""

from __future__ import annotations

import math

import pytest
import torch

from tether.catalogue import get
from tether.errors import InvalidInputError

dypo = get("policy_loss", "dypo").fn
ppo = get("policy_loss", "ppo_clip").fn

D = torch.float64


def make(
    seq_margin: list[float], rewards: list[float], groups: list[int], tokens: int = 2, seed: int = 0
) -> dict[str, torch.Tensor]:
    """log pi - log pi_ref summed over each row equals seq_margin; old log-probs are a random perturbation."""
    gen = torch.Generator().manual_seed(seed)
    b = len(rewards)
    ref = -torch.rand(b, tokens, generator=gen, dtype=D) - 0.5
    lp = (ref + torch.tensor(seq_margin, dtype=D).unsqueeze(-1) / tokens).requires_grad_(True)
    old = lp.detach() + 0.1 * torch.randn(b, tokens, generator=gen, dtype=D)
    r = torch.tensor(rewards, dtype=D)
    return {
        "logprobs": lp,
        "old_logprobs": old,
        "ref_logprobs": ref,
        "advantages": r - r.mean(),
        "rewards": r,
        "group_ids": torch.tensor(groups),
        "response_mask": torch.ones(b, tokens, dtype=torch.bool),
    }


def test_gal_weight_lies_in_zero_beta_and_vanishes_for_large_margins() -> None:
    beta = 1.0
    previous = math.inf
    for d in (-5.0, -1.0, 0.0, 1.0, 5.0, 30.0):
        x = make([d, 0.0], [1.0, 0.0], [0, 0])
        loss, _ = dypo(**x, alpha=0.0, beta=beta)
        (g,) = torch.autograd.grad(loss, x["logprobs"])
        weight = -g[0, 0].item()  # dL/dd with d = seq(s) - seq(f): one success, one failure, one group
        assert 0.0 < weight < beta
        assert weight == pytest.approx(beta * (1 - 1 / (1 + math.exp(-beta * d))))
        assert g[1, 0].item() == pytest.approx(weight)  # the failure is pushed down with the same weight
        assert weight < previous
        previous = weight
    assert previous < 1e-12


def test_gal_value_is_mean_over_pairs_then_over_mixed_groups() -> None:
    x = make([0.5, 1.0, -0.5, 0.2, -0.3, 0.0], [1, 1, 0, 1, 0, 0], [0, 0, 0, 1, 1, 1])
    loss, m = dypo(**x, alpha=0.0, beta=2.0)
    sp = lambda z: math.log1p(math.exp(-2.0 * z))  # noqa: E731
    g0 = (sp(0.5 + 0.5) + sp(1.0 + 0.5)) / 2
    g1 = (sp(0.2 + 0.3) + sp(0.2 - 0.0)) / 2
    assert loss.item() == pytest.approx((g0 + g1) / 2)
    assert m["dypo/mixed_groups"].item() == 2.0


def test_easy_and_hard_groups_contribute_nothing() -> None:
    x = make([0.5, 1.0, -0.5, 0.2], [1, 1, 0, 0], [0, 0, 1, 1])  # one all-correct, one all-wrong group
    loss, m = dypo(**x)
    (g,) = torch.autograd.grad(loss, x["logprobs"])
    assert loss.item() == 0.0 and g.abs().max().item() == 0.0
    assert m["dypo/easy_groups"].item() == 1.0 and m["dypo/hard_groups"].item() == 1.0
    # adding the easy group to a mixed batch changes nothing
    mixed = make([0.3, -0.1], [1, 0], [5, 5])
    both = {k: torch.cat([mixed[k].detach(), x[k].detach()]) for k in mixed}
    a, _ = dypo(**{k: v.detach() for k, v in mixed.items()})
    b, _ = dypo(**both)
    assert a.item() == pytest.approx(b.item())


def test_alpha_one_is_grpo_on_mixed_rows() -> None:
    x = make([0.5, 1.0, -0.5, 0.2, -0.3, 0.0], [1, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1], tokens=3, seed=4)
    x["response_mask"][1, 2] = False
    loss, _ = dypo(**x, alpha=1.0)
    mixed_rows = torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool).unsqueeze(-1)
    ref, _ = ppo(
        x["logprobs"],
        x["old_logprobs"],
        x["advantages"],
        x["response_mask"] & mixed_rows,
        aggregation="seq-mean-token-mean",
    )
    assert loss.item() == pytest.approx(ref.item())
    ga = torch.autograd.grad(loss, x["logprobs"])[0]
    gb = torch.autograd.grad(ref, x["logprobs"])[0]
    assert torch.allclose(ga, gb)


def test_alpha_mixes_the_two_terms() -> None:
    x = make([0.5, -0.2, 0.1], [1, 0, 1], [0, 0, 0], seed=2)
    loss, m = dypo(**x, alpha=0.3)
    assert loss.item() == pytest.approx(0.3 * m["dypo/grpo_loss"].item() + 0.7 * m["dypo/gal_loss"].item())
    assert m["dypo/gal_loss"].item() > 0


def test_rejects_bad_alpha() -> None:
    x = make([0.0, 0.0], [1, 0], [0, 0])
    with pytest.raises(InvalidInputError, match="alpha must be in"):
        dypo(**x, alpha=1.5)
