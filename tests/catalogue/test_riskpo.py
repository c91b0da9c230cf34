"""RiskPO (card adv#B2): mixed-VaR weights, credit modes and the quantile tracker."""

from __future__ import annotations

import pytest
import torch

from tether.catalogue import get
from tether.catalogue.advantages.riskpo import QUANTILE_LEVELS, mixed_var_weight, paper_scores
from tether.errors import InvalidInputError

riskpo = get("advantage", "riskpo").fn
_update = get("advantage", "riskpo").state_update
assert _update is not None
update = _update
D = torch.float64


def batch(seed: int = 0, prompts: int = 4, n: int = 5, bundle: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rewards = (torch.rand(prompts * n, generator=g, dtype=D) > 0.5).to(D)
    group_ids = torch.arange(prompts).repeat_interleave(n)
    return {
        "rewards": rewards,
        "group_ids": group_ids,
        "bundle_ids": group_ids // bundle,
        "sample_index": torch.arange(n).repeat(prompts),
        "response_mask": torch.ones(prompts * n, 3, dtype=torch.bool),
    }


def test_paper_scores_sum_rollout_j_over_the_bundle() -> None:
    b = batch()
    scores, paper_inv, paper_bundle = paper_scores(b["rewards"], b["bundle_ids"], b["sample_index"])
    r = b["rewards"].reshape(4, 5)
    expected = torch.cat([r[0] + r[1], r[2] + r[3]])
    assert torch.equal(scores, expected)
    assert paper_bundle.tolist() == [0] * 5 + [1] * 5
    assert paper_inv[6].item() == 1  # prompt 1, rollout 1 -> paper (0, 1)


def test_natural_baseline_makes_every_weight_non_positive() -> None:
    s = torch.linspace(-1, 6, 50, dtype=D)
    a, c = torch.tensor(1.0, dtype=D), torch.tensor(3.0, dtype=D)
    g = mixed_var_weight(s, a, c, 0.2, 0.8, 1.5, kappa=1.0)
    assert (g <= 1e-12).all()
    g_r = mixed_var_weight(s, a, c, 0.2, 0.8, 0.0, kappa=1.0)
    expected = (torch.clamp(s, 1.0, 3.0) - 3.0) / (0.6 + 1e-6)
    assert torch.allclose(g_r, expected)


def test_kappa_zero_above_c_gives_the_band_width() -> None:
    s = torch.tensor([3.0, 4.0, 10.0], dtype=D)
    g_r = mixed_var_weight(s, torch.tensor(1.0, dtype=D), torch.tensor(3.0, dtype=D), 0.2, 0.8, 0.0, 0.0)
    assert torch.allclose(g_r, torch.full_like(s, 2.0 / (0.6 + 1e-6)))


def test_sum_mean_credits_sum_to_the_paper_weight() -> None:
    b = batch(seed=3)
    a_sm, _ = riskpo(**b, credit="sum-mean")
    a_u, _ = riskpo(**b, credit="uniform")
    _, paper_inv, _ = paper_scores(b["rewards"], b["bundle_ids"], b["sample_index"])
    per_sample_sm, per_sample_u = a_sm[:, 0], a_u[:, 0]
    for p in range(int(paper_inv.max()) + 1):
        sel = paper_inv == p
        g = per_sample_u[sel][0]
        assert per_sample_sm[sel].sum().item() == pytest.approx(g.item(), abs=1e-9)


def test_uniform_credit_shares_the_paper_sign_regardless_of_correctness() -> None:
    b = batch(seed=5)
    adv, _ = riskpo(**b, credit="uniform")
    _, paper_inv, _ = paper_scores(b["rewards"], b["bundle_ids"], b["sample_index"])
    for p in range(int(paper_inv.max()) + 1):
        vals = adv[paper_inv == p, 0]
        assert torch.allclose(vals, vals[0].expand_as(vals))


def test_hand_computed_single_bundle() -> None:
    # one bundle of one prompt, 5 rollouts: S = r; empirical quantiles a = q(0.2), c = q(0.8)
    r = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0], dtype=D)
    ids = torch.zeros(5, dtype=torch.long)
    adv, _ = riskpo(r, ids, ids, torch.arange(5), torch.ones(5, 1, dtype=torch.bool), credit="uniform")
    a, c = torch.quantile(r, 0.2), torch.quantile(r, 0.8)
    g = mixed_var_weight(r, a, c, 0.2, 0.8, 1.5, 0.0) / (r.std() + 1e-6)
    assert torch.allclose(adv[:, 0], g)


def test_tracked_grid_uses_nearest_levels() -> None:
    b = batch(seed=1)
    grid = torch.linspace(0.0, 2.0, len(QUANTILE_LEVELS), dtype=D)
    adv, m = riskpo(**b, quantile_grid=grid, credit="uniform")
    assert m["riskpo/quantile_low"].item() == pytest.approx(grid[3].item())  # level 0.2
    assert m["riskpo/quantile_high"].item() == pytest.approx(grid[15].item())  # level 0.8
    assert torch.isfinite(adv).all()
    with pytest.raises(InvalidInputError, match="quantile_grid"):
        riskpo(**b, quantile_grid=grid[:5])


def test_tracker_converges_to_true_quantiles_on_a_stationary_stream() -> None:
    g = torch.Generator().manual_seed(0)
    q = None
    for _ in range(3000):
        r = torch.randn(64, generator=g, dtype=D)
        ids = torch.arange(64)
        q = update(q, r, ids, torch.zeros(64, dtype=torch.long), eta=0.05)
    assert q is not None
    truth = torch.special.ndtri(torch.tensor(QUANTILE_LEVELS, dtype=D))
    assert torch.allclose(q, truth, atol=0.12)


def test_padding_and_errors() -> None:
    b = batch()
    b["response_mask"][0] = False
    adv, _ = riskpo(**b)
    assert (adv[0] == 0).all()
    with pytest.raises(InvalidInputError, match="alpha < beta"):
        riskpo(**b, alpha=0.9, beta=0.5)
