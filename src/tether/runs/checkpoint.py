"""Checkpoints: tensors in safetensors, everything else in JSON, written atomically.

Layout of one checkpoint directory ``checkpoints/step_000042/``:

- ``tensors.safetensors``: named tensors (model weights under ``model.``, optimizer state under
  ``optim.``, torch RNG states under ``rng.``, anything else a trainer registers);
- ``state.json``: the step, optimizer hyperparameters, Python and NumPy RNG states, and any
  JSON-serialisable trainer state.

The directory is first written as ``.tmp-step_000042-*`` and renamed into place, then the
``latest`` pointer file is replaced atomically. A kill at any moment leaves the previous
checkpoint and pointer intact; leftovers of an interrupted write are ignored and cleaned.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tether.errors import TetherError
from tether.runs.files import atomic_write_text, fsync_dir


class CheckpointError(TetherError):
    """A checkpoint is missing or unreadable."""


@dataclass
class Checkpoint:
    step: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """RNG states of torch (CPU and CUDA), NumPy and Python."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state: tuple[Any, ...] = tuple(np.random.get_state())
    state: dict[str, Any] = {
        "rng_python": _to_json(random.getstate()),
        "rng_numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    return tensors, state


def restore_rng(tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    random.setstate(_from_json(state["rng_python"]))
    kind, keys, pos, has_gauss, gauss = state["rng_numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def _to_json(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return {"__tuple__": [_to_json(v) for v in obj]}
    return obj


def _from_json(obj: Any) -> Any:
    if isinstance(obj, dict) and "__tuple__" in obj:
        return tuple(_from_json(v) for v in obj["__tuple__"])
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    return obj


def optimizer_to_flat(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into named tensors and a JSON part."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, slots in opt_state["state"].items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith("optim."):
            continue
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, slots in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(slots)
    return {"state": state, "param_groups": meta["param_groups"]}


def training_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The model's weights (``model.*``) and the optimizer's tensors (``optim.*``), with the
    optimizer's JSON part: what every trainer's checkpoint starts from."""
    o_tensors, o_meta = optimizer_to_flat(optimizer.state_dict())
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update(o_tensors)
    return tensors, o_meta


def restore_training_state(
    ckpt: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Load what :func:`training_state` saved (JSON part under ``ckpt.state["optim"]``)."""
    model.load_state_dict({k[6:]: v for k, v in ckpt.tensors.items() if k.startswith("model.")})
    optimizer.load_state_dict(optimizer_from_flat(ckpt.tensors, ckpt.state["optim"]))


def load_model_weights(path: str | Path, model: torch.nn.Module) -> int:
    """The weights (``model.*`` tensors) of the checkpoint directory ``path`` into ``model``, reading
    no other tensor (the optimizer state is twice the model); returns the checkpoint's step. A clear
    error when they do not fit ``model`` (another architecture, or LoRA adapters against plain weights)."""
    from safetensors import safe_open

    p = Path(path)
    try:
        step = int(json.loads((p / "state.json").read_text())["step"])
        with safe_open(str(p / "tensors.safetensors"), framework="pt") as fh:
            weights = {k[len("model.") :]: fh.get_tensor(k) for k in fh.keys() if k.startswith("model.")}
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"cannot read checkpoint {str(p)!r}: {err}") from None
    if not weights:
        raise CheckpointError(f"checkpoint {str(p)!r} holds no model weights (no model.* tensors)")
    fix = "the run's model settings (model.*, its model/ directory) must be those it trained with"
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # a tensor of another shape
        raise CheckpointError(
            f"the weights of checkpoint {str(p)!r} do not fit the model built for them ({err}); {fix}"
        ) from None
    if missing or unexpected:
        parts = [
            f"{len(keys)} {what}, e.g. {keys[0]!r}"
            for what, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ]
        raise CheckpointError(
            f"the weights of checkpoint {str(p)!r} do not fit the model built for them ({'; '.join(parts)}); {fix}"
        )
    return step


def _name(step: int) -> str:
    return f"step_{step:09d}"


def save_checkpoint(run_dir: str | Path, ckpt: Checkpoint, keep: int = 2) -> Path:
    """Write ``ckpt`` atomically under ``run_dir/checkpoints`` and point ``latest`` at it.

    The run's append-only logs (``*.jsonl``) are fsynced first: they are flushed, not synced, on
    every line, and a resume keeps exactly the records up to the checkpoint's step, so those
    records must be on disk before the checkpoint is.
    """
    for log in sorted(Path(run_dir).glob("*.jsonl")):
        with open(log, "rb") as fh:
            os.fsync(fh.fileno())
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / _name(ckpt.step)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{_name(ckpt.step)}-", dir=root))
    try:
        tensors: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for k, v in ckpt.tensors.items():
            t = v.detach().contiguous().cpu()
            ptr = t.untyped_storage().data_ptr()
            # safetensors refuses shared storage (tied embeddings): store a copy; loading restores both.
            tensors[k] = t.clone() if ptr in seen else t
            seen.add(ptr)
        save_file(tensors, str(tmp / "tensors.safetensors"))
        with open(tmp / "state.json", "w", encoding="utf-8") as fh:
            json.dump({"step": ckpt.step, **ckpt.state}, fh, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        with open(tmp / "tensors.safetensors", "rb") as fh:
            os.fsync(fh.fileno())
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / "latest", final.name + "\n")
    _prune(root, keep, final.name)
    return final


def _prune(root: Path, keep: int, current: str) -> None:
    for leftover in root.glob(".tmp-step_*"):
        shutil.rmtree(leftover, ignore_errors=True)
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "state.json").exists() else None


def load_latest_checkpoint(run_dir: str | Path) -> Checkpoint:
    """The run's latest checkpoint; a clear error when it has none (``--resume`` on a fresh run)."""
    path = latest_checkpoint(run_dir)
    if path is None:
        raise TetherError(f"nothing to resume in {str(run_dir)!r}: it has no checkpoint")
    return load_checkpoint(path)


def load_checkpoint(path: str | Path) -> Checkpoint:
    p = Path(path)
    try:
        state = json.loads((p / "state.json").read_text())
        tensors = load_file(str(p / "tensors.safetensors"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"cannot read checkpoint {str(p)!r}: {err}. Resume from an earlier one."
        ) from None
    step = int(state.pop("step"))
    return Checkpoint(step=step, tensors=dict(tensors), state=state)
