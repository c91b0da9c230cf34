"""CPO: the constrained trust-region step of Constrained Policy Optimization, as pure math on flat vectors.

World-agnostic: the caller (e.g. ``tether.control.trust_region.cpo_update``) computes the flat gradients
g (reward surrogate) and b (cost surrogate, a mean over samples), solves H x = g and H x = b with
:func:`conjugate_gradient` (H = Fisher matrix of the policy, i.e. the Hessian of the mean KL), measures
c = J_c - d and the mean episode length T, and asks :func:`cpo_step` for the step. The line search that
follows needs the policy, so it lives with the caller; it scales the cost surrogate's change by the same
:func:`cost_surrogate_scale`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from tether.catalogue.contracts import Metrics, detached
from tether.catalogue.registry import register
from tether.errors import InvalidInputError

CPO_PAPER = "Constrained Policy Optimization"
CPO_ARXIV = "1705.10528"

# OmniSafe's guard against dividing by zero (cpo.py uses 1e-8 everywhere).
EPS = 1e-8
# OmniSafe's test for a vanishing cost gradient: b^T b <= 1e-6 (with c < 0) is case 4.
ZERO_COST_GRADIENT = 1e-6

CostLike = float | int | torch.Tensor


def conjugate_gradient(
    fvp: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    iters: int = 15,
    residual_tol: float = 1e-10,
) -> torch.Tensor:
    """Solve H x = b for a symmetric positive-definite H given only v -> H v (conjugate gradients).

    Starts from x = 0 and runs at most ``iters`` iterations (OmniSafe / CPO default 15), stopping once
    the residual norm ||b - H x|| drops below ``residual_tol``. Exact arithmetic reaches the solution
    in at most dim(b) iterations. If a search direction p has p^T H p <= 0 (H not positive definite
    along p, e.g. a Fisher product without damping at a degenerate point), the iteration stops and
    returns the current iterate instead of dividing by a non-positive curvature.
    """
    if b.dim() != 1:
        raise InvalidInputError(
            f"conjugate_gradient: b must be a flat 1-D vector, got shape {tuple(b.shape)}; flatten it first"
        )
    if iters < 1:
        raise InvalidInputError(f"conjugate_gradient: iters must be >= 1, got {iters}")
    b = b.detach()
    x = torch.zeros_like(b)
    residual = b.clone()  # b - H x with x = 0
    direction = residual.clone()
    rr = torch.dot(residual, residual)
    for _ in range(iters):
        if math.sqrt(float(rr)) < residual_tol:
            break
        hp = fvp(direction).detach()
        curvature = torch.dot(direction, hp)
        if not float(curvature) > 0.0:
            break
        alpha = rr / curvature
        x = x + alpha * direction
        residual = residual - alpha * hp
        rr_new = torch.dot(residual, residual)
        direction = residual + (rr_new / rr) * direction
        rr = rr_new
    return x


def _flat_vector(name: str, tensor: torch.Tensor, length: int | None) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 1:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise InvalidInputError(
            f"cpo_step: {name} must be a flat 1-D tensor over all policy parameters, got {shape}; "
            "flatten with torch.cat([p.reshape(-1) for p in params])"
        )
    if not tensor.is_floating_point():
        raise InvalidInputError(f"cpo_step: {name} must be a floating-point tensor, got {tensor.dtype}")
    if length is not None and tensor.shape[0] != length:
        raise InvalidInputError(
            f"cpo_step: {name} has {tensor.shape[0]} entries but reward_gradient has {length}; "
            "all four vectors must be over the same parameters"
        )
    if not bool(torch.isfinite(tensor).all()):
        raise InvalidInputError(
            f"cpo_step: {name} has NaN or inf entries; check the surrogate, its gradient and the "
            "conjugate-gradient solve (raise cg_damping)"
        )
    return tensor.detach().to(torch.float64)


def _scalar(name: str, value: CostLike) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise InvalidInputError(f"cpo_step: {name} must be a scalar, got shape {tuple(value.shape)}")
        out = float(value.detach().reshape(()).item())
    else:
        out = float(value)
    if not math.isfinite(out):
        raise InvalidInputError(f"cpo_step: {name} must be finite, got {out}")
    return out


def cost_surrogate_scale(episode_length: CostLike, omnisafe_units: bool = False) -> float:
    """The factor that puts the per-sample cost surrogate in the constraint's units: T, or 1.

    J_c is a sum over an episode, the surrogate mean(ratio * A_C) a mean over samples; the
    surrogate's change times the mean episode length T approximates the change of J_c (the authors'
    ``safety_rescale``, see :func:`cpo_step`). ``omnisafe_units=True`` gives 1 (OmniSafe's units).
    ``episode_length`` must be finite and > 0 either way.
    """
    length = _scalar("episode_length", episode_length)
    if not length > 0:
        raise InvalidInputError(
            f"cpo_step: episode_length must be > 0 (the mean length T of the episodes J_c was measured "
            f"on), got {length}"
        )
    return 1.0 if omnisafe_units else length


def _clip(value: float, low: float, high: float) -> float:
    """torch.clamp semantics (OmniSafe's ``project``): when low > high the result is high."""
    return min(max(value, low), high)


@register(
    "constraint",
    "cpo_step",
    paper=CPO_PAPER,
    arxiv=CPO_ARXIV,
    status="exact",
    card="control#A4",
)
def cpo_step(
    reward_gradient: torch.Tensor,
    cost_gradient: torch.Tensor,
    hinv_reward_gradient: torch.Tensor,
    hinv_cost_gradient: torch.Tensor,
    cost_excess: CostLike,
    episode_length: CostLike,
    target_kl: float = 0.01,
    omnisafe_dual: bool = False,
    omnisafe_units: bool = False,
) -> tuple[torch.Tensor, Metrics]:
    """CPO's step: argmax_x g^T x  s.t.  c + b^T x <= 0  and  1/2 x^T H x <= delta, solved in the dual.

    Paper: Achiam, Held, Tamar, Abbeel, "Constrained Policy Optimization" (ICML 2017), arXiv 1705.10528,
    section 6.1 and appendix 10.2; case analysis as in OmniSafe's ``CPO._determine_case`` /
    ``_step_direction`` (Ji et al., arXiv 2305.09304); card A4.

    Inputs (flat 1-D, one entry per policy parameter): g = ``reward_gradient`` (gradient of the reward
    surrogate, to MAXIMIZE), b = ``cost_gradient`` (gradient of the per-sample cost surrogate
    mean(ratio * A_C)), H^-1 g and H^-1 b (``hinv_*``, from :func:`conjugate_gradient` with the damped
    Fisher product), c = ``cost_excess`` = J_c - d (J_c the mean cost of an episode, e.g. the last
    epoch's), and T = ``episode_length``, the mean length of the episodes J_c was measured on.
    delta = ``target_kl``.

    Units. The paper's constraint is J_C(pi) + 1/(1 - gamma) E_{s ~ d^pi, a ~ pi'}[A_C(s, a)] <= d
    (section 6.1): the advantage term has the magnitude of an episode's cost. A mean over samples is
    T times smaller than a sum over an episode, so the authors' rllab code multiplies the cost
    surrogate (and with it b, H^-1 b and the line search's cost change) by ``safety_rescale`` =
    samples / trajectories = T (``PolicyGradientSafe.optimize_policy``, with the explanation there;
    ``BatchSamplerSafe`` computes it). So here b and H^-1 b are multiplied by T before anything else
    (:func:`cost_surrogate_scale`; the caller's line search scales by the same factor). With
    ``omnisafe_units=True`` they are used as given (scale 1): what OmniSafe does since its refactor of
    early 2023 (PR #176), comparing the per-sample surrogate directly with J_c - d. (OmniSafe before it
    divided c by the mean episode length, which gives the same step as the rescale up to the 1e-8
    guards.) In OmniSafe's units s = b^T H^-1 b is T^2 times smaller, so the band of J_c around d in
    which cases 1 and 2 occur (c^2 <= 2 delta s) is T times narrower and all but never hit: the step is
    TRPO's (c < 0) or a pure recovery (c >= 0).

    With eps = 1e-8 and b, H^-1 b scaled as above:

      q = g^T H^-1 g,  r = g^T H^-1 b,  s = b^T H^-1 b       (q, s >= 0; rounding below 0 is clamped)
      A = q - r^2 / (s + eps),  B = 2 delta - c^2 / (s + eps)
      case 4: b^T b <= 1e-6 and c < 0   (no cost gradient, feasible)      -> TRPO step
      case 3: c < 0 and B < 0   (the whole trust region is feasible)       -> TRPO step
      case 2: c < 0 and B >= 0  (feasible, the constraint cuts the region) -> dual step
      case 1: c >= 0 and B >= 0 (infeasible, a feasible part is reachable) -> dual step (recovery)
      case 0: c >= 0 and B < 0  (infeasible, nothing feasible reachable)   -> pure cost recovery
    TRPO step (3, 4): x = sqrt(2 delta / (q + eps)) H^-1 g; lambda = 1 / (sqrt(2 delta / (q + eps)) + eps),
      nu = 0.
    Recovery (0): x = -sqrt(2 delta / (s + eps)) H^-1 b; lambda = 0, nu = sqrt(2 delta / (s + eps)).
    Dual step (1, 2): x = (H^-1 g - nu H^-1 b) / (lambda + eps) with nu = max(0, lambda c + r) / (s + eps),
      lambda = the better of  lambda_a = sqrt(A / B)  on the branch nu > 0 (dual value
      f_a(l) = -(A / l + B l) / 2 + r c / s) and  lambda_b = sqrt(q / (2 delta))  on the branch nu = 0
      (f_b(l) = -(q / l + 2 delta l) / 2), each projected onto its branch, which is split at
      lambda_mid = -r / (c + eps): for c < 0, nu > 0 iff lambda < lambda_mid; for c >= 0, iff
      lambda > lambda_mid. When lambda_mid <= 0 one branch is empty: lambda = lambda_b (c < 0) or
      lambda_a (c >= 0), as in the authors' code.

    Signs: the paper's appendix (and the authors' code) write the problem as a minimization, with r
    built from the gradient of the loss; with g the gradient of the reward (as here and in OmniSafe)
    that r changes sign, so nu = max(0, lambda c + r) / s, the split at -r / c and + r c / s in f_a.
    OmniSafe plugs its reward-gradient r into the minimization-form formulas (nu = max(0, lambda c - r)
    / s, split at r / c, - r c / s) and projects with torch.clamp even when the interval is empty;
    ``omnisafe_dual=True`` reproduces that literally for comparisons with OmniSafe runs. Its steps can
    leave the trust region and break the linearized constraint in cases 1 and 2, so it is off by default.

    Exact: the case analysis and its guards are OmniSafe's, the dual solution the paper's, the rescale
    by T the authors' (checked against their rllab code, where every trajectory of a batch is
    complete; which episodes T is measured on is the caller's choice, see the control trainer).

    Returns the step x (same dtype as ``reward_gradient``) and metrics ``cpo/optim_case`` (0..4),
    ``cpo/lambda``, ``cpo/nu``, ``cpo/q``, ``cpo/r``, ``cpo/s``, ``cpo/A``, ``cpo/B``,
    ``cpo/cost_excess`` (OmniSafe logs them as Misc/OptimCase, Misc/Lambda_star, Misc/Nu_star, Misc/q,
    Misc/r, Misc/s, Misc/A, Misc/B; r and s with the scaled b) and ``cpo/cost_scale`` (T, or 1 with
    ``omnisafe_units``; rllab's SafetyGradientRescale). The step is finite for any finite inputs.
    """
    g = _flat_vector("reward_gradient", reward_gradient, None)
    n = g.shape[0]
    scale = cost_surrogate_scale(episode_length, omnisafe_units)
    b = _flat_vector("cost_gradient", cost_gradient, n) * scale
    hg = _flat_vector("hinv_reward_gradient", hinv_reward_gradient, n)
    hb = _flat_vector("hinv_cost_gradient", hinv_cost_gradient, n) * scale
    c = _scalar("cost_excess", cost_excess)
    if not (math.isfinite(target_kl) and target_kl > 0):
        raise InvalidInputError(
            f"cpo_step: target_kl must be a finite value > 0 (paper: 0.01), got {target_kl}"
        )
    delta = float(target_kl)

    q = max(float(torch.dot(g, hg)), 0.0)
    r = float(torch.dot(g, hb))
    s = max(float(torch.dot(b, hb)), 0.0)
    bb = float(torch.dot(b, b))
    if not all(math.isfinite(v) for v in (q, r, s, bb)):
        raise InvalidInputError(
            "cpo_step: q, r or s overflowed (gradients too large); scale the surrogates or advantages down"
        )

    if bb <= ZERO_COST_GRADIENT and c < 0:
        case, big_a, big_b = 4, 0.0, 0.0
    else:
        big_a = q - r * r / (s + EPS)
        big_b = 2.0 * delta - c * c / (s + EPS)
        if c < 0 and big_b < 0:
            case = 3
        elif c < 0:
            case = 2
        elif big_b >= 0:
            case = 1
        else:
            case = 0

    coef_g: float  # step = coef_g * H^-1 g + coef_b * H^-1 b
    coef_b: float
    if case in (3, 4):
        alpha = math.sqrt(2.0 * delta / (q + EPS))
        lam, nu = 1.0 / (alpha + EPS), 0.0
        coef_g, coef_b = alpha, 0.0
    elif case == 0:
        lam, nu = 0.0, math.sqrt(2.0 * delta / (s + EPS))
        coef_g, coef_b = 0.0, -nu
    else:
        lam, nu = _dual_solution(q, r, s, c, max(big_a, 0.0), big_b, delta, omnisafe_dual)
        coef_g, coef_b = 1.0 / (lam + EPS), -nu / (lam + EPS)

    step = coef_g * hg + coef_b * hb
    metrics: Metrics = {
        "cpo/optim_case": detached(float(case)),
        "cpo/lambda": detached(lam),
        "cpo/nu": detached(nu),
        "cpo/q": detached(q),
        "cpo/r": detached(r),
        "cpo/s": detached(s),
        "cpo/A": detached(big_a),
        "cpo/B": detached(big_b),
        "cpo/cost_excess": detached(c),
        "cpo/cost_scale": detached(scale),
    }
    return step.to(reward_gradient.dtype), metrics


def _dual_solution(
    q: float, r: float, s: float, c: float, big_a: float, big_b: float, delta: float, omnisafe: bool
) -> tuple[float, float]:
    """(lambda*, nu*) of cases 1 and 2 (B >= 0, A >= 0); see :func:`cpo_step`."""
    lam_a = math.sqrt(big_a / (big_b + EPS))
    lam_b = math.sqrt(q / (2.0 * delta))
    # Sign of r as it enters the minimization-form formulas: -r here, +r in OmniSafe's literal code.
    r_min = r if omnisafe else -r
    lam_mid = r_min / (c + EPS)

    def f_a(lam: float) -> float:
        return -0.5 * (big_a / (lam + EPS) + big_b * lam) - r_min * c / (s + EPS)

    def f_b(lam: float) -> float:
        return -0.5 * (q / (lam + EPS) + 2.0 * delta * lam)

    if omnisafe or lam_mid > 0:
        if c < 0:
            lam_a_star, lam_b_star = _clip(lam_a, 0.0, lam_mid), _clip(lam_b, lam_mid, math.inf)
        else:
            lam_a_star, lam_b_star = _clip(lam_a, lam_mid, math.inf), _clip(lam_b, 0.0, lam_mid)
        lam = lam_a_star if f_a(lam_a_star) >= f_b(lam_b_star) else lam_b_star
    else:
        # One branch is empty: for c < 0, nu > 0 would need lambda < lambda_mid <= 0; for c >= 0, every
        # lambda >= 0 has nu > 0.
        lam = lam_b if c < 0 else lam_a
    nu = max(lam * c - r_min, 0.0) / (s + EPS)
    if omnisafe and abs(lam + EPS) < EPS:
        # OmniSafe can pick lambda = r / c < 0; keep 1 / (lambda + eps) finite at the one bad point.
        lam = -2.0 * EPS
    return lam, nu
