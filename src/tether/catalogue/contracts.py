"""Output types and input checks shared by catalogue entries.

Every policy loss and regularizer returns ``(loss, metrics)``: a scalar tensor that carries
the gradient, and a dict of detached scalar tensors with stable slash-separated names.
Advantage estimators return ``(advantages, metrics)`` with advantages shaped [B, T] (zero on
padding). Checks raise :class:`~tether.errors.InvalidInputError` naming the argument.
"""

from __future__ import annotations

import torch

from tether.errors import InvalidInputError

Metrics = dict[str, torch.Tensor]
LossOutput = tuple[torch.Tensor, Metrics]


def detached(value: torch.Tensor | float) -> torch.Tensor:
    """A metric value: a detached scalar tensor."""
    if isinstance(value, torch.Tensor):
        return value.detach().float().reshape(())
    return torch.tensor(float(value))


def check_2d(name: str, tensor: torch.Tensor) -> None:
    if tensor.dim() != 2:
        raise InvalidInputError(f"{name} must be a [batch, tokens] tensor, got shape {tuple(tensor.shape)}")


def check_same_shape(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in ``others`` must have the shape of ``reference``."""
    for name, tensor in others.items():
        if tensor is not None and tensor.shape != reference.shape:
            raise InvalidInputError(
                f"{name} has shape {tuple(tensor.shape)} but {reference_name} has shape "
                f"{tuple(reference.shape)}; pass both as [batch, tokens] over the same response tokens"
            )


def token_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Broadcast per-sequence advantages [B] (or [B, 1]) to [B, T]; pass [B, T] through."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    if advantages.shape == mask.shape:
        return advantages
    if advantages.shape == (mask.shape[0], 1):
        return advantages.expand(mask.shape)
    raise InvalidInputError(
        f"advantages have shape {tuple(advantages.shape)}; expected [batch] or [batch, tokens] "
        f"matching response_mask {tuple(mask.shape)}"
    )


def check_groups(group_ids: torch.Tensor, batch: int) -> None:
    if group_ids.dim() != 1 or group_ids.shape[0] != batch:
        raise InvalidInputError(
            f"group_ids must be a [batch] tensor with one id per sample ({batch}), got shape {tuple(group_ids.shape)}"
        )
