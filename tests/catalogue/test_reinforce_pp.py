"""REINFORCE++ and REINFORCE++-baseline (card adv#A5)."""

from __future__ import annotations

import pytest
import torch

from tether.catalogue import get
from tether.errors import InvalidInputError

rpp = get("advantage", "reinforce_pp").fn
rppb = get("advantage", "reinforce_pp_baseline").fn
F64 = torch.float64
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)


def test_whitened_over_all_tokens_and_ignores_groups() -> None:
    r = torch.tensor([1.0, 0.0, 0.5, 1.0], dtype=F64)
    a, m = rpp(r, MASK)
    v = a[MASK]
    assert v.mean().item() == pytest.approx(0.0, abs=1e-9)
    assert v.std().item() == pytest.approx(1.0, rel=1e-6)
    assert a[~MASK].abs().max().item() == 0.0
    # gamma = 1, no KL: the return is the outcome at every token, so A_t is constant along a row
    raw = r.unsqueeze(-1).expand_as(MASK)[MASK]
    expected = (raw - raw.mean()) / torch.sqrt(raw.var() + 1e-8)
    assert torch.allclose(v, expected)
    assert m["adv/mean"].abs().item() < 1e-6


def test_kl_in_reward_and_discount() -> None:
    r = torch.tensor([1.0, 0.0], dtype=F64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    old = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]], dtype=F64)
    ref = torch.tensor([[-1.5, -1.0, -1.0], [-1.0, -1.0, -1.0]], dtype=F64)
    a_kl, _ = rpp(r, mask, old_logprobs=old, ref_logprobs=ref, kl_coef=0.1)
    a0, _ = rpp(r, mask)
    # kl penalty 0.05 only at token 0 of row 0: returns [0.95, 1, 1], [0, 0, 0]
    raw = torch.tensor([0.95, 1.0, 1.0, 0.0, 0.0, 0.0], dtype=F64)
    assert torch.allclose(a_kl.reshape(-1), (raw - raw.mean()) / torch.sqrt(raw.var() + 1e-8))
    assert not torch.allclose(a_kl, a0)
    with pytest.raises(InvalidInputError, match="old_logprobs"):
        rpp(r, mask, kl_coef=0.1)
    a_g, _ = rpp(r, mask, gamma=0.5)
    raw = torch.tensor([0.25, 0.5, 1.0, 0.0, 0.0, 0.0], dtype=F64)
    assert torch.allclose(a_g.reshape(-1), (raw - raw.mean()) / torch.sqrt(raw.var() + 1e-8))


def test_baseline_variant_subtracts_group_mean_first() -> None:
    r = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=F64)
    ids = torch.tensor([5, 5, 9, 9])
    a, m = rppb(r, MASK, ids)
    centred = torch.tensor([0.5, -0.5, 0.0, 0.0], dtype=F64).unsqueeze(-1).expand_as(MASK)[MASK]
    expected = (centred - centred.mean()) / torch.sqrt(centred.var() + 1e-8)
    assert torch.allclose(a[MASK], expected)
    # the degenerate group is 0 before whitening but -mean/std (not 0) after it
    assert a[2, 0].item() != 0.0
    assert a[2, 0].item() == pytest.approx((-centred.mean() / torch.sqrt(centred.var() + 1e-8)).item())
    assert m["adv/zero_std_frac"].item() == pytest.approx(0.5)
