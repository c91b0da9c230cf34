"""Clip-Cov and KL-Cov (Cui et al. 2025): which tokens are selected, and what happens to their gradient."""

from __future__ import annotations

import pytest
import torch

from tether.catalogue import get
from tether.catalogue.losses.covariance import token_covariance
from tether.errors import InvalidInputError

clip_cov = get("policy_loss", "clip_cov").fn
kl_cov = get("policy_loss", "kl_cov").fn
ppo_clip = get("policy_loss", "ppo_clip").fn


def grad_of(fn, lp: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    leaf = lp.clone().double().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(leaf), leaf)
    return g


def covariance_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of 4 tokens; A = (+3, -3, 0, 0) per row so that confident tokens of row 0 have c > 1."""
    lp = torch.tensor(
        [
            [-0.1, -0.2, -3.0, -0.05],
            [-0.1, -2.5, -0.3, -4.0],
            [-1.0, -1.0, -1.0, -1.0],
            [-2.0, -0.5, 0.0, 0.0],
        ],
        dtype=torch.float64,
    )
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([3.0, -3.0, 0.0, 0.0], dtype=torch.float64)
    old = lp.clone()
    return lp, old, adv, mask


def test_token_covariance_hand_computed() -> None:
    lp, _, adv, mask = covariance_batch()
    cov = token_covariance(lp, adv[:, None].expand_as(lp), mask)
    n = float(mask.sum())
    a_bar = float((adv[:, None].expand_as(lp) * mask).sum()) / n
    lp_bar = float((lp * mask).sum()) / n
    assert float(cov[0, 0]) == pytest.approx((3.0 - a_bar) * (-0.1 - lp_bar), rel=1e-12)
    assert float(cov[1, 3]) == pytest.approx((-3.0 - a_bar) * (-4.0 - lp_bar), rel=1e-12)
    assert float(cov[3, 2]) == 0.0  # padding
    # The mean of the entries over valid tokens is the covariance of A and lp.
    a = adv[:, None].expand_as(lp)[mask]
    expected = float(((a - a.mean()) * (lp[mask] - lp[mask].mean())).mean())
    assert float(cov[mask].mean()) == pytest.approx(expected, rel=1e-12)


def test_clip_cov_detaches_exactly_the_covariance_band_when_all_are_picked() -> None:
    lp, old, adv, mask = covariance_batch()
    cov = token_covariance(lp, adv[:, None].expand_as(lp), mask)
    band = mask & (cov > 1.0) & (cov < 5.0)
    assert 0 < int(band.sum()) < int(mask.sum())
    g = grad_of(lambda x: clip_cov(x, old, adv, mask, clip_ratio=1.0)[0], lp)
    g_ppo = grad_of(lambda x: ppo_clip(x, old, adv, mask, 1.0, 1.0, "token-mean")[0], lp)
    assert bool((g[band] == 0).all())
    torch.testing.assert_close(g[~band], g_ppo[~band], rtol=1e-12, atol=0)
    assert bool((g_ppo[band] != 0).all())  # the selection is what zeroed them
    _, metrics = clip_cov(lp, old, adv, mask, clip_ratio=1.0)
    assert float(metrics["clip_cov/selected_frac"]) == pytest.approx(float(band.sum()) / float(mask.sum()))


def test_clip_cov_picks_max_1_floor_ratio_n_at_random_reproducibly() -> None:
    lp, old, adv, mask = covariance_batch()
    n_band = int((token_covariance(lp, adv[:, None].expand_as(lp), mask).gt(1.0) & mask).sum())
    assert n_band >= 2

    def picked(ratio: float, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        g = grad_of(lambda x: clip_cov(x, old, adv, mask, clip_ratio=ratio, generator=gen)[0], lp)
        return (g == 0) & mask & (adv[:, None] != 0)

    # 14 valid tokens: ratio 2e-4 -> max(1, 0) = 1 token; ratio 0.15 -> floor(2.1) = 2 tokens.
    assert int(picked(2e-4, 0).sum()) == 1
    assert int(picked(0.15, 0).sum()) == 2
    assert torch.equal(picked(2e-4, 5), picked(2e-4, 5))
    assert len({tuple(picked(2e-4, s).flatten().tolist()) for s in range(12)}) > 1  # random among the band


def test_clip_cov_never_picks_tokens_ppo_already_clipped() -> None:
    lp, old, adv, mask = covariance_batch()
    old = old.clone()
    old[0, 0] = lp[0, 0] - 1.5  # r = e^1.5 > 2 with A > 0: clipped by PPO (eps 1)
    cov = token_covariance(lp, adv[:, None].expand_as(lp), mask)
    assert 1.0 < float(cov[0, 0]) < 5.0
    _, metrics = clip_cov(lp, old, adv, mask, clip_ratio=1.0)
    n_band = int((mask & (cov > 1.0) & (cov < 5.0)).sum())
    assert float(metrics["clip_cov/candidate_frac"]) * float(mask.sum()) == pytest.approx(n_band - 1)


def test_kl_cov_on_policy_is_the_plain_policy_gradient() -> None:
    lp, old, adv, mask = covariance_batch()
    g = grad_of(lambda x: kl_cov(x, old, adv, mask)[0], lp)
    n = float(mask.sum())
    torch.testing.assert_close(g, torch.where(mask, -adv[:, None] / n, 0.0), rtol=1e-12, atol=1e-12)


def test_kl_cov_penalises_exactly_the_top_k_covariance_tokens() -> None:
    lp, old, adv, mask = covariance_batch()
    gen = torch.Generator().manual_seed(0)
    old = lp + 0.3 * torch.randn(lp.shape, generator=gen, dtype=torch.float64)
    cov = token_covariance(lp, adv[:, None].expand_as(lp), mask)
    top = torch.topk(torch.where(mask, cov, -torch.inf).flatten(), 3).indices
    selected = torch.zeros(lp.numel(), dtype=torch.bool)
    selected[top] = True
    selected = selected.view_as(lp)
    n = float(mask.sum())
    ratio = torch.exp(lp - old)
    # k_ratio 0.25 of 14 valid tokens -> floor(3.5) = 3 tokens; kl_coef 0.7.
    g = grad_of(lambda x: kl_cov(x, old, adv, mask, k_ratio=0.25, kl_coef=0.7)[0], lp)
    expected = -adv[:, None] * ratio / n + torch.where(selected, 0.7 * torch.sign(lp - old) / n, 0.0)
    torch.testing.assert_close(g, torch.where(mask, expected, 0.0), rtol=1e-12, atol=1e-12)
    value, metrics = kl_cov(lp, old, adv, mask, k_ratio=0.25, kl_coef=0.7)
    per_token = -adv[:, None] * ratio + torch.where(selected, 0.7 * (lp - old).abs(), 0.0)
    assert float(value) == pytest.approx(float(per_token[mask].sum()) / n, rel=1e-12)
    assert float(metrics["kl_cov/selected_frac"]) == pytest.approx(3 / 14)


def test_covariance_losses_reject_bad_fractions() -> None:
    lp, old, adv, mask = covariance_batch()
    with pytest.raises(InvalidInputError, match="clip_ratio is a fraction"):
        clip_cov(lp, old, adv, mask, clip_ratio=0.0)
    with pytest.raises(InvalidInputError, match="cov_low must be < cov_high"):
        clip_cov(lp, old, adv, mask, cov_low=5.0, cov_high=1.0)
    with pytest.raises(InvalidInputError, match="k_ratio is a fraction"):
        kl_cov(lp, old, adv, mask, k_ratio=2.0)


def test_kl_cov_never_spends_a_penalty_slot_on_padding() -> None:
    """Padding has covariance 0, above every negative one: with k_ratio 1 every valid token (and no
    padded position) must be penalised."""
    lp, old, adv, mask = covariance_batch()
    gen = torch.Generator().manual_seed(1)
    old = lp + 0.3 * torch.randn(lp.shape, generator=gen, dtype=torch.float64)
    cov = token_covariance(lp, adv[:, None].expand_as(lp), mask)
    assert bool((cov[mask] < 0).any()) and bool((~mask).any())
    n = float(mask.sum())
    g = grad_of(lambda x: kl_cov(x, old, adv, mask, k_ratio=1.0, kl_coef=0.5)[0], lp)
    expected = -adv[:, None] * torch.exp(lp - old) / n + 0.5 * torch.sign(lp - old) / n
    torch.testing.assert_close(g, torch.where(mask, expected, 0.0), rtol=1e-12, atol=1e-12)
    assert float(kl_cov(lp, old, adv, mask, k_ratio=1.0)[1]["kl_cov/selected_frac"]) == 1.0


def anchor_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows of 2 tokens, A = (+1, -1): the current log-probs rank token (0, 0) first by covariance,
    the old ones token (0, 1), so the two anchors select different tokens."""
    lp = torch.tensor([[-0.1, -2.0], [-1.0, -1.0]], dtype=torch.float64)
    old = torch.tensor([[-2.0, -0.1], [-1.0, -1.0]], dtype=torch.float64)
    return lp, old, torch.tensor([1.0, -1.0], dtype=torch.float64), torch.ones(2, 2, dtype=torch.bool)


