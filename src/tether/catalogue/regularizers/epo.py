"""EPO: entropy bonus plus a band penalty keeping entropy near its historical average (card ratio#10)."""

from __future__ import annotations

import math

import torch

from tether.catalogue.aggregate import AggregationLike, aggregate, local, masked_mean
from tether.catalogue.contracts import LossOutput, check_2d, check_same_shape, detached
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


def epo_history_update(
    historical_entropy: float | None, count: int, step_entropy: float | torch.Tensor
) -> tuple[float, int]:
    """Running mean of the entropy of one turn index over training: returns (new mean, new count).

    EPO's H_hist[k] is the mean over the training history of the step-k (turn-k) entropy. Keep one
    (mean, count) pair per turn index; pass None / 0 before the first step.
    """
    h = (
        float(step_entropy.detach().float().mean().item())
        if isinstance(step_entropy, torch.Tensor)
        else float(step_entropy)
    )
    if historical_entropy is None or count <= 0:
        return h, 1
    n = count + 1
    return float(historical_entropy) + (h - float(historical_entropy)) / n, n


def epo_phase_weight(epoch: int, total_epochs: int = 150) -> float:
    """EPO's phase weight w: gentle decay in the first half, fast exponential decay in the second.

    With half = total_epochs / 2 and p the progress within the current half (0 to 1):
    first half w = 1 - 0.2 (1 - exp(-2p)) (down to about 0.83); second half w = 0.8 exp(-3p)
    (down to about 0.04). Reconstructed from the released code (card ratio#10).
    """
    if total_epochs < 2:
        raise InvalidInputError(f"epo_phase_weight: total_epochs must be >= 2, got {total_epochs}")
    half = total_epochs / 2.0
    if epoch < half:
        p = max(epoch, 0) / half
        return 1.0 - 0.2 * (1.0 - math.exp(-2.0 * p))
    p = min((epoch - half) / half, 1.0)
    return 0.8 * math.exp(-3.0 * p)


@register(
    "regularizer",
    "epo",
    paper="EPO: Entropy-regularized Policy Optimization for LLM Agents Reinforcement Learning",
    arxiv="2509.22576",
    status="reconstructed",
    card="ratio#10",
    state_update=epo_history_update,
)
def epo(
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
    historical_entropy: float | torch.Tensor,
    coef: float = 0.001,
    smooth_coef: float = 1.0,
    band_low: float = 0.8,
    band_high: float = 1.2,
    phase_weight: float = 1.0,
    released_form: bool = False,
    out_of_band_value: float = 0.1,
    aggregation: AggregationLike = "token-mean",
) -> LossOutput:
    """EPO: entropy bonus plus a smoothing penalty that keeps token entropy in a band around its history.

    Paper: Xu et al., "EPO: Entropy-regularized Policy Optimization for LLM Agents Reinforcement
    Learning", arXiv 2509.22576. Reconstructed (differentiable form of the paper's intent); the
    released code (github.com/WujiangXu/EPO) is available as ``released_form=True``.

    Hbar = ``historical_entropy`` (detached; a float, or [B] for each sample's turn index k:
    H_hist[k]); H = agg(entropy);
    P = agg(relu(band_low Hbar - H_t) + relu(H_t - band_high Hbar));
    term = -coef H + coef * smooth_coef * phase_weight * P, with c_H = 0.001, c_s = 1.0,
    band (0.8, 1.2) (the launch script uses (0.5, 1.5)); ``epo_phase_weight`` gives w(epoch).
    Zero smoothing gradient inside the band, a pull back toward it outside. The paper applies
    the smoothing only for turns k >= K_max / 2 (pass phase_weight = 0 otherwise).
    released_form=True: P = agg(out_of_band_value * 1[H_t outside (lo Hbar, hi Hbar)]), a constant:
    the smoothing then has NO gradient and EPO reduces to PPO plus an entropy bonus (a bug of
    the released code, kept to reproduce it). smooth_coef = 0 gives ``entropy_bonus`` with coef c_H.
    """
    check_2d("entropy", entropy)
    check_same_shape("entropy", entropy, response_mask=response_mask)
    if not 0.0 <= band_low <= band_high:
        raise InvalidInputError(f"epo: need 0 <= band_low <= band_high, got ({band_low}, {band_high})")
    if coef < 0 or smooth_coef < 0 or phase_weight < 0:
        raise InvalidInputError(
            f"epo: coef, smooth_coef and phase_weight must be >= 0, got {coef}, {smooth_coef}, {phase_weight}"
        )
    hist = torch.as_tensor(historical_entropy, dtype=entropy.dtype, device=entropy.device).detach()
    if hist.dim() == 1:
        if hist.shape[0] != entropy.shape[0]:
            raise InvalidInputError(
                f"epo: historical_entropy has {hist.shape[0]} values but the batch has {entropy.shape[0]} "
                "samples; pass a float or one value per sample (its turn's history)"
            )
        hist = hist.unsqueeze(-1)
    elif hist.dim() != 0:
        raise InvalidInputError(
            f"epo: historical_entropy must be a float or a [batch] tensor, got shape {tuple(hist.shape)}"
        )
    lo = band_low * hist
    hi = band_high * hist
    h_bar = aggregate(entropy, response_mask, aggregation)
    if released_form:
        outside = (entropy.detach() <= lo) | (entropy.detach() >= hi)
        per_token = torch.where(
            outside,
            torch.full((), out_of_band_value, dtype=entropy.dtype, device=entropy.device),
            torch.zeros((), dtype=entropy.dtype, device=entropy.device),
        )
    else:
        per_token = torch.relu(lo - entropy) + torch.relu(entropy - hi)
    penalty = aggregate(per_token, response_mask, aggregation)
    term = -coef * h_bar + coef * smooth_coef * phase_weight * penalty
    with torch.no_grad():
        e = entropy.detach()
        out_frac = masked_mean(((e < lo) | (e > hi)).to(e.dtype), response_mask)
    return term, {
        "reg/entropy": detached(aggregate(entropy.detach(), response_mask, local(aggregation))),
        "epo/band_penalty": detached(aggregate(per_token.detach(), response_mask, local(aggregation))),
        "epo/out_of_band_frac": detached(out_frac),
        "reg/epo_loss": detached(term),
    }
