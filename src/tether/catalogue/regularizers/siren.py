"""SIREN: selective (top-p nucleus, peak-entropy) entropy, anchored to its initial value (card ratio#5)."""

from __future__ import annotations

import torch

from tether.catalogue.aggregate import AggregationLike, aggregate, local, masked_mean
from tether.catalogue.contracts import LossOutput, detached
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


def nucleus_entropy(logits: torch.Tensor, top_p: float = 0.8, top_k: int = 10000) -> torch.Tensor:
    """Entropy of the renormalised top-p nucleus of softmax(logits), per position: [B, T, V] -> [B, T].

    Probabilities are sorted in descending order (restricted to the top-k); the kept set is the
    tokens whose inclusive cumulative probability is < ``top_p``. If the top-1 token alone has
    probability >= top_p the set is empty and the entropy is 0. Differentiable w.r.t. logits
    (the membership of the set is a constant).
    """
    if logits.dim() != 3:
        raise InvalidInputError(
            f"logits must be a [batch, tokens, vocab] tensor, got shape {tuple(logits.shape)}"
        )
    if not 0.0 < top_p <= 1.0:
        raise InvalidInputError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 1:
        raise InvalidInputError(f"top_k must be >= 1, got {top_k}")
    probs = torch.softmax(logits, dim=-1)
    k = min(int(top_k), logits.shape[-1])
    top, _ = torch.topk(probs, k, dim=-1)
    keep = torch.cumsum(top.detach(), dim=-1) < top_p
    zero = torch.zeros((), dtype=top.dtype, device=top.device)
    kept = torch.where(keep, top, zero)
    tiny = torch.finfo(top.dtype).tiny
    q = kept / kept.sum(-1, keepdim=True).clamp_min(tiny)
    plogp = q * torch.log(q.clamp_min(tiny))
    return -torch.where(keep, plogp, zero).sum(-1)


def peak_mask(values: torch.Tensor, response_mask: torch.Tensor, quantile: float = 0.8) -> torch.Tensor:
    """1 where ``values`` exceed the per-response ``quantile`` of its valid tokens (linear interpolation)."""
    valid = response_mask.bool()
    v = values.detach()
    nan = torch.full((), float("nan"), dtype=v.dtype, device=v.device)
    q = torch.nanquantile(torch.where(valid, v, nan), quantile, dim=-1, keepdim=True)
    return valid & (v > q)


def siren_anchor_update(anchor_entropy: float | None, selective_entropy: float | torch.Tensor) -> float:
    """SIREN's anchor: H0 is the selective entropy of the first batch, then kept fixed.

    Pass the ``siren/selective_entropy`` metric. Returns the existing anchor unchanged when set.
    """
    if anchor_entropy is not None:
        return float(anchor_entropy)
    if isinstance(selective_entropy, torch.Tensor):
        return float(selective_entropy.detach().float().item())
    return float(selective_entropy)


@register(
    "regularizer",
    "siren",
    paper="Rethinking Entropy Regularization in Large Reasoning Models",
    arxiv="2509.25133",
    status="exact",
    card="ratio#5",
    state_update=siren_anchor_update,
)
def siren(
    logits: torch.Tensor,
    response_mask: torch.Tensor,
    anchor_entropy: float | torch.Tensor | None,
    coef: float = 0.005,
    top_p: float = 0.8,
    top_k: int = 10000,
    peak_quantile: float = 0.8,
    aggregation: AggregationLike = "seq-mean-token-mean",
) -> LossOutput:
    """SIREN: anchor the entropy of the top-p nucleus at the top-20% entropy positions to its start value.

    Paper: "Rethinking Entropy Regularization in Large Reasoning Models" (SIREN),
    arXiv 2509.25133. Exact (card ratio#5, from github.com/Linn3a/siren).

    Hp_t = entropy of the renormalised top-p nucleus (p = 0.8 within the top-k = 10000; 0 if the
    top-1 token has prob >= p); g_t = 1[Hp_t > q_0.8(Hp over the valid tokens of the response)];
    Hsel = seq-mean-token-mean of Hp over g; term = coef * (Hsel - H0)^2, coef (lambda) = 0.005.
    H0 = ``anchor_entropy`` (state): Hsel of the first training batch. Pass None on that first
    batch: the term is then 0 (with zero gradient) and ``siren/selective_entropy`` gives the
    value to store (``siren_anchor_update``, the registered state update). The paper's base
    loss is Dr.GRPO; add this term to it.
    """
    if logits.dim() != 3 or logits.shape[:2] != response_mask.shape:
        raise InvalidInputError(
            f"logits {tuple(logits.shape)} must be [batch, tokens, vocab] over response_mask "
            f"{tuple(response_mask.shape)}"
        )
    if coef < 0:
        raise InvalidInputError(f"siren: coef must be >= 0, got {coef}")
    if not 0.0 <= peak_quantile < 1.0:
        raise InvalidInputError(f"siren: peak_quantile must be in [0, 1), got {peak_quantile}")
    hp = nucleus_entropy(logits, top_p, top_k)
    g = peak_mask(hp, response_mask, peak_quantile)
    # The anchor penalty is not linear in the batch: each call computes its own selective entropy
    # and weighs its penalty by its share of the (global) aggregation, so micro-batches sum to the
    # mini-batch penalty when their selective entropies agree (exactly so without micro-batching).
    h_sel = aggregate(hp, g, local(aggregation))
    ones = torch.ones_like(hp.detach())
    share = aggregate(ones, response_mask, aggregation) / aggregate(ones, response_mask, local(aggregation))
    if anchor_entropy is None:
        anchor = h_sel.detach()
    else:
        anchor = torch.as_tensor(anchor_entropy, dtype=h_sel.dtype, device=h_sel.device).detach().reshape(())
    term = share * coef * (h_sel - anchor).square()
    metrics = {
        "siren/selective_entropy": detached(h_sel),
        "siren/nucleus_entropy": detached(masked_mean(hp.detach(), response_mask)),
        "siren/anchor_entropy": detached(anchor),
        "siren/peak_frac": detached(masked_mean(g.to(hp.dtype), response_mask)),
        "reg/siren_loss": detached(term),
    }
    return term, metrics
