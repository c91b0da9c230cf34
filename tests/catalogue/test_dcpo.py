"""DCPO (card ratio#9): temperature-targeted on-policy advantage mixing."""

from __future__ import annotations

import pytest
import torch

from tether.catalogue import get

entry = get("advantage", "dcpo")
dcpo = entry.fn
D = torch.float64


def inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 3, 7, generator=g, dtype=D) * 2
    tokens = torch.randint(0, 7, (4, 3), generator=g)
    old = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return {
        "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=D),
        "rewards": torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=D),
        "old_logprobs": old,
        "old_logits": logits,
        "token_ids": tokens,
        "response_mask": torch.ones(4, 3, dtype=torch.bool),
    }


def test_on_target_entropy_is_plain_grpo() -> None:
    b = inputs()
    out, m = dcpo(**b, current_entropy=0.25, target_entropy=0.25)
    assert m["dcpo/alpha"].item() == 0.0
    assert torch.allclose(out, b["advantages"].unsqueeze(-1).expand(4, 3))


def test_temperature_one_gives_unit_rho_and_hand_alpha() -> None:
    b = inputs()
    out, m = dcpo(**b, current_entropy=0.1, temperature_high=1.0)
    # gap = min(0.15, 0.1) = 0.1, p_true = 0.5 -> a~ = 0.2, alpha = 1/6
    alpha = 0.2 / 1.2
    assert m["dcpo/alpha"].item() == pytest.approx(alpha, rel=1e-6)
    b_ind = (b["rewards"] > 0.05).to(D).unsqueeze(-1)
    expected = (1 - alpha) * b["advantages"].unsqueeze(-1) + alpha * b_ind
    assert torch.allclose(out, expected.expand(4, 3))


def test_high_temperature_boosts_low_probability_tokens() -> None:
    b = inputs(1)
    out, m = dcpo(**b, current_entropy=0.0)  # H < H0 -> T = 1.2
    assert m["dcpo/temperature"].item() == pytest.approx(1.2)
    alpha = m["dcpo/alpha"].item()
    rho = (out - (1 - alpha) * b["advantages"].unsqueeze(-1)) / alpha
    correct = b["rewards"] > 0.05
    tempered = (
        torch.log_softmax(b["old_logits"] / 1.2, -1).gather(-1, b["token_ids"].unsqueeze(-1)).squeeze(-1)
    )
    up = tempered > b["old_logprobs"]
    assert ((rho[correct] > 1) == up[correct]).all()
    assert torch.allclose(rho[~correct], torch.zeros_like(rho[~correct]), atol=1e-6)


def test_state_update_is_token_mean_negative_logprob() -> None:
    lp = torch.tensor([[-1.0, -3.0], [-2.0, -9.0]], dtype=D)
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    assert entry.state_update is not None
    assert entry.state_update(lp, mask) == pytest.approx(2.0)


def test_no_correct_sample_leaves_advantages() -> None:
    b = inputs()
    b["rewards"] = torch.zeros(4, dtype=D)
    out, m = dcpo(**b, current_entropy=1.0)
    assert m["dcpo/alpha"].item() == 0.0
    assert torch.allclose(out, b["advantages"].unsqueeze(-1).expand(4, 3))
