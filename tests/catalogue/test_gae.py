"""GAE (card adv#A6)."""

from __future__ import annotations

import pytest
import torch

from tether.catalogue import get
from tether.catalogue.advantages.broadcast import masked_whiten
from tether.catalogue.advantages.gae import gae_returns

gae = get("advantage", "gae").fn
F64 = torch.float64


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    rew = torch.randn(3, 5, generator=gen, dtype=F64)
    val = torch.randn(3, 5, generator=gen, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    return rew, val, mask


def test_lambda_one_is_reward_to_go_minus_value() -> None:
    rew, val, mask = data()
    a, _ = gae(rew, val, mask, whiten=False)
    for i in range(2):
        n = int(mask[i].sum())
        for t in range(n):
            assert a[i, t].item() == pytest.approx(rew[i, t:n].sum().item() - val[i, t].item())
    assert a[~mask].abs().max().item() == 0.0
    ret = gae_returns(rew, val, mask)
    assert torch.allclose(ret[mask], (a + val)[mask])


def test_lambda_zero_is_td_residual() -> None:
    rew, val, mask = data()
    a, _ = gae(rew, val, mask, gamma=0.9, lam=0.0, whiten=False)
    n = 3
    for t in range(n):
        nxt = val[0, t + 1].item() if t + 1 < n else 0.0
        assert a[0, t].item() == pytest.approx(rew[0, t].item() + 0.9 * nxt - val[0, t].item())


def test_padding_does_not_propagate() -> None:
    rew, val, mask = data()
    a1, _ = gae(rew, val, mask, gamma=0.95, lam=0.95, whiten=False)
    rew2, val2 = rew.clone(), val.clone()
    rew2[~mask] = float("nan")
    val2[~mask] = 1e6
    a2, _ = gae(rew2, val2, mask, gamma=0.95, lam=0.95, whiten=False)
    assert torch.equal(a1, a2)
    # a hole inside the mask is skipped: values are carried over it
    hole = torch.tensor([[1, 0, 1]], dtype=torch.bool)
    a, _ = gae(
        torch.tensor([[0.0, 5.0, 1.0]], dtype=F64),
        torch.tensor([[0.2, 9.0, 0.4]], dtype=F64),
        hole,
        whiten=False,
    )
    assert a[0, 0].item() == pytest.approx(0.0 + 0.4 - 0.2 + (1.0 - 0.4))
    assert a[0, 1].item() == 0.0


def test_whitening_default_and_gradient_to_values() -> None:
    rew, val, mask = data()
    val = val.requires_grad_(True)
    a, m = gae(rew, val, mask)
    raw, _ = gae(rew, val, mask, whiten=False)
    assert torch.allclose(a, masked_whiten(raw, mask))
    assert a[mask].mean().item() == pytest.approx(0.0, abs=1e-9)
    (g,) = torch.autograd.grad(a[mask].pow(2).sum() + raw.sum(), val)
    assert torch.isfinite(g).all() and g[~mask].abs().max().item() == 0.0
    assert "adv/mean" in m
