"""Properties every registered entry must have, checked with Hypothesis on generated batches.

- it runs on padded batches that include an all-padding row, and on |log-ratio| up to 50;
- every output tensor and every gradient is finite (no NaN or inf);
- losses and regularizers return a scalar whose gradient reaches some differentiable input
  (a regularizer without a gradient is a bug) and never reaches a padded position;
- advantages come back [B, T] (or [B]) with zeros on padding;
- metrics are detached scalar tensors with slash-separated names;
- the docstring cites the paper's arXiv id and says exact or reconstructed.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.catalogue.inputs import Spec, build_inputs
from tether.catalogue import entries

ALL = entries()
IDS = [f"{e.kind}:{e.name}" for e in ALL]

SPECS = st.builds(
    Spec,
    groups=st.integers(1, 3),
    group_size=st.integers(2, 5),
    tokens=st.integers(1, 7),
    seed=st.integers(0, 10_000),
    extreme=st.booleans(),
    all_padding_row=st.booleans(),
)


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in _tensors(v)]
    return []


def _check_metrics(metrics: Any) -> None:
    assert isinstance(metrics, dict)
    for key, value in metrics.items():
        assert "/" in key, f"metric {key!r} must be namespaced like 'policy/clip_frac'"
        assert isinstance(value, torch.Tensor) and value.dim() == 0, f"metric {key!r} must be a 0-dim tensor"
        assert not value.requires_grad, f"metric {key!r} must be detached"
        assert torch.isfinite(value), f"metric {key!r} is not finite: {value}"


def _run(entry: Any, spec: Spec) -> None:
    inputs = build_inputs(entry.inputs, spec)
    out = entry.fn(**inputs)
    assert isinstance(out, tuple) and len(out) >= 2, "entries return (value, metrics[, ...])"
    value, metrics = out[0], out[1]
    _check_metrics(metrics)
    for t in _tensors(value):
        if t.is_floating_point():
            assert torch.isfinite(t).all(), f"{entry.name}: non-finite output"
    mask = inputs.get("response_mask")
    if entry.kind in ("policy_loss", "regularizer"):
        assert isinstance(value, torch.Tensor) and value.dim() == 0, "a loss is a scalar tensor"
        diff = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}
        if not value.requires_grad:
            return  # e.g. nothing valid in the batch for this term; value must then be 0
        grads = torch.autograd.grad(value, list(diff.values()), allow_unused=True)
        for (name, _tensor), grad in zip(diff.items(), grads):
            if grad is None:
                continue
            assert torch.isfinite(grad).all(), f"{entry.name}: non-finite gradient w.r.t. {name}"
            if mask is not None and grad.shape[:2] == mask.shape:
                pad = ~mask.bool()
                assert grad[pad].abs().max().item() == 0 if bool(pad.any()) else True, (
                    f"{entry.name}: gradient leaks into padded positions of {name}"
                )
    if entry.kind == "advantage":
        assert isinstance(value, torch.Tensor)
        if mask is not None and value.dim() == 2:
            assert value.shape == mask.shape
            assert value[~mask.bool()].abs().max().item() == 0 if bool((~mask.bool()).any()) else True


@pytest.mark.parametrize("entry", ALL, ids=IDS)
def test_docstring_cites_paper(entry: Any) -> None:
    doc = entry.fn.__doc__ or ""
    assert entry.paper and entry.card
    if entry.arxiv:
        assert entry.arxiv in doc, f"{entry.name}: docstring must cite arXiv {entry.arxiv}"
    assert ("xact" in doc) or ("econstructed" in doc), (
        f"{entry.name}: docstring must say exact or reconstructed"
    )


@pytest.mark.parametrize("entry", ALL, ids=IDS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=SPECS)
def test_runs_finite_on_padded_and_extreme_batches(entry: Any, spec: Spec) -> None:
    _run(entry, spec)


@pytest.mark.parametrize(
    "entry", [e for e in ALL if e.kind in ("policy_loss", "regularizer")], ids=lambda e: e.name
)
def test_has_a_gradient(entry: Any) -> None:
    """On an ordinary batch the term must change the gradient of some input."""
    inputs = build_inputs(entry.inputs, Spec(seed=1, all_padding_row=False))
    loss = entry.fn(**inputs)[0]
    assert loss.requires_grad, f"{entry.name} returned a loss with no gradient"
    diff = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    grads = torch.autograd.grad(loss, diff, allow_unused=True)
    total = sum(float(g.abs().sum()) for g in grads if g is not None)
    assert total > 0, f"{entry.name}: gradient is identically zero"
