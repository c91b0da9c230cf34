"""ACE (ratio#12), CAPO (ratio#13) and ProGRPO (ratio#16): confidence-aware advantages."""

from __future__ import annotations

import math

import pytest
import torch

from tether.catalogue import get
from tether.catalogue.advantages.confidence import low_probability_confidence
from tether.catalogue.aggregate import aggregate
from tether.catalogue.ratio import clipped_surrogate

ace = get("advantage", "ace").fn
capo = get("advantage", "capo").fn
progrpo = get("advantage", "progrpo").fn
D = torch.float64


# ----- ACE -----
def test_ace_alpha_zero_and_positive_advantages_unchanged() -> None:
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(4, 3, generator=g, dtype=D)
    ref = -torch.rand(4, 3, generator=g, dtype=D)
    mask = torch.ones(4, 3, dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.3], dtype=D)
    out0, _ = ace(adv, lp, ref, mask, alpha=0.0)
    assert torch.allclose(out0, adv.unsqueeze(-1).expand(4, 3))
    out, _ = ace(adv, lp, ref, mask, alpha=1.0)
    assert torch.allclose(out[adv > 0], adv[adv > 0].unsqueeze(-1).expand(2, 3))


def test_ace_hand_value_and_monotone_in_confidence() -> None:
    mask = torch.ones(1, 2, dtype=torch.bool)
    ref = torch.zeros(1, 2, dtype=D) - 1.0
    adv = torch.tensor([-2.0], dtype=D)
    out, _ = ace(adv, ref + 0.3, ref, mask, alpha=0.5)
    expected = -2.0 * (1 + 0.5 * math.log1p(math.exp(0.6)))
    assert out[0, 0].item() == pytest.approx(expected)
    mags = [
        abs(ace(adv, ref + d, ref, mask, alpha=0.5)[0][0, 0].item()) for d in (-30.0, -1.0, 0.0, 1.0, 5.0)
    ]
    assert mags == sorted(mags)
    assert mags[0] == pytest.approx(2.0, abs=1e-9)  # c -> -inf gives A' -> A


def test_ace_carries_no_gradient_and_zero_padding() -> None:
    lp = torch.full((2, 3), -1.0, dtype=D, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    out, _ = ace(torch.tensor([-1.0, -1.0], dtype=D), lp, lp.detach() - 1, mask)
    assert not out.requires_grad
    assert (out[~mask] == 0).all()


# ----- CAPO -----
def test_capo_degenerate_groups_give_zero() -> None:
    lp = -torch.rand(6, 4, dtype=D)
    mask = torch.ones(6, 4, dtype=torch.bool)
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    out, _ = capo(r.to(D), ids, lp, mask)
    assert (out == 0).all()


def test_capo_correct_ranked_below_wrong_gets_more() -> None:
    s = torch.tensor([-3.0, -0.5, -1.0, -2.0], dtype=D)  # correct: 0 (low conf), 1 (high conf)
    lp = s.unsqueeze(-1).expand(4, 2).clone()
    r = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=D)
    out, _ = capo(r, torch.zeros(4, dtype=torch.long), lp, torch.ones(4, 2, dtype=torch.bool))
    assert out[0, 0] > out[1, 0] > 0
    assert (out[2:, 0] < 0).all()
    card, _ = capo(
        r, torch.zeros(4, dtype=torch.long), lp, torch.ones(4, 2, dtype=torch.bool), normalization="card"
    )
    expected = (torch.sigmoid(s[2] - s[0]) + torch.sigmoid(s[3] - s[0])) / 2
    assert card[0, 0].item() == pytest.approx(expected.item())


