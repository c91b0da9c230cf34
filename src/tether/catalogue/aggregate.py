"""The one place where per-token values become a scalar.

Every policy loss and regularizer in the catalogue reduces its per-token matrix through
:func:`aggregate`. The modes are those of verl's ``agg_loss`` (``loss_agg_mode``):

- ``token-mean``: sum_{i,t} m l / N_tok (DAPO, TRL ``dapo``/``bnpo``; N_tok = valid tokens)
- ``token-sum``: sum_{i,t} m l
- ``seq-mean-token-mean``: (1/N_seq) sum_i [sum_t m l / sum_t m] (original GRPO, TRL ``grpo``)
- ``seq-mean-token-sum``: (1/N_seq) sum_i sum_t m l
- ``seq-mean-token-sum-norm``: sum_{i,t} m l / (N_seq * L_norm) (Dr.GRPO; TRL ``dr_grpo`` with
  L_norm = max_completion_length)

Micro-batch invariance: pass an :class:`Aggregation` with the *global* counts of the whole
mini-batch (``num_tokens``, ``num_sequences``). Then summing the aggregated losses of the
micro-batches gives exactly the loss of the full mini-batch, so gradient accumulation does
not change the update (verl #5625, #1083). Without global counts the local counts are used.

N_seq defaults to the number of sequences with at least one valid token (verl's convention);
all-padding rows contribute nothing and do not dilute the mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from tether.errors import InvalidInputError

AggregationMode = Literal[
    "token-mean",
    "token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
]
AGGREGATION_MODES: tuple[str, ...] = get_args(AggregationMode)


@dataclass(frozen=True)
class Aggregation:
    """How to reduce a per-token matrix, with optional global counts for micro-batching.

    ``num_tokens`` / ``num_sequences``: counts over the whole (global) mini-batch; ``None`` means
    "count this batch". ``norm_length``: the constant L_norm of ``seq-mean-token-sum-norm``
    (``None`` means the padded length T of the batch).
    """

    mode: AggregationMode = "token-mean"
    num_tokens: float | None = None
    num_sequences: float | None = None
    norm_length: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in AGGREGATION_MODES:
            raise InvalidInputError(
                f"unknown aggregation mode {self.mode!r}; choose one of: {', '.join(AGGREGATION_MODES)}"
            )
        for name in ("num_tokens", "num_sequences", "norm_length"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise InvalidInputError(f"Aggregation.{name} must be > 0 when given, got {value}")


AggregationLike = Aggregation | str


def as_aggregation(aggregation: AggregationLike) -> Aggregation:
    """Accept a mode string or an :class:`Aggregation`."""
    if isinstance(aggregation, Aggregation):
        return aggregation
    if aggregation not in AGGREGATION_MODES:
        raise InvalidInputError(
            f"unknown aggregation mode {aggregation!r}; choose one of: {', '.join(AGGREGATION_MODES)}"
        )
    return Aggregation(mode=aggregation)  # type: ignore[arg-type]


def local(aggregation: AggregationLike) -> Aggregation:
    """The same mode without global counts: for metrics, which describe the batch at hand.

    Convention: a metric whose name ends in ``loss`` is computed with the caller's aggregation and
    adds up across micro-batches; every other metric is a statistic of the batch it was computed
    on (use ``aggregate(values, mask, local(aggregation))``), averaged across micro-batches.
    """
    agg = as_aggregation(aggregation)
    return Aggregation(mode=agg.mode, norm_length=agg.norm_length)


def count_tokens(mask: torch.Tensor) -> float:
    """Valid tokens in a mask (for building a global :class:`Aggregation`)."""
    return float(mask.float().sum().item())


def count_sequences(mask: torch.Tensor) -> float:
    """Sequences with at least one valid token."""
    return float((mask.float().sum(-1) > 0).float().sum().item())


def aggregate(
    values: torch.Tensor, mask: torch.Tensor, aggregation: AggregationLike = "token-mean"
) -> torch.Tensor:
    """Reduce ``values`` [B, T] under ``mask`` [B, T] to a scalar, following ``aggregation``.

    Masked positions never contribute, even if they hold NaN or inf (they are zeroed with
    ``torch.where``, not multiplied). An all-padding batch gives 0 with a zero gradient.
    """
    agg = as_aggregation(aggregation)
    if values.dim() == 1:
        values = values.unsqueeze(-1)
    if mask.dim() == 1:
        mask = mask.unsqueeze(-1)
    if values.shape != mask.shape:
        if values.shape[-1] == 1 and values.shape[0] == mask.shape[0]:
            values = values.expand_as(mask)
        else:
            raise InvalidInputError(
                f"aggregate: values {tuple(values.shape)} and mask {tuple(mask.shape)} must have the same [B, T] shape"
            )
    m = mask.to(dtype=values.dtype) if values.is_floating_point() else mask.float()
    valid = mask.bool()
    masked = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))
    per_seq_tokens = m.sum(-1)
    local_seqs = (per_seq_tokens > 0).to(masked.dtype).sum()

    def seqs() -> torch.Tensor:
        if agg.num_sequences is not None:
            return torch.as_tensor(agg.num_sequences, dtype=masked.dtype, device=masked.device)
        return local_seqs.clamp(min=1.0)

    if agg.mode == "token-mean":
        denom = (
            torch.as_tensor(agg.num_tokens, dtype=masked.dtype, device=masked.device)
            if agg.num_tokens is not None
            else m.sum().clamp(min=1.0)
        )
        return masked.sum() / denom
    if agg.mode == "token-sum":
        return masked.sum()
    if agg.mode == "seq-mean-token-mean":
        seq_means = masked.sum(-1) / per_seq_tokens.clamp(min=1.0)
        return seq_means.sum() / seqs()
    if agg.mode == "seq-mean-token-sum":
        return masked.sum() / seqs()
    # seq-mean-token-sum-norm
    norm = agg.norm_length if agg.norm_length is not None else float(values.shape[-1])
    return masked.sum() / (seqs() * norm)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean of ``values`` over valid positions (0 when nothing is valid). For metrics."""
    return aggregate(values, mask, "token-mean")


def masked_seq_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` [B, T] over the valid tokens of each row -> [B]; 0 for an all-padding row."""
    valid = mask.bool()
    zeros = torch.zeros((), dtype=values.dtype, device=values.device)
    total = torch.where(valid, values, zeros).sum(-1)
    return total / valid.sum(-1).clamp(min=1).to(values.dtype)
