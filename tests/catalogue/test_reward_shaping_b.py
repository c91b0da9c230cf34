"""Reward entries: DAPO overlong (ratio#B5c), noisy verifiers (adv#B16), DSDR bonus (ratio#15), GCPO (adv#B18)."""

from __future__ import annotations

import pytest
import torch

from tether.catalogue import get
from tether.catalogue.advantages.group_stats import grpo_scores
from tether.errors import InvalidInputError

overlong = get("reward", "dapo_overlong").fn
backward = get("reward", "noisy_backward").fn
forward = get("reward", "noisy_forward").fn
dsdr = get("reward", "dsdr_bonus").fn
gcpo = get("reward", "gcpo").fn
D = torch.float64


# ----- DAPO overlong -----
def test_overlong_penalty_at_the_card_points() -> None:
    e = 20480 - 4096
    lengths = torch.tensor([100, e, e + 2048, 20480], dtype=D)
    r = torch.ones(4, dtype=D)
    out, m = overlong(r, torch.ones(4, 1, dtype=torch.bool), response_lengths=lengths)
    assert out.tolist() == pytest.approx([1.0, 1.0, 0.5, 0.0])
    assert m["reward/overlong_frac"].item() == 0.5


def test_overlong_reads_lengths_from_the_mask() -> None:
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    out, _ = overlong(torch.zeros(3, dtype=D), mask, max_length=4, cache_length=2, penalty_factor=2.0)
    assert out.tolist() == pytest.approx([-2.0, 0.0, 0.0])
    with pytest.raises(InvalidInputError, match="cache_length < max_length"):
        overlong(torch.zeros(3, dtype=D), mask, max_length=4, cache_length=4)


# ----- noisy verifiers -----
def test_noisy_identity_at_zero_noise_and_validation() -> None:
    r = torch.tensor([0.0, 1.0, 1.0], dtype=D)
    assert torch.equal(backward(r)[0], r)
    assert torch.equal(forward(r)[0], r - 1.0)
    with pytest.raises(InvalidInputError, match="rho0 \\+ rho1 < 1"):
        backward(r, rho0=0.6, rho1=0.4)


def test_backward_is_unbiased_by_simulation() -> None:
    g = torch.Generator().manual_seed(0)
    rho0, rho1 = 0.1, 0.3
    clean = (torch.rand(400_000, generator=g, dtype=D) < 0.35).to(D)
    u = torch.rand(clean.shape, generator=g, dtype=D)
    noisy = torch.where(clean > 0, (u >= rho1).to(D), (u < rho0).to(D))
    est, _ = backward(noisy, rho0=rho0, rho1=rho1)
    assert est.mean().item() == pytest.approx(clean.mean().item(), abs=5e-3)
    assert abs(noisy.mean().item() - clean.mean().item()) > 0.02  # the raw one is biased


def test_forward_matches_scaled_clean_gradient_in_a_bandit() -> None:
    # softmax bandit over 3 arms, arm 0 correct; exact expectation over arms and channel flips
    logits = torch.tensor([0.2, -0.3, 0.5], dtype=D, requires_grad=True)
    pi = torch.softmax(logits, 0)
    clean_r = torch.tensor([1.0, 0.0, 0.0], dtype=D)
    rho0, rho1 = 0.1, 0.25
    p_noisy1 = torch.where(clean_r > 0, torch.full_like(clean_r, 1 - rho1), torch.full_like(clean_r, rho0))
    w1 = forward(torch.ones(1, dtype=D), rho1=rho1)[0]
    w0 = forward(torch.zeros(1, dtype=D), rho1=rho1)[0]
    exp_w = p_noisy1 * w1 + (1 - p_noisy1) * w0
    logpi = torch.log_softmax(logits, 0)
    (g_fwd,) = torch.autograd.grad((pi.detach() * exp_w * logpi).sum(), logits)
    (g_clean,) = torch.autograd.grad((pi.detach() * clean_r * torch.log_softmax(logits, 0)).sum(), logits)
    assert torch.allclose(g_fwd, (1 - rho0 - rho1) * g_clean)


def test_affine_invariance_trap_grpo_erases_both_corrections() -> None:
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0], dtype=D)
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    base = grpo_scores(r, ids)
    assert torch.allclose(grpo_scores(forward(r, rho1=0.3)[0], ids), base)
    assert torch.allclose(grpo_scores(backward(r, rho0=0.1, rho1=0.3)[0], ids), base, atol=1e-5)


# ----- DSDR bonus -----
def test_dsdr_bonus_only_for_correct_and_bounded() -> None:
    r = torch.tensor([1.0, 1.0, 0.0], dtype=D)
    d = torch.tensor([0.9, 0.2, 1.0], dtype=D)
    out, _ = dsdr(r, d, lam_g=0.5, d_max=0.5)
    assert out.tolist() == pytest.approx([1.25, 1.1, 0.0])
    assert torch.equal(dsdr(r, torch.zeros(3, dtype=D))[0], r)
    assert torch.equal(dsdr(r, d, lam_g=0.0)[0], r)
    assert (out[r > 0] > r[r == 0].max()).all()
    with pytest.raises(InvalidInputError, match="d_max \\* lam_g < 1"):
        dsdr(r, d, lam_g=2.0, d_max=0.5)


# ----- GCPO -----
def test_gcpo_contrastive_mask() -> None:
    r = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0], dtype=D)
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    aux = torch.tensor([1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 1], dtype=torch.bool)
    out, m = gcpo(r, ids, aux)
    # group 0: aux helps (1 vs 0) -> +1 on aux users; group 1: aux hurts (0.5 vs 1) -> -1; group 2: no contrast
    assert out.tolist() == pytest.approx([2.0, 2.0, 0.0, 0.0, -1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    assert m["gcpo/positive_group_frac"].item() == pytest.approx(1 / 3)
    # with eta = 0.6 the small harm in group 1 is inside the dead zone; the large gain in group 0 is not
    out2, _ = gcpo(r, ids, aux, eta=0.6)
    assert out2.tolist() == pytest.approx([2.0, 2.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    # aux is never rewarded where it lowers the group's accuracy
    lowers = torch.tensor([0.0, 1.0, 1.0, 1.0], dtype=D)
    out3, _ = gcpo(lowers, torch.zeros(4, dtype=torch.long), torch.tensor([1, 0, 0, 1], dtype=torch.bool))
    assert (out3 <= lowers).all()
