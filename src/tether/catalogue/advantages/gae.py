"""Generalized Advantage Estimation for critic-based PPO, and the critic's return targets."""

from __future__ import annotations

import torch

from tether.catalogue.advantages.baselines import AdvantageOutput
from tether.catalogue.advantages.broadcast import advantage_metrics, masked_whiten
from tether.catalogue.contracts import check_2d, check_same_shape
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


def _gae(
    token_rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw GAE advantages and returns (A + V), both 0 on padding.

    Walks backwards over the tokens; a padded position neither contributes nor breaks the
    chain (the next valid token's value and advantage are carried over it), and the value after
    the last valid token is 0.
    """
    check_2d("values", values)
    check_same_shape("values", values, token_rewards=token_rewards, response_mask=response_mask)
    if not 0.0 <= gamma <= 1.0 or not 0.0 <= lam <= 1.0:
        raise InvalidInputError(f"gae: gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
    valid = response_mask.bool()
    dtype = torch.promote_types(token_rewards.dtype, values.dtype)
    zero_row = torch.zeros(values.shape[0], dtype=dtype, device=values.device)
    zero = torch.zeros((), dtype=dtype, device=values.device)
    rew = torch.where(valid, token_rewards.to(dtype), zero)
    val = torch.where(valid, values.to(dtype), zero)
    next_value = zero_row
    next_adv = zero_row
    adv_cols: list[torch.Tensor] = []
    for t in range(values.shape[1] - 1, -1, -1):
        delta = rew[:, t] + gamma * next_value - val[:, t]
        a_t = delta + gamma * lam * next_adv
        m = valid[:, t]
        adv_cols.append(torch.where(m, a_t, zero_row))
        next_value = torch.where(m, val[:, t], next_value)
        next_adv = torch.where(m, a_t, next_adv)
    adv_cols.reverse()
    adv = torch.stack(adv_cols, dim=1) if adv_cols else val.new_zeros(val.shape)
    returns = torch.where(valid, adv + val, zero)
    return adv, returns


def gae_returns(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> torch.Tensor:
    """Critic targets of GAE: returns = A_raw + V on valid tokens (before any whitening), 0 on padding.

    Use the same gamma and lam as :func:`gae`. With lam = 1 these are the Monte-Carlo returns.
    """
    return _gae(token_rewards, values, response_mask, gamma, lam)[1]


@register(
    "advantage",
    "gae",
    paper="High-Dimensional Continuous Control Using Generalized Advantage Estimation",
    arxiv="1506.02438",
    status="exact",
    card="adv#A6",
)
def gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
    whiten: bool = True,
) -> AdvantageOutput:
    """GAE: exponentially weighted sum of TD residuals of a learned value function.

    Paper: Schulman et al., "High-Dimensional Continuous Control Using Generalized Advantage
    Estimation", arXiv 1506.02438. Exact (verl compute_gae_advantage_return).

    delta_t = r_t + gamma V_{t+1} - V_t (V after the last valid token = 0), A_t = delta_t + gamma lam A_{t+1};
    padded tokens are skipped. Then (``whiten``, verl's default) A <- (A - mean)/sqrt(var + 1e-8) over all
    valid tokens. gamma = lam = 1 are verl's defaults (A_t = sum_{s>=t} r_s - V_t); LLM PPO commonly
    uses lam = 0.95. The critic's targets (A + V, unwhitened) come from :func:`gae_returns`.
    """
    adv, _ = _gae(token_rewards, values, response_mask, gamma, lam)
    if whiten:
        adv = masked_whiten(adv, response_mask)
    return adv, advantage_metrics(adv, response_mask)