def test_the_covariance_is_of_the_current_log_probs_not_the_old() -> None:
    """The authors' code ranks tokens by Cov(A, log pi_theta) of the current forward pass.
    Mean A = 0 and mean lp = -1.025, so c = (0.925, -0.975; -0.025, -0.025) by the current log-probs
    and (-0.975, 0.925; -0.025, -0.025) by the old ones."""
    lp, old, adv, mask = anchor_batch()
    cov = token_covariance(lp, adv[:, None].expand_as(lp), mask)
    torch.testing.assert_close(cov, torch.tensor([[0.925, -0.975], [-0.025, -0.025]], dtype=torch.float64))
    n = 4.0
    # KL-Cov, k_ratio 0.25 -> 1 token: (0, 0), penalised by 0.5 |lp - old| (lp - old = 1.9 > 0).
    g = grad_of(lambda x: kl_cov(x, old, adv, mask, k_ratio=0.25, kl_coef=0.5)[0], lp)
    pg = -adv[:, None] * torch.exp(lp - old) / n
    torch.testing.assert_close(g, pg + torch.tensor([[0.5 / n, 0.0], [0.0, 0.0]], dtype=torch.float64))
    # Clip-Cov, every candidate of the band (0.5, 5) picked (clip_ratio 1; PPO's clip opened wide so
    # that no token is clipped): only (0, 0) loses its gradient.
    g = grad_of(
        lambda x: clip_cov(x, old, adv, mask, clip_ratio=1.0, cov_low=0.5, eps_low=10.0, eps_high=10.0)[0],
        lp,
    )
    torch.testing.assert_close(g, torch.where(torch.tensor([[True, False], [False, False]]), 0.0, pg))
