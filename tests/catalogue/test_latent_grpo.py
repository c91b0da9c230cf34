"""Latent-GRPO invalid-sample masking (card adv#B17)."""

from __future__ import annotations

import torch

from tether.catalogue import get

latent = get("advantage", "latent_grpo").fn
grpo = get("advantage", "grpo").fn
F64 = torch.float64
R = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0], dtype=F64)
IDS = torch.tensor([4, 4, 4, 4, 9, 9, 9, 9])
M = torch.ones(8, 2, dtype=torch.bool)


def test_no_truncation_equals_grpo() -> None:
    none = torch.zeros(8, dtype=torch.bool)
    assert torch.allclose(latent(R, M, IDS, none)[0], grpo(R, M, IDS)[0])


def test_truncated_get_zero_and_do_not_change_others() -> None:
    trunc = torch.tensor([False, False, True, False, False, False, False, True])
    a = latent(R, M, IDS, trunc)[0][:, 0]
    assert a[2].item() == 0.0 and a[7].item() == 0.0
    keep = ~trunc
    ref = grpo(R[keep], M[keep], IDS[keep])[0][:, 0]
    assert torch.allclose(a[keep], ref)
    # changing a truncated sample's reward changes nothing
    r2 = R.clone()
    r2[2] = 1.0
    assert torch.allclose(latent(r2, M, IDS, trunc)[0], latent(R, M, IDS, trunc)[0])


def test_fewer_than_two_valid_uses_mean_zero_std_one() -> None:
    trunc = torch.tensor([True, True, True, False, False, False, False, False])
    a = latent(R, M, IDS, trunc)[0][:, 0]
    assert a[3].item() == 1.0 / (1 + 1e-6)
    assert a[:3].abs().max().item() == 0.0
