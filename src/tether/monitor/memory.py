"""Memory a run holds, logged with each step (``perf/`` metrics, like verl's ``perf/max_memory_*``).

- ``perf/cpu_peak_rss_gb``: the process's peak resident memory since it started (``getrusage``);
  it never decreases, so a rise marks the step that grew it.
- ``perf/gpu_peak_allocated_gb`` and ``perf/gpu_peak_reserved_gb`` (CUDA only): the peaks of
  the tensors allocated and of the caching allocator's reserve during the step just ended; the
  peak counters are reset after each reading, so every step reports its own.
"""

from __future__ import annotations

import sys

import torch

GB = float(1 << 30)


def cpu_peak_rss_gb() -> float | None:
    """Peak resident set size of this process in GiB (None where ``resource`` is missing, e.g. Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    # Linux reports KiB, macOS bytes.
    return peak / GB if sys.platform == "darwin" else peak * 1024 / GB


def memory_metrics(device: torch.device) -> dict[str, float]:
    """The memory metrics of the step just ended (see the module)."""
    out: dict[str, float] = {}
    rss = cpu_peak_rss_gb()
    if rss is not None:
        out["perf/cpu_peak_rss_gb"] = rss
    if device.type == "cuda" and torch.cuda.is_available():
        out["perf/gpu_peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / GB
        out["perf/gpu_peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / GB
        torch.cuda.reset_peak_memory_stats(device)
    return out
