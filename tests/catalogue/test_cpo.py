"""Card properties of CPO's step (control card A4): conjugate gradients, the cases, KKT optimality."""

from __future__ import annotations

import math

import pytest
import torch

from tether.catalogue import get
from tether.catalogue.constraints.cpo import conjugate_gradient, cpo_step
from tether.errors import InvalidInputError

D = torch.float64
DELTA = 0.01


def _spd(n: int, seed: int, ridge: float = 0.1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=gen, dtype=D)
    return m @ m.T + ridge * torch.eye(n, dtype=D)


def _problem(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1000)
    return _spd(n, seed), torch.randn(n, generator=gen, dtype=D), torch.randn(n, generator=gen, dtype=D)


def _step(
    h: torch.Tensor, g: torch.Tensor, b: torch.Tensor, c: float, **kw: object
) -> tuple[torch.Tensor, dict[str, float]]:
    x, metrics = cpo_step(g, b, torch.linalg.solve(h, g), torch.linalg.solve(h, b), c, 1.0, **kw)  # type: ignore[arg-type]
    return x, {k: float(v) for k, v in metrics.items()}


def test_registered_with_card_defaults() -> None:
    entry = get("constraint", "cpo_step")
    assert entry.fn is cpo_step and entry.arxiv == "1705.10528" and entry.status == "exact"
    assert entry.inputs == (
        "reward_gradient",
        "cost_gradient",
        "hinv_reward_gradient",
        "hinv_cost_gradient",
        "cost_excess",
        "episode_length",
    )
    assert entry.hyperparameters["target_kl"] == 0.01
    assert entry.hyperparameters["omnisafe_units"] is False  # the authors' units by default


# ---- conjugate gradients --------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 8])
def test_conjugate_gradient_solves_spd_system(n: int) -> None:
    h = _spd(n, seed=n)
    rhs = torch.randn(n, generator=torch.Generator().manual_seed(7), dtype=D)
    x = conjugate_gradient(lambda v: h @ v, rhs, iters=4 * n, residual_tol=1e-14)
    torch.testing.assert_close(x, torch.linalg.solve(h, rhs), atol=1e-8, rtol=0)


