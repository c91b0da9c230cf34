"""DCPO: an on-policy, temperature-targeted regulariser folded into the advantage."""

from __future__ import annotations

import torch

from tether.catalogue.advantages.broadcast import check_outcome, to_tokens
from tether.catalogue.contracts import Metrics, check_same_shape, detached, token_advantages
from tether.catalogue.ratio import log_ratio
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


def dcpo_entropy_estimate(logprobs: torch.Tensor, response_mask: torch.Tensor) -> float:
    """DCPO's state: the entropy estimate of an actor update, token-mean of -lp over valid tokens."""
    valid = response_mask.bool()
    if not bool(valid.any()):
        return 0.0
    return float((-logprobs.detach()[valid]).mean().item())


@register(
    "advantage",
    "dcpo",
    paper="Distribution-Centric Policy Optimization Dominates Exploration-Exploitation Trade-off",
    arxiv="2601.12730",
    status="exact",
    card="ratio#9",
    state_update=dcpo_entropy_estimate,
)
def dcpo(
    advantages: torch.Tensor,
    rewards: torch.Tensor,
    old_logprobs: torch.Tensor,
    old_logits: torch.Tensor,
    token_ids: torch.Tensor,
    response_mask: torch.Tensor,
    current_entropy: float,
    target_entropy: float = 0.25,
    temperature_high: float = 1.2,
    temperature_low: float = 0.8,
    max_gap: float = 0.1,
    correct_threshold: float = 0.05,
) -> tuple[torch.Tensor, Metrics]:
    """DCPO: mix a REINFORCE term on correct samples, re-weighted toward a tempered target, into A.

    Paper: Li et al., "Distribution-Centric Policy Optimization Dominates Exploration-Exploitation
    Trade-off", arXiv 2601.12730. Exact as implemented (597358816/DCPO).

    H = ``current_entropy`` (token-mean -lp of the previous actor update, ``dcpo_entropy_estimate``),
    H0 = ``target_entropy`` (README's best 0.25 for Qwen2.5-Math-7B; the script default is 0.5).
    T = 1.2 if H <= H0 else 0.8;  lp_old^T = log softmax(old_logits / T)[token]
    rho_{i,t} = exp(lp_old^T - lp_old);  b_i = 1[R_i > 0.05];  p_true = mean_i b_i
    a~ = min(|H0 - H|, 0.1) / p_true;  alpha = a~ / (1 + a~)   (alpha := 0 when no sample is correct)
    A'_{i,t} = (1 - alpha) A_i + alpha b_i rho_{i,t}.  Feed A' to dual-clip PPO (0.2, 0.2, c=3), token-mean.
    ``old_logits`` are the behaviour policy's logits at sampling temperature 1 (as ``old_logprobs``).
    """
    check_outcome(rewards, response_mask)
    check_same_shape("old_logprobs", old_logprobs, response_mask=response_mask, token_ids=token_ids)
    if old_logits.dim() != 3 or old_logits.shape[:2] != old_logprobs.shape:
        raise InvalidInputError(
            f"dcpo: old_logits must be [batch, tokens, vocab] matching old_logprobs {tuple(old_logprobs.shape)}, "
            f"got {tuple(old_logits.shape)}"
        )
    if temperature_high <= 0 or temperature_low <= 0:
        raise InvalidInputError("dcpo: temperatures must be > 0")
    temperature = temperature_high if current_entropy <= target_entropy else temperature_low
    with torch.no_grad():
        tempered = torch.log_softmax(old_logits.detach() / temperature, dim=-1)
        lp_t = tempered.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)
        rho = torch.exp(log_ratio(lp_t, old_logprobs.detach()))
        b = (rewards.detach() > correct_threshold).to(rho.dtype)
        p_true = b.mean() if b.numel() else torch.zeros((), dtype=rho.dtype)
        gap = min(abs(target_entropy - current_entropy), max_gap)
        if float(p_true) > 0:
            a_tilde = gap / float(p_true)
            mix = a_tilde / (1.0 + a_tilde)
        else:
            mix = 0.0
        base = token_advantages(advantages.detach(), response_mask).to(rho.dtype)
        adv = (1.0 - mix) * base + mix * b.unsqueeze(-1) * rho
        out = to_tokens(adv, response_mask)
        valid = response_mask.bool()
        rho_mean = rho[valid].mean() if bool(valid.any()) else torch.ones(())
    metrics: Metrics = {
        "dcpo/alpha": detached(float(mix)),
        "dcpo/temperature": detached(float(temperature)),
        "dcpo/p_true": detached(p_true),
        "dcpo/rho_mean": detached(rho_mean),
    }
    return out, metrics
