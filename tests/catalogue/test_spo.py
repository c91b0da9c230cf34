"""SPO (cards adv#B30, ratio#20): tracker baseline, batch normalisation, tracker update and init."""

from __future__ import annotations

import pytest
import torch

from tether.catalogue import get
from tether.catalogue.advantages.spo import spo_divergence, spo_tracker_init, spo_tracker_update
from tether.errors import InvalidInputError

entry = get("advantage", "spo")
spo = entry.fn
F64 = torch.float64


def test_advantage_against_tracker_with_batch_normalisation() -> None:
    r = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=F64)
    alpha = torch.tensor([1.0, 3.0, 2.0, 1.0], dtype=F64)
    beta = torch.tensor([3.0, 1.0, 2.0, 1.0], dtype=F64)
    m = torch.ones(4, 2, dtype=torch.bool)
    a = spo(r, m, alpha, beta)[0][:, 0]
    raw = r - alpha / (alpha + beta)
    assert torch.allclose(a, (raw - raw.mean()) / (raw.std() + 1e-8))
    assert a.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert a.std().item() == pytest.approx(1.0, rel=1e-6)


def test_single_sample_per_prompt_has_signal_where_grpo_has_none() -> None:
    r = torch.tensor([1.0, 0.0, 1.0], dtype=F64)
    m = torch.ones(3, 1, dtype=torch.bool)
    a = spo(r, m, torch.full((3,), 1.0, dtype=F64), torch.full((3,), 1.0, dtype=F64))[0]
    assert a.abs().sum().item() > 0
    g = get("advantage", "grpo").fn(r, m, torch.arange(3))[0]
    assert torch.allclose(g[:, 0], r / (1 + 1e-6))  # verl's lone-sample rule: not a relative signal
    with pytest.raises(InvalidInputError, match="tracker_alpha"):
        spo(r, m, -torch.ones(3, dtype=F64), torch.ones(3, dtype=F64))


def test_tracker_update_rho_and_running_rate() -> None:
    assert entry.state_update is spo_tracker_update
    a, b = spo_tracker_update(
        torch.tensor([2.0]), torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([0.0])
    )
    assert a.item() == pytest.approx(0.96 * 2 + 1) and b.item() == pytest.approx(0.96 * 2)
    a, b = spo_tracker_update(
        torch.tensor([2.0]), torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([1.0])
    )
    assert a.item() == pytest.approx(0.875 * 2)
    a, b = spo_tracker_update(
        torch.tensor([2.0]), torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([0.06])
    )
    assert a.item() == pytest.approx(0.875 * 2)  # 2^-1 clipped at rho_min
    # rho = 1: the tracked value is the running success rate
    al, be = torch.tensor([0.0]), torch.tensor([0.0])
    seq = [1.0, 0.0, 1.0, 1.0, 0.0]
    for x in seq:
        al, be = spo_tracker_update(al, be, torch.tensor([x]), torch.tensor([0.0]), rho_min=1.0, rho_max=1.0)
    assert (al / (al + be)).item() == pytest.approx(sum(seq) / len(seq))


def test_tracker_init_and_divergence() -> None:
    a, b = spo_tracker_init(torch.tensor([3.0]), 8, rho_min=0.875)
    assert a.item() == pytest.approx(8 * 3.5 / 9) and b.item() == pytest.approx(8 * 5.5 / 9)
    then = torch.tensor([[-1.0, -2.0, -3.0], [0.0, 0.0, 0.0]], dtype=F64)
    now = torch.tensor([[-1.5, -2.0, 9.0], [0.0, 0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    assert spo_divergence(then, now, mask).tolist() == pytest.approx([0.25, 0.0])