def test_conjugate_gradient_stops_early_and_handles_zero_rhs() -> None:
    h = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=D))
    calls = []

    def fvp(v: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return h @ v

    x = conjugate_gradient(fvp, torch.tensor([1.0, 0.0, 0.0], dtype=D), iters=15)
    torch.testing.assert_close(x, torch.tensor([1.0, 0.0, 0.0], dtype=D))
    assert len(calls) == 1  # exact after one step, then the residual test stops it
    assert conjugate_gradient(fvp, torch.zeros(3, dtype=D)).abs().max() == 0
    with pytest.raises(InvalidInputError, match="1-D"):
        conjugate_gradient(fvp, torch.zeros(3, 1, dtype=D))


# ---- the cases ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_inactive_constraint_gives_trpo_step(seed: int) -> None:
    h, g, b = _problem(4, seed)
    x, m = _step(h, g, b, c=-1e3)
    assert m["cpo/optim_case"] == 3 and m["cpo/nu"] == 0
    hinv_g = torch.linalg.solve(h, g)
    trpo = math.sqrt(2 * DELTA / float(g @ hinv_g)) * hinv_g
    torch.testing.assert_close(x, trpo, atol=1e-8, rtol=0)


def test_zero_cost_gradient_feasible_is_case_4_trpo_step() -> None:
    h, g, _ = _problem(3, 0)
    x, m = _step(h, g, torch.zeros(3, dtype=D), c=-0.001)
    assert m["cpo/optim_case"] == 4
    hinv_g = torch.linalg.solve(h, g)
    torch.testing.assert_close(x, math.sqrt(2 * DELTA / float(g @ hinv_g)) * hinv_g, atol=1e-8, rtol=0)


@pytest.mark.parametrize("seed", range(5))
def test_infeasible_gives_pure_recovery_step(seed: int) -> None:
    h, g, b = _problem(4, seed)
    hinv_b = torch.linalg.solve(h, b)
    s = float(b @ hinv_b)
    c = 2.0 * math.sqrt(2 * DELTA * s)  # c^2 / s = 8 delta > 2 delta
    x, m = _step(h, g, b, c=c)
    assert m["cpo/optim_case"] == 0 and m["cpo/lambda"] == 0 and m["cpo/B"] < 0
    torch.testing.assert_close(x, -math.sqrt(2 * DELTA / s) * hinv_b, atol=1e-8, rtol=0)
    assert float(b @ x) < 0  # the step only decreases the (linearized) cost
    assert float(b @ x) == pytest.approx(-math.sqrt(2 * DELTA * s), rel=1e-6)


def _cases() -> list[tuple[int, float]]:
    return [(seed, c) for seed in range(12) for c in (-1.0, -0.2, -0.05, -0.01, 0.0, 0.01, 0.05, 0.2, 1.0)]


@pytest.mark.parametrize(("seed", "c"), _cases())
def test_step_is_the_kkt_solution_in_every_case(seed: int, c: float) -> None:
    """Trust region always; in feasible cases (1..4) the linearized constraint, signs and slackness.

    The problem is convex, so a point that is feasible and satisfies the KKT conditions with
    lambda, nu >= 0 is the global maximum: x = (H^-1 g - nu H^-1 b) / lambda, nu (c + b^T x) = 0,
    lambda (1/2 x^T H x - delta) = 0.
    """
    h, g, b = _problem(2 + seed % 4, seed)
    x, m = _step(h, g, b, c=c)
    case = int(m["cpo/optim_case"])
    quad = 0.5 * float(x @ h @ x)
    assert quad <= DELTA * (1 + 1e-6)
    assert all(math.isfinite(v) for v in m.values())
    assert m["cpo/q"] >= 0 and m["cpo/s"] >= 0 and m["cpo/cost_excess"] == pytest.approx(c, rel=1e-6)
    if case == 0:
        return
    lin = c + float(b @ x)
    assert lin <= 1e-8
    lam, nu = m["cpo/lambda"], m["cpo/nu"]
    assert lam > 0 and nu >= 0
    expected = (torch.linalg.solve(h, g) - nu * torch.linalg.solve(h, b)) / (lam + 1e-8)
    torch.testing.assert_close(x, expected, atol=1e-5 * float(x.norm()), rtol=1e-5)  # metrics are float32
    if nu > 1e-9:
        assert abs(lin) < 1e-7
    assert quad == pytest.approx(DELTA, rel=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_dual_step_beats_feasible_points_of_the_trust_region(seed: int) -> None:
    """Independent optimality check: no random feasible point inside the trust region does better."""
    h, g, b = _problem(3, seed)
    s = float(b @ torch.linalg.solve(h, b))
    for c in (-0.5 * math.sqrt(2 * DELTA * s), 0.5 * math.sqrt(2 * DELTA * s)):  # cases 2 and 1
        x, m = _step(h, g, b, c=c)
        assert m["cpo/optim_case"] in (1, 2)
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(20000, 3, generator=gen, dtype=D)
        chol = torch.linalg.cholesky(h)
        # points with 1/2 x^T H x <= delta: x = L^-T u, ||u||^2 <= 2 delta
        u = (
            z
            / z.norm(dim=1, keepdim=True)
            * math.sqrt(2 * DELTA)
            * torch.rand(20000, 1, generator=gen, dtype=D)
        )
        pts = torch.linalg.solve_triangular(chol.T, u.T, upper=True).T
        feasible = pts[(c + pts @ b) <= 0]
        assert len(feasible) > 100
        assert float(g @ x) >= float((feasible @ g).max()) - 1e-9


def test_hand_computed_case_2() -> None:
    # H = I (2-D), delta = 1/2, so the trust region is the unit disk. g = (1, 1), b = (0, 1), c = -1/2:
    # maximize x1 + x2 on the unit disk with x2 <= 1/2.
    #   q = g.g = 2, r = g.b = 1, s = b.b = 1; A = q - r^2/s = 1; B = 2 delta - c^2/s = 1 - 1/4 = 3/4.
    #   c < 0 and B >= 0 -> case 2. lambda_a = sqrt(A/B) = 2/sqrt(3) ~ 1.1547, lambda_b = sqrt(q/(2 delta))
    #   = sqrt(2); nu > 0 iff lambda c + r > 0 iff lambda < lambda_mid = -r/c = 2.
    #   lambda_a* = clip(2/sqrt(3), 0, 2) = 2/sqrt(3); lambda_b* = max(sqrt(2), 2) = 2.
    #   f_a(lambda_a*) = -sqrt(A B) + r c / s = -sqrt(3)/2 - 1/2 ~ -1.3660;
    #   f_b(2) = -(q/2 + 2 delta * 2)/2 = -(1 + 2)/2 = -1.5  ->  lambda* = 2/sqrt(3).
    #   nu* = (lambda c + r)/s = 1 - 1/sqrt(3) ~ 0.42265.
    #   x = (g - nu b)/lambda = (1, 1/sqrt(3)) * sqrt(3)/2 = (sqrt(3)/2, 1/2): on the circle and on the
    #   line x2 = 1/2, the geometric answer.
    g = torch.tensor([1.0, 1.0], dtype=D)
    b = torch.tensor([0.0, 1.0], dtype=D)
    x, m = cpo_step(g, b, g, b, -0.5, 1.0, target_kl=0.5)
    assert m["cpo/optim_case"].item() == 2
    assert m["cpo/q"].item() == pytest.approx(2.0)
    assert m["cpo/r"].item() == pytest.approx(1.0)
    assert m["cpo/s"].item() == pytest.approx(1.0)
    assert m["cpo/A"].item() == pytest.approx(1.0, rel=1e-6)
    assert m["cpo/B"].item() == pytest.approx(0.75, rel=1e-6)
    assert m["cpo/lambda"].item() == pytest.approx(2 / math.sqrt(3), rel=1e-6)
    assert m["cpo/nu"].item() == pytest.approx(1 - 1 / math.sqrt(3), rel=1e-6)
    torch.testing.assert_close(x, torch.tensor([math.sqrt(3) / 2, 0.5], dtype=D), atol=1e-7, rtol=0)


def test_hand_computed_case_1_recovery() -> None:
    # H = I, delta = 1/2, g = (1, 0), b = (0, 1), c = +1/2: maximize x1 on the unit disk with x2 <= -1/2.
    #   q = 1, r = 0, s = 1; A = 1; B = 1 - 1/4 = 3/4 >= 0 and c >= 0 -> case 1.
    #   lambda_mid = -r/c = 0, so every lambda > 0 has nu > 0: lambda* = lambda_a = 2/sqrt(3).
    #   nu* = (lambda c + r)/s = 1/sqrt(3); x = (g - nu b)/lambda = (sqrt(3)/2, -1/2).
    g = torch.tensor([1.0, 0.0], dtype=D)
    b = torch.tensor([0.0, 1.0], dtype=D)
    x, m = cpo_step(g, b, g, b, torch.tensor(0.5), 1.0, target_kl=0.5)
    assert m["cpo/optim_case"].item() == 1
    assert m["cpo/lambda"].item() == pytest.approx(2 / math.sqrt(3), rel=1e-6)
    assert m["cpo/nu"].item() == pytest.approx(1 / math.sqrt(3), rel=1e-6)
    torch.testing.assert_close(x, torch.tensor([math.sqrt(3) / 2, -0.5], dtype=D), atol=1e-7, rtol=0)


def test_omnisafe_dual_reproduces_omnisafe_sign() -> None:
    # Same problem as test_hand_computed_case_2 with OmniSafe's literal formulas: its split point is
    # r/(c + eps) = -2, torch.clamp(lambda_a, 0, -2) = -2, f_a(-2) = 1.5 > f_b(sqrt 2), so lambda = -2,
    # nu = max(-2 c - r, 0)/s = 0 and x = g / (-2 + eps) = (-1/2, -1/2): the reward goes down.
    g = torch.tensor([1.0, 1.0], dtype=D)
    b = torch.tensor([0.0, 1.0], dtype=D)
    x, m = cpo_step(g, b, g, b, -0.5, 1.0, target_kl=0.5, omnisafe_dual=True)
    assert m["cpo/optim_case"].item() == 2
    assert m["cpo/lambda"].item() == pytest.approx(-2.0)
    assert m["cpo/nu"].item() == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(x, torch.tensor([-0.5, -0.5], dtype=D), atol=1e-7, rtol=0)


def test_finite_on_inconsistent_and_degenerate_inputs() -> None:
    gen = torch.Generator().manual_seed(3)
    for _ in range(200):
        n = 5
        vecs = [
            torch.randn(n, generator=gen, dtype=D) * 10 ** float(torch.randint(-6, 4, (1,), generator=gen))
            for _ in range(4)
        ]
        c = float(torch.randn(1, generator=gen)) * 10 ** float(torch.randint(-4, 3, (1,), generator=gen))
        for omnisafe in (False, True):
            x, m = cpo_step(*vecs, c, 1.0, omnisafe_dual=omnisafe)
            assert torch.isfinite(x).all()
            assert all(torch.isfinite(v) for v in m.values())
    zero = torch.zeros(3, dtype=D)
    for c in (-1.0, 0.0, 1.0):
        x, _ = cpo_step(zero, zero, zero, zero, c, 1.0)
        assert torch.isfinite(x).all() and x.abs().max() == 0


def test_dtype_and_bad_inputs() -> None:
    g32 = torch.ones(3)
    x, metrics = cpo_step(g32, g32, g32, g32, -1.0, 1.0)
    assert x.dtype == torch.float32
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())
    with pytest.raises(InvalidInputError, match="1-D"):
        cpo_step(torch.ones(2, 2), g32, g32, g32, -1.0, 1.0)
    with pytest.raises(InvalidInputError, match="same parameters"):
        cpo_step(g32, torch.ones(4), g32, g32, -1.0, 1.0)
    with pytest.raises(InvalidInputError, match="NaN or inf"):
        cpo_step(g32, g32, torch.tensor([1.0, float("nan"), 0.0]), g32, -1.0, 1.0)
    with pytest.raises(InvalidInputError, match="target_kl"):
        cpo_step(g32, g32, g32, g32, -1.0, 1.0, target_kl=0.0)
    with pytest.raises(InvalidInputError, match="cost_excess"):
        cpo_step(g32, g32, g32, g32, float("inf"), 1.0)


# ---- units: the cost surrogate is per sample, J_c per episode (defect: they were mixed) ------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("c", [-2.0, -0.05, 0.0, 0.05, 2.0])
def test_episode_length_scales_b_and_hinv_b_exactly(seed: int, c: float) -> None:
    """The step with T equals the step computed from T b and T H^-1 b with T = 1, to the bit."""
    h, g, b = _problem(4, seed)
    hg, hb = torch.linalg.solve(h, g), torch.linalg.solve(h, b)
    for length in (1.0, 7.3, 200.0, 1000.0):
        x, m = cpo_step(g, b, hg, hb, c, length)
        x_ref, m_ref = cpo_step(g, length * b, hg, length * hb, c, 1.0)
        assert torch.equal(x, x_ref)
        assert m["cpo/cost_scale"].item() == pytest.approx(length) and m_ref["cpo/cost_scale"].item() == 1.0
        assert all(torch.equal(m[k], m_ref[k]) for k in m if k != "cpo/cost_scale")


@pytest.mark.parametrize("c", [-1.0, -0.01, 0.0, 0.3])
def test_unit_episode_length_and_omnisafe_units_keep_the_unscaled_step(c: float) -> None:
    """T = 1, or omnisafe_units=True with any T, is the step of the unscaled b (OmniSafe's units)."""
    h, g, b = _problem(5, 11)
    hg, hb = torch.linalg.solve(h, g), torch.linalg.solve(h, b)
    x1, m1 = cpo_step(g, b, hg, hb, c, 1.0)
    for length in (3.0, 200.0):
        x, m = cpo_step(g, b, hg, hb, c, length, omnisafe_units=True)
        assert torch.equal(x, x1) and all(torch.equal(m[k], m1[k]) for k in m1)
    # the unscaled s and r, exactly as b enters
    assert m1["cpo/s"].item() == pytest.approx(float(b @ hb), rel=1e-6)
    assert m1["cpo/cost_scale"].item() == 1.0


def test_consistent_units_reach_the_dual_cases_near_the_limit() -> None:
    # H = I (2-D), delta = 0.01 (trust region: |x|^2 <= 0.02), g = (1, 1), per-sample cost gradient
    # b = (0, 0.01), episodes of T = 200 steps: the linearized constraint is c + 200 b^T x = c + 2 x2 <= 0.
    #   Consistent units: b' = T b = (0, 2); q = 2, r = 2, s = 4, A = q - r^2/s = 1.
    #   c = -0.1 (J_c 0.1 under d): B = 0.02 - 0.01/4 = 0.0175 >= 0 -> case 2: maximize x1 + x2 on the
    #     disk with x2 <= 0.05 -> x = (sqrt(0.0175), 0.05); lambda = sqrt(A/B), nu = (lambda c + r)/s.
    #   c = +0.05 (J_c 0.05 over d): B = 0.02 - 0.0025/4 = 0.019375 >= 0 -> case 1: x2 <= -0.025 ->
    #     x = (sqrt(0.019375), -0.025).
    #   Per-sample units (omnisafe_units): s = 1e-4, so c^2/s = 100 and 25 > 2 delta: B < 0 in both, and
    #     the steps are TRPO's (case 3, x = sqrt(2 delta / q) g = (0.1, 0.1)) and a pure recovery
    #     (case 0, x = -sqrt(2 delta / s) b ~ (0, -sqrt(0.02))).
    g = torch.tensor([1.0, 1.0], dtype=D)
    b = torch.tensor([0.0, 0.01], dtype=D)
    x, m = cpo_step(g, b, g, b, -0.1, 200.0, target_kl=0.01)
    assert m["cpo/optim_case"].item() == 2
    assert m["cpo/B"].item() == pytest.approx(0.0175, rel=1e-6)
    assert m["cpo/lambda"].item() == pytest.approx(math.sqrt(1 / 0.0175), rel=1e-6)
    assert m["cpo/nu"].item() == pytest.approx((-0.1 * math.sqrt(1 / 0.0175) + 2) / 4, rel=1e-6)
    # (the 1e-8 guards move the step by ~3e-8 here)
    torch.testing.assert_close(x, torch.tensor([math.sqrt(0.0175), 0.05], dtype=D), atol=1e-6, rtol=0)
    x, m = cpo_step(g, b, g, b, 0.05, 200.0, target_kl=0.01)
    assert m["cpo/optim_case"].item() == 1
    torch.testing.assert_close(x, torch.tensor([math.sqrt(0.019375), -0.025], dtype=D), atol=1e-6, rtol=0)

    x, m = cpo_step(g, b, g, b, -0.1, 200.0, target_kl=0.01, omnisafe_units=True)
    assert m["cpo/optim_case"].item() == 3
    torch.testing.assert_close(x, torch.tensor([0.1, 0.1], dtype=D), atol=1e-6, rtol=0)
    x, m = cpo_step(g, b, g, b, 0.05, 200.0, target_kl=0.01, omnisafe_units=True)
    assert m["cpo/optim_case"].item() == 0
    recovery = -math.sqrt(0.02 / (1e-4 + 1e-8)) * 0.01  # s + eps: the guard is 1e-4 of s here
    torch.testing.assert_close(x, torch.tensor([0.0, recovery], dtype=D), atol=1e-12, rtol=0)


def test_episode_length_must_be_positive_and_finite() -> None:
    g = torch.ones(3, dtype=D)
    for bad in (0.0, -5.0, float("nan"), float("inf")):
        with pytest.raises(InvalidInputError, match="episode_length"):
            cpo_step(g, g, g, g, -1.0, bad)
