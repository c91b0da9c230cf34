"""Statistics across seeds, after rliable.

Reference: R. Agarwal, M. Schwarzer, P. S. Castro, A. Courville, M. G. Bellemare, "Deep Reinforcement
Learning at the Edge of the Statistical Precipice", NeurIPS 2021, arXiv:2108.13264 (library
``rliable``). With a handful of seeds a point estimate says little: report interval estimates
(percentile bootstrap confidence intervals over runs), the interquartile mean (robust to a single
outlier seed, more efficient than the median) and the probability of improvement of one method over
another.

Pure numpy; every random draw uses a seeded :class:`numpy.random.Generator`, so the same inputs and
``seed`` give the same intervals. NaN values (missing or non-finite runs) are dropped before any
statistic; an empty sample gives NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import numpy as np

from tether.arena.runs import RunRecord, group_by_recipe, series, to_float

Stat = Callable[..., Any]

#: Metric names of the stability view (see :func:`recipe_table`).
ENTROPY = "policy/entropy"
RATIO_MAX = "policy/ratio_max"
KL_REF = "policy/kl_ref"
ACCURACY = "reward/accuracy"
PROXY = "reward/proxy"
GOLD = "reward/gold"

#: Metrics where a lower value is better (costs of a constrained control run); see :func:`lower_is_better`.
LOWER_IS_BETTER = frozenset(
    {"episode/cost", "episode/cost_last10", "safety/violation_rate", "lagrange/constraint_violation"}
)


def lower_is_better(metric: str, extra: Collection[str] = ()) -> bool:
    """Whether a lower ``metric`` is better: those named in ``extra`` (``--lower-is-better``) or in
    :data:`LOWER_IS_BETTER`, and any metric whose last path part starts with ``cost`` or holds
    ``violation`` (``episode/cost_last10``, ``safety/violation_rate``, ``eval/cost``)."""
    if metric in extra or metric in LOWER_IS_BETTER:
        return True
    last = metric.rsplit("/", 1)[-1]
    return last.startswith("cost") or "violation" in last


def _clean(values: Iterable[float] | np.ndarray) -> np.ndarray:
    """1-d float array without NaN/inf."""
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    return a[np.isfinite(a)]


def _apply_stat(stat: Stat, samples: np.ndarray) -> np.ndarray:
    """``stat`` over the last axis of ``samples`` [n_boot, n]; vectorised when stat takes ``axis``."""
    try:
        out = np.asarray(stat(samples, axis=-1), dtype=np.float64)
        if out.shape == (samples.shape[0],):
            return out
    except TypeError:
        pass
    return np.array([float(stat(row)) for row in samples], dtype=np.float64)


def bootstrap_ci(
    values: Iterable[float] | np.ndarray,
    stat: Stat = np.mean,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap ``1 - alpha`` confidence interval of ``stat`` over seeds (rliable).

    Resamples the runs with replacement ``n_boot`` times, applies ``stat`` to each resample and
    returns the ``alpha/2`` and ``1 - alpha/2`` percentiles. NaN values are dropped; fewer than two
    values give ``(nan, nan)``: one seed says nothing about the spread (a (v, v) "interval" would
    claim certainty). Deterministic for a given ``seed``. With few seeds the percentile interval
    cannot be wider than the seeds' range, so it understates the uncertainty; the report says so.
    Agarwal et al. 2021, arXiv:2108.13264, section 4 (interval estimates).
    """
    a = _clean(values)
    if a.size < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n_boot, a.size))
    boot = _apply_stat(stat, a[idx])
    boot = boot[np.isfinite(boot)]
    if boot.size == 0:
        return math.nan, math.nan
    low, high = np.percentile(boot, [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)])
    return float(low), float(high)


def iqm(values: Iterable[float] | np.ndarray, fractional: bool = False) -> float:
    """Interquartile mean: the mean of the middle 50% of the runs (rliable's aggregate).

    Agarwal et al. 2021 (arXiv:2108.13264, section 4.2): discard the bottom and top 25% of the runs
    and average the rest. With ``fractional=True`` the 25% cut is exact: when ``n/4`` is not
    an integer, the two runs straddling the quartiles count with the fraction of them inside the
    middle 50% (e.g. n=5: weights 0, .75, 1, .75, 0). ``fractional=False`` (default) reproduces rliable's code,
    ``scipy.stats.trim_mean(x, 0.25)``, which cuts ``floor(n/4)`` runs at each end. Both agree when n
    is a multiple of 4 (IQM of 1..8 = 4.5). NaN dropped; empty gives NaN.
    """
    a = np.sort(_clean(values))
    n = a.size
    if n == 0:
        return math.nan
    if not fractional:
        k = int(0.25 * n)
        return float(a[k : n - k].mean())
    lo, hi = 0.25 * n, 0.75 * n
    i = np.arange(n, dtype=np.float64)
    w = np.clip(np.minimum(i + 1.0, hi) - np.maximum(i, lo), 0.0, None)
    return float((w * a).sum() / w.sum())


