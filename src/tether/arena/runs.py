"""Read run directories back: config, metrics, alarms, summary and error of each run.

A run directory (see :mod:`tether.runs.rundir`) holds ``config.yaml``, ``metrics.jsonl`` (one JSON
object per step, non-finite floats written as the strings ``"nan"``/``"inf"``), ``alarms.jsonl``,
``summary.json`` once the run has ended, and ``error.txt`` when an executor saw it fail. This module
only reads: it never imports the trainer, so reports can be rebuilt from the directories alone.

A control run (``tether control train``) has the same files; its ``config.yaml`` names an ``env.id``
instead of a ``task`` and the record's ``task`` is that environment id, its ``world`` ``"control"``.

Status of a run:

- ``"finished"``: ``summary.json`` exists (even if a stale ``error.txt`` is left from an earlier try);
- ``"failed"``: no ``summary.json`` but an ``error.txt``;
- ``"incomplete"``: neither (interrupted, or still running).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

Status = Literal["finished", "failed", "incomplete"]

_NONFINITE = {"nan": math.nan, "inf": math.inf, "+inf": math.inf, "-inf": -math.inf, "infinity": math.inf}


def to_float(value: Any) -> float | None:
    """A metric value as a float: numbers, booleans and the strings "nan"/"inf"/"-inf"; else None."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        key = value.strip().lower()
        if key in _NONFINITE:
            return _NONFINITE[key]
        try:
            return float(key)
        except ValueError:
            return None
    return None


