"""DPPO's divergence trust region: hand-computed values, gradients, reductions and its contrast with
PPO's ratio clip."""

from __future__ import annotations

import math

import pytest
import torch

from tether.catalogue import get
from tether.errors import InvalidInputError

dppo = get("policy_loss", "dppo").fn
cispo = get("policy_loss", "cispo").fn
ppo = get("policy_loss", "ppo_clip").fn

F64 = torch.float64


def _probs_batch(
    p: list[list[float]], p_old: list[list[float]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs of 2 x 2 tokens (new, requiring grad; old), advantages (+1, -1), a full mask."""
    return (
        torch.tensor(p, dtype=F64).log().requires_grad_(True),
        torch.tensor(p_old, dtype=F64).log(),
        torch.tensor([1.0, -1.0], dtype=F64),
        torch.ones(2, 2, dtype=torch.bool),
    )


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _probs_batch([[0.5, 0.3], [0.01, 0.9]], [[0.3, 0.5], [0.001, 0.95]])


def test_binary_tv_hand_computed() -> None:
    lp, old, adv, mask = _batch()
    loss, m = dppo(
        lp, old, adv, mask, delta_low=0.15, delta_high=0.15, ratio_cap=10.0, aggregation="token-sum"
    )
    # row 0 (A = +1): p 0.3 -> 0.5 moved up by 0.2 > 0.15: dropped; 0.5 -> 0.3 moved down: kept, w = 0.6
    # row 1 (A = -1): 0.001 -> 0.01 moved up (kept), w = min(10, 10) = 10; 0.95 -> 0.9 down 0.05: kept
    want = -0.6 * math.log(0.3) + 10.0 * math.log(0.01) + (0.9 / 0.95) * math.log(0.9)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-12)
    (grad,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(grad, torch.tensor([[0.0, -0.6], [10.0, 0.9 / 0.95]], dtype=F64))
    assert float(m["policy/clip_frac_high"]) == 0.25 and float(m["policy/clip_frac_low"]) == 0.0


def test_binary_kl_hand_computed() -> None:
    lp, old, adv, mask = _batch()

    def kl(q: float, p: float) -> float:
        return q * math.log(q / p) + (1 - q) * math.log((1 - q + 1e-8) / (1 - p + 1e-8))

    assert kl(0.3, 0.5) == pytest.approx(0.0823, abs=1e-4) and kl(0.001, 0.01) == pytest.approx(
        0.0068, abs=1e-4
    )
    # delta 0.05: row 0 token 0 (up, A > 0, KL 0.082) is dropped; row 1 token 0 moved up with A < 0: kept
    _, m = dppo(lp, old, adv, mask, divergence="kl", delta_low=0.05, delta_high=0.05)
    assert float(m["policy/clip_frac_high"]) == 0.25 and float(m["policy/clip_frac_low"]) == 0.0
    # delta 0.005 also drops row 1's 0.95 -> 0.9 (down, A < 0, KL 0.0090 > 0.005)
    assert kl(0.95, 0.9) > 0.005
    _, m = dppo(lp, old, adv, mask, divergence="kl", delta_low=0.005, delta_high=0.005)
    assert float(m["policy/clip_frac_low"]) == 0.25


def test_without_a_trust_region_it_is_the_ratio_weighted_policy_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    lp = (-torch.rand(4, 5, generator=gen, dtype=F64) * 3).requires_grad_(True)
    old = lp.detach() + 0.5 * torch.randn(4, 5, generator=gen, dtype=F64)
    adv, mask = torch.randn(4, generator=gen, dtype=F64), torch.rand(4, 5, generator=gen) > 0.2
    ours = dppo(lp, old, adv, mask, delta_low=2.0, delta_high=2.0, ratio_cap=1e9, aggregation="token-mean")[0]
    theirs = cispo(lp, old, adv, mask, eps_low=1e9, eps_high=1e9, aggregation="token-mean")[0]
    torch.testing.assert_close(torch.autograd.grad(ours, lp)[0], torch.autograd.grad(theirs, lp)[0])


def test_the_trust_region_is_on_probability_mass_not_on_the_ratio() -> None:
    """The paper's point: a rare token tripled (0.001 -> 0.003) moves little mass and keeps its
    gradient, where PPO clips it; a likely token moved 0.5 -> 0.59 (ratio 1.18, inside PPO's clip)
    moves a lot of mass and is dropped by a 0.05 TV region."""
    p_old = torch.tensor([[0.001, 0.5]], dtype=F64)
    p = torch.tensor([[0.003, 0.59]], dtype=F64)
    adv, mask = torch.tensor([1.0], dtype=F64), torch.ones(1, 2, dtype=torch.bool)
    lp = p.log().requires_grad_(True)
    g_dppo = torch.autograd.grad(dppo(lp, p_old.log(), adv, mask, delta_low=0.05, delta_high=0.05)[0], lp)[0]
    g_ppo = torch.autograd.grad(ppo(lp, p_old.log(), adv, mask)[0], lp)[0]
    assert g_dppo[0, 0] != 0 and g_ppo[0, 0] == 0  # rare token: DPPO keeps it, PPO clips it
    assert g_dppo[0, 1] == 0 and g_ppo[0, 1] != 0  # likely token: the other way round


def test_dppo_checks_its_settings() -> None:
    lp, old, adv, mask = _batch()
    with pytest.raises(InvalidInputError, match="divergence"):
        dppo(lp, old, adv, mask, divergence="js")
    with pytest.raises(InvalidInputError, match="delta"):
        dppo(lp, old, adv, mask, delta_low=-0.1)
    with pytest.raises(InvalidInputError, match="ratio_cap"):
        dppo(lp, old, adv, mask, ratio_cap=0.0)


def _asymmetric_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row 0 (A = +1): 0.3 -> 0.5 (up), 0.001 -> 0.01 (ratio 10); row 1 (A = -1): 0.5 -> 0.3 (down
    by 0.2), 0.9 -> 0.88 (down by 0.02)."""
    return _probs_batch([[0.5, 0.01], [0.3, 0.88]], [[0.3, 0.001], [0.5, 0.9]])


def test_binary_tv_with_unequal_deltas_and_a_binding_ratio_cap() -> None:
    """delta_low 0.15 < 0.2 (the drop of row 1's 0.5 -> 0.3) < delta_high 0.25 (the rise of row 0's
    0.3 -> 0.5): each side must use its own delta. The rare token's ratio 10 exceeds the cap 4."""
    lp, old, adv, mask = _asymmetric_batch()
    loss, m = dppo(
        lp, old, adv, mask, delta_low=0.15, delta_high=0.25, ratio_cap=4.0, aggregation="token-sum"
    )
    # row 0: 0.3 -> 0.5 up 0.2 <= 0.25: kept, w = 0.5 / 0.3; 0.001 -> 0.01: kept, w = min(10, 4) = 4
    # row 1 (A < 0): 0.5 -> 0.3 down 0.2 > 0.15: dropped; 0.9 -> 0.88 down 0.02: kept, w = 0.88 / 0.9
    w = [[0.5 / 0.3, 4.0], [0.0, 0.88 / 0.9]]
    want = -w[0][0] * math.log(0.5) - w[0][1] * math.log(0.01) + w[1][1] * math.log(0.88)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-12)
    (grad,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(grad, torch.tensor([[-w[0][0], -4.0], [0.0, w[1][1]]], dtype=F64))
    assert float(m["policy/clip_frac_low"]) == 0.25 and float(m["policy/clip_frac_high"]) == 0.0
    assert float(m["dppo/capped_frac"]) == 0.25


def test_binary_kl_with_unequal_deltas_and_a_binding_ratio_cap() -> None:
    lp, old, adv, mask = _asymmetric_batch()

    def kl(q: float, p: float) -> float:  # KL(Bern(q) || Bern(p)), eps 1e-8 as the authors'
        return q * math.log(q / p) + (1 - q) * math.log((1 - q + 1e-8) / (1 - p + 1e-8))

    # delta_low 0.05 < KL of row 1's drop 0.5 -> 0.3 (0.087) < delta_high 0.1; the rise 0.3 -> 0.5
    # of row 0 (0.082) is inside delta_high but outside delta_low.
    assert 0.05 < kl(0.5, 0.3) < 0.1 and 0.05 < kl(0.3, 0.5) < 0.1
    assert kl(0.001, 0.01) < 0.05 and kl(0.9, 0.88) < 0.05
    loss, m = dppo(
        lp,
        old,
        adv,
        mask,
        divergence="kl",
        delta_low=0.05,
        delta_high=0.1,
        ratio_cap=4.0,
        aggregation="token-sum",
    )
    w = [[0.5 / 0.3, 4.0], [0.0, 0.88 / 0.9]]
    want = -w[0][0] * math.log(0.5) - w[0][1] * math.log(0.01) + w[1][1] * math.log(0.88)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-12)
    (grad,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(grad, torch.tensor([[-w[0][0], -4.0], [0.0, w[1][1]]], dtype=F64))
    assert float(m["policy/clip_frac_low"]) == 0.25 and float(m["policy/clip_frac_high"]) == 0.0
    assert float(m["dppo/capped_frac"]) == 0.25
