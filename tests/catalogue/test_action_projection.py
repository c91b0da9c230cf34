"""Card properties of the safety layer's action projection (control card A5, Dalal et al. 2018)."""

from __future__ import annotations

import itertools

import pytest
import torch

from tether.catalogue import get
from tether.catalogue.constraints.projection import action_projection, least_distance_multipliers, nnls
from tether.errors import InvalidInputError

D = torch.float64
SOLVERS = ["closed_form", "qp"]


def _random_problem(
    seed: int, batch: int, k: int, action_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(batch, action_dim, generator=gen, dtype=D)
    grads = torch.randn(batch, k, action_dim, generator=gen, dtype=D)
    values = torch.randn(batch, k, generator=gen, dtype=D)
    return mu, grads, values


def _predicted(actions: torch.Tensor, grads: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return (grads @ actions.unsqueeze(-1)).squeeze(-1) + values


def test_registered_with_card_defaults() -> None:
    entry = get("constraint", "action_projection")
    assert entry.fn is action_projection
    assert (entry.arxiv, entry.status, entry.card) == ("1801.08757", "exact", "control#A5")
    assert entry.inputs == ("actions", "constraint_gradients", "constraint_values")
    h = entry.hyperparameters
    assert (h["limits"], h["solver"], h["low"], h["high"]) == (0.0, "closed_form", None, None)


@pytest.mark.parametrize("solver", SOLVERS)
def test_feasible_mu_is_unchanged(solver: str) -> None:
    mu, grads, values = _random_problem(0, 64, 3, 2)
    # Shift the values so every mu satisfies every constraint with some slack (limit 0).
    values = values - _predicted(mu, grads, values).clamp(min=0) - torch.rand(64, 3, dtype=D)
    assert (_predicted(mu, grads, values) < 0).all()
    out, metrics = action_projection(mu, grads, values, solver=solver)  # type: ignore[arg-type]
    assert torch.equal(out, mu)
    assert metrics["projection/changed_frac"].item() == 0.0
    assert metrics["projection/correction_norm"].item() == 0.0
    assert metrics["projection/max_violation"].item() == 0.0


@pytest.mark.parametrize("solver", SOLVERS)
def test_single_constraint_is_satisfied_and_projection_idempotent(solver: str) -> None:
    mu, grads, values = _random_problem(1, 256, 1, 3)
    limits = 0.3
    out, metrics = action_projection(mu, grads, values, limits=limits, solver=solver)  # type: ignore[arg-type]
    assert (_predicted(out, grads, values) - limits).max().item() <= 1e-6
    assert metrics["projection/max_violation"].item() <= 1e-6
    violated = _predicted(mu, grads, values) > limits
    assert metrics["projection/changed_frac"].item() == pytest.approx(violated.double().mean().item())
    # Violated constraints end up active (on the boundary): the nearest feasible point.
    torch.testing.assert_close(
        _predicted(out, grads, values)[violated], torch.full_like(values[violated], limits)
    )
    again, _ = action_projection(out, grads, values, limits=limits, solver=solver)  # type: ignore[arg-type]
    torch.testing.assert_close(again, out, atol=1e-9, rtol=0)


def test_several_constraints_with_qp_are_satisfied_and_idempotent() -> None:
    mu, grads, values = _random_problem(2, 256, 3, 4)  # K <= A: always jointly feasible
    limits = torch.tensor([0.0, 0.5, -0.2], dtype=D)
    out, metrics = action_projection(mu, grads, values, limits=limits, solver="qp")
    assert (_predicted(out, grads, values) - limits).max().item() <= 1e-6
    assert metrics["projection/infeasible_frac"].item() == 0.0
    again, _ = action_projection(out, grads, values, limits=limits, solver="qp")
    torch.testing.assert_close(again, out, atol=1e-9, rtol=0)


def test_closed_form_equals_qp_with_one_constraint() -> None:
    mu, grads, values = _random_problem(3, 200, 1, 5)
    closed, _ = action_projection(mu, grads, values, limits=0.1)
    qp, _ = action_projection(mu, grads, values, limits=0.1, solver="qp")
    torch.testing.assert_close(closed, qp, atol=1e-10, rtol=0)


def test_hand_computed_two_dimensional_examples() -> None:
    # One constraint: mu = (1, 1), g = (1, 0), c = 0.5, C = 1 -> lambda = (1 + 0.5 - 1) / 1 = 0.5.
    mu = torch.tensor([[1.0, 1.0]], dtype=D)
    out, metrics = action_projection(
        mu, torch.tensor([[[1.0, 0.0]]], dtype=D), torch.tensor([[0.5]], dtype=D), 1.0
    )
    torch.testing.assert_close(out, torch.tensor([[0.5, 1.0]], dtype=D))
    assert metrics["projection/correction_norm"].item() == pytest.approx(0.5)
    # Diagonal gradient: mu = (1, 2), g = (1, 1), c = 0, C = 1 -> lambda = (3 - 1) / 2 = 1, a = (0, 1).
    out, _ = action_projection(
        torch.tensor([[1.0, 2.0]], dtype=D),
        torch.tensor([[[1.0, 1.0]]], dtype=D),
        torch.zeros(1, 1, dtype=D),
        1.0,
    )
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.0]], dtype=D))
    # Two active constraints a_1 <= 0.5, a_2 <= 0.25 from mu = (1, 1): the QP moves both coordinates;
    # the closed form picks the larger lambda (lambda_2 = 0.75 > lambda_1 = 0.5) and fixes only a_2.
    grads = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=D)
    limits = torch.tensor([0.5, 0.25], dtype=D)
    qp, qp_metrics = action_projection(mu, grads, torch.zeros(1, 2, dtype=D), limits, solver="qp")
    torch.testing.assert_close(qp, torch.tensor([[0.5, 0.25]], dtype=D))
    assert qp_metrics["projection/max_violation"].item() == pytest.approx(0.0, abs=1e-12)
    closed, closed_metrics = action_projection(mu, grads, torch.zeros(1, 2, dtype=D), limits)
    torch.testing.assert_close(closed, torch.tensor([[1.0, 0.25]], dtype=D))
    assert closed_metrics["projection/max_violation"].item() == pytest.approx(0.5)