def test_capo_pg_gradient_equals_logistic_auc_gradient() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 4, 6, generator=g, dtype=D, requires_grad=True)  # 2 groups of 5
    tokens = torch.randint(0, 6, (10, 4), generator=g)
    mask = torch.ones(10, 4, dtype=torch.bool)
    mask[1, 2:] = False
    mask[7, 1:] = False
    r = torch.tensor([1, 0, 1, 0, 0, 1, 1, 1, 0, 1], dtype=D)
    ids = torch.arange(2).repeat_interleave(5)

    def lp_of(x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(x.reshape(10, 4, 6), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    lp = lp_of(logits)
    adv, _ = capo(r, ids, lp, mask)
    ratio = torch.exp(lp - lp.detach())
    pg = aggregate(clipped_surrogate(ratio, adv, 0.2, 0.2), mask, "seq-mean-token-mean")
    (g_pg,) = torch.autograd.grad(pg, logits)
    lp2 = lp_of(logits)
    s = torch.where(mask, lp2, torch.zeros_like(lp2)).sum(-1) / mask.sum(-1)
    auc = torch.zeros((), dtype=D)
    for grp in range(2):
        sel = ids == grp
        sp, sn = s[sel & (r > 0.5)], s[sel & (r < 0.5)]
        auc = auc + torch.nn.functional.softplus(-(sp.unsqueeze(1) - sn.unsqueeze(0))).mean()
    (g_auc,) = torch.autograd.grad(auc / 2, logits)
    assert torch.allclose(g_pg, g_auc, atol=1e-12)


def test_capo_noise_mask_drops_tails() -> None:
    n = 20
    lp = -torch.rand(n, 3, dtype=D)
    ref = torch.linspace(-5, -0.1, n, dtype=D).unsqueeze(-1).expand(n, 3).clone()
    r = torch.tensor([1.0, 0.0] * (n // 2), dtype=D)
    mask = torch.ones(n, 3, dtype=torch.bool)
    out, m = capo(r, torch.zeros(n, dtype=torch.long), lp, mask, ref_logprobs=ref, noise_quantile=0.1)
    assert out[0, 0] == 0  # correct with the lowest reference confidence
    assert out[n - 1, 0] == 0  # wrong with the highest reference confidence
    assert m["capo/noise_dropped_frac"].item() > 0


# ----- ProGRPO -----
def _pro_inputs() -> dict[str, torch.Tensor]:
    lp = torch.log(
        torch.tensor(
            [[0.9, 0.8, 0.1, 0.7, 0.6], [0.5, 0.5, 0.5, 0.5, 0.5], [0.2, 0.9, 0.9, 0.9, 0.9]], dtype=D
        )
    )
    return {
        "advantages": torch.tensor([1.0, 1.0, -1.0], dtype=D),
        "rewards": torch.tensor([1.0, 1.0, 0.0], dtype=D),
        "group_ids": torch.zeros(3, dtype=torch.long),
        "logprobs": lp,
        "prompt_logprobs": torch.full((3, 2), math.log(0.5), dtype=D),
        "prompt_mask": torch.ones(3, 2, dtype=torch.bool),
        "response_mask": torch.ones(3, 5, dtype=torch.bool),
    }


def test_progrpo_alpha_zero_and_hand_value() -> None:
    b = _pro_inputs()
    out0, _ = progrpo(**b, alpha=0.0)
    assert torch.allclose(out0, b["advantages"].unsqueeze(-1).expand(3, 5))
    out, _ = progrpo(**b, alpha=0.1)
    # lowest 20% of 5 tokens = 1 token: c(o) = min prob; c(q) = 0.5
    assert out[0, 0].item() == pytest.approx(1.0 + 0.1 * (0.5 - 0.1))
    assert out[1, 0].item() == pytest.approx(1.0 + 0.1 * (0.5 - 0.5))
    assert out[0, 0] > out[1, 0]  # higher answer confidence -> lower advantage


def test_progrpo_all_wrong_group_unchanged() -> None:
    b = _pro_inputs()
    b["rewards"] = torch.zeros(3, dtype=D)
    out, _ = progrpo(**b, alpha=0.5)
    assert torch.allclose(out, b["advantages"].unsqueeze(-1).expand(3, 5))


def test_low_probability_confidence_counts() -> None:
    lp = torch.log(torch.tensor([[0.1, 0.2, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]], dtype=D))
    c = low_probability_confidence(lp, torch.ones(1, 10, dtype=torch.bool), 0.2)
    assert c.item() == pytest.approx(math.exp((math.log(0.1) + math.log(0.2)) / 2))
