"""CalibRL: dual-clip PPO plus an expert-calibrated, LeakyReLU-gated guidance term."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tether.catalogue.aggregate import AggregationLike, aggregate, masked_mean
from tether.catalogue.contracts import LossOutput, check_2d, check_same_shape, detached, token_advantages
from tether.catalogue.losses.ppo_clip import clip_loss
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


def _per_row(name: str, tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Accept [B, T] or a single [T] row broadcast to every sample."""
    if tensor.shape == like.shape:
        return tensor
    if tensor.dim() == 1 and tensor.shape[0] == like.shape[1]:
        return tensor.unsqueeze(0).expand(like.shape)
    raise InvalidInputError(
        f"calibrl: {name} has shape {tuple(tensor.shape)}; expected [batch, tokens] {tuple(like.shape)} "
        f"(the expert trajectory of each sample's group, aligned by position) or [tokens] {like.shape[1]}"
    )


@register(
    "policy_loss",
    "calibrl",
    paper="Controllable Exploration in Hybrid-Policy RLVR for Multi-Modal Reasoning",
    arxiv="2602.20197",
    status="exact",
    card="adv#B20",
)
def calibrl(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    rewards: torch.Tensor,
    expert_old_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    guide_weight: float = 0.1,
    negative_slope: float = 0.5,
    success_threshold: float = 0.1,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    clip_c: float = 3.0,
    expert_mask: torch.Tensor | None = None,
    aggregation: AggregationLike = "token-mean",
) -> LossOutput:
    """CalibRL: PPO on on-policy samples plus a guidance term that uses the expert's log-probs as a calibration baseline.

    Paper: Huang et al., "Controllable Exploration in Hybrid-Policy RLVR for Multi-Modal Reasoning",
    arXiv 2602.20197. Exact (card adv#B20, zhh6425/CalibRL ``core_algos.py`` + ``dp_actor.py``).

    The batch holds the on-policy samples only (the expert trajectory of each group is excluded from
    the PPO term and enters through ``expert_old_logprobs``: [B, T], the expert old log-probs of the
    sample's group aligned by token POSITION, or a single [T] row broadcast to all samples).
    z_t = lp_t - expert_old_logprobs_t; sign_i = 2 1[r_i > 0.1] - 1;
    g_t = LeakyReLU_{0.5}(-sign_i z_t) |A_i|;
    loss = PPO(dual clip c = 3, eps 0.2, token-mean) + 0.1 token-mean(g).
    A correct sample is pushed up at the full rate |A| while below the expert baseline (z < 0) and at
    half rate above it; a wrong sample is pushed down at full rate above, half rate below. The paper
    pairs this with A_i = r_i - mean_q r (no std). ``expert_mask`` ([B, T] or [T], optional) drops
    positions past the expert's length from the guidance term.
    """
    check_2d("logprobs", logprobs)
    check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, response_mask=response_mask)
    batch = logprobs.shape[0]
    if rewards.dim() != 1 or rewards.shape[0] != batch:
        raise InvalidInputError(
            f"calibrl: rewards must be a [batch] tensor ({batch}), got shape {tuple(rewards.shape)}"
        )
    if guide_weight < 0:
        raise InvalidInputError(
            f"calibrl: guide_weight must be >= 0 (the paper uses 0.1), got {guide_weight}"
        )
    if not 0.0 <= negative_slope <= 1.0:
        raise InvalidInputError(
            f"calibrl: negative_slope must be in [0, 1] (the paper uses 0.5), got {negative_slope}"
        )
    if clip_c <= 1.0:
        raise InvalidInputError(f"calibrl: clip_c must be > 1 (the paper uses 3.0), got {clip_c}")
    expert = _per_row("expert_old_logprobs", expert_old_logprobs, logprobs).to(logprobs.dtype)
    guide_mask = response_mask.bool()
    if expert_mask is not None:
        guide_mask = guide_mask & _per_row("expert_mask", expert_mask, logprobs).bool()

    ppo, metrics = clip_loss(
        logprobs, old_logprobs, advantages, response_mask, eps_low, eps_high, clip_c, aggregation
    )
    adv = token_advantages(advantages, response_mask).to(logprobs.dtype)
    sign = torch.where(rewards > success_threshold, 1.0, -1.0).to(logprobs.dtype).unsqueeze(-1)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    z = torch.where(guide_mask, logprobs - expert, zero)
    guided = F.leaky_relu(-sign * z, negative_slope) * adv.abs()
    guide = aggregate(guided, guide_mask, aggregation)
    loss = ppo + guide_weight * guide
    with torch.no_grad():
        g = guide_mask.float()
        metrics["calibrl/ppo_loss"] = detached(ppo)
        metrics["calibrl/guide_loss"] = detached(guide)
        metrics["calibrl/z_mean"] = detached(masked_mean(z.detach(), g))
        metrics["calibrl/above_expert_frac"] = detached(masked_mean((z.detach() > 0).float(), g))
    metrics["policy/loss"] = detached(loss)
    return loss, metrics
