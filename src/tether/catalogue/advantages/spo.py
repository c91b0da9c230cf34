"""SPO: single-stream advantages against a per-prompt Beta value tracker, normalised over the batch."""

from __future__ import annotations

import torch

from tether.catalogue.advantages.baselines import AdvantageOutput
from tether.catalogue.advantages.broadcast import (
    advantage_metrics,
    as_float,
    check_outcome,
    check_per_sample,
    to_tokens,
)
from tether.catalogue.advantages.group_stats import batch_mean_std
from tether.catalogue.contracts import check_same_shape, detached
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


def spo_divergence(
    logprobs_then: torch.Tensor, logprobs_now: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """D_x = mean_t |lp_then - lp_now| per sample [B], on the response stored at the prompt's last visit.

    0 for an all-padding row (a first-time prompt also uses D = 0).
    """
    check_same_shape("response_mask", response_mask, logprobs_then=logprobs_then, logprobs_now=logprobs_now)
    valid = response_mask.bool()
    diff = torch.where(valid, (logprobs_then - logprobs_now).abs(), torch.zeros_like(logprobs_now))
    return diff.sum(-1) / valid.to(diff.dtype).sum(-1).clamp(min=1.0)


def spo_tracker_update(
    alpha: torch.Tensor,
    beta: torch.Tensor,
    rewards: torch.Tensor,
    divergence: torch.Tensor,
    d_half: float = 0.06,
    rho_min: float = 0.875,
    rho_max: float = 0.96,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance the per-prompt Beta trackers after observing rewards in [0, 1].

    rho = clip(2^(-D / D_half), rho_min, rho_max); alpha <- rho alpha + r; beta <- rho beta + (1 - r).
    With D = 0, rho = rho_max = 0.96. Returns the new (alpha, beta); inputs are not modified.
    """
    if d_half <= 0 or not 0 < rho_min <= rho_max <= 1:
        raise InvalidInputError(
            f"spo_tracker_update: need d_half > 0 and 0 < rho_min <= rho_max <= 1, "
            f"got d_half={d_half}, rho_min={rho_min}, rho_max={rho_max}"
        )
    r = as_float(rewards).to(alpha.dtype)
    rho = torch.clamp(torch.exp2(-divergence.to(alpha.dtype) / d_half), rho_min, rho_max)
    return rho * alpha + r, rho * beta + (1.0 - r)


def spo_tracker_init(
    successes: torch.Tensor, trials: torch.Tensor | int, rho_min: float = 0.875
) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial trackers from an offline estimate of k successes in n samples (n = 8 in the paper).

    N0 = 1/(1 - rho_min); alpha0 = N0 (k + 0.5)/(n + 1); beta0 = N0 (n - k + 0.5)/(n + 1).
    """
    if not 0 <= rho_min < 1:
        raise InvalidInputError(f"spo_tracker_init: rho_min must lie in [0, 1), got {rho_min}")
    k = as_float(successes)
    n = torch.as_tensor(trials, dtype=k.dtype, device=k.device)
    n0 = 1.0 / (1.0 - rho_min)
    return n0 * (k + 0.5) / (n + 1.0), n0 * (n - k + 0.5) / (n + 1.0)


@register(
    "advantage",
    "spo",
    paper="Single-stream Policy Optimization",
    arxiv="2509.13232",
    status="reconstructed",
    card="adv#B30",
    state_update=spo_tracker_update,
)
def spo(
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    tracker_alpha: torch.Tensor,
    tracker_beta: torch.Tensor,
    eps: float = 1e-8,
) -> AdvantageOutput:
    """SPO: baseline = the prompt's tracked success rate, advantages standardised over the whole batch.

    Paper: "Single-stream Policy Optimization", arXiv 2509.13232. Reconstructed: the loss part is
    exact (verl recipe/spo), the tracker is from the paper text (card adv#B30 / ratio#20).

    p_hat_i = alpha_i/(alpha_i + beta_i) from the per-prompt Beta tracker BEFORE this step's update
    (``tracker_alpha``, ``tracker_beta`` [B], looked up by the trainer); A_i = r_i - p_hat_i, then
    A <- (A - mean_B A)/(std_B A + 1e-8) (unbiased std over the batch). No groups: one sample per prompt
    works. Advance the trackers afterwards with :func:`spo_tracker_update` (the registered state update);
    initialise them with :func:`spo_tracker_init`. Pair with the plain PPO clip loss, token-mean.
    """
    check_outcome(rewards, response_mask)
    b = rewards.shape[0]
    check_per_sample("tracker_alpha", tracker_alpha, b)
    check_per_sample("tracker_beta", tracker_beta, b)
    r = as_float(rewards)
    a = tracker_alpha.to(r.dtype)
    bt = tracker_beta.to(r.dtype)
    if bool(((a < 0) | (bt < 0) | (a + bt <= 0)).any()):
        raise InvalidInputError(
            "spo: tracker_alpha and tracker_beta must be >= 0 with alpha + beta > 0; "
            "initialise them with spo_tracker_init"
        )
    p_hat = a / (a + bt)
    raw = r - p_hat
    mean, std = batch_mean_std(raw)
    adv = to_tokens((raw - mean) / (std + eps), response_mask)
    metrics = advantage_metrics(adv, response_mask, r)
    metrics["spo/baseline_mean"] = detached(p_hat.mean() if b else torch.zeros(()))
    return adv, metrics
