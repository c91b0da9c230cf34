"""CPO's control-side update: flat parameters, the Fisher-vector product and the line search (card A4)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.distributions import kl_divergence
from torch.func import functional_call

from tether.control.policy import CategoricalActor, GaussianActor
from tether.control.trust_region import (
    cpo_update,
    fisher_vector_product,
    flat_grad,
    flat_params,
    set_flat_params,
)
from tether.errors import InvalidInputError

D = torch.float64
Closures = tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor], Callable[[], torch.Tensor]]


def _gaussian(seed: int = 0, hidden: tuple[int, ...] = (3,)) -> tuple[GaussianActor, torch.Tensor, Closures]:
    """A tiny Gaussian policy (14 parameters), a batch it sampled, advantages and the three closures."""
    torch.manual_seed(seed)
    actor = GaussianActor(2, 1, hidden=hidden).to(D)
    obs = torch.randn(64, 2, dtype=D)
    with torch.no_grad():
        old = actor.distribution(obs)
        old = torch.distributions.Normal(old.loc.clone(), old.scale.clone())
        act = old.sample()
        old_logp = old.log_prob(act).sum(-1)
    adv = torch.randn(64, dtype=D)
    adv_c = torch.randn(64, dtype=D)

    def ratio() -> torch.Tensor:
        return torch.exp(actor.log_prob(actor.distribution(obs), act) - old_logp)

    def surrogate() -> torch.Tensor:
        return (ratio() * adv).mean()

    def cost_surrogate() -> torch.Tensor:
        return (ratio() * adv_c).mean()

    def kl() -> torch.Tensor:
        return kl_divergence(old, actor.distribution(obs)).sum(-1).mean()

    return actor, obs, (surrogate, cost_surrogate, kl)


def _explicit_hessian(
    actor: torch.nn.Module, kl_of: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
) -> torch.Tensor:
    names = [n for n, _ in actor.named_parameters()]
    shapes = [p.shape for _, p in actor.named_parameters()]
    sizes = [p.numel() for _, p in actor.named_parameters()]

    def f(theta: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(theta, sizes)
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return kl_of(actor, params)

    hess = torch.autograd.functional.hessian(f, flat_params(actor))
    assert isinstance(hess, torch.Tensor)
    return hess


def _gaussian_kl_of(obs: torch.Tensor, old: torch.distributions.Normal) -> Callable[..., torch.Tensor]:
    def kl_of(actor: torch.nn.Module, params: dict[str, torch.Tensor]) -> torch.Tensor:
        mean = functional_call(
            actor.net, {k[4:]: v for k, v in params.items() if k.startswith("net.")}, (obs,)
        )
        std = params["log_std"].expand_as(mean).exp()
        return kl_divergence(old, torch.distributions.Normal(mean, std)).sum(-1).mean()

    return kl_of


def test_flat_params_round_trip_and_flat_grad() -> None:
    actor, _, (surrogate, _, _) = _gaussian()
    theta = flat_params(actor)
    assert theta.shape == (sum(p.numel() for p in actor.parameters()),)
    set_flat_params(actor, theta + 1.0)
    torch.testing.assert_close(flat_params(list(actor.parameters())), theta + 1.0)
    set_flat_params(actor, theta)
    params = list(actor.parameters())
    g = flat_grad(surrogate(), params)
    manual = torch.autograd.grad(surrogate(), params)
    torch.testing.assert_close(g, torch.cat([m.reshape(-1) for m in manual]))
    with pytest.raises(InvalidInputError, match="entries"):
        set_flat_params(actor, theta[:-1])
    unused = torch.nn.Parameter(torch.ones(2, dtype=D))
    assert flat_grad(surrogate(), [*params, unused])[-2:].abs().max() == 0


@pytest.mark.parametrize("perturb", [0.0, 0.3])
def test_fisher_vector_product_matches_explicit_hessian(perturb: float) -> None:
    actor, obs, (_, _, kl) = _gaussian(seed=1)
    with torch.no_grad():
        d = actor.distribution(obs)
        old = torch.distributions.Normal(d.loc.clone(), d.scale.clone())
    # the closure's old distribution is the same as `old`; move away from it to test H off theta_old too
    set_flat_params(actor, flat_params(actor) + perturb * torch.randn(flat_params(actor).shape, dtype=D))
    hess = _explicit_hessian(actor, _gaussian_kl_of(obs, old))
    damping = 0.1
    fvp = fisher_vector_product(kl, list(actor.parameters()), damping)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(hess.shape[0], generator=gen, dtype=D)
        torch.testing.assert_close(fvp(v), hess @ v + damping * v, atol=1e-5, rtol=1e-5)
    if perturb == 0.0:  # the Fisher matrix is positive semi-definite
        assert torch.linalg.eigvalsh(hess).min() > -1e-10


def _hinv_g(actor: GaussianActor, closures: Closures, damping: float = 0.1) -> torch.Tensor:
    surrogate, _, kl = closures
    params = list(actor.parameters())
    fvp = fisher_vector_product(kl, params, damping)
    n = sum(p.numel() for p in params)
    h = torch.stack([fvp(e) for e in torch.eye(n, dtype=D)], 1)
    return torch.linalg.solve(h, flat_grad(surrogate(), params))


def test_inactive_constraint_takes_the_trpo_natural_gradient_direction() -> None:
    actor, _, closures = _gaussian(seed=2)
    surrogate, cost_surrogate, kl = closures
    theta_old = flat_params(actor)
    natural = _hinv_g(actor, closures)
    with torch.no_grad():
        before = float(surrogate())
    m = cpo_update(
        list(actor.parameters()),
        surrogate,
        cost_surrogate,
        kl,
        mean_episode_cost=0.0,
        cost_limit=1e6,
        episode_length=1.0,
    )
    assert m["cpo/optim_case"] == 3 and m["cpo/nu"] == 0
    delta = flat_params(actor) - theta_old
    assert delta.abs().max() > 0 and m["cpo/accepted_step"] > 0
    cosine = float(torch.dot(delta, natural) / (delta.norm() * natural.norm()))
    assert cosine > 0.999
    with torch.no_grad():
        assert float(kl()) <= 0.01 + 1e-6
        assert float(surrogate()) >= before
    with torch.no_grad():
        assert m["cpo/kl"] == pytest.approx(float(kl()))
        assert m["cpo/surrogate_improvement"] == pytest.approx(float(surrogate()) - before)


@pytest.mark.parametrize("seed", range(3))
def test_update_stays_in_trust_region_and_changes_params(seed: int) -> None:
    actor, _, (surrogate, cost_surrogate, kl) = _gaussian(seed=seed, hidden=(8,))
    theta_old = flat_params(actor)
    m = cpo_update(
        list(actor.parameters()),
        surrogate,
        cost_surrogate,
        kl,
        mean_episode_cost=24.0,
        cost_limit=25.0,
        episode_length=1.0,
    )
    assert not torch.equal(flat_params(actor), theta_old)
    with torch.no_grad():
        assert float(kl()) <= 0.01 + 1e-6
    assert 0 < m["cpo/accepted_step"] <= 1
    assert m["cpo/cost_surrogate_change"] <= 1.0 + 1e-12  # max(-c, 0) with c = -1
    assert m["cpo/accepted_step"] == pytest.approx(0.8 ** m["cpo/backtracks"])


def test_infeasible_update_decreases_the_cost_surrogate() -> None:
    actor, _, (surrogate, cost_surrogate, kl) = _gaussian(seed=3)
    with torch.no_grad():
        cost_before = float(cost_surrogate())
    m = cpo_update(
        list(actor.parameters()),
        surrogate,
        cost_surrogate,
        kl,
        mean_episode_cost=1e4,
        cost_limit=25.0,
        episode_length=1.0,
    )
    assert m["cpo/optim_case"] == 0 and m["cpo/accepted_step"] > 0
    with torch.no_grad():
        assert float(cost_surrogate()) < cost_before
        assert float(kl()) <= 0.01 + 1e-6
    assert m["cpo/cost_surrogate_change"] < 0


def test_no_acceptable_step_restores_params_exactly() -> None:
    actor, _, (surrogate, cost_surrogate, kl) = _gaussian(seed=4)
    theta_old = flat_params(actor)

    # A constant offset leaves the Fisher product unchanged but makes every candidate's KL exceed
    # target_kl. (A tiny target_kl alone is not enough: with damping the model overestimates the KL,
    # so the full step is accepted.)
    def kl_with_offset() -> torch.Tensor:
        return kl() + 1e-3

    m = cpo_update(
        list(actor.parameters()),
        surrogate,
        cost_surrogate,
        kl_with_offset,
        0.0,
        25.0,
        episode_length=1.0,
        target_kl=1e-4,
    )
    assert torch.equal(flat_params(actor), theta_old)
    assert m["cpo/accepted_step"] == 0 and m["cpo/backtracks"] == 15
    assert m["cpo/kl"] == 0 and m["cpo/surrogate_improvement"] == 0


def test_tiny_target_kl_takes_a_tiny_step() -> None:
    actor, _, (surrogate, cost_surrogate, kl) = _gaussian(seed=5)
    cpo_update(
        list(actor.parameters()),
        surrogate,
        cost_surrogate,
        kl,
        0.0,
        25.0,
        episode_length=1.0,
        target_kl=1e-12,
    )
    with torch.no_grad():
        assert float(kl()) <= 1e-12 + 1e-15


def test_categorical_policy() -> None:
    torch.manual_seed(6)
    actor = CategoricalActor(3, 4, hidden=(8,)).to(D)
    obs = torch.randn(128, 3, dtype=D)
    with torch.no_grad():
        old = torch.distributions.Categorical(logits=actor.distribution(obs).logits.clone())
        act = old.sample()
        old_logp = old.log_prob(act)
    adv, adv_c = torch.randn(128, dtype=D), torch.randn(128, dtype=D)

    def ratio() -> torch.Tensor:
        return torch.exp(actor.log_prob(actor.distribution(obs), act) - old_logp)

    def kl() -> torch.Tensor:
        return kl_divergence(old, actor.distribution(obs)).mean()

    theta_old = flat_params(actor)
    m = cpo_update(
        list(actor.parameters()),
        lambda: (ratio() * adv).mean(),
        lambda: (ratio() * adv_c).mean(),
        kl,
        mean_episode_cost=20.0,
        cost_limit=25.0,
        episode_length=1.0,
    )
    assert not torch.equal(flat_params(actor), theta_old)
    with torch.no_grad():
        assert float(kl()) <= 0.01 + 1e-6
    assert all(isinstance(v, float) for v in m.values())
    expected = {"cpo/optim_case", "cpo/lambda", "cpo/nu", "cpo/q", "cpo/r", "cpo/s", "cpo/cost_excess"}
    assert expected | {"cpo/accepted_step", "cpo/kl", "cpo/backtracks"} <= set(m)
    assert m["cpo/cost_excess"] == -5.0


def _quadratic_problem(kappa: float = 1.0) -> tuple[list[torch.nn.Parameter], Closures]:
    """theta in R^2 from 0; reward surrogate g.theta with g = (1, 1); per-sample cost surrogate
    b.theta + kappa/2 |theta|^2 with b = (0.01, -0.01), orthogonal to g; KL = |theta|^2 / 2, so with
    cg_damping = 0 the Fisher matrix is exactly I."""
    theta = torch.nn.Parameter(torch.zeros(2, dtype=D))
    g = torch.tensor([1.0, 1.0], dtype=D)
    b = torch.tensor([0.01, -0.01], dtype=D)
    return [theta], (
        lambda: g @ theta,
        lambda: b @ theta + 0.5 * kappa * (theta @ theta),
        lambda: 0.5 * (theta @ theta),
    )


def test_line_search_checks_the_cost_change_times_the_episode_length() -> None:
    # J_c = 24.95, d = 25: c = -0.05, room 0.05 under the limit. T = 8: b' = 8 b, s = 0.0128,
    # c^2/s = 0.195 > 2 delta -> case 3, x = sqrt(2 delta / q) g = (0.1, 0.1). The surrogate's change at
    # the fraction f of x is b.(f x) + f^2 |x|^2 / 2 = 0.01 f^2 (b is orthogonal to x); times T = 0.08 f^2:
    # f = 1 -> 0.08 and f = 0.8 -> 0.0512 exceed 0.05; f = 0.64 -> 0.0328 is accepted after 2 backtracks.
    # Unscaled (T = 1, or omnisafe_units) the change 0.01 fits at once.
    params, (surrogate, cost_surrogate, kl) = _quadratic_problem()
    m = cpo_update(params, surrogate, cost_surrogate, kl, 24.95, 25.0, episode_length=8.0, cg_damping=0.0)
    assert m["cpo/optim_case"] == 3 and m["cpo/cost_scale"] == 8.0
    assert m["cpo/backtracks"] == 2 and m["cpo/accepted_step"] == pytest.approx(0.64)
    assert m["cpo/cost_surrogate_change"] == pytest.approx(8 * 0.01 * 0.64**2, rel=1e-6)
    torch.testing.assert_close(params[0].detach(), torch.tensor([0.064, 0.064], dtype=D), atol=1e-9, rtol=0)
    for kwargs in ({"episode_length": 1.0}, {"episode_length": 8.0, "omnisafe_units": True}):
        params, (surrogate, cost_surrogate, kl) = _quadratic_problem()
        m = cpo_update(params, surrogate, cost_surrogate, kl, 24.95, 25.0, cg_damping=0.0, **kwargs)  # type: ignore[arg-type]
        assert m["cpo/optim_case"] == 3 and m["cpo/cost_scale"] == 1.0
        assert m["cpo/backtracks"] == 0 and m["cpo/cost_surrogate_change"] == pytest.approx(0.01, rel=1e-6)


@pytest.mark.parametrize("mean_cost", [0.0, 24.9, 25.0, 25.1, 60.0])
def test_episode_length_is_the_authors_rescale_of_the_cost_surrogate(mean_cost: float) -> None:
    """cpo_update with T equals cpo_update on T * the cost surrogate with T = 1 (the authors' code scales
    the surrogate itself), to the bit: T = 8, a power of two, scales every float exactly."""
    results = []
    for scale, length in ((1.0, 8.0), (8.0, 1.0)):
        actor, _, (surrogate, cost_surrogate, kl) = _gaussian(seed=7)
        m = cpo_update(
            list(actor.parameters()),
            surrogate,
            lambda cost_surrogate=cost_surrogate, scale=scale: scale * cost_surrogate(),
            kl,
            mean_cost,
            25.0,
            episode_length=length,
        )
        results.append((flat_params(actor), m))
    (theta_a, m_a), (theta_b, m_b) = results
    assert torch.equal(theta_a, theta_b)
    assert {k: v for k, v in m_a.items() if k != "cpo/cost_scale"} == {
        k: v for k, v in m_b.items() if k != "cpo/cost_scale"
    }
    assert m_a["cpo/cost_scale"] == 8.0 and m_b["cpo/cost_scale"] == 1.0


def test_unit_episode_length_equals_omnisafe_units() -> None:
    """T = 1 and omnisafe_units=True (any T) give the unscaled update, to the bit."""
    results = []
    for kwargs in ({"episode_length": 1.0}, {"episode_length": 173.0, "omnisafe_units": True}):
        actor, _, (surrogate, cost_surrogate, kl) = _gaussian(seed=8)
        m = cpo_update(list(actor.parameters()), surrogate, cost_surrogate, kl, 24.99, 25.0, **kwargs)  # type: ignore[arg-type]
        results.append((flat_params(actor), m))
    assert torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1]


def test_bad_arguments() -> None:
    actor, _, (surrogate, cost_surrogate, kl) = _gaussian()
    params = list(actor.parameters())
    with pytest.raises(InvalidInputError, match="backtrack_coeff"):
        cpo_update(params, surrogate, cost_surrogate, kl, 0.0, 1.0, episode_length=1.0, backtrack_coeff=1.5)
    with pytest.raises(InvalidInputError, match="mean_episode_cost"):
        cpo_update(params, surrogate, cost_surrogate, kl, float("nan"), 1.0, episode_length=1.0)
    with pytest.raises(InvalidInputError, match="empty"):
        cpo_update([], surrogate, cost_surrogate, kl, 0.0, 1.0, episode_length=1.0)
    with pytest.raises(InvalidInputError, match="episode_length"):
        cpo_update(params, surrogate, cost_surrogate, kl, 0.0, 1.0, episode_length=0.0)
    with pytest.raises(InvalidInputError, match="damping"):
        fisher_vector_product(kl, params, -1.0)
