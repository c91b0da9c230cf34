"""GSPO: the importance ratio and its clipping at the sequence level (GSPO-token form)."""

from __future__ import annotations

import torch

from tether.catalogue.aggregate import AggregationLike, aggregate
from tether.catalogue.contracts import LossOutput, check_2d, check_same_shape, detached, token_advantages
from tether.catalogue.ratio import LOG_RATIO_CLAMP, clipped_surrogate, log_ratio, ratio_metrics
from tether.catalogue.registry import register
from tether.errors import InvalidInputError

GSPO_LOG_RATIO_CAP = 10.0
"""verl caps the (token-form) sequence log-ratio at 10 before exp; we do the same."""


def sequence_log_ratio(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """log s_i = (1/L_i) sum_t m_{i,t} (lp - lp_old) per sequence, [B]; 0 for an all-padding row.

    Padded positions are excluded with ``torch.where`` (they may hold anything, even inf).
    """
    valid = response_mask.bool()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    diff = torch.where(valid, logprobs - old_logprobs, zero)
    lengths = valid.sum(-1).clamp(min=1).to(logprobs.dtype)
    return diff.sum(-1) / lengths


@register(
    "policy_loss",
    "gspo",
    paper="Group Sequence Policy Optimization",
    arxiv="2507.18071",
    status="exact",
    card="ratio#B6",
    aliases=("gspo_token",),
)
def gspo(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    aggregation: AggregationLike = "seq-mean-token-mean",
) -> LossOutput:
    """GSPO: clip the length-normalised sequence ratio instead of the token ratios.

    Paper: Zheng et al., "Group Sequence Policy Optimization", arXiv 2507.18071. Exact
    (GSPO-token form; verl ``compute_policy_loss_gspo``, TRL ``importance_sampling_level``).

    s_i = exp((1/L_i) sum_t (lp_{i,t} - lp_old_{i,t}))   (masked mean over the response)
    s_{i,t} = sg(s_i) * exp(lp_{i,t} - sg(lp_{i,t}))       (value s_i, gradient through each token)
    l_{i,t} = max(-A_{i,t} s_{i,t}, -A_{i,t} clip(s_{i,t}, 1 - eps_low, 1 + eps_high)), seq-mean-token-mean.
    The clip decision is the same for every token of a sequence. When A is constant per sequence
    the value and gradient equal TRL's ``importance_sampling_level="sequence"`` loss (GRPO
    aggregation): unclipped, d loss / d lp_{i,t} = -A_i s_i / L_i (divided by N_seq).
    Numerics: log s_{i,t} is clamped to [-20, 10] (verl caps it at 10; the floor only protects exp),
    so a sequence whose mean log-ratio exceeds 10 gets no gradient. Defaults eps_low=3e-4,
    eps_high=4e-4 are GSPO v2, section 5.1. Token advantages [B, T] are accepted (GSPO-token).
    """
    check_2d("logprobs", logprobs)
    check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, response_mask=response_mask)
    if eps_low < 0 or eps_high < 0:
        raise InvalidInputError(
            f"gspo: eps_low and eps_high must be >= 0 (paper: 3e-4, 4e-4), got {eps_low}, {eps_high}"
        )
    adv = token_advantages(advantages, response_mask).to(logprobs.dtype)
    # Padded log-probs may be -inf (masked vocabularies): lp - sg(lp) would be NaN there.
    logprobs = torch.where(response_mask.bool(), logprobs, torch.zeros_like(logprobs))
    old_logprobs = torch.where(response_mask.bool(), old_logprobs, torch.zeros_like(old_logprobs))
    log_s = sequence_log_ratio(logprobs, old_logprobs, response_mask)
    log_s_tok = log_s.detach().unsqueeze(-1) + (logprobs - logprobs.detach())
    log_s_tok = torch.clamp(log_s_tok, min=-LOG_RATIO_CLAMP, max=GSPO_LOG_RATIO_CAP)
    per_token = clipped_surrogate(torch.exp(log_s_tok), adv, eps_low, eps_high)
    loss = aggregate(per_token, response_mask, aggregation)

    metrics = ratio_metrics(log_ratio(logprobs, old_logprobs), response_mask)
    seq = ratio_metrics(log_s_tok, response_mask, adv, eps_low, eps_high)
    for side in ("clip_frac", "clip_frac_low", "clip_frac_high"):
        metrics[f"policy/{side}"] = seq[f"policy/{side}"]
    with torch.no_grad():
        has_tokens = response_mask.bool().any(-1)
        s = torch.exp(torch.clamp(log_s.detach(), -LOG_RATIO_CLAMP, GSPO_LOG_RATIO_CAP))
        if bool(has_tokens.any()):
            s_valid = s[has_tokens]
            metrics["gspo/seq_ratio_mean"] = detached(s_valid.mean())
            metrics["gspo/seq_ratio_min"] = detached(s_valid.min())
            metrics["gspo/seq_ratio_max"] = detached(s_valid.max())
        else:
            for key in ("mean", "min", "max"):
                metrics[f"gspo/seq_ratio_{key}"] = detached(1.0)
    metrics["policy/loss"] = detached(loss)
    return loss, metrics
