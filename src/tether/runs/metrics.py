"""``metrics.jsonl``: one JSON object per step, appended and flushed line by line.

Lines are flushed to the OS, not fsynced (an fsync per update cost ~8 ms, 3% of a CartPole PPO
run); :func:`tether.runs.checkpoint.save_checkpoint` fsyncs the logs before each checkpoint, and
a resume keeps only the records up to the checkpoint's step.

A torn last line (a kill in the middle of a write) is ignored when reading. On resume,
:meth:`MetricsLog.truncate_after` drops the records after the checkpoint's step, so the
resumed run appends exactly the records a run that never stopped would have written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tether.runs.files import atomic_write_text


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf": JSON has no literal for them
    return value


class MetricsLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)  # nothing is created until the first record

    def append(self, record: Mapping[str, Any]) -> None:
        line = json.dumps({k: _clean(v) for k, v in record.items()}, sort_keys=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # torn final line from a kill mid-write
        return records

    def truncate_after(self, step: int, key: str = "step") -> None:
        """Keep only the records with ``record[key] <= step`` (atomically)."""
        kept = [r for r in self.read() if int(r.get(key, -1)) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