def iqm_ci(
    values: Iterable[float] | np.ndarray, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap ``1 - alpha`` CI of the :func:`iqm` across seeds (rliable's interval of
    its aggregate). NaN dropped; empty gives ``(nan, nan)``. Deterministic for a given ``seed``."""
    return bootstrap_ci(values, stat=iqm, n_boot=n_boot, alpha=alpha, seed=seed)


def _poi_matrix(x: np.ndarray, y: np.ndarray) -> float:
    gt = (x[:, None] > y[None, :]).mean()
    eq = (x[:, None] == y[None, :]).mean()
    return float(gt + 0.5 * eq)


def probability_of_improvement(x: Iterable[float] | np.ndarray, y: Iterable[float] | np.ndarray) -> float:
    """P(X > Y) + 0.5 P(X = Y) over all pairs of runs of X and Y (rliable).

    The Mann-Whitney U statistic of the two samples divided by ``len(x) * len(y)``: 1 when every run
    of X beats every run of Y, 0.5 for identical samples, 0 when Y always wins. Higher is better
    (negate both samples for a metric where lower is better). Agarwal et al. 2021, arXiv:2108.13264,
    section 4.3 ("probability of improvement"). NaN dropped; an empty side gives NaN.
    """
    a, b = _clean(x), _clean(y)
    if a.size == 0 or b.size == 0:
        return math.nan
    return _poi_matrix(a, b)


def poi_ci(
    x: Iterable[float] | np.ndarray,
    y: Iterable[float] | np.ndarray,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI ``(low, high)`` of :func:`probability_of_improvement`.

    The runs of X and of Y are resampled independently (rliable's stratified bootstrap, one stratum
    per method). Agarwal et al. 2021, arXiv:2108.13264. A side with fewer than two runs: ``(nan, nan)``
    (resampling one run gives an interval of zero width, not certainty).
    """
    a, b = _clean(x), _clean(y)
    if a.size < 2 or b.size < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    ia = rng.integers(0, a.size, size=(n_boot, a.size))
    ib = rng.integers(0, b.size, size=(n_boot, b.size))
    boot = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, 4_000_000 // max(1, a.size * b.size))
    for start in range(0, n_boot, chunk):
        xa = a[ia[start : start + chunk]][:, :, None]
        yb = b[ib[start : start + chunk]][:, None, :]
        boot[start : start + chunk] = (xa > yb).mean(axis=(1, 2)) + 0.5 * (xa == yb).mean(axis=(1, 2))
    low, high = np.percentile(boot, [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)])
    return float(low), float(high)


