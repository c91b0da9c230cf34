"""``metrics.jsonl``: one JSON object per step, appended and flushed line by line.

Lines are flushed to the OS, not fsynced (an fsync per update cost ~8 ms, 3% of a CartPole PPO
run); :func:`tether.runs.checkpoint.save_checkpoint` fsyncs the logs before each checkpoint, and
a resume keeps only the records up to the checkpoint's step.

JSON has no literal for NaN and infinities: they are written as the strings ``"nan"``, ``"inf"`` and
``"-inf"`` and read back as floats (a resumed run reports what an unbroken one does), in every key
or, for a log that also holds text, in the keys named by ``numbers`` (``alarms.jsonl``: its alarm
kind "nan" stays a string; ``samples.jsonl``: a completion may read "nan").

A torn last line (a kill in the middle of a write) is ignored when reading. On resume,
:meth:`MetricsLog.truncate_after` drops the records after the checkpoint's step, so the
resumed run appends exactly the records a run that never stopped would have written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from tether.runs.files import NONFINITE, atomic_write_text


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf": JSON has no literal for them
    return value


def _restore(value: Any) -> Any:
    """The inverse of :func:`_clean`: "nan", "inf", "-inf" back to floats."""
    if isinstance(value, str) and value in NONFINITE:
        return float(value)
    return value


class MetricsLog:
    def __init__(self, path: str | Path, numbers: Collection[str] | None = None) -> None:
        self.path = Path(path)  # nothing is created until the first record
        # the keys whose "nan" / "inf" / "-inf" are read back as floats (None: every key)
        self.numbers = None if numbers is None else frozenset(numbers)

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
                record = json.loads(line)
            except json.JSONDecodeError:
                break  # torn final line from a kill mid-write
            if isinstance(record, dict):
                record = {
                    k: _restore(v) if self.numbers is None or k in self.numbers else v
                    for k, v in record.items()
                }
            records.append(record)
        return records

    def truncate_after(self, step: int, key: str = "step") -> None:
        """Keep only the records with ``record[key] <= step`` (atomically)."""
        kept = [r for r in self.read() if int(r.get(key, -1)) <= step]
        atomic_write_text(
            self.path,
            "".join(json.dumps({k: _clean(v) for k, v in r.items()}, sort_keys=True) + "\n" for r in kept),
        )
