"""REAL (card adv#B8): rewards as class labels with anchor logits."""

from __future__ import annotations

import math

import pytest
import torch

from tether.catalogue import get
from tether.errors import InvalidInputError

real = get("policy_loss", "real").fn

D = torch.float64


def batch(
    scores: list[float], rewards: list[float], groups: list[int], tokens: int = 3
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows whose length-normalised log-ratio is exactly `scores` (every token carries the same log-ratio)."""
    b = len(scores)
    old = torch.full((b, tokens), -1.0, dtype=D)
    lp = (old + torch.tensor(scores, dtype=D).unsqueeze(-1)).requires_grad_(True)
    mask = torch.ones(b, tokens, dtype=torch.bool)
    return lp, old, torch.tensor(rewards, dtype=D), torch.tensor(groups), mask


def score_grads(loss: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """dL/ds_i: with s_i the token mean of the log-ratio, dL/ds_i = sum_t dL/dlp_{i,t}."""
    (g,) = torch.autograd.grad(loss, lp)
    return g.sum(-1)


def test_gradient_weights_at_zero_score() -> None:
    tau = 0.5
    lp, old, r, g, m = batch([0.0] * 5, [1, 1, 0, 0, 0], [0] * 5)
    loss, _ = real(lp, old, r, g, m, tau=tau)
    w = score_grads(loss, lp)
    for i in (0, 1):
        assert w[i].item() == pytest.approx(-1.0 / (tau * (1 + 2)))
    for i in (2, 3, 4):
        assert w[i].item() == pytest.approx(1.0 / (tau * (1 + 3)))
    # value at s = 0: log(1 + |N|) + log(1 + |P|)
    assert loss.item() == pytest.approx(math.log(4) + math.log(3))


def test_hand_computed_value() -> None:
    tau = 0.5
    s = [0.3, -0.2, 0.1, 0.4]
    lp, old, r, g, m = batch(s, [1, 0, 0, 1], [7, 7, 7, 7])
    loss, _ = real(lp, old, r, g, m, tau=tau)
    neg = math.log(1 + math.exp(-0.2 / tau) + math.exp(0.1 / tau))
    pos = math.log(1 + math.exp(-0.3 / tau) + math.exp(-0.4 / tau))
    assert loss.item() == pytest.approx(neg + pos)


def test_weights_bounded_by_one_over_tau() -> None:
    gen = torch.Generator().manual_seed(0)
    tau = 0.5
    for _ in range(20):
        s = (torch.randn(6, generator=gen, dtype=D) * 8).tolist()
        lp, old, r, g, m = batch(s, [1, 0, 1, 0, 0, 1], [0] * 6)
        loss, _ = real(lp, old, r, g, m, tau=tau)
        w = score_grads(loss, lp)
        assert torch.isfinite(w).all()
        assert w.abs().max().item() < 1.0 / tau
        assert (w[torch.tensor([0, 2, 5])] <= 0).all() and (w[torch.tensor([1, 3, 4])] >= 0).all()


def test_single_class_groups_contribute_zero_but_count_as_prompts() -> None:
    lp, old, r, g, m = batch([0.5, -0.3, 0.2, 0.1], [1, 1, 1, 0], [0, 0, 1, 1])
    loss, metrics = real(lp, old, r, g, m)
    w = score_grads(loss, lp)
    assert w[0].item() == 0.0 and w[1].item() == 0.0
    mixed_only, _ = real(lp[2:].detach(), old[2:], r[2:], g[2:], m[2:])
    assert loss.item() == pytest.approx(mixed_only.item() / 2)
    assert metrics["real/mixed_groups"].item() == 1.0
    lp, old, r, g, m = batch([0.5, -0.3], [0, 0], [0, 0])
    loss, _ = real(lp, old, r, g, m)
    assert loss.item() == 0.0 and score_grads(loss, lp).abs().sum().item() == 0.0


def test_global_prompt_count_makes_micro_batches_add_up() -> None:
    s = [0.5, -0.3, 0.2, 0.1, -0.4, 0.6]
    rw = [1, 0, 1, 0, 0, 1]
    gid = [0, 0, 1, 1, 2, 2]
    lp, old, r, g, m = batch(s, rw, gid)
    full, _ = real(lp, old, r, g, m)
    parts = [
        real(lp[i : i + 2], old[i : i + 2], r[i : i + 2], g[i : i + 2], m[i : i + 2], num_prompts=3.0)[0]
        for i in (0, 2, 4)
    ]
    assert sum(p.item() for p in parts) == pytest.approx(full.item())


def test_product_and_bce_variants() -> None:
    tau = 0.5
    s = [0.3, -0.2, 0.1]
    lp, old, r, g, m = batch(s, [1, 0, 0], [0, 0, 0])
    prod, _ = real(lp, old, r, g, m, variant="product")
    sum_n = math.exp(-0.2 / tau) + math.exp(0.1 / tau)
    sum_p = math.exp(-0.3 / tau)
    assert prod.item() == pytest.approx(math.log(1 + sum_n * sum_p))
    bce, _ = real(lp, old, r, g, m, variant="bce")
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    assert bce.item() == pytest.approx(sp(-0.3 / tau) + sp(-0.2 / tau) + sp(0.1 / tau))
    # with one sample per class "sum" is BCE, and "product" is a logistic loss on the margin
    lp, old, r, g, m = batch([0.7, -0.1], [1, 0], [0, 0])
    vals = [real(lp, old, r, g, m, variant=v)[0].item() for v in ("sum", "product", "bce")]
    assert vals[0] == pytest.approx(vals[2])
    assert vals[1] == pytest.approx(math.log1p(math.exp((-0.1 - 0.7) / tau)))


def test_extreme_scores_are_finite() -> None:
    lp, old, r, g, m = batch([40.0, -40.0, 15.0, -15.0], [0, 1, 0, 1], [0, 0, 0, 0])
    for variant in ("sum", "product", "bce"):
        loss, _ = real(lp, old, r, g, m, tau=0.01, variant=variant)  # type: ignore[arg-type]
        w = score_grads(loss, lp)
        assert torch.isfinite(loss) and torch.isfinite(w).all()
        assert loss.item() > 100


def test_padding_and_threshold() -> None:
    lp, old, r, g, _ = batch([0.3, -0.2, 0.0], [0.9, 0.3, 0.0], [0, 0, 0], tokens=4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        lp[0, 2:] = 1e4  # garbage in padding must not matter
    loss, _ = real(lp, old, r, g, mask)
    tau = 0.5
    # reward 0.3 is below the 0.5 threshold -> negative; the all-padding row is not a sample
    expected = math.log(1 + math.exp(-0.2 / tau)) + math.log(1 + math.exp(-0.3 / tau))
    assert loss.item() == pytest.approx(expected)
    (grad,) = torch.autograd.grad(loss, lp)
    assert grad[~mask].abs().max().item() == 0.0
    low, _ = real(lp, old, r, g, mask, label_threshold=0.2)
    assert low.item() == 0.0  # now both rows are positives


def test_rejects_bad_tau() -> None:
    lp, old, r, g, m = batch([0.0, 0.0], [1, 0], [0, 0])
    with pytest.raises(InvalidInputError, match="tau must be > 0"):
        real(lp, old, r, g, m, tau=0.0)