def cvar(values: Iterable[float] | np.ndarray, alpha: float = 0.1) -> float:
    """Conditional value at risk: the mean of the worst (lowest) ``alpha`` fraction of the values.

    Exact for the empirical distribution: when ``alpha * n`` is not an integer the boundary value
    counts with its fractional weight (n=5, alpha=0.1: the minimum; n=20: mean of the 2 lowest).
    Used on per-prompt success rates (the worst 10% of prompts) next to their mean. NaN dropped;
    empty gives NaN. ``alpha`` in (0, 1].
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"cvar: alpha must be in (0, 1], got {alpha}")
    a = np.sort(_clean(values))
    n = a.size
    if n == 0:
        return math.nan
    i = np.arange(n, dtype=np.float64)
    w = np.clip(np.minimum(i + 1.0, alpha * n) - i, 0.0, 1.0)
    return float((w * a).sum() / w.sum())


def _curve(
    steps: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(steps, dtype=np.float64).reshape(-1)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if s.shape != v.shape:
        raise ValueError(f"steps and values differ in length: {s.shape} vs {v.shape}")
    keep = np.isfinite(s) & np.isfinite(v)
    s, v = s[keep], v[keep]
    order = np.argsort(s, kind="stable")
    return s[order], v[order]


def half_life(steps: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray) -> float:
    """Steps from the first point until the curve first falls to half its initial value.

    ``initial`` is the first finite value; the result is ``steps[j] - steps[0]`` for the first
    ``j`` with ``values[j] <= initial / 2`` (no interpolation between logged steps). NaN if it never
    gets there, or if the initial value is not positive (halving is meaningless then). Used for the
    entropy half-life: how fast a recipe collapses its policy's entropy.
    """
    s, v = _curve(steps, values)
    if v.size == 0 or v[0] <= 0:
        return math.nan
    hit = np.nonzero(v <= v[0] / 2.0)[0]
    return float(s[hit[0]] - s[0]) if hit.size else math.nan


def steps_to_target(
    steps: Sequence[float] | np.ndarray,
    values: Sequence[float] | np.ndarray,
    target: float,
    higher_is_better: bool = True,
) -> float:
    """The first logged step at which the value reaches ``target`` (``>=``; ``<=`` when
    ``higher_is_better`` is False), NaN if never. NaN values are skipped."""
    s, v = _curve(steps, values)
    hit = np.nonzero(v >= target if higher_is_better else v <= target)[0]
    return float(s[hit[0]]) if hit.size else math.nan


def summarize(
    values: Iterable[float] | np.ndarray, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> dict[str, Any]:
    """``{"mean", "ci_low", "ci_high", "iqm", "std", "n", "values"}`` of one sample across seeds.

    ``n`` counts the finite values (NaN dropped); ``values`` is the raw list, NaN included.
    """
    arr = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=np.float64)
    raw = [float(v) for v in arr.reshape(-1)]
    a = _clean(raw)
    low, high = bootstrap_ci(a, n_boot=n_boot, alpha=alpha, seed=seed)
    return {
        "mean": float(a.mean()) if a.size else math.nan,
        "ci_low": low,
        "ci_high": high,
        "iqm": iqm(a),
        "std": float(a.std(ddof=1)) if a.size > 1 else (0.0 if a.size == 1 else math.nan),
        "n": int(a.size),
        "values": raw,
    }


def final_values(records: Iterable[RunRecord], metric: str, only_finished: bool = True) -> np.ndarray:
    """Final value of ``metric`` per run (see :meth:`RunRecord.final`), NaN where unknown.

    With ``only_finished`` (default) failed and incomplete runs are left out.
    """
    return np.array(
        [r.final(metric) for r in records if r.status == "finished" or not only_finished], dtype=np.float64
    )


def summarize_recipe(
    records: Iterable[RunRecord],
    metric: str,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    only_finished: bool = True,
) -> dict[str, Any]:
    """Final ``metric`` of the given runs (normally one recipe, one run per seed) summarized across seeds.

    Returns ``{"mean", "ci_low", "ci_high", "iqm", "std", "n", "values"}``: mean, percentile
    bootstrap ``1 - alpha`` CI of the mean and interquartile mean (rliable, Agarwal et al. 2021,
    arXiv:2108.13264). ``"eval/<key>"`` metrics read ``summary["eval"][key]``.
    """
    return summarize(final_values(records, metric, only_finished), n_boot=n_boot, alpha=alpha, seed=seed)


def _per_run_curve_stat(
    records: Sequence[RunRecord], metric: str, fn: Callable[[np.ndarray, np.ndarray], float]
) -> list[float]:
    out = []
    for r in records:
        steps, values = series([r], metric)
        out.append(fn(steps, values[0]) if steps.size else math.nan)
    return out


def _summ_reached(values: list[float], n_boot: int, alpha: float, seed: int) -> dict[str, Any]:
    d = summarize(values, n_boot=n_boot, alpha=alpha, seed=seed)
    d["reached"] = int(np.isfinite(np.asarray(values, dtype=np.float64)).sum()) if values else 0
    d["runs"] = len(values)
    return d


def recipe_table(
    records: Iterable[RunRecord],
    metrics: Sequence[str],
    baseline: str | None = None,
    target_accuracy: float | None = None,
    cvar_alpha: float = 0.1,
    lower_is_better: Collection[str] = (),
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per recipe (order of first appearance; the baseline first when given).

    Statistics use the finished runs only; failed and incomplete ones are counted and listed. Each
    summary below is a :func:`summarize` dict (``mean, ci_low, ci_high, iqm, std, n, values``). Row::

        {"recipe": str, "runs": int, "finished": int, "failed": int, "incomplete": int,
         "errors": [{"seed", "path", "error"}],            # failed runs, with error.txt's text
         "metrics": {metric: summary of its final value},
         "poi": {metric: {"value", "ci_low", "ci_high"}},  # P(recipe > baseline); {} without baseline
         "stability": {
            "entropy_final": summary, "entropy_half_life": summary + {"reached", "runs"},
            "alarms": {kind: mean count per run}, "alarm_count": summary,
            "ratio_max": summary (max over steps of policy/ratio_max per run),
            "kl_final": summary (final policy/kl_ref),
            "steps_to_target": summary + {"reached", "runs", "target"} or None without target_accuracy,
            "reward_hacking_gap": summary of final reward/proxy - reward/gold, or None when no run has both},
         "risk": {"cvar": summary, "mean": summary, "alpha": cvar_alpha}}  # of eval per_prompt_success

    ``poi`` uses :func:`probability_of_improvement` and :func:`poi_ci` across seeds (rliable, Agarwal
    et al. 2021, arXiv:2108.13264); for a metric in ``lower_is_better`` the improvement is a lower value.
    The baseline's own row has P = 0.5. A summary with ``n == 0`` has NaN statistics.
    """
    groups = group_by_recipe(records)
    order = list(groups)
    if baseline is not None and baseline in groups:
        order.remove(baseline)
        order.insert(0, baseline)
    base_finished = [r for r in groups.get(baseline, []) if r.status == "finished"] if baseline else []
    kw: dict[str, Any] = {"n_boot": n_boot, "alpha": alpha, "seed": seed}
    rows: list[dict[str, Any]] = []
    for recipe in order:
        runs = groups[recipe]
        fin = [r for r in runs if r.status == "finished"]
        row: dict[str, Any] = {
            "recipe": recipe,
            "runs": len(runs),
            "finished": len(fin),
            "failed": sum(r.status == "failed" for r in runs),
            "incomplete": sum(r.status == "incomplete" for r in runs),
            "errors": [
                {"seed": r.seed, "path": str(r.path), "error": r.error} for r in runs if r.status == "failed"
            ],
            "metrics": {m: summarize_recipe(fin, m, **kw) for m in metrics},
            "poi": {},
        }
        if baseline is not None and base_finished:
            for m in metrics:
                sign = -1.0 if m in lower_is_better else 1.0
                x = sign * final_values(fin, m)
                y = sign * final_values(base_finished, m)
                low, high = poi_ci(x, y, **kw)
                row["poi"][m] = {"value": probability_of_improvement(x, y), "ci_low": low, "ci_high": high}

        alarm_kinds: dict[str, float] = {}
        for r in fin:
            for kind, count in r.alarm_counts().items():
                alarm_kinds[kind] = alarm_kinds.get(kind, 0.0) + count
        alarm_total = [float(sum(r.alarm_counts().values())) for r in fin]
        gaps = [r.final(PROXY) - r.final(GOLD) for r in fin]
        has_gap = any(math.isfinite(g) for g in gaps)
        ratio_max = _per_run_curve_stat(
            fin, RATIO_MAX, lambda s, v: float(np.nanmax(v)) if np.isfinite(v).any() else math.nan
        )
        stability: dict[str, Any] = {
            "entropy_final": summarize_recipe(fin, ENTROPY, **kw),
            "entropy_half_life": _summ_reached(_per_run_curve_stat(fin, ENTROPY, half_life), **kw),
            "alarms": {k: v / len(fin) for k, v in sorted(alarm_kinds.items())} if fin else {},
            "alarm_count": summarize(alarm_total, **kw),
            "ratio_max": summarize(ratio_max, **kw),
            "kl_final": summarize_recipe(fin, KL_REF, **kw),
            "steps_to_target": None,
            "reward_hacking_gap": summarize(gaps, **kw) if has_gap else None,
        }
        if target_accuracy is not None:
            t = float(target_accuracy)
            reach = [steps_to_target(*r.curve(ACCURACY), t) if r.metrics else math.nan for r in fin]
            d = _summ_reached(reach, **kw)
            d["target"] = t
            stability["steps_to_target"] = d
        row["stability"] = stability

        cv, mean = [], []
        for r in fin:
            pps = r.eval.get("per_prompt_success")
            if isinstance(pps, list) and pps:
                conv = [to_float(v) for v in pps]
                arr = np.array([np.nan if v is None else v for v in conv], dtype=np.float64)
                cv.append(cvar(arr, cvar_alpha))
                fa = _clean(arr)
                mean.append(float(fa.mean()) if fa.size else math.nan)
        row["risk"] = {"cvar": summarize(cv, **kw), "mean": summarize(mean, **kw), "alpha": cvar_alpha}
        rows.append(row)
    return rows
