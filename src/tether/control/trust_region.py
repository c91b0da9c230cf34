"""Trust-region policy updates for the control world: flat parameters, Fisher products and CPO's update.

The math of the step lives in the catalogue (:func:`tether.catalogue.constraints.cpo.cpo_step`); this
module supplies what needs the policy: flat gradients, the Fisher-vector product (the Hessian of the
mean KL by double backprop), the conjugate-gradient solves and OmniSafe's backtracking line search.
Callers pass zero-argument closures that evaluate the surrogates and the KL at the module's CURRENT
parameters, so the same closures serve before the step and inside the line search.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from tether.catalogue.constraints.cpo import conjugate_gradient, cost_surrogate_scale, cpo_step
from tether.errors import InvalidInputError

ParamsLike = nn.Module | Iterable[torch.Tensor]
Closure = Callable[[], torch.Tensor]


def _param_list(module: ParamsLike) -> list[torch.Tensor]:
    params: list[torch.Tensor] = list(module.parameters()) if isinstance(module, nn.Module) else list(module)
    if not params:
        raise InvalidInputError("no parameters given; pass the policy module or a non-empty parameter list")
    return params


def flat_params(module: ParamsLike) -> torch.Tensor:
    """All parameters of ``module`` (or of a parameter list) as one detached flat vector, in order."""
    return torch.cat([p.detach().reshape(-1) for p in _param_list(module)])


def set_flat_params(module: ParamsLike, flat: torch.Tensor) -> None:
    """Copy the flat vector ``flat`` back into the parameters (the inverse of :func:`flat_params`)."""
    params = _param_list(module)
    total = sum(p.numel() for p in params)
    if flat.dim() != 1 or flat.numel() != total:
        raise InvalidInputError(
            f"set_flat_params: flat must be a 1-D vector with {total} entries (one per parameter "
            f"element), got shape {tuple(flat.shape)}; build it with flat_params on the same module"
        )
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(flat[offset : offset + n].view_as(p))
            offset += n


def flat_grad(
    scalar: torch.Tensor,
    params: Sequence[torch.Tensor],
    retain_graph: bool = False,
    create_graph: bool = False,
) -> torch.Tensor:
    """d scalar / d params as one flat vector; parameters the scalar does not depend on get zeros.

    As in ``torch.autograd.grad``, ``create_graph=True`` also keeps the graph (needed to differentiate
    the result again).
    """
    if scalar.dim() != 0 and scalar.numel() != 1:
        raise InvalidInputError(f"flat_grad: expected a scalar, got shape {tuple(scalar.shape)}")
    grads = torch.autograd.grad(
        scalar.reshape(()),
        list(params),
        retain_graph=retain_graph or create_graph,
        create_graph=create_graph,
        allow_unused=True,
    )
    return torch.cat(
        [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params, strict=True)]
    )


def fisher_vector_product(
    kl_fn: Closure, params: Sequence[torch.Tensor], damping: float
) -> Callable[[torch.Tensor], torch.Tensor]:
    """v -> (H + damping I) v, with H the Hessian of the mean KL(pi_old || pi_theta) at the current params.

    ``kl_fn()`` returns the mean KL as a differentiable scalar of ``params`` (pi_old detached). Its
    gradient is taken once with ``create_graph=True``; each product is then one more backward pass
    through (grad KL)^T v (Pearlmutter's trick, as in OmniSafe's ``NaturalPG._fvp``). At
    theta = theta_old, H is the Fisher information matrix of the policy.
    """
    if damping < 0 or not math.isfinite(damping):
        raise InvalidInputError(f"fisher_vector_product: damping must be finite and >= 0, got {damping}")
    params = list(params)
    kl = kl_fn()
    grad_kl = flat_grad(kl, params, create_graph=True)

    def product(v: torch.Tensor) -> torch.Tensor:
        if v.shape != grad_kl.shape:
            raise InvalidInputError(
                f"fisher_vector_product: v must have shape {tuple(grad_kl.shape)}, got {tuple(v.shape)}"
            )
        gv = torch.dot(grad_kl, v.detach().to(grad_kl.dtype))
        if not gv.requires_grad:  # KL independent of params: H = 0
            return damping * v.detach()
        hv = flat_grad(gv, params, retain_graph=True)
        return hv.detach() + damping * v.detach()

    return product


def cpo_update(
    params: list[nn.Parameter],
    surrogate_fn: Closure,
    cost_surrogate_fn: Closure,
    kl_fn: Closure,
    mean_episode_cost: float,
    cost_limit: float,
    *,
    episode_length: float,
    target_kl: float = 0.01,
    cg_iters: int = 15,
    cg_damping: float = 0.1,
    backtrack_iters: int = 15,
    backtrack_coeff: float = 0.8,
    omnisafe_dual: bool = False,
    omnisafe_units: bool = False,
) -> dict[str, float]:
    """One CPO policy update in place (Achiam et al. 2017, arXiv 1705.10528; OmniSafe's ``CPO._update_actor``).

    1. g = grad of ``surrogate_fn()`` (reward surrogate to maximize, e.g. mean(ratio * A)), b = grad of
       ``cost_surrogate_fn()`` (the per-sample mean(ratio * A_C)), both at the current params.
    2. H^-1 g and H^-1 b by ``cg_iters`` conjugate-gradient steps on the Fisher product of ``kl_fn``
       (damping ``cg_damping``).
    3. c = ``mean_episode_cost`` - ``cost_limit`` (OmniSafe's ``ep_costs``); the step x and the optim
       case come from :func:`cpo_step`, which multiplies b and H^-1 b by the scale
       :func:`cost_surrogate_scale` = T = ``episode_length`` (the mean length of the episodes that gave
       ``mean_episode_cost``; the authors' ``safety_rescale``), or by 1 with ``omnisafe_units=True``
       (OmniSafe's units, this function's behaviour before the rescale).
    4. Backtracking line search over theta_old + 0.8^k x, k = 0 .. ``backtrack_iters`` - 1: accept the
       first candidate whose KL(pi_old || pi_new) is finite and <= ``target_kl``, whose cost-surrogate
       change times the same scale is <= max(-c, 0) (the predicted change of J_c against the room
       left under the limit), and (optim cases 2, 3, 4 only) whose reward surrogate did not decrease.
       If none is accepted the old parameters are restored exactly.

    ``kl_fn`` must close over the old policy's distribution (detached) and evaluate the current one, so
    it is ~0 before the update. Returns floats: the ``cpo_step`` metrics plus ``cpo/accepted_step``
    (the fraction 0.8^k of x taken, 0 if rejected), ``cpo/kl``, ``cpo/surrogate_improvement`` and
    ``cpo/cost_surrogate_change`` (times the scale: episode-cost units) at the final parameters (0 when
    rejected), ``cpo/backtracks`` (k, or ``backtrack_iters`` when nothing was accepted),
    ``cpo/expected_improvement`` (g^T x) and ``cpo/step_norm``.
    """
    params = list(params)
    if not params:
        raise InvalidInputError("cpo_update: params is empty; pass the actor's parameters")
    if cg_iters < 1 or backtrack_iters < 1:
        raise InvalidInputError(
            f"cpo_update: cg_iters and backtrack_iters must be >= 1, got {cg_iters}, {backtrack_iters}"
        )
    if not 0 < backtrack_coeff < 1:
        raise InvalidInputError(
            f"cpo_update: backtrack_coeff must be in (0, 1) (OmniSafe: 0.8), got {backtrack_coeff}"
        )
    for name, value in (("mean_episode_cost", mean_episode_cost), ("cost_limit", cost_limit)):
        if not math.isfinite(float(value)):
            raise InvalidInputError(f"cpo_update: {name} must be finite, got {value}")

    cost_scale = cost_surrogate_scale(episode_length, omnisafe_units)  # refuses T <= 0 before any work
    theta_old = flat_params(params)

    surrogate = surrogate_fn()
    g = flat_grad(surrogate, params)
    surrogate_before = float(surrogate.detach())
    cost_surrogate = cost_surrogate_fn()
    b = flat_grad(cost_surrogate, params)
    cost_surrogate_before = float(cost_surrogate.detach())

    fvp = fisher_vector_product(kl_fn, params, cg_damping)
    hinv_g = conjugate_gradient(fvp, g, iters=cg_iters)
    hinv_b = conjugate_gradient(fvp, b, iters=cg_iters)
    del fvp  # frees the retained double-backprop graph

    cost_excess = float(mean_episode_cost) - float(cost_limit)
    step, step_metrics = cpo_step(
        g,
        b,
        hinv_g,
        hinv_b,
        cost_excess,
        episode_length,
        target_kl=target_kl,
        omnisafe_dual=omnisafe_dual,
        omnisafe_units=omnisafe_units,
    )
    optim_case = int(step_metrics["cpo/optim_case"].item())
    allowed_cost_change = max(-cost_excess, 0.0)

    accepted_frac, backtracks = 0.0, backtrack_iters
    kl_value = improvement = cost_change = 0.0
    frac = 1.0
    with torch.no_grad():
        for k in range(backtrack_iters):
            set_flat_params(params, theta_old + frac * step)
            new_surrogate = float(surrogate_fn())
            new_cost = float(cost_surrogate_fn())
            kl = float(kl_fn())
            d_reward = new_surrogate - surrogate_before
            d_cost = cost_scale * (new_cost - cost_surrogate_before)
            finite = all(math.isfinite(v) for v in (new_surrogate, new_cost, kl))
            reward_ok = d_reward >= 0 or optim_case <= 1
            if finite and reward_ok and d_cost <= allowed_cost_change and kl <= target_kl:
                accepted_frac, backtracks = frac, k
                kl_value, improvement, cost_change = kl, d_reward, d_cost
                break
            frac *= backtrack_coeff
        else:
            set_flat_params(params, theta_old)

    out = {key: float(value.item()) for key, value in step_metrics.items()}
    out.update(
        {
            "cpo/accepted_step": accepted_frac,
            "cpo/kl": kl_value,
            "cpo/surrogate_improvement": improvement,
            "cpo/cost_surrogate_change": cost_change,
            "cpo/backtracks": float(backtracks),
            "cpo/expected_improvement": float(torch.dot(g, step)),
            "cpo/step_norm": float(step.norm()),
        }
    )
    return out