def _brute_force(mu: torch.Tensor, grads: torch.Tensor, values: torch.Tensor) -> torch.Tensor | None:
    """The nearest feasible point by enumerating every active set (None when infeasible)."""
    k = grads.shape[0]
    best: tuple[float, torch.Tensor] | None = None
    for r in range(k + 1):
        for subset in itertools.combinations(range(k), r):
            idx = list(subset)
            x = mu
            if idx:
                g = grads[idx]
                try:
                    lam = torch.linalg.solve(g @ g.T, g @ mu + values[idx])
                except RuntimeError:
                    continue
                if bool((lam < -1e-12).any()):
                    continue
                x = mu - g.T @ lam
            if bool((grads @ x + values <= 1e-9 * (1.0 + float(x.norm()))).all()):
                dist = float((x - mu).norm())
                if best is None or dist < best[0]:
                    best = (dist, x)
    return None if best is None else best[1]


@pytest.mark.parametrize("seed", range(4))
def test_qp_matches_brute_force_and_kkt(seed: int) -> None:
    mu, grads, values = _random_problem(10 + seed, 60, 4, 3)  # K > A: some rows infeasible
    out, metrics = action_projection(mu, grads, values, solver="qp")
    infeasible = 0
    for b in range(mu.shape[0]):
        expected = _brute_force(mu[b], grads[b], values[b])
        if expected is None:
            infeasible += 1
            assert (
                least_distance_multipliers(grads[b].numpy(), (grads[b] @ mu[b] + values[b]).numpy()) is None
            )
            continue
        scale = 1.0 + float(expected.norm())  # nearly dependent constraints give huge corrections
        torch.testing.assert_close(out[b], expected, atol=1e-8 * scale, rtol=0)
        # KKT: primal feasibility, mu - a = G_A^T lambda_A with lambda_A >= 0 on the active set and
        # lambda_i = 0 on every inactive constraint (complementary slackness).
        slack = grads[b] @ out[b] + values[b]
        assert slack.max().item() <= 1e-8 * scale
        active = slack.abs() <= 1e-8 * scale
        if bool(active.any()):
            lam = torch.linalg.lstsq(grads[b][active].T, (mu[b] - out[b]).unsqueeze(-1)).solution.squeeze(-1)
            assert lam.min().item() >= -1e-8 * scale
            torch.testing.assert_close(grads[b][active].T @ lam, mu[b] - out[b], atol=1e-8 * scale, rtol=0)
        else:
            torch.testing.assert_close(out[b], mu[b])
    assert metrics["projection/infeasible_frac"].item() == pytest.approx(infeasible / mu.shape[0])


