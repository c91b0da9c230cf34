"""Selection entries: DAPO dynamic sampling (ratio#B5d), D^3S (adv#B5), Knapsack RL (adv#B6)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tether.catalogue import get
from tether.catalogue.selection.knapsack import knapsack_extra, rollout_value

dyn = get("selection", "dynamic_sampling").fn
d3s = get("selection", "d3s").fn
knap = get("selection", "knapsack").fn
D = torch.float64


# ----- dynamic sampling -----
def test_dynamic_sampling_drops_flat_groups() -> None:
    r = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.5, 0.5], dtype=D)
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    keep, m = dyn(r, ids)
    assert keep.tolist() == [False, False, False, False, True, True, False, False]
    keep2, _ = dyn(r, ids, drop="all_correct")
    assert keep2.tolist() == [False, False, True, True, True, True, True, True]
    assert m["selection/kept_groups"].item() == 1
    # after the filter every kept group has nonzero reward std
    for g in torch.unique(ids[keep]).tolist():
        assert r[ids == g].std() > 0


# ----- D^3S -----
def _var(x: torch.Tensor) -> float:
    return float(((x - x.mean()) ** 2).mean())


def test_d3s_sample_level_is_variance_optimal() -> None:
    g = torch.Generator().manual_seed(0)
    for G in (2, 3, 5, 8):
        for kappa in (0.25, 0.5, 0.75):
            adv = torch.randn(G, generator=g, dtype=D)
            k = math.ceil(kappa * G - 1e-9)
            mask = torch.ones(G, 1, dtype=torch.bool)
            tok, _ = d3s(adv, torch.zeros(G, dtype=torch.long), torch.ones(G, 1, dtype=D), mask, kappa, 1.0)
            chosen = tok[:, 0]
            assert int(chosen.sum()) == k
            best = max(_var(adv[list(s)]) for s in itertools.combinations(range(G), k))
            assert _var(adv[chosen]) == pytest.approx(best, abs=1e-12)


def test_d3s_kappa_one_keeps_everything_and_token_count_is_exact() -> None:
    g = torch.Generator().manual_seed(1)
    adv = torch.randn(6, generator=g, dtype=D)
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[2, 3:] = False
    ent = torch.rand(6, 5, generator=g, dtype=D) + 0.1
    full, _ = d3s(adv, ids, ent, mask, 1.0, 1.0)
    assert torch.equal(full, mask)
    tok, _ = d3s(adv, ids, ent, mask, 1.0, 0.3)
    assert int(tok.sum()) == math.ceil(0.3 * int(mask.sum()))
    score = torch.where(mask, adv.abs().unsqueeze(-1) * ent, torch.full_like(ent, -1.0))
    assert score[tok].min() >= score[mask & ~tok].max()


def test_d3s_never_keeps_zero_advantage_tokens_while_others_remain() -> None:
    adv = torch.tensor([0.0, 0.0, 1.0, -1.0], dtype=D)
    mask = torch.ones(4, 3, dtype=torch.bool)
    tok, _ = d3s(adv, torch.zeros(4, dtype=torch.long), torch.ones(4, 3, dtype=D), mask, 1.0, 0.5)
    assert not tok[:2].any() and int(tok.sum()) == 6


# ----- Knapsack -----
def test_knapsack_budget_and_fixed_counts() -> None:
    rates = torch.tensor([0.0, 1.0, 0.5, 0.1, float("nan"), 0.9], dtype=D)
    counts, _ = knap(rates, fallback=False)
    assert int(counts.sum()) == 6 * 8
    assert counts[0] == 2 and counts[1] == 2 and counts[4] == 8
    assert (counts[[2, 3, 5]] >= 2).all()
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        p = torch.rand(10, generator=g, dtype=D)
        p[:2] = 0.0
        p[2] = 1.0
        for mode in ("probability", "expectation"):
            c, _ = knap(p, cost=mode)
            assert int(c.sum()) == 80


def test_knapsack_edge_cases() -> None:
    counts, _ = knap(torch.tensor([0.0, 0.0, 1.0], dtype=D))  # no effective prompt -> p=0 prompts
    assert counts.tolist() == [11, 11, 2]
    counts, _ = knap(torch.tensor([1.0, 1.0], dtype=D))
    assert counts.tolist() == [8, 8]


def test_value_increases_with_rollouts() -> None:
    for p in (0.05, 0.3, 0.5, 0.9):
        v = rollout_value(torch.arange(1, 40), p)
        assert (v[1:] >= v[:-1]).all()


def test_dp_equals_brute_force() -> None:
    g = torch.Generator().manual_seed(3)
    for _ in range(15):
        m = int(torch.randint(1, 5, (1,), generator=g))
        rates = (torch.rand(m, generator=g, dtype=D) * 0.9 + 0.05).tolist()
        budget = int(torch.randint(0, 10, (1,), generator=g))
        max_extra = 4
        extra, value = knapsack_extra(rates, budget, 2, max_extra)

        def val(ks: tuple[int, ...], rates: list[float] = rates) -> float:
            return sum(float(rollout_value(2 + k, p)) if k > 0 else 0.0 for k, p in zip(ks, rates))

        feasible = [ks for ks in itertools.product(range(max_extra + 1), repeat=m) if sum(ks) == budget]
        if feasible:
            assert sum(extra) == budget
            assert value == pytest.approx(max(val(ks) for ks in feasible), abs=1e-12)
            assert val(tuple(extra)) == pytest.approx(value, abs=1e-12)
