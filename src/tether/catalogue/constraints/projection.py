"""Safety layer (Dalal et al. 2018): project an action onto linearized state constraints.

World-agnostic math. A caller holds, for every sample of a batch, the action mu proposed by some
policy, the current constraint values c_i(s) and a linear model of how the action changes them,
c_i(s') ~ c_i(s) + g_i(s)^T a (the gradients g_i come from a learned model; see
``tether.control.safety_layer``). :func:`action_projection` returns the nearest action (in Euclidean
norm) whose predicted next constraint values stay within the limits C_i.

Two solvers:

- ``"closed_form"``: the paper's solution under the assumption that at most one constraint is active,
  lambda_i = max(0, (g_i^T mu + c_i - C_i) / (g_i^T g_i)), i* = argmax_i lambda_i,
  a* = mu - lambda_{i*} g_{i*}. Differentiable in mu, g and c (the paper backpropagates through it).
- ``"qp"``: the exact projection with any number of active constraints,
  min_a 1/2 ||a - mu||^2 s.t. c_i + g_i^T a <= C_i for all i. Solved as a least-distance program
  through non-negative least squares (Lawson & Hanson, "Solving Least Squares Problems", ch. 23),
  which also detects jointly infeasible constraints. The multipliers of the active constraints are
  then recomputed in torch from the KKT system (G_A G_A^T) lambda_A = G_A mu + c_A - C_A, so the
  result carries the gradient of the exact solution with its active set held fixed.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from numpy.typing import NDArray

from tether.catalogue.contracts import Metrics, detached
from tether.catalogue.registry import register
from tether.errors import InvalidInputError

SAFETY_LAYER_PAPER = "Safe Exploration in Continuous Action Spaces"
SAFETY_LAYER_ARXIV = "1801.08757"

Solver = Literal["closed_form", "qp"]
BoundLike = float | int | torch.Tensor | None

FloatArray = NDArray[np.float64]


# ---------------------------------------------------------------------------------------------
# Non-negative least squares and the least-distance program (Lawson & Hanson)


def nnls(matrix: FloatArray, target: FloatArray, max_iter: int | None = None) -> FloatArray:
    """argmin_{u >= 0} ||matrix @ u - target||_2 by the Lawson-Hanson active-set algorithm.

    Exact (up to floating point) after finitely many steps; ``max_iter`` (default 3 * columns + 10)
    bounds the outer loop. Small dense problems only (a handful of constraints per action).
    """
    m, n = matrix.shape
    u = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    tol = (
        10.0 * np.finfo(np.float64).eps * max(1.0, float(np.abs(matrix).sum(0).max(initial=0.0))) * max(m, n)
    )
    limit = 3 * n + 10 if max_iter is None else max_iter
    for _ in range(limit):
        w = matrix.T @ (target - matrix @ u)
        candidates = np.where(~passive, w, -np.inf)
        j = int(np.argmax(candidates)) if n else 0
        if n == 0 or candidates[j] <= tol:
            break
        passive[j] = True
        while True:
            z = np.zeros(n)
            cols = np.flatnonzero(passive)
            z[cols] = np.linalg.lstsq(matrix[:, cols], target, rcond=None)[0]
            if bool(np.all(z[cols] > 0)):
                u = z
                break
            bad = cols[z[cols] <= 0]
            gap = u[bad] - z[bad]  # >= 0; 0 only when u_j = z_j = 0
            alpha = float(np.min(np.where(gap > 0, u[bad] / np.where(gap > 0, gap, 1.0), 0.0)))
            u = u + alpha * (z - u)
            passive &= u > tol
            u[~passive] = 0.0
            if not passive.any():
                break
    return u


def least_distance_multipliers(grads: FloatArray, violation: FloatArray) -> FloatArray | None:
    """Multipliers of min_x 1/2 ||x||^2 s.t. grads @ x <= -violation, or None when infeasible.

    With x = a - mu and violation_i = g_i^T mu + c_i - C_i this is the safety layer's QP. Least
    distance programming (Lawson & Hanson, ch. 23) with E = -grads, f = violation: solve
    u = NNLS([E^T; f^T], e_{n+1}); the residual's last entry is 1 - f^T u; it is 0 exactly when the
    constraints are jointly infeasible. Otherwise lambda = u / (1 - f^T u) and x = -grads^T lambda.
    """
    n = grads.shape[1]
    stacked = np.concatenate([-grads.T, violation[None, :]], axis=0)  # [n + 1, k]
    target = np.zeros(n + 1)
    target[-1] = 1.0
    u = nnls(stacked, target)
    denominator = 1.0 - float(violation @ u)
    if denominator <= 1e-12 * max(1.0, float(np.abs(u).sum())):
        return None
    return np.asarray(u / denominator, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Input checks


def _as_batch_tensor(
    name: str, value: float | int | torch.Tensor, shape: tuple[int, ...], like: torch.Tensor
) -> torch.Tensor:
    """A float or a tensor broadcastable to ``shape`` (e.g. [K] or [B, K] to [B, K])."""
    tensor = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    try:
        return tensor.expand(shape)
    except RuntimeError as exc:
        raise InvalidInputError(
            f"{name} has shape {tuple(tensor.shape)} and does not broadcast to {shape}; pass a float, "
            f"a [{shape[-1]}] tensor (one value per column) or a full {list(shape)} tensor"
        ) from exc


def _check_inputs(
    actions: torch.Tensor, constraint_gradients: torch.Tensor, constraint_values: torch.Tensor
) -> tuple[int, int, int]:
    if actions.dim() != 2:
        raise InvalidInputError(
            f"actions must be a [batch, action_dim] tensor, got shape {tuple(actions.shape)}; "
            "add a batch dimension with actions.unsqueeze(0) for a single action"
        )
    batch, action_dim = actions.shape
    if (
        constraint_gradients.dim() != 3
        or constraint_gradients.shape[0] != batch
        or (constraint_gradients.shape[2] != action_dim)
    ):
        raise InvalidInputError(
            f"constraint_gradients must be [batch, num_constraints, action_dim] = [{batch}, K, {action_dim}] "
            f"(one action-vector g_i(s) per constraint), got shape {tuple(constraint_gradients.shape)}"
        )
    k = constraint_gradients.shape[1]
    if constraint_values.shape != (batch, k):
        raise InvalidInputError(
            f"constraint_values must be [batch, num_constraints] = [{batch}, {k}] (c_i(s) of the current "
            f"states), got shape {tuple(constraint_values.shape)}"
        )
    if k == 0:
        raise InvalidInputError("action_projection needs at least one constraint (num_constraints >= 1)")
    return batch, k, action_dim


# ---------------------------------------------------------------------------------------------
# Solvers


def _closed_form(mu: torch.Tensor, grads: torch.Tensor, violation: torch.Tensor) -> torch.Tensor:
    """a* = mu - lambda_{i*} g_{i*}; constraints with g_i = 0 get lambda_i = 0 (the action cannot help)."""
    gg = (grads * grads).sum(-1)  # [B, K]
    movable = gg > 0
    lam = torch.where(movable, violation.clamp(min=0.0) / torch.where(movable, gg, torch.ones_like(gg)), 0.0)
    best = lam.argmax(dim=-1, keepdim=True)  # [B, 1]
    lam_best = lam.gather(-1, best)  # [B, 1]
    g_best = grads.gather(1, best.unsqueeze(-1).expand(-1, 1, grads.shape[-1])).squeeze(1)  # [B, A]
    return mu - lam_best * g_best


def _qp(mu: torch.Tensor, grads: torch.Tensor, violation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact projection; returns (actions, infeasible [B] bool). Infeasible rows use the closed form."""
    batch, k, _ = grads.shape
    g64 = grads.detach().to(torch.float64).cpu().numpy()
    v64 = violation.detach().to(torch.float64).cpu().numpy()
    lam_np = np.zeros((batch, k))
    infeasible = np.zeros(batch, dtype=bool)
    for row in range(batch):
        if not bool(np.any(v64[row] > 0)):
            continue  # mu already feasible: lambda = 0 exactly
        movable = np.einsum("ka,ka->k", g64[row], g64[row]) > 0
        # A constraint that the action cannot change (g_i = 0) is dropped: if it is violated no action
        # fixes it; the returned violation metric reports it.
        lam_row = least_distance_multipliers(g64[row][movable], v64[row][movable])
        if lam_row is None:
            infeasible[row] = True
            continue
        lam_np[row, movable] = lam_row
    lam_fixed = torch.as_tensor(lam_np, dtype=mu.dtype, device=mu.device)

    # Differentiable re-solve on the active set: (G_A G_A^T) lambda_A = violation_A, lambda = 0 elsewhere.
    active = lam_fixed > 0
    gram = grads @ grads.transpose(1, 2)  # [B, K, K]
    pair = active.unsqueeze(-1) & active.unsqueeze(-2)
    eye = torch.eye(k, dtype=mu.dtype, device=mu.device).expand(batch, k, k)
    masked = torch.where(pair, gram, torch.zeros_like(gram)) + torch.where(active, 0.0, 1.0).diag_embed()
    rhs = torch.where(active, violation, torch.zeros_like(violation))
    with torch.no_grad():
        trial, info = torch.linalg.solve_ex(masked.detach(), rhs.detach().unsqueeze(-1))
        trial = trial.squeeze(-1)
        scale = 1.0 + lam_fixed.abs()
        good = (
            (info == 0)
            & torch.isfinite(trial).all(-1)
            & ((trial - lam_fixed).abs() <= 1e-6 * scale).all(-1)
            & active.any(-1)
        )
    safe_matrix = torch.where(good.view(-1, 1, 1), masked, eye)
    safe_rhs = torch.where(good.view(-1, 1), rhs, torch.zeros_like(rhs))
    resolved = torch.linalg.solve(safe_matrix, safe_rhs.unsqueeze(-1)).squeeze(-1)
    lam = torch.where(good.view(-1, 1), resolved, lam_fixed)
    out = mu - (lam.unsqueeze(-1) * grads).sum(1)
    bad = torch.as_tensor(infeasible, device=mu.device)
    if bool(bad.any()):
        out = torch.where(bad.view(-1, 1), _closed_form(mu, grads, violation), out)
    return out, bad


