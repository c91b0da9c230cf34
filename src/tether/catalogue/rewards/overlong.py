"""DAPO's soft overlong punishment, added to the outcome reward."""

from __future__ import annotations

import torch

from tether.catalogue.contracts import Metrics, detached
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


@register(
    "reward",
    "dapo_overlong",
    paper="DAPO: An Open-Source LLM Reinforcement Learning System at Scale",
    arxiv="2503.14476",
    status="exact",
    card="ratio#B5",
)
def dapo_overlong(
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    response_lengths: torch.Tensor | None = None,
    max_length: int = 20480,
    cache_length: int = 4096,
    penalty_factor: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """DAPO soft overlong punishment: a linear length penalty inside the last L_cache tokens.

    Paper: Yu et al., "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", arXiv
    2503.14476 (part c). Exact (verl DAPO reward manager: min(-(L - E)/L_cache * f, 0)).

    E = L_max - L_cache;  r_len = 0 if L <= E, else -(L - E) / L_cache * f;  R' = R + r_len.
    So r_len = 0 at L = E, -0.5 at E + L_cache/2, -f at L_max (it keeps falling past L_max, as verl).
    L = ``response_lengths`` when given, else the number of valid tokens of ``response_mask``.
    Defaults L_max = 20480, L_cache = 4096, f = 1.0 (paper).
    """
    if rewards.dim() != 1:
        raise InvalidInputError(f"dapo_overlong: rewards must be [batch], got {tuple(rewards.shape)}")
    if not 0 < cache_length < max_length:
        raise InvalidInputError(
            f"dapo_overlong: need 0 < cache_length < max_length, got {cache_length}, {max_length}"
        )
    if response_lengths is None:
        lengths = response_mask.bool().sum(-1).to(rewards.dtype)
    else:
        lengths = response_lengths.to(rewards.dtype)
    if lengths.shape != rewards.shape:
        raise InvalidInputError("dapo_overlong: one length per reward is needed ([batch])")
    expected = float(max_length - cache_length)
    penalty = torch.clamp(-(lengths - expected) / cache_length * penalty_factor, max=0.0)
    out = rewards.detach() + penalty
    metrics: Metrics = {
        "reward/overlong_penalty_mean": detached(penalty.mean()),
        "reward/overlong_frac": detached((penalty < 0).to(out.dtype).mean()),
    }
    return out, metrics
