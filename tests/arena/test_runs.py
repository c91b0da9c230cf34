"""Reading run directories back (finished, failed, incomplete) and aligning metric curves."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tether.arena.runs import RunRecord, load_run, load_runs, series, to_float

CONFIG = """\
recipe_resolved:
  name: {recipe}
recipe: {recipe}
task:
  name: arithmetic
  params:
    digits: 2
train:
  seed: {seed}
  steps: 3
"""


def _run_dir(
    root: Path,
    recipe: str = "grpo",
    seed: int = 0,
    metrics: list[dict[str, Any]] | None = None,
    summary: dict[str, Any] | None = None,
    error: str | None = None,
    alarms: list[dict[str, Any]] | None = None,
    sub: str | None = None,
) -> Path:
    d = root / (sub if sub is not None else f"{recipe}/seed{seed}")
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(CONFIG.format(recipe=recipe, seed=seed))
    if metrics is not None:
        (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if alarms is not None:
        (d / "alarms.jsonl").write_text("".join(json.dumps(a) + "\n" for a in alarms))
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))
    if error is not None:
        (d / "error.txt").write_text(error)
    return d


def _metrics(n: int, start: float = 0.0) -> list[dict[str, Any]]:
    return [
        {"step": i + 1, "reward/mean": start + 0.1 * i, "policy/entropy": 1.0, "alarms": 0} for i in range(n)
    ]


def test_finished_run(tmp_path: Path) -> None:
    summary = {
        "recipe": "grpo",
        "task": "arithmetic",
        "seed": 3,
        "steps": 3,
        "final": {"reward/mean": 0.25, "policy/entropy": 0.9},
        "alarms": {"entropy_collapse": 2},
        "alarm_count": 2,
        "eval": {"accuracy": 0.5, "per_prompt_success": [0.0, 1.0]},
    }
    d = _run_dir(tmp_path, seed=3, metrics=_metrics(3), summary=summary)
    r = load_run(d)
    assert isinstance(r, RunRecord)
    assert (r.path, r.recipe, r.task, r.seed, r.status) == (d, "grpo", "arithmetic", 3, "finished")
    assert r.error is None
    assert r.summary == summary
    assert [m["step"] for m in r.metrics] == [1.0, 2.0, 3.0]
    assert r.metrics[2]["reward/mean"] == pytest.approx(0.2)
    assert r.final("reward/mean") == 0.25  # summary wins over the last logged value
    assert r.final("eval/accuracy") == 0.5
    assert math.isnan(r.final("eval/missing")) and math.isnan(r.final("policy/kl_ref"))
    assert r.alarm_counts() == {"entropy_collapse": 2}
    assert r.eval["per_prompt_success"] == [0.0, 1.0]


def test_failed_run_keeps_error_text(tmp_path: Path) -> None:
    d = _run_dir(tmp_path, metrics=_metrics(1), error="Traceback ...\nNonFiniteError: 5 consecutive steps")
    r = load_run(d)
    assert r.status == "failed"
    assert r.summary is None
    assert r.error is not None and "NonFiniteError" in r.error
    assert r.final("reward/mean") == pytest.approx(0.0)  # falls back to the last logged value


def test_incomplete_run_and_torn_last_line(tmp_path: Path) -> None:
    d = _run_dir(
        tmp_path,
        metrics=_metrics(2),
        alarms=[
            {"step": 1, "kind": "kl_spike", "message": "m", "value": 3.0},
            {"step": 2, "kind": "kl_spike"},
        ],
    )
    with open(d / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "reward/me')  # killed mid-write
    r = load_run(d)
    assert r.status == "incomplete"
    assert r.summary is None and r.error is None
    assert len(r.metrics) == 2
    assert r.alarm_counts() == {"kl_spike": 2}  # counted from alarms.jsonl without a summary
    assert len(r.alarms) == 2


def test_summary_wins_over_stale_error(tmp_path: Path) -> None:
    d = _run_dir(tmp_path, metrics=_metrics(1), summary={"final": {}}, error="old failure")
    r = load_run(d)
    assert r.status == "finished"
    assert r.error == "old failure"


def test_nan_strings_and_non_numeric_values(tmp_path: Path) -> None:
    d = _run_dir(
        tmp_path,
        metrics=[
            {"step": 1, "reward/mean": "nan", "grad/norm": "inf", "x": "-inf", "note": "hello", "flag": True},
            {"step": 2, "reward/mean": 0.5, "grad/norm": 1.0},
        ],
    )
    r = load_run(d)
    m0 = r.metrics[0]
    assert math.isnan(m0["reward/mean"])
    assert m0["grad/norm"] == math.inf and m0["x"] == -math.inf
    assert "note" not in m0 and m0["flag"] == 1.0
    # the last *finite* value is the fallback final
    assert r.final("reward/mean") == 0.5
    assert to_float("NaN") is not None and math.isnan(to_float("NaN") or 0.0)
    assert to_float("abc") is None and to_float(None) is None and to_float("2.5") == 2.5


def test_recipe_task_seed_fallbacks(tmp_path: Path) -> None:
    # no config.yaml: recipe and seed from the directory names, task from the summary
    d = tmp_path / "dapo" / "seed4"
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"task": "countdown", "final": {}}))
    r = load_run(d)
    assert (r.recipe, r.task, r.seed, r.status) == ("dapo", "countdown", 4, "finished")
    with pytest.raises(FileNotFoundError):
        load_run(tmp_path / "missing")


def test_load_runs_both_layouts_sorted(tmp_path: Path) -> None:
    _run_dir(tmp_path, "grpo", 1, metrics=_metrics(2))
    _run_dir(tmp_path, "grpo", 0, metrics=_metrics(2), summary={"final": {}})
    _run_dir(tmp_path, "dapo", 2, metrics=_metrics(2), sub="dapo-arith-s2")  # flat layout
    (tmp_path / "plots").mkdir()  # not a run
    (tmp_path / "plots" / "x.png").write_bytes(b"")
    (tmp_path / "report.md").write_text("# report")
    recs = load_runs(tmp_path)
    assert [(r.recipe, r.seed) for r in recs] == [("dapo", 2), ("grpo", 0), ("grpo", 1)]
    assert [r.status for r in recs] == ["incomplete", "finished", "incomplete"]
    assert load_runs(tmp_path / "nowhere") == []


def test_series_aligns_steps_with_nan_where_missing(tmp_path: Path) -> None:
    a = load_run(
        _run_dir(
            tmp_path,
            seed=0,
            metrics=[
                {"step": 1, "m": 1.0},
                {"step": 2, "m": 2.0},
                {"step": 3, "m": "nan"},
                {"step": 4, "m": 4.0},
            ],
        )
    )
    b = load_run(
        _run_dir(
            tmp_path,
            seed=1,
            metrics=[{"step": 2, "m": 20.0}, {"step": 3, "other": 1.0}, {"step": 5, "m": 50.0}],
        )
    )
    steps, values = series([a, b], "m")
    assert steps.tolist() == [1, 2, 3, 4, 5]
    assert steps.dtype == np.int64
    expected = np.array([[1.0, 2.0, np.nan, 4.0, np.nan], [np.nan, 20.0, np.nan, np.nan, 50.0]])
    np.testing.assert_array_equal(values, expected)
    s, v = a.curve("m")
    assert s.tolist() == [1, 2, 3, 4] and np.isnan(v[2])


def test_series_edge_cases(tmp_path: Path) -> None:
    a = load_run(_run_dir(tmp_path, seed=0, metrics=[{"m": 1.0}, {"m": 2.0}]))  # no "step": index + 1
    b = load_run(_run_dir(tmp_path, seed=1, metrics=[]))
    c = load_run(_run_dir(tmp_path, seed=2, metrics=[{"step": 1, "m": 1.0}, {"step": 1, "m": 3.0}]))
    steps, values = series([a, b, c], "m")
    assert steps.tolist() == [1, 2]
    np.testing.assert_array_equal(values, [[1.0, 2.0], [np.nan, np.nan], [3.0, np.nan]])
    steps, values = series([a, b], "absent")
    assert steps.shape == (0,) and values.shape == (2, 0)
    steps, values = series([], "m")
    assert values.shape == (0, 0)
