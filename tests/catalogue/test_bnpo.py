"""BNPO (card adv#B1): reductions, the Beta fit, guards and advantage decomposition."""

from __future__ import annotations

import math

import pytest
import torch

from tether.catalogue import get
from tether.catalogue.advantages.bnpo import fit_beta
from tether.errors import InvalidInputError

bnpo = get("advantage", "bnpo").fn
F64 = torch.float64
R = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0], dtype=F64)
IDS = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
M = torch.ones(12, 2, dtype=torch.bool)


def group_p() -> torch.Tensor:
    return torch.tensor([0.25, 0.5, 0.75], dtype=F64).repeat_interleave(4)


def test_alpha_beta_one_is_reinforce_with_group_mean() -> None:
    a = bnpo(R, M, IDS, alpha=1.0, beta=1.0)[0][:, 0]
    assert torch.allclose(a, R - group_p())


def test_alpha_beta_three_halves_is_pi_over_8_population_grpo() -> None:
    a = bnpo(R, M, IDS, alpha=1.5, beta=1.5)[0][:, 0]
    p = group_p()
    assert torch.allclose(a, (math.pi / 8) * (R - p) / torch.sqrt(p * (1 - p)))


def test_fitted_beta_matches_method_of_moments() -> None:
    a, m = bnpo(R, M, IDS)
    p = torch.tensor([0.25, 0.5, 0.75], dtype=F64)
    mean, var = p.mean(), p.var()
    c = mean * (1 - mean) / var - 1
    al, be = max(1.0, 1 + (c * mean / 3).item()), max(1.0, 1 + (c * (1 - mean) / 3).item())
    assert m["bnpo/alpha"].item() == pytest.approx(al, rel=1e-6)
    assert m["bnpo/beta"].item() == pytest.approx(be, rel=1e-6)
    dist = torch.distributions.Beta(torch.tensor(al, dtype=F64), torch.tensor(be, dtype=F64))
    w = 1 / dist.log_prob(group_p()).exp()
    assert torch.allclose(a[:, 0], w * (R - group_p()))
    # zero-sum per group (weights are per group)
    assert a[:, 0].reshape(3, 4).sum(-1).abs().max().item() < 1e-12


def test_guards_degenerate_groups_one_group_and_zero_variance() -> None:
    r = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0], dtype=F64)
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    m = torch.ones(6, 1, dtype=torch.bool)
    a, _ = bnpo(r, m, ids, alpha=3.0, beta=3.0)  # pdf 0 at p in {0,1}: weight capped, r - p = 0
    assert torch.isfinite(a).all() and a[:4].abs().max().item() == 0.0
    one = torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=F64)
    alpha, beta = fit_beta(torch.tensor([0.25], dtype=F64))
    assert alpha.item() == 1.0 and beta.item() == 1.0
    a, met = bnpo(one, torch.ones(4, 1, dtype=torch.bool), torch.zeros(4, dtype=torch.long))
    assert torch.allclose(a[:, 0], one - 0.25)
    same = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=F64)  # both groups p = 0.5 -> v = 0
    a, met = bnpo(same, torch.ones(4, 1, dtype=torch.bool), torch.tensor([0, 0, 1, 1]))
    assert met["bnpo/alpha"].item() == 1.0 and torch.allclose(a[:, 0], same - 0.5)


def test_decomposition_and_rescaling() -> None:
    single = bnpo(R, M, IDS)[0]
    assert torch.allclose(bnpo(R.unsqueeze(-1), M, IDS)[0], single)
    fmt = torch.tensor([1.0, 1.0, 0.0, 1.0] * 3, dtype=F64)
    two = bnpo(torch.stack([R, fmt], -1), M, IDS)[0]
    assert torch.allclose(two, 0.5 * (single + bnpo(fmt, M, IDS)[0]))
    assert torch.allclose(bnpo(10 * R - 5, M, IDS, reward_min=-5.0, reward_max=5.0)[0], single)
    with pytest.raises(InvalidInputError, match="reward_min"):
        bnpo(2 * R, M, IDS)
    with pytest.raises(InvalidInputError, match="both alpha and beta"):
        bnpo(R, M, IDS, alpha=1.0)
