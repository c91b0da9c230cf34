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
from typing import Any

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
