"""GSPO (card ratio#B6): sequence-level ratio and clip, GSPO-token gradient routing."""

from __future__ import annotations

import math

import pytest
import torch

from tether.catalogue import get
from tether.errors import InvalidInputError

gspo = get("policy_loss", "gspo").fn
ppo = get("policy_loss", "ppo_clip").fn

D = torch.float64


def sequence_level_reference(
    lp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, el: float, eh: float
) -> torch.Tensor:
    """GRPO loss with one ratio per sequence (gradient through the mean), seq-mean-token-mean."""
    m = mask.to(D)
    log_s = ((lp - old) * m).sum(-1) / m.sum(-1).clamp(min=1)
    s = torch.exp(log_s).unsqueeze(-1)
    a = adv.unsqueeze(-1)
    per_tok = -torch.minimum(s * a, torch.clamp(s, 1 - el, 1 + eh) * a).expand_as(m)
    per_seq = (per_tok * m).sum(-1) / m.sum(-1).clamp(min=1)
    return per_seq[m.sum(-1) > 0].mean()


def batch(seed: int, scale: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lp = (-torch.rand(6, 5, generator=g, dtype=D) * 3).requires_grad_(True)
    old = lp.detach() + scale * torch.randn(6, 5, generator=g, dtype=D)
    adv = torch.randn(6, generator=g, dtype=D)
    lengths = torch.tensor([5, 3, 1, 4, 2, 0])
    mask = torch.arange(5).unsqueeze(0) < lengths.unsqueeze(1)
    return lp, old, adv, mask


def test_clip_decision_is_identical_for_all_tokens_of_a_sequence() -> None:
    # seq 0: token log-ratios +-0.5 (each far outside the clip) but mean 0 -> unclipped everywhere.
    # seq 1: mean log-ratio 0.01 > log(1 + 4e-4) with A > 0 -> clipped everywhere, even the token
    # whose own ratio is below 1.
    old = torch.full((2, 2), -1.0, dtype=D)
    lp = (old + torch.tensor([[0.5, -0.5], [0.03, -0.01]], dtype=D)).requires_grad_(True)
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss, m = gspo(lp, old, torch.tensor([1.0, 1.0], dtype=D), mask)
    (g,) = torch.autograd.grad(loss, lp)
    assert (g[0] != 0).all() and (g[1] == 0).all()
    assert g[0, 0].item() == pytest.approx(g[0, 1].item())
    assert m["policy/clip_frac_high"].item() == pytest.approx(0.5)


def test_single_token_sequences_reduce_to_ppo_clip() -> None:
    for log_r in (-0.5, -1e-4, 0.0, 2e-4, 1e-3, 0.3):
        for a in (-1.3, 0.8):
            lp = torch.tensor([[math.log(0.4) + log_r]], dtype=D, requires_grad=True)
            old = torch.tensor([[math.log(0.4)]], dtype=D)
            mask = torch.ones(1, 1, dtype=torch.bool)
            adv = torch.tensor([a], dtype=D)
            l1, _ = gspo(lp, old, adv, mask)
            l2, _ = ppo(lp, old, adv, mask, eps_low=3e-4, eps_high=4e-4)
            (g1,) = torch.autograd.grad(l1, lp)
            (g2,) = torch.autograd.grad(l2, lp)
            assert l1.item() == pytest.approx(l2.item(), rel=1e-12)
            assert g1.item() == pytest.approx(g2.item(), rel=1e-12, abs=1e-15)


def test_unclipped_gradient_is_minus_a_s_over_length() -> None:
    lp, old, adv, mask = batch(0, scale=0.3)
    loss, _ = gspo(lp, old, adv, mask, eps_low=100.0, eps_high=100.0)
    (g,) = torch.autograd.grad(loss, lp)
    lengths = mask.sum(-1).to(D)
    log_s = torch.where(mask, lp.detach() - old, torch.zeros((), dtype=D)).sum(-1) / lengths.clamp(min=1)
    s = torch.exp(log_s)
    n_seq = float((lengths > 0).sum())
    expected = (-adv * s / lengths.clamp(min=1) / n_seq).unsqueeze(-1).expand_as(g)
    expected = torch.where(mask, expected, torch.zeros((), dtype=D))
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-15)
    assert loss.item() == pytest.approx((-adv * s)[lengths > 0].mean().item(), rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_value_and_gradient_equal_sequence_level_importance_sampling(seed: int) -> None:
    lp, old, adv, mask = batch(seed, scale=0.002)  # mixes clipped and unclipped sequences
    loss, m = gspo(lp, old, adv, mask)
    ref = sequence_level_reference(lp, old, adv, mask, 3e-4, 4e-4)
    g1 = torch.autograd.grad(loss, lp)[0]
    g2 = torch.autograd.grad(ref, lp)[0]
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-15)
    assert 0 < m["policy/clip_frac"].item() < 1


def test_sequence_log_ratio_is_capped_at_ten() -> None:
    lp = torch.tensor([[12.0 - 1.0]], dtype=D, requires_grad=True)
    old = torch.tensor([[-1.0]], dtype=D)
    loss, m = gspo(lp, old, torch.tensor([-2.0], dtype=D), torch.ones(1, 1, dtype=torch.bool))
    (g,) = torch.autograd.grad(loss, lp)
    assert loss.item() == pytest.approx(2.0 * math.exp(10.0))
    assert g.item() == 0.0
    assert m["gspo/seq_ratio_max"].item() == pytest.approx(math.exp(10.0), rel=1e-6)


def test_padding_with_infinite_logprobs_gets_no_gradient() -> None:
    lp = torch.tensor([[-1.0, -float("inf")], [-2.0, -0.5]], dtype=D, requires_grad=True)
    old = torch.tensor([[-1.1, -float("inf")], [-2.0, -0.4]], dtype=D)
    mask = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)
    loss, _ = gspo(lp, old, torch.tensor([1.0, -1.0], dtype=D), mask, eps_low=0.5, eps_high=0.5)
    (g,) = torch.autograd.grad(loss, lp)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    assert g[0, 1].item() == 0.0 and g[0, 0].item() != 0.0


def test_negative_eps_is_rejected() -> None:
    lp, old, adv, mask = batch(0)
    with pytest.raises(InvalidInputError, match="eps_low"):
        gspo(lp, old, adv, mask, eps_low=-0.1)
