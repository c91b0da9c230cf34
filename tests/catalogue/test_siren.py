"""SIREN: nucleus entropy, peak mask, anchored squared penalty (card ratio#5)."""

from __future__ import annotations

import math

import pytest
import torch

from tether.catalogue import aggregate, get
from tether.catalogue.regularizers.siren import nucleus_entropy, peak_mask, siren_anchor_update

siren = get("regularizer", "siren").fn


def test_nucleus_entropy_hand_computed() -> None:
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    logits = torch.log(probs).reshape(1, 1, 5)
    # cumulative 0.5, 0.7 < 0.8 keep two tokens; renormalised (5/7, 2/7)
    q = torch.tensor([5 / 7, 2 / 7], dtype=torch.float64)
    assert nucleus_entropy(logits).item() == pytest.approx(-(q * q.log()).sum().item())
    # top-k = 1 keeps only the first: entropy 0
    assert nucleus_entropy(logits, top_k=1).item() == 0.0


def test_one_hot_and_dominant_top1_give_zero() -> None:
    logits = torch.tensor([[[30.0, 0.0, 0.0, 0.0]]], dtype=torch.float64, requires_grad=True)
    h = nucleus_entropy(logits)
    assert h.item() == 0.0
    (g,) = torch.autograd.grad(h.sum(), logits)
    assert torch.isfinite(g).all() and g.abs().max().item() == 0.0
    dominant = torch.log(torch.tensor([[[0.85, 0.1, 0.05]]], dtype=torch.float64))
    assert nucleus_entropy(dominant).item() == 0.0


def test_peak_mask_per_response_quantile() -> None:
    values = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5], [0.9, 0.1, 0.2, 9.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    g = peak_mask(values, mask, 0.8)
    assert g[0].tolist() == [False, False, False, False, True]
    assert g[1].tolist() == [True, False, False, False, False]  # padding never selected


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(2, 6, 12, generator=gen, dtype=torch.float64) * 0.7).requires_grad_(True)
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    return logits, mask


def test_first_batch_sets_anchor_and_zero_gradient_at_anchor() -> None:
    logits, mask = _batch()
    value, m = siren(logits, mask, None)
    assert value.item() == 0.0
    anchor = siren_anchor_update(None, m["siren/selective_entropy"])
    assert anchor == pytest.approx(m["siren/selective_entropy"].item())
    assert siren_anchor_update(1.25, m["siren/selective_entropy"]) == 1.25
    with torch.no_grad():
        hp = nucleus_entropy(logits)
        exact = aggregate(hp, peak_mask(hp, mask), "seq-mean-token-mean")
    assert exact.item() == pytest.approx(m["siren/selective_entropy"].item(), rel=1e-6)
    at_anchor, _ = siren(logits, mask, exact)
    (g,) = torch.autograd.grad(at_anchor, logits)
    assert g.abs().max().item() < 1e-12


def test_value_and_gradient_only_on_peak_tokens() -> None:
    logits, mask = _batch(1)
    value, m = siren(logits, mask, 0.1)
    hsel = m["siren/selective_entropy"].item()
    assert value.item() == pytest.approx(0.005 * (hsel - 0.1) ** 2, rel=1e-6)
    (g,) = torch.autograd.grad(value, logits)
    hp = nucleus_entropy(logits.detach())
    peaks = peak_mask(hp, mask, 0.8)
    per_pos = g.abs().sum(-1)
    assert per_pos[~peaks].max().item() == 0.0  # low-entropy and padded positions get nothing
    assert (per_pos[peaks] > 0).all()
    # the gradient pulls the selective entropy down toward the anchor
    stepped = logits.detach() - 100.0 * g
    assert siren(stepped, mask, 0.1)[1]["siren/selective_entropy"].item() < hsel


def test_lambda_zero_gives_no_term() -> None:
    logits, mask = _batch(2)
    value, _ = siren(logits, mask, 0.3, coef=0.0)
    (g,) = torch.autograd.grad(value, logits)
    assert value.item() == 0.0 and g.abs().max().item() == 0.0


def test_selective_entropy_is_seq_mean_token_mean_over_peaks() -> None:
    probs = torch.tensor([0.35, 0.35, 0.15, 0.15], dtype=torch.float64)
    flat = torch.log(torch.tensor([0.97, 0.01, 0.01, 0.01], dtype=torch.float64))
    logits = torch.stack([torch.log(probs), flat, flat, flat, flat]).reshape(1, 5, 4)
    _, m = siren(logits, torch.ones(1, 5, dtype=torch.bool), 0.0)
    # only position 0 has Hp > 0; its nucleus is the two 0.35 tokens (cum 0.35, 0.7 < 0.8): ln 2
    assert m["siren/selective_entropy"].item() == pytest.approx(math.log(2.0), rel=1e-6)
