"""Mixed precision for the language-model world: float32 weights, forward passes under autocast.

Pure bf16 weights lose AdamW updates smaller than bf16's resolution (2^-8 of the weight). So by
default the weights (and the optimizer state) stay float32 and only the forward passes
(training, reference, sampling, evaluation) run under ``torch.autocast`` in bf16 on a CUDA
device that supports it: the usual bf16 mixed-precision recipe. Models under
``AUTO_MIN_PARAMETERS`` stay in float32 throughout (see there).

The choice travels with the model as the attribute ``tether_autocast`` (set by
``load_policy`` / ``load_reference``), so that every forward pass tether runs, whoever
calls it, uses the same precision; :func:`autocast_context` reads it.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Literal

import torch

from tether.errors import TetherError

ATTR = "tether_autocast"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


# ``auto`` leaves smaller models in float32: on a GPU they are bound by kernel launches, not
# arithmetic, so bf16 does not speed them up, and it broke the embedded 1.8 M-parameter model's
# learning (demo SFT 1-4% accuracy under bf16, 51% in float32).
AUTO_MIN_PARAMETERS = 50_000_000


def resolve_autocast(spec: str | bool, device: torch.device, num_parameters: int) -> torch.dtype | None:
    """The autocast dtype for ``spec`` (``auto``, false, ``bfloat16``, ``float16``), or None.

    ``auto``: bfloat16 on a CUDA device that supports it for a model of at least
    ``AUTO_MIN_PARAMETERS`` parameters; otherwise none (the weights' dtype). A named dtype is
    honoured on any device (CPU autocast supports bf16).
    """
    if spec is False:
        return None
    if spec == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 and num_parameters >= AUTO_MIN_PARAMETERS else None
    if not isinstance(spec, str) or spec not in _DTYPES:
        raise TetherError(
            f"model.autocast={spec!r} is not allowed; choose one of auto, false, bfloat16, float16"
        )
    return _DTYPES[spec]


def set_autocast(model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> None:
    """Record on ``model`` the autocast its forward passes run under (None: none)."""
    object.__setattr__(model, ATTR, None if dtype is None else (device.type, dtype))


def autocast_dtype(model: Any) -> torch.dtype | None:
    """The autocast dtype recorded on ``model`` by :func:`set_autocast` (None: none)."""
    spec = getattr(model, ATTR, None)
    return None if spec is None else spec[1]


def autocast_context(model: Any) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` as recorded on ``model`` by :func:`set_autocast`, else a no-op."""
    spec = getattr(model, ATTR, None)
    if spec is None:
        return contextlib.nullcontext()
    device_type, dtype = spec
    return torch.autocast(device_type=device_type, dtype=dtype)


def computes_in_float16(model: Any) -> bool:
    """Whether ``model``'s forward passes compute in float16: autocast to float16 recorded on it by
    :func:`set_autocast`, or, with no autocast, float16 weights (a frozen LoRA base)."""
    spec = getattr(model, ATTR, None)
    if spec is not None:
        return bool(spec[1] == torch.float16)
    return any(p.dtype == torch.float16 for p in model.parameters())


def make_grad_scaler(model: Any) -> torch.amp.GradScaler | None:
    """Dynamic loss scaling (``torch.amp.GradScaler``) when ``model`` computes in float16, else None.

    float16 keeps 5 exponent bits: gradients of activations below about 6e-8 flush to zero in its
    backward pass, which loses the small gradients of a policy-gradient loss. The scaler multiplies
    the loss by a large factor S before the backward pass (2^16 at first) and divides the float32
    gradients by S before clipping and the optimizer step; when a scaled gradient overflows, it skips
    that update and halves S, and it doubles S after 2000 updates without an overflow (PyTorch's
    defaults, as in the usual float16 mixed-precision recipe). bfloat16 has float32's exponent range
    and needs none.
    """
    if not computes_in_float16(model):
        return None
    return torch.amp.GradScaler(next(model.parameters()).device.type)


#: How :func:`clipped_step` ended: the optimizer stepped; the scaler skipped an overflow of the
#: scaled gradients (and halved its scale); or the gradients were non-finite without scaling to blame.
StepOutcome = Literal["stepped", "overflow", "nonfinite"]


def clipped_step(
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    max_norm: float,
    scaler: torch.amp.GradScaler | None,
) -> tuple[float, StepOutcome]:
    """Unscale the gradients (with a scaler), clip their global norm to ``max_norm``, and step the
    optimizer when they are finite. Returns the norm before clipping and the outcome. A non-finite
    gradient under a scale above 1 is the scaler's overflow, a routine event of float16 training;
    at a scale of 1 or below nothing of it comes from scaling, so it is ``nonfinite``. The caller
    zeroes the gradients."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    finite = math.isfinite(norm)
    if scaler is None:
        if finite:
            optimizer.step()
        return norm, "stepped" if finite else "nonfinite"
    scale = float(scaler.get_scale())
    scaler.step(optimizer)  # skips the update when unscale_ found an inf or NaN
    scaler.update()
    if finite:
        return norm, "stepped"
    return norm, "overflow" if scale > 1.0 else "nonfinite"


def restore_grad_scaler(scaler: torch.amp.GradScaler | None, state: dict[str, Any]) -> None:
    """Put back the loss scale and its growth counter saved in a checkpoint's ``state`` (under
    ``grad_scaler``), so that a resumed float16 run skips and steps exactly as one that never
    stopped."""
    saved = state.get("grad_scaler")
    if scaler is not None and saved is not None:
        scaler.load_state_dict(saved)
