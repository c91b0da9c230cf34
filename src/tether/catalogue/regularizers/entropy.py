"""The entropy bonus and TRL's adaptive entropy coefficient.

The bonus is aggregated with its own normaliser (token-mean by default): its per-token gradient
is -coef / N_tok whatever the policy loss's aggregation is. TRL once scaled the bonus by the
policy loss's normaliser, which made it several times too small for some loss types (TRL
PR #6648; lessons.md item 2); tests/catalogue/test_entropy.py guards against that.
"""

from __future__ import annotations

import torch

from tether.catalogue.aggregate import AggregationLike, aggregate, local
from tether.catalogue.contracts import LossOutput, check_2d, check_same_shape, detached
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


def entropy_coef_update(
    coef: float,
    entropy: float | torch.Tensor,
    target: float = 0.2,
    delta: float = 0.005,
    coef_min: float = 0.0,
    coef_max: float = 1.0,
) -> float:
    """TRL's adaptive entropy coefficient (``use_adaptive_entropy``): one step of a bang-bang rule.

    If the measured mean token entropy is <= ``target`` the coefficient grows by ``delta``, else it
    shrinks by ``delta``; the result is clipped to [coef_min, coef_max]. Defaults are TRL's
    (``entropy_target`` 0.2 nats, ``entropy_coef_delta`` 0.005, min 0, max 1). Pass the
    ``reg/entropy`` metric of the last step as ``entropy``. Pure: returns the new coefficient.
    """
    if delta < 0:
        raise InvalidInputError(f"entropy_coef_update: delta must be >= 0, got {delta}")
    if coef_min > coef_max:
        raise InvalidInputError(
            f"entropy_coef_update: coef_min ({coef_min}) must be <= coef_max ({coef_max})"
        )
    h = float(entropy.detach().float().mean().item()) if isinstance(entropy, torch.Tensor) else float(entropy)
    new = coef + delta if h <= target else coef - delta
    return float(min(max(new, coef_min), coef_max))


@register(
    "regularizer",
    "entropy_bonus",
    paper="Proximal Policy Optimization Algorithms",
    arxiv="1707.06347",
    status="exact",
    card="ratio#B1",
    state_update=entropy_coef_update,
    aliases=("entropy",),
)
def entropy_bonus(
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
    coef: float = 0.01,
    aggregation: AggregationLike = "token-mean",
) -> LossOutput:
    """Entropy bonus: subtract coef times the mean token entropy from the loss.

    Paper: Schulman et al., "Proximal Policy Optimization Algorithms", arXiv 1707.06347
    (objective L^CLIP - c1 L^VF + c2 S, c2 = 0.01 in the Atari runs). Exact.

    term = -coef * agg(H), H [B, T] = full-vocabulary entropy (differentiable), token-mean by
    default, so d term / d H_t = -coef / N_tok on every valid token, independent of the policy
    loss's own normaliser. Other defaults: verl ``entropy_coeff`` 0.001 (older releases; now
    0), TRL ``entropy_coef`` 0. For LLMs, 0.01 usually makes entropy explode; consider SIREN.
    ``entropy_coef_update`` (TRL's adaptive coefficient) is the registered state update.
    Metrics: ``reg/entropy`` [TRL ``entropy``; verl ``actor/entropy``], ``reg/entropy_loss``.
    """
    check_2d("entropy", entropy)
    check_same_shape("entropy", entropy, response_mask=response_mask)
    if coef < 0:
        raise InvalidInputError(f"entropy_bonus: coef must be >= 0 (a bonus), got {coef}")
    term = -coef * aggregate(entropy, response_mask, aggregation)
    return term, {
        "reg/entropy": detached(aggregate(entropy.detach(), response_mask, local(aggregation))),
        "reg/entropy_loss": detached(term),
        "reg/entropy_coef": detached(coef),
    }
