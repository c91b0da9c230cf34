"""Statistics of the arena (rliable, Agarwal et al. 2021, arXiv:2108.13264): hand-computed values."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tether.arena.runs import load_runs
from tether.arena.stats import (
    bootstrap_ci,
    cvar,
    half_life,
    iqm,
    poi_ci,
    probability_of_improvement,
    recipe_table,
    steps_to_target,
    summarize_recipe,
)

# ----------------------------------------------------------------------------- IQM


def test_iqm_of_one_to_eight_is_mean_of_middle_half() -> None:
    # rliable: scipy.stats.trim_mean(x, 0.25) drops 1,2 and 7,8 -> mean(3,4,5,6) = 4.5
    assert iqm(np.arange(1, 9)) == pytest.approx(4.5)
    assert iqm(np.arange(1, 9), fractional=False) == pytest.approx(4.5)
    assert iqm([8, 1, 7, 2, 6, 3, 5, 4]) == pytest.approx(4.5)  # order does not matter


def test_iqm_ignores_outliers() -> None:
    assert iqm([1, 2, 3, 4, 5, 6, 7, 1e9]) == pytest.approx(4.5)


def test_iqm_fractional_trimming_when_n_not_multiple_of_four() -> None:
    x = [1.0, 2.0, 4.0, 8.0, 16.0]
    # 25% of 5 = 1.25 cut at each end: weights 0, .75, 1, .75, 0 over 2.5
    assert iqm(x, fractional=True) == pytest.approx((0.75 * 2 + 4 + 0.75 * 8) / 2.5)
    # scipy.stats.trim_mean / rliable's code (the default): floor(1.25) = 1 at each end
    assert iqm(x) == pytest.approx((2 + 4 + 8) / 3)


def test_iqm_edge_cases() -> None:
    assert iqm([3.0]) == 3.0
    assert math.isnan(iqm([]))
    assert iqm([1, 2, 3, 4, float("nan")]) == pytest.approx(2.5)  # NaN dropped: middle of 1..4


# ----------------------------------------------------------------------------- probability of improvement


def test_poi_disjoint_samples() -> None:
    assert probability_of_improvement([10, 11, 12], [1, 2, 3]) == 1.0
    assert probability_of_improvement([1, 2, 3], [10, 11, 12]) == 0.0


def test_poi_symmetric_and_identical() -> None:
    x = [0.1, 0.5, 0.9]
    assert probability_of_improvement(x, x) == pytest.approx(0.5)
    assert probability_of_improvement([1, 3], [2, 2]) == pytest.approx(0.5)


def test_poi_hand_computed_with_ties() -> None:
    # pairs (x, y): (1,1)=.5 (1,2)=0 (2,1)=1 (2,2)=.5 (3,1)=1 (3,2)=1 -> 4/6
    assert probability_of_improvement([1, 2, 3], [1, 2]) == pytest.approx(4 / 6)
    # P(X>Y) + P(Y>X) = 1
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=7), rng.normal(size=5)
    assert probability_of_improvement(a, b) + probability_of_improvement(b, a) == pytest.approx(1.0)


def test_poi_nan_and_empty() -> None:
    assert probability_of_improvement([2, float("nan")], [1]) == 1.0
    assert math.isnan(probability_of_improvement([], [1]))


def test_poi_ci_contains_point_and_is_degenerate_for_disjoint() -> None:
    assert poi_ci([10, 11, 12], [1, 2, 3]) == (1.0, 1.0)
    rng = np.random.default_rng(0)
    x, y = rng.normal(0.5, 1, 10), rng.normal(0, 1, 10)
    low, high = poi_ci(x, y, seed=1)
    assert 0.0 <= low <= probability_of_improvement(x, y) <= high <= 1.0
    assert low < high
    assert poi_ci(x, y, seed=1) == (low, high)


# ----------------------------------------------------------------------------- bootstrap CI


def test_bootstrap_ci_contains_mean_and_is_deterministic() -> None:
    x = np.array([0.2, 0.4, 0.5, 0.55, 0.9])
    low, high = bootstrap_ci(x, seed=7)
    assert low <= x.mean() <= high
    assert x.min() <= low < high <= x.max()
    assert bootstrap_ci(x, seed=7) == (low, high)
    assert bootstrap_ci(x, seed=8) != (low, high)


def test_bootstrap_ci_shrinks_with_more_seeds() -> None:
    rng = np.random.default_rng(0)
    widths = []
    for n in (5, 20, 80, 320):
        x = rng.normal(0, 1, n)
        x = (x - x.mean()) / x.std()  # same spread at every n: only n changes
        low, high = bootstrap_ci(x)
        assert low <= 0.0 <= high
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2] > widths[3]
    # ~ 2 * 1.96 / sqrt(n): each 4x more seeds halves the width
    for n, w in zip((5, 20, 80, 320), widths, strict=True):
        assert w == pytest.approx(2 * 1.96 / math.sqrt(n), rel=0.3)


def test_bootstrap_ci_coverage() -> None:
    """A nominal 95% interval contains the true mean most of the time (percentile bootstrap
    undercovers a little with n=10)."""
    rng = np.random.default_rng(123)
    hits = 0
    for i in range(200):
        low, high = bootstrap_ci(rng.normal(1.0, 1.0, 10), n_boot=500, seed=i)
        hits += low <= 1.0 <= high
    assert 0.82 <= hits / 200 <= 0.99


def test_bootstrap_ci_other_stats_and_edges() -> None:
    x = np.arange(1, 9, dtype=float)
    low, high = bootstrap_ci(x, stat=iqm, n_boot=300)
    assert low <= iqm(x) <= high
    low, high = bootstrap_ci(x, stat=np.median)
    assert low <= 4.5 <= high
    # one seed says nothing about the spread: no interval, not a zero-width one
    assert all(math.isnan(v) for v in bootstrap_ci([2.5]))
    assert all(math.isnan(v) for v in poi_ci([2.5], [1.0, 2.0])) and all(
        math.isnan(v) for v in poi_ci([1.0, 2.0], [3.0])
    )
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    assert all(math.isnan(v) for v in bootstrap_ci([float("nan")]))
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)


# ----------------------------------------------------------------------------- CVaR


def test_cvar_known_arrays() -> None:
    x = np.arange(10, dtype=float)  # 0..9
    assert cvar(x, 0.1) == 0.0
    assert cvar(x, 0.2) == pytest.approx(0.5)
    assert cvar(x, 1.0) == pytest.approx(x.mean())
    assert cvar(np.arange(20.0), 0.1) == pytest.approx(0.5)  # mean of 0, 1
    # fractional: n=4, alpha=.375 -> 1.5 values: (0 + 0.5 * 1) / 1.5
    assert cvar([3.0, 0.0, 1.0, 2.0], 0.375) == pytest.approx(0.5 / 1.5)
    assert cvar([0.7, 0.2, 0.9, 1.0, 0.4], 0.1) == pytest.approx(0.2)  # worst of 5


def test_cvar_at_most_mean_and_nan() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(size=50)
    assert cvar(x) <= x.mean()
    # NaN dropped: 9 values, the worst 0.9 of a value is the 0.0
    assert cvar([1.0, float("nan"), 0.0] + [1.0] * 7, 0.1) == 0.0
    assert cvar([1.0, float("nan"), 0.5] + [1.0] * 7, 0.2) == pytest.approx((0.5 + 0.8 * 1.0) / 1.8)
    assert math.isnan(cvar([]))
    with pytest.raises(ValueError):
        cvar([1.0], 0.0)


# ----------------------------------------------------------------------------- curves


def test_half_life_of_exponential_decay() -> None:
    steps = np.arange(0, 101)
    values = 2.0 * np.exp(-np.log(2) * steps / 20.0)  # halves every 20 steps
    assert half_life(steps, values) == pytest.approx(20.0)
    # measured from the first logged step
    assert half_life(steps[10:], values[10:]) == pytest.approx(20.0)


def test_half_life_never_and_nan() -> None:
    assert math.isnan(half_life([1, 2, 3], [1.0, 0.9, 0.8]))
    assert math.isnan(half_life([1, 2], [0.0, 0.0]))
    assert math.isnan(half_life([], []))
    # NaN points skipped: first finite is 4.0 at step 2, first <= 2 at step 5
    assert half_life([1, 2, 3, 4, 5], [float("nan"), 4.0, 3.0, float("nan"), 2.0]) == 3.0


def test_steps_to_target() -> None:
    steps = [10, 20, 30, 40]
    acc = [0.1, 0.4, 0.8, 0.9]
    assert steps_to_target(steps, acc, 0.8) == 30.0
    assert steps_to_target(steps, acc, 0.05) == 10.0
    assert math.isnan(steps_to_target(steps, acc, 0.95))
    assert steps_to_target(steps, [0.1, float("nan"), 0.9, 0.2], 0.5) == 30.0
    assert steps_to_target(steps, [5.0, 3.0, 1.0, 0.5], 1.0, higher_is_better=False) == 30.0
    with pytest.raises(ValueError):
        steps_to_target([1, 2], [0.1], 0.5)


# ----------------------------------------------------------------------------- per recipe


def _write_run(
    root: Path,
    recipe: str,
    seed: int,
    acc: list[float],
    entropy: list[float],
    finished: bool = True,
    per_prompt: list[float] | None = None,
    extra_final: dict[str, float] | None = None,
    alarms: dict[str, int] | None = None,
) -> Path:
    d = root / recipe / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(
        f"recipe: {recipe}\ntask:\n  name: arithmetic\n  params: {{}}\ntrain:\n  seed: {seed}\n  steps: {len(acc)}\n"
    )
    lines = []
    for i, (a, e) in enumerate(zip(acc, entropy, strict=True)):
        lines.append(
            json.dumps(
                {"step": i + 1, "reward/accuracy": a, "policy/entropy": e, "policy/ratio_max": 1.0 + i}
            )
        )
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if finished:
        final: dict[str, Any] = {
            "reward/accuracy": acc[-1],
            "policy/entropy": entropy[-1],
            **(extra_final or {}),
        }
        summary = {
            "recipe": recipe,
            "task": "arithmetic",
            "seed": seed,
            "steps": len(acc),
            "final": final,
            "alarms": alarms or {},
            "alarm_count": sum((alarms or {}).values()),
            "eval": {"accuracy": acc[-1], "per_prompt_success": per_prompt or []},
        }
        (d / "summary.json").write_text(json.dumps(summary))
    else:
        (d / "error.txt").write_text("RuntimeError: boom")
    return d


def test_summarize_recipe_and_recipe_table(tmp_path: Path) -> None:
    ent = [2.0, 1.5, 1.0, 0.5]
    for s, final in enumerate([0.2, 0.3, 0.4]):
        _write_run(
            tmp_path,
            "grpo",
            s,
            [0.1, 0.1, 0.2, final],
            ent,
            per_prompt=[0.0, 1.0, 0.5, 0.5] * 5,
            alarms={"entropy_collapse": 1},
        )
    for s, final in enumerate([0.6, 0.7, 0.8]):
        _write_run(
            tmp_path,
            "dapo",
            s,
            [0.2, 0.5, 0.6, final],
            [2.0, 2.0, 1.8, 1.6],
            per_prompt=[1.0] * 20,
            extra_final={"reward/proxy": 0.9, "reward/gold": final},
        )
    _write_run(tmp_path, "dapo", 9, [0.0], [1.0], finished=False)
    records = load_runs(tmp_path)

    grpo = [r for r in records if r.recipe == "grpo"]
    s = summarize_recipe(grpo, "reward/accuracy")
    assert s["n"] == 3
    assert s["mean"] == pytest.approx(0.3)
    assert s["ci_low"] <= 0.3 <= s["ci_high"]
    assert s["iqm"] == pytest.approx(0.3)
    assert summarize_recipe(grpo, "eval/accuracy")["mean"] == pytest.approx(0.3)

    rows = recipe_table(records, ["reward/accuracy"], baseline="grpo", target_accuracy=0.5)
    assert [r["recipe"] for r in rows] == ["grpo", "dapo"]
    g, d = rows
    assert g["poi"]["reward/accuracy"]["value"] == pytest.approx(0.5)
    assert d["poi"]["reward/accuracy"]["value"] == 1.0
    assert d["poi"]["reward/accuracy"]["ci_low"] == 1.0
    assert d["runs"] == 4 and d["finished"] == 3 and d["failed"] == 1
    assert d["errors"][0]["error"] == "RuntimeError: boom" and d["errors"][0]["seed"] == 9
    assert d["metrics"]["reward/accuracy"]["mean"] == pytest.approx(0.7)

    gs, ds = g["stability"], d["stability"]
    assert gs["entropy_final"]["mean"] == pytest.approx(0.5)
    assert gs["entropy_half_life"]["mean"] == pytest.approx(2.0)  # 2.0 -> 1.0 from step 1 to step 3
    assert ds["entropy_half_life"]["reached"] == 0 and math.isnan(ds["entropy_half_life"]["mean"])
    assert gs["alarms"] == {"entropy_collapse": 1.0}
    assert gs["alarm_count"]["mean"] == 1.0
    assert gs["ratio_max"]["mean"] == pytest.approx(4.0)
    assert gs["kl_final"]["n"] == 0
    assert gs["steps_to_target"]["reached"] == 0
    assert ds["steps_to_target"]["mean"] == pytest.approx(2.0) and ds["steps_to_target"]["target"] == 0.5
    assert gs["reward_hacking_gap"] is None
    assert ds["reward_hacking_gap"]["mean"] == pytest.approx(0.2)

    # risk: worst 10% of 20 prompts are two zeros
    assert g["risk"]["cvar"]["mean"] == 0.0
    assert g["risk"]["mean"]["mean"] == pytest.approx(0.5)
    assert d["risk"]["cvar"]["mean"] == 1.0

    # lower-is-better flips the comparison; no baseline -> no poi
    rows = recipe_table(records, ["reward/accuracy"], baseline="grpo", lower_is_better={"reward/accuracy"})
    assert rows[1]["poi"]["reward/accuracy"]["value"] == 0.0
    assert rows[1]["stability"]["steps_to_target"] is None
    assert all(r["poi"] == {} for r in recipe_table(records, ["reward/accuracy"]))
