"""DPH-RL: a mass-covering f-divergence to the initial policy, on pi_0's own samples (card ratio#6)."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from tether.catalogue.aggregate import AggregationLike, aggregate, local
from tether.catalogue.contracts import LossOutput, check_2d, check_same_shape, detached
from tether.catalogue.ratio import log_ratio
from tether.catalogue.registry import register
from tether.errors import InvalidInputError

Divergence = Literal["forward_kl", "js", "alpha"]


def f_term(log_u: torch.Tensor, divergence: Divergence, alpha: float = 0.2) -> torch.Tensor:
    """The generator f(u) at u = exp(log_u); E_{pi_0}[f(pi/pi_0)] is the f-divergence.

    forward_kl: u - log u - 1            (E = KL(pi_0 || pi_theta))
    js:         u log u - (u+1) log((u+1)/2)   (E = 2 JS(pi_theta, pi_0) <= 2 log 2)
    alpha:      (u^(1-a) - (1-a) u - a) / (a (a - 1)),  a in (0, 1)
    All are >= 0 with f(1) = f'(1) = 0.
    """
    u = torch.exp(log_u)
    if divergence == "forward_kl":
        return u - log_u - 1.0
    if divergence == "js":
        # log((u + 1) / 2) = softplus(log u) - log 2, stable for large |log u|
        return u * log_u - (u + 1.0) * (F.softplus(log_u) - math.log(2.0))
    if divergence == "alpha":
        a = alpha
        return (torch.exp((1.0 - a) * log_u) - (1.0 - a) * u - a) / (a * (a - 1.0))
    raise InvalidInputError(f"divergence must be 'forward_kl', 'js' or 'alpha', got {divergence!r}")


@register(
    "regularizer",
    "dph_rl",
    paper=(
        "The Choice of Divergence: A Neglected Key to Mitigating Diversity Collapse in "
        "Reinforcement Learning with Verifiable Reward"
    ),
    arxiv="2509.07430",
    status="exact",
    card="ratio#6",
)
def dph_rl(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    divergence: Divergence = "forward_kl",
    alpha: float = 0.2,
    coef: float = 0.01,
    aggregation: AggregationLike = "token-mean",
) -> LossOutput:
    """DPH-RL rehearsal term: an f-divergence to pi_0 estimated on pre-sampled pi_0 responses.

    Paper: Li et al., "The Choice of Divergence: A Neglected Key to Mitigating Diversity Collapse
    in Reinforcement Learning with Verifiable Reward", arXiv 2509.07430. Exact (card ratio#6,
    from github.com/seamoke/DPH-RL).

    Apply ONLY to D_pef mini-batches: correct responses SAMPLED FROM pi_0 on prompts pi_0 already
    solves; ``ref_logprobs`` are their stored pi_0 token log-probs lp0 (no online reference
    model). u_t = exp(lp_t - lp0_t) (log u clamped to [-20, 20]); term = coef * agg(f(u_t)),
    coef (eta, ``sft_loss_coeff``) = 0.01, with f from ``divergence``:
    forward_kl f = u - log u - 1 (gradient (u - 1) grad lp, E_{pi_0} = grad KL(pi_0 || pi_theta));
    js f = u log u - (u + 1) log((u + 1)/2) (E = 2 JS <= 2 log 2);
    alpha f = (u^(1-a) - (1-a) u - a) / (a (a - 1)), a = 0.2.
    D_exp mini-batches use the GRPO/DAPO loss (clip-higher 0.28) with no KL.
    """
    check_2d("logprobs", logprobs)
    check_same_shape("logprobs", logprobs, ref_logprobs=ref_logprobs, response_mask=response_mask)
    if divergence not in ("forward_kl", "js", "alpha"):
        raise InvalidInputError(
            f"dph_rl: divergence must be 'forward_kl', 'js' or 'alpha', got {divergence!r}"
        )
    if divergence == "alpha" and not 0.0 < alpha < 1.0:
        raise InvalidInputError(f"dph_rl: alpha must be in (0, 1) for the alpha-divergence, got {alpha}")
    if coef < 0:
        raise InvalidInputError(f"dph_rl: coef (eta) must be >= 0, got {coef}")
    valid = response_mask.bool()
    log_u = log_ratio(logprobs, ref_logprobs.to(logprobs.dtype))
    log_u = torch.where(valid, log_u, torch.zeros((), dtype=log_u.dtype, device=log_u.device))
    per_token = f_term(log_u, divergence, alpha)
    term = coef * aggregate(per_token, response_mask, aggregation)
    div = aggregate(per_token.detach(), response_mask, local(aggregation))
    return term, {"dph/divergence": detached(div), "reg/dph_loss": detached(term)}
