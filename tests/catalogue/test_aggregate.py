from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.catalogue.aggregate import (
    AGGREGATION_MODES,
    Aggregation,
    aggregate,
    count_sequences,
    count_tokens,
)
from tether.errors import InvalidInputError

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token-mean", 10.0 / 4),
        ("token-sum", 10.0),
        ("seq-mean-token-mean", (2.0 + 4.0) / 2),
        ("seq-mean-token-sum", (6.0 + 4.0) / 2),
        ("seq-mean-token-sum-norm", 10.0 / (2 * 3)),
    ],
)
def test_hand_computed(mode: str, expected: float) -> None:
    assert aggregate(VALUES, MASK, mode).item() == pytest.approx(expected)


def test_norm_length_constant() -> None:
    agg = Aggregation("seq-mean-token-sum-norm", norm_length=10)
    assert aggregate(VALUES, MASK, agg).item() == pytest.approx(10.0 / 20)


def test_padding_never_contributes_even_if_nan() -> None:
    v = VALUES.clone()
    v[1, 1:] = float("nan")
    for mode in AGGREGATION_MODES:
        assert torch.isfinite(aggregate(v, MASK, mode))


def test_all_padding_gives_zero_with_zero_grad() -> None:
    v = torch.randn(2, 3, requires_grad=True)
    for mode in AGGREGATION_MODES:
        out = aggregate(v, torch.zeros(2, 3, dtype=torch.bool), mode)
        assert out.item() == 0.0
        (g,) = torch.autograd.grad(out, v)
        assert g.abs().sum() == 0


def test_all_padding_rows_do_not_dilute_sequence_means() -> None:
    mask = torch.cat([MASK, torch.zeros(1, 3, dtype=torch.bool)])
    values = torch.cat([VALUES, torch.ones(1, 3)])
    assert aggregate(values, mask, "seq-mean-token-mean").item() == pytest.approx(3.0)


def test_bad_mode_and_shapes() -> None:
    with pytest.raises(InvalidInputError, match="unknown aggregation mode 'mean'"):
        aggregate(VALUES, MASK, "mean")
    with pytest.raises(InvalidInputError, match="same"):
        aggregate(torch.ones(2, 4), MASK)
    with pytest.raises(InvalidInputError, match="num_tokens"):
        Aggregation("token-mean", num_tokens=0)


@settings(max_examples=40, deadline=None)
@given(
    mode=st.sampled_from(AGGREGATION_MODES),
    batch=st.integers(2, 9),
    tokens=st.integers(1, 6),
    split=st.integers(1, 8),
    seed=st.integers(0, 1000),
)
def test_micro_batch_invariance_with_global_counts(
    mode: str, batch: int, tokens: int, split: int, seed: int
) -> None:
    """Summing micro-batch losses with global counts equals the full-batch loss (value and grad)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(batch, tokens, generator=g, dtype=torch.float64, requires_grad=True)
    lengths = torch.randint(0, tokens + 1, (batch,), generator=g)
    mask = torch.arange(tokens).unsqueeze(0) < lengths.unsqueeze(1)
    full = aggregate(values, mask, Aggregation(mode, norm_length=tokens))  # type: ignore[arg-type]
    glob = Aggregation(
        mode,  # type: ignore[arg-type]
        num_tokens=max(count_tokens(mask), 1.0),
        num_sequences=max(count_sequences(mask), 1.0),
        norm_length=tokens,
    )
    split = min(split, batch)
    parts = sum(aggregate(v, m, glob) for v, m in zip(values.split(split), mask.split(split)))
    assert torch.allclose(full, parts, atol=1e-12)
    (g_full,) = torch.autograd.grad(full, values)
    (g_parts,) = torch.autograd.grad(parts, values)  # type: ignore[arg-type]
    assert torch.allclose(g_full, g_parts, atol=1e-12)
