"""KL estimators k1, k2, k3, low_var_kl, k3+ and abs: the properties of card ratio#B8."""

from __future__ import annotations

import math

import pytest
import torch

from tether.catalogue import get
from tether.errors import InvalidInputError

k1 = get("regularizer", "kl_k1").fn
k2 = get("regularizer", "kl_k2").fn
k3 = get("regularizer", "kl_k3").fn
low_var = get("regularizer", "kl_low_var").fn
k3_plus = get("regularizer", "kl_k3_plus").fn
kabs = get("regularizer", "kl_abs").fn

ONE = torch.ones(1, 1, dtype=torch.bool)


def toy() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    theta = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), -1)
    return theta, ref


def expected_grad(fn: object, theta: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """E_{a ~ pi}[grad k(a)], enumerating the 6 actions exactly (no sampling)."""
    logp = torch.log_softmax(theta, -1)
    pi = logp.exp().detach()
    total = torch.zeros(6, dtype=torch.float64)
    for a in range(6):
        loss, _ = fn(logp[a].reshape(1, 1), ref[a].reshape(1, 1), ONE, coef=1.0, aggregation="token-sum")  # type: ignore[operator]
        (g,) = torch.autograd.grad(loss, theta, retain_graph=True)
        total += pi[a] * g
    return total


def reverse_kl_grad(theta: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(theta, -1)
    (g,) = torch.autograd.grad((logp.exp() * (logp - ref)).sum(), theta)
    return g


def forward_kl_grad(theta: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(theta, -1)
    (g,) = torch.autograd.grad((ref.exp() * (ref - logp)).sum(), theta)
    return g


def test_k1_has_zero_expected_gradient() -> None:
    theta, ref = toy()
    assert expected_grad(k1, theta, ref).abs().max().item() < 1e-14


def test_k2_expected_gradient_is_reverse_kl() -> None:
    theta, ref = toy()
    torch.testing.assert_close(expected_grad(k2, theta, ref), reverse_kl_grad(theta, ref), atol=1e-14, rtol=0)


def test_k3_expected_gradient_is_forward_kl() -> None:
    theta, ref = toy()
    g = expected_grad(k3, theta, ref)
    torch.testing.assert_close(g, forward_kl_grad(theta, ref), atol=1e-14, rtol=0)
    assert (g - reverse_kl_grad(theta, ref)).abs().max().item() > 1e-3
    torch.testing.assert_close(expected_grad(low_var, theta, ref), g, atol=1e-14, rtol=0)


def test_k3_plus_has_k2_gradient_and_k3_value() -> None:
    theta, ref = toy()
    torch.testing.assert_close(
        expected_grad(k3_plus, theta, ref), reverse_kl_grad(theta, ref), atol=1e-14, rtol=0
    )
    g = torch.Generator().manual_seed(0)
    lp = (-torch.rand(3, 5, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    ref2 = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 3
    mask = torch.ones(3, 5, dtype=torch.bool)
    v_plus, _ = k3_plus(lp, ref2, mask)
    v3, _ = k3(lp, ref2, mask)
    assert v_plus.item() == pytest.approx(v3.item(), rel=1e-12)
    (gp,) = torch.autograd.grad(v_plus, lp)
    (g2,) = torch.autograd.grad(k2(lp, ref2, mask)[0], lp)
    torch.testing.assert_close(gp, g2)


def test_unbiased_values_on_policy() -> None:
    theta, ref = toy()
    logp = torch.log_softmax(theta, -1).detach()
    pi = logp.exp()
    kl = (pi * (logp - ref)).sum().item()
    for fn in (k1, k3):
        vals = torch.stack(
            [fn(logp[a].reshape(1, 1), ref[a].reshape(1, 1), ONE, coef=1.0)[0] for a in range(6)]
        )
        assert (pi * vals).sum().item() == pytest.approx(kl, rel=1e-12)


def test_k3_matches_trl_per_token_kl_and_grpo_aggregation() -> None:
    g = torch.Generator().manual_seed(1)
    lp = -torch.rand(3, 4, generator=g, dtype=torch.float64) * 4
    ref = -torch.rand(3, 4, generator=g, dtype=torch.float64) * 4
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    per = torch.exp(ref - lp) - (ref - lp) - 1  # TRL per_token_kl
    expected = 0.04 * ((per[0, :3].mean() + per[1, :1].mean()) / 2)  # seq-mean-token-mean, beta 0.04
    value, m = k3(lp, ref, mask)
    assert value.item() == pytest.approx(expected.item(), rel=1e-12)
    assert m["reg/kl"].item() == pytest.approx(expected.item() / 0.04, rel=1e-6)


def test_k3_nonnegative_and_zero_iff_equal() -> None:
    d = (torch.arange(-80, 81, dtype=torch.float64) / 10).reshape(1, -1)
    ref = torch.full_like(d, -2.0)
    mask = torch.ones_like(d, dtype=torch.bool)
    for i in range(d.shape[1]):
        lp = (ref[:, i : i + 1] + d[:, i : i + 1]).clone().requires_grad_(True)
        v, _ = k3(lp, ref[:, i : i + 1], mask[:, i : i + 1], coef=1.0)
        assert v.item() >= 0.0
        if d[0, i].item() == 0.0:
            (gr,) = torch.autograd.grad(v, lp)
            assert v.item() == 0.0 and gr.item() == 0.0
        else:
            assert v.item() > 0.0


def test_low_var_clamps_and_stops_gradient() -> None:
    lp = torch.tensor([[-31.0, -1.2]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    v, _ = low_var(lp, ref, mask, coef=1.0, aggregation="token-sum")
    x = 0.2
    assert v.item() == pytest.approx(10.0 + math.exp(x) - x - 1)
    (g,) = torch.autograd.grad(v, lp)
    assert g[0, 0].item() == 0.0 and g[0, 1].item() == pytest.approx(1 - math.exp(x))
    v3, _ = k3(lp, ref, mask, coef=1.0, aggregation="token-sum")
    assert v3.item() > 1e12  # unclamped TRL form


def test_abs_and_k1_values_and_gradients() -> None:
    lp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -0.5]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    v, m = kabs(lp, ref, mask, coef=1.0, aggregation="token-sum")
    assert v.item() == pytest.approx(1.5) and m["reg/kl_loss"].item() == pytest.approx(1.5)
    (g,) = torch.autograd.grad(v, lp)
    assert g.tolist() == [[1.0, -1.0, 0.0]]
    v1, _ = k1(lp, ref, mask, coef=2.0, aggregation="token-mean")
    assert v1.item() == pytest.approx(2.0 * (0.5 - 1.0 + 0.0) / 3)


def test_bias_correction_multiplies_by_the_ratio() -> None:
    g = torch.Generator().manual_seed(2)
    lp = (-torch.rand(2, 3, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    ref = -torch.rand(2, 3, generator=g, dtype=torch.float64) * 2
    old = -torch.rand(2, 3, generator=g, dtype=torch.float64) * 2
    mask = torch.ones(2, 3, dtype=torch.bool)
    same, _ = k3(lp, ref, mask, old_logprobs=lp.detach())
    plain, _ = k3(lp, ref, mask)
    assert same.item() == pytest.approx(plain.item(), rel=1e-12)
    corrected, _ = k3(lp, ref, mask, coef=1.0, aggregation="token-sum", old_logprobs=old)
    d = (ref - lp).detach()
    expected = ((torch.exp(d) - d - 1) * torch.exp(lp.detach() - old)).sum()
    assert corrected.item() == pytest.approx(expected.item(), rel=1e-12)


def test_padding_gets_no_gradient_even_at_extreme_log_ratio() -> None:
    lp = torch.tensor([[-1.0, -80.0]], dtype=torch.float32, requires_grad=True)
    ref = torch.tensor([[-1.5, -0.1]], dtype=torch.float32)
    mask = torch.tensor([[1, 0]], dtype=torch.bool)
    for fn in (k1, k2, k3, low_var, k3_plus, kabs):
        v, _ = fn(lp, ref, mask)
        (gr,) = torch.autograd.grad(v, lp)
        assert torch.isfinite(v) and torch.isfinite(gr).all() and gr[0, 1].item() == 0.0


def test_negative_coef_is_rejected() -> None:
    with pytest.raises(InvalidInputError, match="coef"):
        k3(torch.zeros(1, 1), torch.zeros(1, 1), ONE, coef=-1.0)


@pytest.mark.parametrize(
    ("kl", "expected"),
    [
        (0.02, 0.04 * 1.02),  # KL twice the target: error 1 clipped to 0.2, x (1 + 0.1 * 0.2)
        (0.011, 0.04 * 1.01),  # error 0.1
        (0.01, 0.04),  # on target: unchanged
        (0.0095, 0.04 * (1 - 0.1 * 0.05)),
        (0.0, 0.04 * 0.98),  # error -1 clipped to -0.2
    ],
)
def test_adaptive_kl_coefficient_by_hand(kl: float, expected: float) -> None:
    from tether.catalogue.regularizers.kl import adaptive_kl_coef

    assert adaptive_kl_coef(0.04, kl, target=0.01) == pytest.approx(expected, rel=1e-12)


def test_adaptive_kl_coefficient_is_the_state_update_of_every_estimator() -> None:
    from tether.catalogue.regularizers.kl import adaptive_kl_coef

    for name in ("kl_k1", "kl_k2", "kl_k3", "kl_low_var", "kl_k3_plus", "kl_abs"):
        assert get("regularizer", name).state_update is adaptive_kl_coef, name
    with pytest.raises(InvalidInputError, match="target must be a KL > 0"):
        adaptive_kl_coef(0.04, 0.01, target=0.0)
    # the authors' form, 1 + e * n_steps / horizon with 512 episodes a step over 10000: rate 0.0512
    assert adaptive_kl_coef(1.0, 0.02, target=0.01, rate=512 / 10000) == pytest.approx(1 + 0.2 * 0.0512)


def test_kl_in_reward_subtracts_the_sequence_kl_by_hand() -> None:
    fn = get("reward", "kl_in_reward").fn
    rewards = torch.tensor([1.0, 0.0])
    old = torch.tensor([[-1.0, -2.0], [-0.5, -9.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0], [-1.0, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    # k1 per token: (0.5, -1) -> -0.5 ; (0.5, padding) -> 0.5
    out, metrics = fn(rewards, old, ref, mask, coef=0.1)
    assert out.tolist() == pytest.approx([1.0 + 0.05, 0.0 - 0.05])
    assert float(metrics["reward/kl"]) == pytest.approx(0.0) and float(
        metrics["reward/kl_penalty"]
    ) == pytest.approx(0.0)
    assert not out.requires_grad  # a penalty in the reward acts through the advantages only
    # k3 per token: exp(-d) + d - 1
    k3 = [math.exp(-0.5) + 0.5 - 1 + math.exp(1.0) - 1 - 1, math.exp(-0.5) + 0.5 - 1]
    out, metrics = fn(rewards, old, ref, mask, coef=0.2, estimator="k3")
    assert out.tolist() == pytest.approx([1.0 - 0.2 * k3[0], -0.2 * k3[1]])
    assert float(metrics["reward/kl"]) == pytest.approx(sum(k3) / 2)
    # coef 0 is the identity
    assert torch.equal(fn(rewards, old, ref, mask, coef=0.0)[0], rewards)
    with pytest.raises(InvalidInputError, match="estimator must be one of"):
        fn(rewards, old, ref, mask, estimator="k4")
