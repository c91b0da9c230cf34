"""GRPO-Guard (card ratio#2, reconstructed token form): KL re-centred log-ratio in the PPO clip."""

from __future__ import annotations

import pytest
import torch

from tether.catalogue import get
from tether.catalogue.losses.grpo_guard import guard_log_ratio
from tether.errors import InvalidInputError

guard = get("policy_loss", "grpo_guard").fn
ppo = get("policy_loss", "ppo_clip").fn

D = torch.float64


def logits_pair(
    seed: int, b: int = 3, t: int = 4, v: int = 7, noise: float = 0.5
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(b, t, v, generator=g, dtype=D) * 2
    logits = (old + noise * torch.randn(b, t, v, generator=g, dtype=D)).requires_grad_(True)
    ids = torch.randint(0, v, (b, t), generator=g)
    adv = torch.randn(b, generator=g, dtype=D)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)[:b, :t]
    return logits, old, ids, adv, mask


def test_normalised_log_ratio_has_zero_mean_under_old_policy() -> None:
    v = 9
    g = torch.Generator().manual_seed(3)
    old = torch.randn(1, 1, v, generator=g, dtype=D) * 3
    logits = old + torch.randn(1, 1, v, generator=g, dtype=D)
    ids = torch.arange(v).view(v, 1)  # enumerate every token at the same position
    log_rt, raw, kl = guard_log_ratio(logits.expand(v, 1, v), old.expand(v, 1, v), ids)
    p_old = torch.softmax(old[0, 0], -1)
    assert (p_old * log_rt[:, 0]).sum().item() == pytest.approx(0.0, abs=1e-12)
    # the raw log-ratio is biased low by exactly the KL
    assert (p_old * raw[:, 0]).sum().item() == pytest.approx(-kl[0, 0].item(), rel=1e-10)
    assert kl[0, 0].item() > 0


def test_equal_logits_give_ratio_exactly_one() -> None:
    _, old, ids, adv, mask = logits_pair(0)
    log_rt, _, kl = guard_log_ratio(old, old, ids)
    assert (log_rt == 0).all() and (kl == 0).all()
    same = old.clone().requires_grad_(True)
    loss, m = guard(same, old, ids, adv, mask)
    assert m["policy/ratio_min"].item() == 1.0 and m["policy/ratio_max"].item() == 1.0
    assert loss.item() == pytest.approx(-adv[:2].mean().item(), rel=1e-12)


def test_loss_is_ppo_clip_on_the_shifted_log_ratio() -> None:
    logits, old, ids, adv, mask = logits_pair(1, noise=0.8)
    loss, _ = guard(logits, old, ids, adv, mask)
    (g1,) = torch.autograd.grad(loss, logits)
    logp = torch.log_softmax(logits, -1)
    old_logp = torch.log_softmax(old, -1)
    kl = (old_logp.exp() * (old_logp - logp)).sum(-1)
    lp = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    lp_old = old_logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    ref, _ = ppo(lp + kl, lp_old, adv, mask, aggregation="seq-mean-token-mean")
    (g2,) = torch.autograd.grad(ref, logits, retain_graph=True)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-14)
    # the KL term changes the gradient compared to clipping the raw ratio
    raw, _ = ppo(lp, lp_old, adv, mask, aggregation="seq-mean-token-mean")
    (g3,) = torch.autograd.grad(raw, logits)
    assert (g1 - g3).abs().max().item() > 1e-6
    assert g1[~mask].abs().max().item() == 0.0


def test_positive_advantages_reach_the_upper_clip_again() -> None:
    """Sampling from pi_old, the raw ratio rarely exceeds 1 + eps; the re-centred one does so more often."""
    g = torch.Generator().manual_seed(5)
    b, t, v = 64, 8, 6
    old = torch.randn(b, t, v, generator=g, dtype=D) * 2
    logits = old + 0.6 * torch.randn(b, t, v, generator=g, dtype=D)
    ids = torch.multinomial(torch.softmax(old, -1).view(-1, v), 1, generator=g).view(b, t)
    log_rt, raw, _ = guard_log_ratio(logits, old, ids)
    assert raw.mean().item() < 0
    assert abs(log_rt.mean().item()) < abs(raw.mean().item()) / 3
    assert (log_rt > 0.2).double().mean().item() > (raw > 0.2).double().mean().item()


def test_shape_mismatch_is_rejected() -> None:
    logits, old, ids, adv, mask = logits_pair(0)
    with pytest.raises(InvalidInputError, match="old_logits"):
        guard(logits, old[:, :, :3], ids, adv, mask)
    with pytest.raises(InvalidInputError, match="token_ids"):
        guard(logits, old, ids[:, :2], adv, mask)
