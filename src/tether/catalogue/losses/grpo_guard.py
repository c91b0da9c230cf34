"""GRPO-Guard (token form): re-centre the log-ratio so that its mean under pi_old is zero."""

from __future__ import annotations

import torch

from tether.catalogue.aggregate import AggregationLike, aggregate, masked_mean
from tether.catalogue.contracts import LossOutput, check_2d, detached, token_advantages
from tether.catalogue.ratio import LOG_RATIO_CLAMP, clipped_surrogate, ratio_metrics
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


def _check_logits(logits: torch.Tensor, old_logits: torch.Tensor, token_ids: torch.Tensor) -> None:
    if logits.dim() != 3:
        raise InvalidInputError(
            f"logits must be a [batch, tokens, vocab] tensor, got shape {tuple(logits.shape)}"
        )
    if old_logits.shape != logits.shape:
        raise InvalidInputError(
            f"old_logits has shape {tuple(old_logits.shape)} but logits has shape {tuple(logits.shape)}; "
            "pass both over the same response tokens and vocabulary"
        )
    check_2d("token_ids", token_ids)
    if token_ids.shape != logits.shape[:2]:
        raise InvalidInputError(
            f"token_ids has shape {tuple(token_ids.shape)} but logits are {tuple(logits.shape)}; "
            "token_ids must be [batch, tokens] matching the first two dims of logits"
        )


def guard_log_ratio(
    logits: torch.Tensor, old_logits: torch.Tensor, token_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log r~, log r, KL) per position, [B, T] each, unclamped.

    log r = lp - lp_old of the sampled token (both from the logits), KL_t = KL(pi_old(.|s_t) ||
    pi_theta(.|s_t)) exactly over the vocabulary (differentiable through ``logits``; ``old_logits``
    is detached), and log r~ = log r + KL, so that E_{v ~ pi_old}[log r~] = 0 at every position.
    Vocabulary entries with pi_old = 0 (logit -inf) contribute 0 to the KL.
    """
    logp = torch.log_softmax(logits, dim=-1)
    old_logp = torch.log_softmax(old_logits.detach(), dim=-1)
    old_p = old_logp.exp()
    terms = torch.where(old_p > 0, old_p * (old_logp - logp), torch.zeros_like(logp))
    kl = terms.sum(-1)
    index = token_ids.long().unsqueeze(-1)
    raw = logp.gather(-1, index).squeeze(-1) - old_logp.gather(-1, index).squeeze(-1)
    return raw + kl, raw, kl


@register(
    "policy_loss",
    "grpo_guard",
    paper="GRPO-Guard: Mitigating Implicit Over-Optimization in Flow Matching via Regulated Clipping",
    arxiv="2510.22319",
    status="reconstructed",
    card="ratio#2",
)
def grpo_guard(
    logits: torch.Tensor,
    old_logits: torch.Tensor,
    token_ids: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: AggregationLike = "seq-mean-token-mean",
) -> LossOutput:
    """GRPO-Guard RatioNorm, token form: clip a log-ratio re-centred by the exact per-position KL.

    Paper: Wang et al., "GRPO-Guard: Mitigating Implicit Over-Optimization in Flow Matching via
    Regulated Clipping", arXiv 2510.22319. Reconstructed: the paper is about Gaussian flow-matching
    steps (log r~ = s_t (lp - lp_old) + ||mu_theta - mu_old||^2 / (2 s_t)); this categorical mapping
    is the card's own hypothesis, not in the paper.

    For a categorical step E_{pi_old}[log r] = -KL(pi_old || pi_theta) < 0 (the left shift that keeps
    positive-advantage tokens from reaching the upper clip). Re-centre:
      log r~_t = (lp_t - lp_old_t) + KL_t(pi_old(.|s_t) || pi_theta(.|s_t))   (clamped to +-20)
      l_t = max(-A_t r~_t, -A_t clip(r~_t, 1 - eps_low, 1 + eps_high)), seq-mean-token-mean (GRPO).
    The KL is exact over the vocabulary and differentiable through ``logits``. The sampled-token
    log-probs are derived from ``logits``/``old_logits`` and ``token_ids`` (one source of truth, so
    E_{pi_old}[log r~] = 0 holds exactly); ``logits == old_logits`` gives r~ = 1 exactly. Not mapped:
    the per-step variance rescaling and gradient reweighting over noise levels of the flow form.
    """
    _check_logits(logits, old_logits, token_ids)
    if response_mask.shape != token_ids.shape:
        raise InvalidInputError(
            f"response_mask has shape {tuple(response_mask.shape)} but token_ids has shape "
            f"{tuple(token_ids.shape)}; pass both as [batch, tokens]"
        )
    dtype = logits.dtype
    adv = token_advantages(advantages, response_mask).to(dtype)
    log_rt, raw, kl = guard_log_ratio(logits, old_logits, token_ids)
    log_rt = torch.clamp(log_rt, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    per_token = clipped_surrogate(torch.exp(log_rt), adv, eps_low, eps_high)
    loss = aggregate(per_token, response_mask, aggregation)

    metrics = ratio_metrics(log_rt, response_mask, adv, eps_low, eps_high)
    with torch.no_grad():
        m = response_mask.float()
        metrics["grpo_guard/kl_mean"] = detached(masked_mean(kl.detach(), m))
        metrics["grpo_guard/raw_log_ratio_mean"] = detached(masked_mean(raw.detach(), m))
        metrics["grpo_guard/log_ratio_mean"] = detached(masked_mean(log_rt.detach(), m))
    metrics["policy/loss"] = detached(loss)
    return loss, metrics