@dataclass
class RunRecord:
    """Everything the arena knows about one run (one recipe, task and seed)."""

    path: Path
    recipe: str
    task: str
    seed: int
    status: Status
    metrics: list[dict[str, float]] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    error: str | None = None
    alarms: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    world: str = "lm"  # "control" for a ``tether control train`` run (``task`` is then its env id)

    @property
    def eval(self) -> dict[str, Any]:
        """``summary["eval"]`` (empty when the run has no summary or no evaluation)."""
        if not self.summary:
            return {}
        ev = self.summary.get("eval")
        return ev if isinstance(ev, dict) else {}

    def curve(self, metric: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of one metric over this run's steps (NaN where a step lacks it); ``x``
        names the logged key used as the step (``"env_steps"`` for a control run's environment steps)."""
        steps, values = series([self], metric, x=x)
        return steps, values[0]

    def final(self, metric: str) -> float:
        """Final value of ``metric`` for this run, NaN when unknown.

        ``"eval/<key>"`` reads ``summary["eval"][key]``; other names read ``summary["final"]``, then
        fall back to the last finite value logged in ``metrics.jsonl`` (for runs without a summary).
        """
        if metric.startswith("eval/"):
            v = to_float(self.eval.get(metric[len("eval/") :]))
            return math.nan if v is None else v
        if self.summary and isinstance(self.summary.get("final"), dict):
            v = to_float(self.summary["final"].get(metric))
            if v is not None:
                return v
        for rec in reversed(self.metrics):
            v = rec.get(metric)
            if v is not None and math.isfinite(v):
                return v
        return math.nan

    def alarm_counts(self) -> dict[str, int]:
        """Alarms by kind: ``summary["alarms"]`` when present, else counted from ``alarms.jsonl``."""
        if self.summary and isinstance(self.summary.get("alarms"), dict):
            return {str(k): int(v) for k, v in self.summary["alarms"].items()}
        counts: dict[str, int] = {}
        for a in self.alarms:
            kind = str(a.get("kind", "unknown"))
            counts[kind] = counts.get(kind, 0) + 1
        return counts


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out: list[dict[str, Any]] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue  # torn line from a kill mid-write
        if isinstance(obj, dict):
            out.append(obj)
    return out


def _metric_record(raw: dict[str, Any]) -> dict[str, float]:
    rec: dict[str, float] = {}
    for k, v in raw.items():
        f = to_float(v)
        if f is not None:
            rec[str(k)] = f
    return rec


def _name(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        return str(value["name"])
    return None


def _seed_from_path(path: Path) -> int | None:
    m = re.search(r"seed[_-]?(\d+)", path.name)
    return int(m.group(1)) if m else None


def load_run(path: str | Path) -> RunRecord:
    """Read one run directory into a :class:`RunRecord`.

    Recipe, task and seed come from ``config.yaml`` (``recipe``, ``task.name``, ``train.seed``), then
    from ``summary.json``, then from the directory names (``<recipe>/seed<k>``). Unreadable lines of
    ``metrics.jsonl`` are skipped; values that are not numbers (or "nan"/"inf" strings) are dropped.
    Raises FileNotFoundError when ``path`` is not a directory.
    """
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"run directory {str(p)!r} does not exist")
    config: dict[str, Any] = {}
    cfg_path = p / "config.yaml"
    if cfg_path.exists():
        try:
            loaded = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
            if isinstance(loaded, dict):
                config = loaded
        except yaml.YAMLError:
            config = {}
    summary: dict[str, Any] | None = None
    sum_path = p / "summary.json"
    if sum_path.exists():
        try:
            loaded_summary = json.loads(sum_path.read_text(encoding="utf-8"))
            summary = loaded_summary if isinstance(loaded_summary, dict) else None
        except json.JSONDecodeError:
            summary = None
    err_path = p / "error.txt"
    error = err_path.read_text(encoding="utf-8", errors="replace") if err_path.exists() else None

    recipe = _name(config.get("recipe")) or _name(config.get("recipe_resolved"))
    if recipe is None and summary is not None:
        recipe = _name(summary.get("recipe"))
    if recipe is None:
        recipe = p.parent.name if _seed_from_path(p) is not None else p.name
    task = _name(config.get("task"))
    if task is None and summary is not None:
        task = _name(summary.get("task"))
    env = config.get("env")
    world = "lm"
    if task is None and isinstance(env, dict) and isinstance(env.get("id"), str):
        world, task = "control", str(env["id"])  # a control run: its environment stands for the task
    if Path(recipe).suffix in (".yaml", ".yml"):
        recipe = Path(recipe).stem  # a recipe file is named by its stem, as compare names its runs
    train = config.get("train")
    seed_val: Any = train.get("seed") if isinstance(train, dict) else None
    if seed_val is None and summary is not None:
        seed_val = summary.get("seed")
    if seed_val is None:
        seed_val = _seed_from_path(p)

    status: Status
    if summary is not None:
        status = "finished"
    elif error is not None:
        status = "failed"
    else:
        status = "incomplete"
    return RunRecord(
        path=p,
        recipe=recipe,
        task=task or "",
        seed=int(seed_val) if seed_val is not None else 0,
        status=status,
        metrics=[_metric_record(r) for r in _read_jsonl(p / "metrics.jsonl")],
        summary=summary,
        error=error,
        alarms=_read_jsonl(p / "alarms.jsonl"),
        config=config,
        world=world,
    )


MAX_RUN_DEPTH = 3
"""How deep :func:`load_runs` looks for runs (``<task>/<recipe>/seed<k>``)."""


def load_runs(comparison_dir: str | Path) -> list[RunRecord]:
    """Every run under ``comparison_dir``: subdirectories holding a ``config.yaml``, up to
    :data:`MAX_RUN_DEPTH` levels down (``<recipe>/seed<k>/``, or ``<task>/<recipe>/seed<k>/`` for a
    comparison over several tasks or environments); a run's own subdirectories are not searched.

    Sorted by (recipe, task, seed, path). A missing directory gives an empty list.
    """
    root = Path(comparison_dir)
    if not root.is_dir():
        return []
    found: list[Path] = []

    def walk(directory: Path, depth: int) -> None:
        for child in sorted(directory.iterdir()):
            if not child.is_dir() or child.name.startswith("."):
                continue
            if (child / "config.yaml").exists():
                found.append(child)
            elif depth < MAX_RUN_DEPTH:
                walk(child, depth + 1)

    walk(root, 1)
    records = [load_run(d) for d in found]
    records.sort(key=lambda r: (r.recipe, r.task, r.seed, str(r.path)))
    return records


def series(records: Sequence[RunRecord], metric: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
    """One metric of several runs aligned on steps.

    Returns ``(steps, values)``: ``steps`` the sorted union (int64) of the steps at which any run
    logged ``metric``, ``values`` a float array ``[len(records), len(steps)]`` with NaN where a run
    has no value at that step (shorter run, missing key, or a logged "nan"). A record without a
    "step" key counts as step ``index + 1``; a repeated step keeps its last value. ``x``: the
    logged key that gives the step (default ``"step"``; e.g. ``"env_steps"``: records without it
    are skipped).
    """
    per_run: list[dict[int, float]] = []
    all_steps: set[int] = set()
    for r in records:
        d: dict[int, float] = {}
        for i, rec in enumerate(r.metrics):
            if metric not in rec:
                continue
            step = rec.get(x, float(i + 1)) if x == "step" else rec.get(x, math.nan)
            if not math.isfinite(step):
                continue
            d[int(step)] = rec[metric]
        per_run.append(d)
        all_steps.update(d)
    steps = np.array(sorted(all_steps), dtype=np.int64)
    index = {int(s): j for j, s in enumerate(steps)}
    values = np.full((len(records), len(steps)), np.nan, dtype=np.float64)
    for i, d in enumerate(per_run):
        for s, v in d.items():
            values[i, index[s]] = v
    return steps, values


def group_by_recipe(records: Iterable[RunRecord]) -> dict[str, list[RunRecord]]:
    """Records grouped by recipe, recipes in order of first appearance."""
    groups: dict[str, list[RunRecord]] = {}
    for r in records:
        groups.setdefault(r.recipe, []).append(r)
    return groups