@register(
    "constraint",
    "action_projection",
    paper=SAFETY_LAYER_PAPER,
    arxiv=SAFETY_LAYER_ARXIV,
    status="exact",
    card="control#A5",
)
def action_projection(
    actions: torch.Tensor,
    constraint_gradients: torch.Tensor,
    constraint_values: torch.Tensor,
    limits: float | torch.Tensor = 0.0,
    solver: Solver = "closed_form",
    low: BoundLike = None,
    high: BoundLike = None,
) -> tuple[torch.Tensor, Metrics]:
    """Safety layer: the action nearest to mu whose linearized next constraint values stay within limits.

    Paper: Dalal, Dvijotham, Vecerik, Hester, Paduraru, Tassa, "Safe Exploration in Continuous Action
    Spaces", arXiv 1801.08757 (the safety layer's QP and its closed-form solution). Exact: the closed
    form is the paper's; ``solver="qp"`` solves the same QP exactly with several active constraints
    (card A5).

    For each sample b (dropping b): mu = ``actions`` [B, A], g_i = ``constraint_gradients`` [B, K, A]
    (row i: how action a changes constraint i, c_i(s') ~ c_i(s) + g_i^T a), c_i = ``constraint_values``
    [B, K], C_i = ``limits`` (float, [K] or [B, K]; default 0).

      a* = argmin_a 1/2 ||a - mu||^2  s.t.  c_i + g_i^T a <= C_i  for all i.

    closed_form (paper, assumes at most one active constraint):
      lambda_i = max(0, (g_i^T mu + c_i - C_i) / (g_i^T g_i)),  i* = argmax_i lambda_i,
      a* = mu - lambda_{i*} g_{i*}.
    qp: the exact solution, a* = mu - sum_i lambda_i g_i with lambda >= 0 and complementary
    slackness, by least-distance programming (Lawson-Hanson NNLS); rows whose constraints are jointly
    infeasible fall back to the closed form (metric ``projection/infeasible_frac``).

    A constraint with g_i = 0 cannot be changed by the action and gets lambda_i = 0. A feasible mu is
    returned unchanged (lambda = 0 exactly). With ``low`` / ``high`` (floats or tensors broadcastable to
    [B, A]) the result is then clipped to the action box, which can re-violate a constraint (reported).

    Metrics: ``projection/changed_frac`` (fraction of actions changed, clipping included),
    ``projection/correction_norm`` (mean ||a* - mu||), ``projection/max_violation`` (max over the batch
    and constraints of max(0, c_i + g_i^T a* - C_i), the linearized violation left after projection),
    ``projection/infeasible_frac`` (qp only: rows with jointly infeasible constraints).
    """
    batch, k, action_dim = _check_inputs(actions, constraint_gradients, constraint_values)
    if solver not in ("closed_form", "qp"):
        raise InvalidInputError(f"action_projection: solver must be 'closed_form' or 'qp', got {solver!r}")
    dtype = actions.dtype if actions.is_floating_point() else torch.get_default_dtype()
    mu = actions.to(dtype)
    grads = constraint_gradients.to(dtype)
    values = constraint_values.to(dtype)
    limit = _as_batch_tensor("limits", limits, (batch, k), mu)
    for name, tensor in (("constraint_gradients", grads), ("constraint_values", values), ("limits", limit)):
        if not bool(torch.isfinite(tensor).all()):
            raise InvalidInputError(f"action_projection: {name} must be finite (no NaN or inf)")

    violation = (grads @ mu.unsqueeze(-1)).squeeze(-1) + values - limit  # g_i^T mu + c_i - C_i
    infeasible = torch.zeros(batch, dtype=torch.bool, device=mu.device)
    if solver == "closed_form":
        safe = _closed_form(mu, grads, violation)
    else:
        safe, infeasible = _qp(mu, grads, violation)

    if low is not None or high is not None:
        lo = _as_batch_tensor("low", -math.inf if low is None else low, (batch, action_dim), mu)
        hi = _as_batch_tensor("high", math.inf if high is None else high, (batch, action_dim), mu)
        if bool((lo > hi).any()):
            raise InvalidInputError("action_projection: low must be <= high in every action dimension")
        safe = torch.maximum(torch.minimum(safe, hi), lo)

    with torch.no_grad():
        delta = safe.detach() - mu.detach()
        norms = delta.norm(dim=-1)
        after = (grads.detach() @ safe.detach().unsqueeze(-1)).squeeze(-1) + values.detach() - limit.detach()
        metrics: Metrics = {
            "projection/changed_frac": detached((norms > 0).float().mean() if batch else 0.0),
            "projection/correction_norm": detached(norms.mean() if batch else 0.0),
            "projection/max_violation": detached(after.clamp(min=0.0).max() if batch else 0.0),
        }
        if solver == "qp":
            metrics["projection/infeasible_frac"] = detached(infeasible.float().mean() if batch else 0.0)
    return safe, metrics
