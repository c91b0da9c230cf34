"""VERL (hidden-state): effective-rank exploration/exploitation bonus added to the advantage."""

from __future__ import annotations

import torch

from tether.catalogue.advantages.broadcast import to_tokens
from tether.catalogue.contracts import Metrics, check_2d, detached, token_advantages
from tether.catalogue.registry import register
from tether.errors import InvalidInputError

DEV_CLIP = 5.0


def effective_rank(matrix: torch.Tensor) -> torch.Tensor:
    """ER = exp(entropy of the normalised singular values) of an [L, D] matrix; 0 for an empty or zero one."""
    if matrix.shape[0] == 0:
        return torch.zeros((), dtype=matrix.dtype)
    sv = torch.linalg.svdvals(matrix)
    total = sv.sum()
    if float(total) <= 0.0:
        return torch.zeros((), dtype=matrix.dtype)
    p = sv / total
    logp = torch.log(torch.where(p > 0, p, torch.ones_like(p)))
    return torch.exp(-(p * logp).sum())


def rank_indicators(
    hidden_states: torch.Tensor, response_mask: torch.Tensor, stride: int = 40, min_windows: int = 3
) -> torch.Tensor:
    """Per-sample (ER, ERV, ERA) [B, 3] of the response hidden states.

    ER over the full response; ERV / ERA = mean first / second finite difference of ER over the
    prefixes of length stride, 2 stride, ..., L. For short responses the stride shrinks to
    max(1, L // min_windows) so that ERV and ERA stay defined; L < 2 gives ERV = 0, L < 3 ERA = 0.
    """
    out = torch.zeros(hidden_states.shape[0], 3, dtype=hidden_states.dtype, device=hidden_states.device)
    with torch.no_grad():
        for i in range(hidden_states.shape[0]):
            rows = hidden_states[i][response_mask[i].bool()].detach()
            length = rows.shape[0]
            if length == 0:
                continue
            step = max(1, min(stride, length // min_windows))
            ends = list(range(step, length + 1, step))
            if ends[-1] != length:
                ends.append(length)
            ers = torch.stack([effective_rank(rows[:e]) for e in ends])
            out[i, 0] = ers[-1]
            if ers.numel() >= 2:
                d1 = ers[1:] - ers[:-1]
                out[i, 1] = d1.mean()
                if d1.numel() >= 2:
                    out[i, 2] = (d1[1:] - d1[:-1]).mean()
    return out.to(hidden_states.device)


def _batch_means(indicators: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    rows = response_mask.bool().any(-1)
    if not bool(rows.any()):
        return torch.zeros(3, dtype=indicators.dtype, device=indicators.device)
    return indicators[rows].mean(0)


def verl_er_update_ema(
    ema_means: torch.Tensor | None,
    hidden_states: torch.Tensor,
    response_mask: torch.Tensor,
    stride: int = 40,
    ema_alpha: float = 0.3,
) -> torch.Tensor:
    """VERL's state: EMA of the batch means of (ER, ERV, ERA): m <- (1 - a) m + a mean_batch (first: mean)."""
    means = _batch_means(rank_indicators(hidden_states, response_mask, stride), response_mask)
    if ema_means is None:
        return means
    return (1.0 - ema_alpha) * ema_means.detach().to(means.dtype) + ema_alpha * means


@register(
    "advantage",
    "verl_er",
    paper="Beyond the Exploration-Exploitation Trade-off: A Hidden State Approach for LLM Reasoning in RLVR",
    arxiv="2509.23808",
    status="exact",
    card="ratio#19",
    state_update=verl_er_update_ema,
)
def verl_er(
    advantages: torch.Tensor,
    hidden_states: torch.Tensor,
    response_mask: torch.Tensor,
    ema_means: torch.Tensor | None = None,
    stride: int = 40,
    gain: float = 2.0,
    kappa: float = 2.0,
    scale: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """VERL: bounded bonus from effective-rank deviations, gated by ER acceleration, added to A.

    Paper: Huang et al., "Beyond the Exploration-Exploitation Trade-off: A Hidden State Approach for
    LLM Reasoning in RLVR", arXiv 2509.23808. Exact (hf618/VERL).

    ER = exp(H(normalised singular values of the response hidden states)); ERV, ERA = mean first and
    second differences of ER over prefixes of ``stride`` tokens (see ``rank_indicators``).
    dev_k = clip((v_k - m_k) / (|m_k| + 1e-8), -5, 5), m_k = EMA of batch means (``ema_means`` [3] in
    the order ER, ERV, ERA; None at the first step = this batch's means; update with
    ``verl_er_update_ema``, alpha 0.3).  g = sigmoid(gain dev_ERA);
    aux = scale [g tanh(dev_ER) + (1 - g) tanh(dev_ERV)]   (w_explore on ER, w_exploit on ERV)
    A = A_0 + min(relu(aux), |A_0| / kappa): the bonus is in [0, |A_0|/kappa] and 0 when A_0 = 0.
    """
    if hidden_states.dim() != 3 or hidden_states.shape[:2] != response_mask.shape:
        raise InvalidInputError(
            f"verl_er: hidden_states must be [batch, tokens, dim] matching response_mask "
            f"{tuple(response_mask.shape)}, got {tuple(hidden_states.shape)}"
        )
    check_2d("response_mask", response_mask)
    if stride < 1 or kappa <= 0:
        raise InvalidInputError(
            f"verl_er: need stride >= 1 and kappa > 0, got stride={stride}, kappa={kappa}"
        )
    ind = rank_indicators(hidden_states, response_mask, stride)
    if ema_means is None:
        m = _batch_means(ind, response_mask)
    else:
        if ema_means.shape != (3,):
            raise InvalidInputError(
                f"verl_er: ema_means must be a [3] tensor (ER, ERV, ERA), got {tuple(ema_means.shape)}"
            )
        m = ema_means.detach().to(ind.dtype)
    dev = torch.clamp((ind - m) / (m.abs() + 1e-8), -DEV_CLIP, DEV_CLIP)
    gate = torch.sigmoid(gain * dev[:, 2])
    aux = scale * (gate * torch.tanh(dev[:, 0]) + (1.0 - gate) * torch.tanh(dev[:, 1]))
    base = token_advantages(advantages.detach(), response_mask).to(ind.dtype)
    bonus = torch.minimum(torch.relu(aux).unsqueeze(-1).expand_as(base), base.abs() / kappa)
    out = to_tokens(base + bonus, response_mask)
    valid = response_mask.bool()
    metrics: Metrics = {
        "verl/er_mean": detached(_batch_means(ind, response_mask)[0]),
        "verl/gate_mean": detached(gate.mean()),
        "verl/aux_mean": detached(aux.mean()),
        "verl/bonus_mean": detached(bonus[valid].mean() if bool(valid.any()) else torch.zeros(())),
    }
    return out, metrics