def test_nnls_against_projected_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    matrix = torch.randn(6, 4, generator=gen, dtype=D).numpy()
    target = torch.randn(6, generator=gen, dtype=D).numpy()
    u = nnls(matrix, target)
    assert (u >= 0).all()
    # KKT of NNLS: w = M^T (t - M u) <= 0, with w_j = 0 where u_j > 0.
    w = matrix.T @ (target - matrix @ u)
    assert w.max() <= 1e-10
    assert abs(w[u > 0]).max(initial=0.0) <= 1e-10


def test_box_clipping_and_zero_gradient_guard() -> None:
    mu = torch.tensor([[0.9, -0.9], [3.0, 0.0]], dtype=D)
    grads = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]], dtype=D)
    values = torch.tensor([[0.0, 0.0], [2.0, 0.0]], dtype=D)
    for solver in SOLVERS:
        out, metrics = action_projection(
            mu,
            grads,
            values,
            limits=torch.tensor([-2.0, 0.0], dtype=D),
            solver=solver,  # type: ignore[arg-type]
            low=-1.0,
            high=torch.tensor([1.0, 1.0], dtype=D),
        )
        assert torch.isfinite(out).all()
        # Row 0 asks for a_1 <= -2; the box stops it at -1, leaving a violation of 1.
        torch.testing.assert_close(out[0], torch.tensor([-1.0, -0.9], dtype=D))
        # Row 1: g = 0, nothing the action can do; only the box clip changes it.
        torch.testing.assert_close(out[1], torch.tensor([1.0, 0.0], dtype=D))
        assert metrics["projection/max_violation"].item() == pytest.approx(4.0)  # row 1: c = 2 vs -2


def test_jointly_infeasible_constraints_are_reported() -> None:
    # a <= -1 and -a <= -1 (a >= 1): no action satisfies both.
    mu = torch.zeros(1, 1, dtype=D)
    grads = torch.tensor([[[1.0], [-1.0]]], dtype=D)
    out, metrics = action_projection(mu, grads, torch.ones(1, 2, dtype=D), solver="qp")
    assert torch.isfinite(out).all()
    assert metrics["projection/infeasible_frac"].item() == 1.0
    assert metrics["projection/max_violation"].item() > 0


@pytest.mark.parametrize("solver", SOLVERS)
def test_gradient_is_the_projector_on_the_active_constraint(solver: str) -> None:
    g = torch.tensor([1.0, 2.0, -1.0], dtype=D)
    mu = torch.tensor([[1.0, 1.0, 0.0]], dtype=D, requires_grad=True)
    out, _ = action_projection(mu, g.view(1, 1, 3), torch.zeros(1, 1, dtype=D), solver=solver)  # type: ignore[arg-type]
    jac = torch.stack([torch.autograd.grad(out[0, i], mu, retain_graph=True)[0][0] for i in range(3)])
    projector = torch.eye(3, dtype=D) - torch.outer(g, g) / (g @ g)
    torch.testing.assert_close(jac, projector)


def test_float32_actions_and_per_sample_limits() -> None:
    mu, grads, values = _random_problem(5, 8, 2, 2)
    limits = torch.rand(8, 2, dtype=D)
    out, _ = action_projection(mu.float(), grads.float(), values.float(), limits=limits.float(), solver="qp")
    assert out.dtype == torch.float32
    assert (_predicted(out.double(), grads, values) - limits).max().item() <= 1e-4


def test_bad_inputs_raise_with_the_fix() -> None:
    mu, grads, values = _random_problem(6, 4, 2, 3)
    with pytest.raises(InvalidInputError, match="unsqueeze"):
        action_projection(mu[0], grads, values)
    with pytest.raises(InvalidInputError, match="constraint_gradients"):
        action_projection(mu, grads[:, :, :2], values)
    with pytest.raises(InvalidInputError, match="constraint_values"):
        action_projection(mu, grads, values[:, :1])
    with pytest.raises(InvalidInputError, match="limits"):
        action_projection(mu, grads, values, limits=torch.zeros(3, dtype=D))
    with pytest.raises(InvalidInputError, match="solver"):
        action_projection(mu, grads, values, solver="osqp")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="low must be <= high"):
        action_projection(mu, grads, values, low=1.0, high=-1.0)
    with pytest.raises(InvalidInputError, match="finite"):
        action_projection(mu, grads, values * float("nan"))
