"""Corrections for a noisy verifier modelled as a binary channel (false-positive / false-negative rates).

Both corrections are affine in the noisy reward R~, so GRPO's (r - mean)/std erases them (the
affine-invariance trap): use ``noisy_backward`` with an estimator that does not rescale (RLOO,
Dr.GRPO: there it is a pure rescale of the advantage), and use ``noisy_forward``'s weight directly
as the advantage, with no baseline at all (any mean subtraction removes its constant shift).
"""

from __future__ import annotations

import torch

from tether.catalogue.contracts import Metrics, detached
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


def _check_rates(name: str, rho0: float, rho1: float) -> None:
    if not (0.0 <= rho0 < 1.0 and 0.0 <= rho1 < 1.0):
        raise InvalidInputError(f"{name}: rho0 and rho1 are probabilities in [0, 1), got {rho0}, {rho1}")
    if rho0 + rho1 >= 1.0:
        raise InvalidInputError(
            f"{name}: need rho0 + rho1 < 1 (got {rho0} + {rho1}); a verifier at or below chance carries no "
            "signal. Re-estimate the false-positive rate rho0 and false-negative rate rho1"
        )


@register(
    "reward",
    "noisy_backward",
    paper="Reinforcement Learning with Verifiable yet Noisy Rewards under Imperfect Verifiers",
    arxiv="2510.00915",
    status="exact",
    card="adv#B16",
)
def noisy_backward(
    rewards: torch.Tensor, rho0: float = 0.0, rho1: float = 0.0
) -> tuple[torch.Tensor, Metrics]:
    """Backward correction: an unbiased estimate of the clean 0/1 reward from the noisy one.

    Paper: "Reinforcement Learning with Verifiable yet Noisy Rewards under Imperfect Verifiers",
    arXiv 2510.00915. Exact formula (from the paper summary; no code); the GRPO hook is Reconstructed.

    R_hat = (R~ - rho0) / (1 - rho0 - rho1), rho0 = P(R~=1 | R=0), rho1 = P(R~=0 | R=1); E[R_hat | R] = R.
    rho0 = rho1 = 0 (default: the rates must be estimated, e.g. by appeals to a judge) returns R~.
    Affine in R~: after GRPO normalisation it is a no-op; pair it with RLOO / Dr.GRPO.
    """
    _check_rates("noisy_backward", rho0, rho1)
    out = (rewards.detach() - rho0) / (1.0 - rho0 - rho1)
    return out, {"reward/corrected_mean": detached(out.mean() if out.numel() else torch.zeros(()))}


@register(
    "reward",
    "noisy_forward",
    paper="Reinforcement Learning with Verifiable yet Noisy Rewards under Imperfect Verifiers",
    arxiv="2510.00915",
    status="exact",
    card="adv#B16",
)
def noisy_forward(rewards: torch.Tensor, rho1: float = 0.0) -> tuple[torch.Tensor, Metrics]:
    """Forward correction: a score weight whose expected gradient is the clean one times (1 - rho0 - rho1).

    Paper: "Reinforcement Learning with Verifiable yet Noisy Rewards under Imperfect Verifiers",
    arXiv 2510.00915. Exact formula (from the paper summary); the GRPO hook is Reconstructed.

    w = R~ - (1 - rho1): w(R~=1) = rho1, w(R~=0) = rho1 - 1. E[w | R=1] = 0, E[w | R=0] = -(1 - rho0 - rho1),
    so E[w grad log pi] = (1 - rho0 - rho1) x (clean gradient); only rho1 is needed.
    TRAP: w is R~ shifted by a constant, so GRPO / RLOO / Dr.GRPO baselines turn it back into the
    uncorrected advantage. Use w directly as the advantage (REINFORCE, no baseline).
    """
    _check_rates("noisy_forward", 0.0, rho1)
    out = rewards.detach() - (1.0 - rho1)
    return out, {"reward/forward_weight_mean": detached(out.mean() if out.numel() else torch.zeros(()))}
