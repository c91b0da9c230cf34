"""REINFORCE++ and REINFORCE++-baseline: critic-free advantages with global batch whitening."""

from __future__ import annotations

import torch

from tether.catalogue.advantages.baselines import AdvantageOutput, outcome_group_stats
from tether.catalogue.advantages.broadcast import (
    advantage_metrics,
    as_float,
    check_outcome,
    masked_whiten,
    to_tokens,
)
from tether.catalogue.advantages.group_stats import verl_single_sample
from tether.catalogue.contracts import check_same_shape
from tether.catalogue.registry import register
from tether.errors import InvalidInputError

PAPER = "REINFORCE++: Stabilizing Critic-Free Policy Optimization with Global Normalization"


def kl_penalty_tokens(
    response_mask: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    kl_coef: float,
    name: str,
) -> torch.Tensor | None:
    """beta * (log pi_old - log pi_ref) on valid tokens (0 on padding), or None when kl_coef == 0."""
    if kl_coef < 0:
        raise InvalidInputError(f"{name}: kl_coef must be >= 0, got {kl_coef}")
    if kl_coef == 0.0:
        return None
    if old_logprobs is None or ref_logprobs is None:
        raise InvalidInputError(
            f"{name}: kl_coef={kl_coef} puts a KL penalty in the reward; pass both old_logprobs and "
            "ref_logprobs [batch, tokens], or set kl_coef=0"
        )
    check_same_shape("response_mask", response_mask, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs)
    kl = (old_logprobs - ref_logprobs).detach()
    return torch.where(response_mask.bool(), kl_coef * kl, torch.zeros((), dtype=kl.dtype, device=kl.device))


def last_token_rewards(rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] with the outcome reward on each row's last valid token (nothing on an all-padding row)."""
    valid = response_mask.bool()
    positions = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    last = torch.where(valid, positions, torch.full_like(positions, -1)).amax(dim=1, keepdim=True)
    at_last = valid & (positions == last)
    return torch.where(
        at_last, rewards.unsqueeze(-1), torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    )


def discounted_returns(
    token_rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float
) -> torch.Tensor:
    """R_t = sum_{s >= t, valid} gamma^(s-t) r_s, skipping padding; 0 on padding."""
    valid = response_mask.bool()
    zero = torch.zeros(token_rewards.shape[0], dtype=token_rewards.dtype, device=token_rewards.device)
    running = zero
    out: list[torch.Tensor] = []
    for t in range(token_rewards.shape[1] - 1, -1, -1):
        step = token_rewards[:, t] + gamma * running
        running = torch.where(valid[:, t], step, running)
        out.append(torch.where(valid[:, t], step, zero))
    out.reverse()
    if not out:
        return token_rewards.new_zeros(token_rewards.shape)
    return torch.stack(out, dim=1)


@register("advantage", "reinforce_pp", paper=PAPER, arxiv="2501.03262", status="exact", card="adv#A5")
def reinforce_pp(
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
) -> AdvantageOutput:
    """REINFORCE++: token returns of the outcome reward, whitened over every valid token of the batch.

    Paper: Hu et al., "REINFORCE++: Stabilizing Critic-Free Policy Optimization with Global
    Normalization" (first titled "REINFORCE++: A Simple and Efficient Approach for Aligning Large
    Language Models"), arXiv 2501.03262. Exact (verl compute_reinforce_plus_plus_outcome_advantage).

    Token rewards: r_{i,t} = r_i 1[t = last valid token] - kl_coef (log pi_old - log pi_ref)_{i,t};
    returns R_{i,t} = sum_{s >= t} gamma^(s-t) r_{i,s} (gamma = 1); A = (R - mean) / sqrt(var + 1e-8)
    with mean and unbiased var over ALL valid tokens of the batch (no groups). The KL-in-reward
    term is off by default (verl use_kl_in_reward=False); with kl_coef > 0 pass old_logprobs and
    ref_logprobs (they are optional inputs).
    """
    check_outcome(rewards, response_mask)
    r = as_float(rewards)
    tok = last_token_rewards(r, response_mask)
    kl = kl_penalty_tokens(response_mask, old_logprobs, ref_logprobs, kl_coef, "reinforce_pp")
    if kl is not None:
        tok = tok - kl.to(tok.dtype)
    returns = discounted_returns(tok, response_mask, gamma)
    adv = masked_whiten(returns, response_mask)
    return adv, advantage_metrics(adv, response_mask, r)


@register(
    "advantage", "reinforce_pp_baseline", paper=PAPER, arxiv="2501.03262", status="exact", card="adv#A5"
)
def reinforce_pp_baseline(
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> AdvantageOutput:
    """REINFORCE++-baseline: subtract the group mean reward, then whiten over the batch's tokens.

    Paper: Hu et al., "REINFORCE++: Stabilizing Critic-Free Policy Optimization with Global
    Normalization", arXiv 2501.03262. Exact (verl compute_reinforce_plus_plus_baseline_outcome_advantage).

    s_i = r_i - kl_coef sum_t (log pi_old - log pi_ref)_{i,t}; a_i = s_i - mean_g s (a single-sample
    group uses mean 0, as verl); a_i is broadcast to the tokens and whitened:
    A = (a - mean) / sqrt(var_unbiased + 1e-8) over all valid tokens of the batch. A degenerate
    group has a_i = 0 before whitening, but -mean/std (not 0) after it.
    """
    check_outcome(rewards, response_mask)
    r = as_float(rewards)
    kl = kl_penalty_tokens(response_mask, old_logprobs, ref_logprobs, kl_coef, "reinforce_pp_baseline")
    s = r if kl is None else r - kl.to(r.dtype).sum(-1)
    s, stats = outcome_group_stats(s, response_mask, group_ids)
    mean, _ = verl_single_sample(stats)
    centred = to_tokens(s - mean, response_mask)
    adv = masked_whiten(centred, response_mask)
    return adv, advantage_metrics(adv, response_mask, r, stats.zero_std_frac())
