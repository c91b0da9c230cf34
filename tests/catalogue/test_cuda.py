"""Every catalogue entry on CUDA tensors gives what it gives on the CPU: value, metrics and
gradients (float64, so only the order of reductions differs). The language-model trainer runs
the losses and regularizers on the policy's device, so an entry that builds a tensor on the
wrong device, or moves one to the CPU, fails here. Skipped where no CUDA device exists.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from tests.catalogue.inputs import Spec, build_inputs
from tether.catalogue import entries

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

ALL = entries()


class _SeededOnCPU(TorchFunctionMode):
    """Random draws from the builders' CPU generator happen on the CPU, then move to ``device``:
    the inputs are the CPU ones, built (derived tensors and their autograd links included) on
    ``device``."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = device

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        gen = kwargs.get("generator")
        if isinstance(gen, torch.Generator) and gen.device.type == "cpu":
            return func(*args, **{**kwargs, "device": "cpu"}).to(self.device)
        return func(*args, **kwargs)


def _build_on(device: str, names: tuple[str, ...], spec: Spec) -> dict[str, Any]:
    with torch.device(device), _SeededOnCPU(device):
        return build_inputs(names, spec)


def _flat(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj) for t in _flat(obj[k])]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in _flat(v)]
    return []


def _run(entry: Any, inputs: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    out = entry.fn(**inputs)
    value, metrics = out[0], out[1]
    outputs = [t.detach().cpu() for t in _flat(value) + _flat(metrics)]
    grads: list[torch.Tensor] = []
    if entry.kind in ("policy_loss", "regularizer") and value.requires_grad:
        diff = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
        got = torch.autograd.grad(value, diff, allow_unused=True)
        grads = [torch.zeros(()) if g is None else g.detach().cpu() for g in got]
    return outputs, grads


@pytest.mark.parametrize("entry", ALL, ids=[f"{e.kind}:{e.name}" for e in ALL])
@pytest.mark.parametrize("seed", [0, 1])
def test_entry_on_cuda_equals_cpu(entry: Any, seed: int) -> None:
    inputs = build_inputs(entry.inputs, Spec(seed=seed, all_padding_row=bool(seed)))
    cuda_inputs = _build_on("cuda", entry.inputs, Spec(seed=seed, all_padding_row=bool(seed)))
    cpu_out, cpu_grads = _run(entry, inputs)
    gpu_out, gpu_grads = _run(entry, cuda_inputs)
    assert len(cpu_out) == len(gpu_out)
    for a, b in zip(cpu_out, gpu_out):
        torch.testing.assert_close(b, a, atol=1e-8, rtol=1e-6, equal_nan=True)
    assert len(cpu_grads) == len(gpu_grads)
    for a, b in zip(cpu_grads, gpu_grads):
        torch.testing.assert_close(b, a, atol=1e-8, rtol=1e-6)
