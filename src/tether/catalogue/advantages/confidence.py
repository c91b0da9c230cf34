"""Confidence-aware advantages: ACE (overconfident errors), CAPO (logistic AUC), ProGRPO (ARM).

All three read the policy's own log-probabilities as a *confidence* signal; they are used
detached, so the advantages carry no gradient. ACE and ProGRPO reshape a base advantage passed in
as ``advantages`` (GRPO, DAPO, ...); CAPO replaces it with pairwise advantages.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from tether.catalogue.advantages.broadcast import check_outcome, to_tokens
from tether.catalogue.advantages.group_stats import group_count, group_sum, groups_of
from tether.catalogue.aggregate import masked_seq_mean
from tether.catalogue.contracts import Metrics, check_groups, check_same_shape, detached, token_advantages
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


@register(
    "advantage",
    "ace",
    paper="Overconfident Errors Need Stronger Correction: Asymmetric Confidence Penalties for "
    "Reinforcement Learning",
    arxiv="2602.21420",
    status="reconstructed",
    card="ratio#12",
)
def ace(
    advantages: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    alpha: float = 0.5,
    confidence: Literal["sum", "mean"] = "sum",
) -> tuple[torch.Tensor, Metrics]:
    """ACE: scale up the negative advantages of errors the policy grew more confident in than pi_ref.

    Paper: Xu et al., "Overconfident Errors Need Stronger Correction: Asymmetric Confidence
    Penalties for Reinforcement Learning", arXiv 2602.21420. Reconstructed (no code released).

    c_i = sg(sum_t m (lp - lp_ref))  (confidence shift log pi(y|x)/pi_ref(y|x); "mean" divides by L_i)
    A'_{i,t} = A_{i,t} (1 + alpha softplus(c_i)) where A_{i,t} < 0, else A_{i,t}.
    alpha: the paper's value is unknown (card: sweep {0.1, 0.5, 1.0}); 0.5 is the middle of that
    sweep. alpha = 0 returns the base advantages.
    """
    check_same_shape("logprobs", logprobs, ref_logprobs=ref_logprobs, response_mask=response_mask)
    if alpha < 0:
        raise InvalidInputError(f"ace: alpha must be >= 0, got {alpha}")
    if confidence not in ("sum", "mean"):
        raise InvalidInputError(f"ace: confidence must be 'sum' or 'mean', got {confidence!r}")
    valid = response_mask.bool()
    diff = torch.where(valid, logprobs.detach() - ref_logprobs.detach(), torch.zeros_like(logprobs))
    c = diff.sum(-1)
    if confidence == "mean":
        c = c / valid.sum(-1).clamp(min=1).to(c.dtype)
    adv = token_advantages(advantages.detach(), response_mask).to(logprobs.dtype)
    scale = 1.0 + alpha * F.softplus(c).unsqueeze(-1)
    out = torch.where(adv < 0, adv * scale, adv)
    out = to_tokens(out, response_mask)
    neg = (adv < 0) & valid
    metrics: Metrics = {
        "ace/confidence_mean": detached(c.mean()),
        "ace/scale_mean_neg": detached(
            scale.expand_as(adv)[neg].mean() if bool(neg.any()) else torch.ones(())
        ),
        "ace/overconfident_frac": detached((c > 0).to(c.dtype).mean()),
    }
    return out, metrics


@register(
    "advantage",
    "capo",
    paper="Calibration-Aware Policy Optimization for Reasoning LLMs",
    arxiv="2604.12632",
    status="reconstructed",
    card="ratio#13",
)
def capo(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    noise_quantile: float | None = None,
    correct_threshold: float = 0.5,
    normalization: Literal["auc", "card"] = "auc",
) -> tuple[torch.Tensor, Metrics]:
    """CAPO: pairwise advantages from a logistic AUC surrogate between correct and wrong confidences.

    Paper: Wang et al., "Calibration-Aware Policy Optimization for Reasoning LLMs", arXiv
    2604.12632. Reconstructed (code "TBD"; card ratio#13).

    s_i = sg(mean_t lp_{i,t}) (negative log-perplexity); per group P = correct (r > threshold),
    N = incorrect. Group loss L_g = (1/(|P||N|)) sum_{i in P, j in N} log(1 + exp(-(s_i - s_j))).
    "auc" (default): A = -G dL_g/ds, i.e. A_i = G/(|P||N|) sum_{j in N} sigmoid(s_j - s_i) for i in P and
    A_j = -G/(|P||N|) sum_{i in P} sigmoid(s_j - s_i) for j in N (G = group size), so at r = 1 the
    seq-mean-token-mean policy-gradient loss has exactly the gradient of mean_g L_g.
    "card": A_i = (1/|N|) sum_j sigmoid(s_j - s_i), A_j = -(1/|P|) sum_i sigmoid(s_j - s_i) (the card's
    form; it rescales the two sides differently, so it is not the gradient of one loss unless |P|=|N|).
    Groups with no correct or no wrong sample get A = 0; rows with no valid token are left out.
    Noise mask (off by default; the paper's thresholds are unknown, the card suggests 0.1): with
    ``noise_quantile=q`` and ``ref_logprobs``, correct samples whose reference confidence is below
    the batch q-quantile and wrong samples above the (1-q)-quantile get A = 0 and leave the pairs.
    """
    check_outcome(rewards, response_mask)
    check_groups(group_ids, rewards.shape[0])
    check_same_shape("logprobs", logprobs, response_mask=response_mask, ref_logprobs=ref_logprobs)
    if normalization not in ("auc", "card"):
        raise InvalidInputError(f"capo: normalization must be 'auc' or 'card', got {normalization!r}")
    s = masked_seq_mean(logprobs.detach(), response_mask)
    has_tokens = response_mask.bool().any(-1)
    correct = (rewards.detach() > correct_threshold) & has_tokens
    wrong = (rewards.detach() <= correct_threshold) & has_tokens
    dropped = torch.zeros_like(correct)
    if noise_quantile is not None:
        if ref_logprobs is None:
            raise InvalidInputError("capo: noise_quantile needs ref_logprobs (reference-policy log-probs)")
        if not 0.0 < noise_quantile < 0.5:
            raise InvalidInputError(f"capo: noise_quantile must be in (0, 0.5), got {noise_quantile}")
        ref_s = masked_seq_mean(ref_logprobs.detach(), response_mask)
        if bool(has_tokens.any()):
            lo = torch.quantile(ref_s[has_tokens], noise_quantile)
            hi = torch.quantile(ref_s[has_tokens], 1.0 - noise_quantile)
            dropped = (correct & (ref_s < lo)) | (wrong & (ref_s > hi))
            correct = correct & ~dropped
            wrong = wrong & ~dropped
    groups = groups_of(group_ids, s.shape[0])
    inverse = groups.index
    same = inverse.unsqueeze(0) == inverse.unsqueeze(1)
    pair = same & correct.unsqueeze(1) & wrong.unsqueeze(0)  # [i in P, j in N]
    sig = torch.sigmoid(s.unsqueeze(0) - s.unsqueeze(1))  # sig[i, j] = sigmoid(s_j - s_i)
    sig = torch.where(pair, sig, torch.zeros_like(sig))
    n_pos = groups.gather(group_count(groups, correct, s.dtype))
    n_neg = groups.gather(group_count(groups, wrong, s.dtype))
    size = groups.gather(group_count(groups, dtype=s.dtype))
    pos_sum = sig.sum(1)  # for i in P
    neg_sum = sig.sum(0)  # for j in N
    if normalization == "auc":
        denom = (n_pos * n_neg).clamp(min=1.0)
        a_pos = size * pos_sum / denom
        a_neg = -size * neg_sum / denom
    else:
        a_pos = pos_sum / n_neg.clamp(min=1.0)
        a_neg = -neg_sum / n_pos.clamp(min=1.0)
    active = (n_pos > 0) & (n_neg > 0)
    adv = torch.where(correct & active, a_pos, torch.where(wrong & active, a_neg, torch.zeros_like(s)))
    out = to_tokens(adv, response_mask)
    n_pairs = pair.to(s.dtype).sum()
    correct_above = torch.where(pair, (s.unsqueeze(1) > s.unsqueeze(0)).to(s.dtype), torch.zeros_like(sig))
    metrics: Metrics = {
        "capo/pair_auc": detached(correct_above.sum() / n_pairs if float(n_pairs) > 0 else torch.tensor(0.5)),
        "capo/noise_dropped_frac": detached(dropped.to(s.dtype).mean()),
        "capo/confidence_mean": detached(s.mean()),
        "adv/abs_mean": detached(adv.abs().mean()),
    }
    return out, metrics


def low_probability_confidence(
    logprobs: torch.Tensor, response_mask: torch.Tensor, fraction: float = 0.2
) -> torch.Tensor:
    """c(o|q) = exp(mean of the lowest ceil(fraction * L) valid token log-probs) per row [B]; 1 if empty."""
    valid = response_mask.bool()
    lengths = valid.sum(-1)
    k = torch.ceil(lengths.to(logprobs.dtype) * fraction).clamp(min=1).long()
    filled = torch.where(valid, logprobs.detach(), torch.full_like(logprobs, math.inf))
    ordered, _ = torch.sort(filled, dim=-1)
    positions = torch.arange(logprobs.shape[-1], device=logprobs.device).unsqueeze(0)
    take = (positions < k.unsqueeze(-1)) & (positions < lengths.unsqueeze(-1))
    total = torch.where(take, ordered, torch.zeros_like(ordered)).sum(-1)
    mean = total / take.sum(-1).clamp(min=1).to(logprobs.dtype)
    return torch.exp(mean)


@register(
    "advantage",
    "progrpo",
    paper="Back to Basics: Revisiting Exploration in Reinforcement Learning for LLM Reasoning via "
    "Generative Probabilities",
    arxiv="2602.05281",
    status="reconstructed",
    card="ratio#16",
    aliases=("arm",),
)
def progrpo(
    advantages: torch.Tensor,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    logprobs: torch.Tensor,
    prompt_logprobs: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_mask: torch.Tensor,
    alpha: float = 0.1,
    low_fraction: float = 0.2,
) -> tuple[torch.Tensor, Metrics]:
    """ProGRPO / ARM: shift advantages by prompt confidence minus answer confidence.

    Paper: Li et al., "Back to Basics: Revisiting Exploration in Reinforcement Learning for LLM
    Reasoning via Generative Probabilities", arXiv 2602.05281. Partly exact: the advantage form is
    the paper's; the confidence definitions are Reconstructed (card ratio#16).

    A~_i = A_i if every reward of the group is <= 0 (no correct answer), else A_i + alpha (c(q) - c(o_i|q)),
    c(q) = exp(mean prompt log-prob) (inverse prompt perplexity, from prompt_logprobs/prompt_mask),
    c(o|q) = exp(mean of the lowest 20% response log-probs), both detached. The base advantage
    ``advantages`` ([B] or [B, T], e.g. GRPO's) is an input, as in ``ace``, so ARM composes with any
    estimator. alpha = 0 returns the base advantages (card: sweep {0.1, 0.5}).
    """
    check_outcome(rewards, response_mask)
    check_groups(group_ids, rewards.shape[0])
    check_same_shape("logprobs", logprobs, response_mask=response_mask)
    check_same_shape("prompt_logprobs", prompt_logprobs, prompt_mask=prompt_mask)
    if not 0.0 < low_fraction <= 1.0:
        raise InvalidInputError(f"progrpo: low_fraction must be in (0, 1], got {low_fraction}")
    c_q = torch.exp(masked_seq_mean(prompt_logprobs.detach(), prompt_mask))
    c_o = low_probability_confidence(logprobs, response_mask, low_fraction)
    groups = groups_of(group_ids, c_o.shape[0])
    any_correct = groups.gather(group_sum((rewards.detach() > 0).to(c_o.dtype), groups)) > 0
    shift = torch.where(any_correct, alpha * (c_q - c_o), torch.zeros_like(c_o))
    adv = token_advantages(advantages.detach(), response_mask).to(logprobs.dtype) + shift.unsqueeze(-1)
    out = to_tokens(adv, response_mask)
    metrics: Metrics = {
        "progrpo/prompt_confidence": detached(c_q.mean()),
        "progrpo/answer_confidence": detached(c_o.mean()),
        "progrpo/shift_abs_mean": detached(shift.abs().mean()),
    }
    return out, metrics
