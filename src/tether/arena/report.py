"""The comparison report: ``report.md``, a self-contained ``report.html`` and PNG plots.

Built from the run directories alone (:func:`tether.arena.runs.load_runs`), so ``tether report DIR``
rebuilds it at any time, byte for byte the same for the same directories. Statistics come from
:mod:`tether.arena.stats` (rliable-style: bootstrap 95% CIs across seeds, interquartile mean,
probability of improvement over a baseline recipe); the plots are drawn with matplotlib's Agg
renderer through :class:`matplotlib.figure.Figure` (no pyplot, no global backend state).

Layout of a comparison directory after :func:`build_report`::

    DIR/report.md          tables + links to plots/*.png
    DIR/report.html        the same, images embedded as base64 data URIs
    DIR/plots/*.png        learning curves with seed bands, final scores with CIs

Control comparisons (runs of ``tether control train``, whose config names an ``env.id``) get their
own section per environment: final ``episode/return_last10``, ``episode/cost_last10`` and
``safety/violation_rate`` by default (``--metric`` chooses others), the IQM and mean with bootstrap
CIs per recipe, how many seeds end within the cost limit, and learning curves over environment
steps (``env_steps``). Costs are lower-is-better (:func:`tether.arena.stats.lower_is_better`,
``--lower-is-better`` adds metrics): the probability of improvement then counts a lower value as better.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tether.arena.runs import RunRecord, load_run, load_runs, series
from tether.arena.stats import iqm_ci, lower_is_better, recipe_table, summarize_recipe
from tether.config import flatten, key_under
from tether.errors import TetherError
from tether.runs.files import atomic_write_text

#: Learning curves: (metric, y-axis label with unit, title). One PNG per metric present in a run.
CURVES: tuple[tuple[str, str, str], ...] = (
    ("reward/mean", "reward (mean per sample)", "Reward"),
    ("reward/accuracy", "reward (fraction correct)", "Training accuracy"),
    ("policy/entropy", "entropy (nats per token)", "Policy entropy"),
    ("policy/kl_ref", "KL to reference (nats per token)", "KL to the reference policy"),
    ("policy/clip_frac", "clipped tokens (fraction)", "Clip fraction"),
    ("policy/clip_frac_low", "tokens clipped below 1-ε (fraction)", "Clip fraction, low side"),
    ("policy/clip_frac_high", "tokens clipped above 1+ε (fraction)", "Clip fraction, high side"),
    ("response/length_mean", "response length (tokens)", "Response length"),
)

#: Final-score metrics for the per-metric tables (eval first; pass@K keys are found in the summaries).
_EVAL_METRICS = ("eval/accuracy", "eval/greedy_accuracy", "eval/format_rate")
_TRAIN_METRICS = ("reward/accuracy", "reward/mean")

#: Control runs: learning curves over environment steps, and the default final-score metrics.
CONTROL_CURVES: tuple[tuple[str, str, str], ...] = (
    ("episode/return_last10", "return (mean of the last 10 episodes)", "Episode return"),
    ("episode/cost_last10", "cost per episode (mean of the last 10)", "Episode cost"),
    ("safety/violation_rate", "episodes over the cost limit (fraction)", "Cost-limit violations"),
    ("lagrange/multiplier", "Lagrange multiplier λ", "Lagrange multiplier"),
    ("policy/entropy", "entropy (nats per step)", "Policy entropy"),
    ("policy/approx_kl", "approximate KL (nats)", "KL of each update"),
)
CONTROL_METRICS = ("episode/return_last10", "episode/cost_last10", "safety/violation_rate")
_MULTIPLIER = "lagrange/multiplier"

_LABELS = {
    "eval/accuracy": "eval accuracy (pass@1, fraction correct)",
    "eval/greedy_accuracy": "eval greedy accuracy (fraction correct)",
    "eval/format_rate": "eval format rate (fraction well-formed)",
    "reward/accuracy": "final training accuracy (fraction correct)",
    "reward/mean": "final training reward (mean per sample)",
    "episode/return_last10": "final return (mean of the last 10 episodes)",
    "episode/cost_last10": "final cost (mean episode cost of the last 10 episodes)",
    "safety/violation_rate": "final violation rate (fraction of the last update's episodes over the cost limit)",
}
_SHORT_LABELS = {
    "episode/return_last10": "final return\n(mean of the last 10 episodes)",
    "episode/cost_last10": "final episode cost\n(mean of the last 10; lower is better)",
    "safety/violation_rate": "final violation rate\n(fraction; lower is better)",
}

_DPI = 110


# --------------------------------------------------------------------------------------------------
# A tiny document model rendered to both Markdown and HTML.


@dataclass
class _Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class _Image:
    path: str  # relative to the comparison directory
    alt: str


@dataclass
class _Doc:
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append((f"h{level}", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: Sequence[str]) -> None:
        self.blocks.append(("ul", list(items)))

    def pre(self, text: str) -> None:
        self.blocks.append(("pre", text))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]], caption: str = "") -> None:
        self.blocks.append(("table", _Table(list(headers), [list(r) for r in rows], caption)))

    def image(self, path: str, alt: str) -> None:
        self.blocks.append(("img", _Image(path, alt)))


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _render_md(doc: _Doc) -> str:
    out: list[str] = []
    for kind, val in doc.blocks:
        if kind.startswith("h"):
            out += ["#" * int(kind[1:]) + " " + val, ""]
        elif kind == "p":
            out += [val, ""]
        elif kind == "ul":
            out += [f"- {item}" for item in val] + [""]
        elif kind == "pre":
            out += ["```", val.rstrip("\n"), "```", ""]
        elif kind == "table":
            t: _Table = val
            if t.caption:
                out += [t.caption, ""]
            out.append("| " + " | ".join(_md_cell(c) for c in t.headers) + " |")
            out.append("|" + "|".join("---" for _ in t.headers) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
            out.append("")
        elif kind == "img":
            img: _Image = val
            out += [f"![{img.alt}]({img.path})", ""]
    return "\n".join(out).rstrip("\n") + "\n"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1, h2, h3 { line-height: 1.2; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
tr:nth-child(even) td { background: #fafafa; }
code { background: #f4f4f4; padding: 0 0.2em; }
pre { background: #f4f4f4; padding: 0.6em; overflow-x: auto; white-space: pre-wrap; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0 1.5em; }
.caption { color: #555; margin-bottom: 0.2em; }
"""


def _inline_html(text: str) -> str:
    """HTML of a line with Markdown `code` spans and **bold** (the only inline markup used here)."""
    parts = text.split("`")
    out = []
    for i, part in enumerate(parts):
        esc = html.escape(part)
        if i % 2 == 1 and i < len(parts) - 1:
            out.append(f"<code>{esc}</code>")
        else:
            bold = esc.split("**")
            out.append(
                "".join(
                    f"<strong>{b}</strong>" if j % 2 == 1 and j < len(bold) - 1 else b
                    for j, b in enumerate(bold)
                )
            )
    return "".join(out)


def _render_html(doc: _Doc, root: Path, title: str) -> str:
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
    ]
    for kind, val in doc.blocks:
        if kind.startswith("h"):
            out.append(f"<{kind}>{_inline_html(val)}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline_html(val)}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in val) + "</ul>")
        elif kind == "pre":
            out.append(f"<pre>{html.escape(val.rstrip())}</pre>")
        elif kind == "table":
            t: _Table = val
            if t.caption:
                out.append(f'<p class="caption">{_inline_html(t.caption)}</p>')
            head = "".join(f"<th>{_inline_html(c)}</th>" for c in t.headers)
            body = "".join(
                "<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in r) + "</tr>" for r in t.rows
            )
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            img: _Image = val
            data = base64.b64encode((root / img.path).read_bytes()).decode("ascii")
            out.append(f'<img alt="{html.escape(img.alt)}" src="data:image/png;base64,{data}">')
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# Formatting.


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    f = float(v)
    if not math.isfinite(f):
        return "–"
    return f"{f:.{digits}f}"


def _mean_ci(s: dict[str, Any] | None, digits: int = 3) -> str:
    """``mean [low, high]`` of a :func:`tether.arena.stats.summarize` dict."""
    if not s or not s.get("n"):
        return "–"
    if not (math.isfinite(s["ci_low"]) and math.isfinite(s["ci_high"])):
        return f"{_fmt(s['mean'], digits)} (1 seed: no CI)"
    return f"{_fmt(s['mean'], digits)} [{_fmt(s['ci_low'], digits)}, {_fmt(s['ci_high'], digits)}]"


def _label(metric: str) -> str:
    if metric in _LABELS:
        return _LABELS[metric]
    if metric.startswith("eval/pass@"):
        return f"eval {metric[5:]} (fraction of prompts solved)"
    return metric


def _short_label(metric: str) -> str:
    """Two-line y-axis label of a final-score panel (short enough for a small panel)."""
    if metric == "eval/accuracy":
        return "eval accuracy, pass@1\n(fraction correct)"
    if metric.startswith("eval/pass@"):
        return f"eval {metric[5:]}\n(fraction of prompts solved)"
    if metric == "reward/accuracy":
        return "final training accuracy\n(fraction correct)"
    return _SHORT_LABELS.get(metric, _label(metric))


def _slug(metric: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in metric).strip("_")


def _rel(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


# --------------------------------------------------------------------------------------------------
# Plots.


_LINESTYLES = ("-", "--", "-.", ":")


def _colours(recipes: Sequence[str]) -> dict[str, Any]:
    """One colour per recipe, the same in every figure (tab10, tab20 beyond ten recipes)."""
    import matplotlib

    if len(recipes) <= 10:
        cmap = matplotlib.colormaps["tab10"]
        return {r: cmap(i) for i, r in enumerate(recipes)}
    cmap = matplotlib.colormaps["tab20"]  # dark shades first, then the light ones: neighbours differ
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return {r: cmap(order[i % 20]) for i, r in enumerate(recipes)}


def _linestyle(colours: dict[str, Any], recipe: str) -> str:
    """A line style per recipe as well, so curves that overlap (or colours not told apart) stay readable."""
    return _LINESTYLES[list(colours).index(recipe) % len(_LINESTYLES)]


def _nan_stats(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, min and max over seeds (axis 0) ignoring NaN; NaN where no seed has a value."""
    finite = np.isfinite(values)
    count = finite.sum(axis=0)
    filled = np.where(finite, values, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, filled.sum(axis=0) / np.maximum(count, 1), np.nan)
    lo = np.where(count > 0, np.where(finite, values, np.inf).min(axis=0), np.nan)
    hi = np.where(count > 0, np.where(finite, values, -np.inf).max(axis=0), np.nan)
    return mean, lo, hi


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average of each row, NaN-aware (a window without values stays NaN)."""
    if window <= 1 or values.shape[1] == 0:
        return values
    kernel = np.ones(window)
    out = np.empty_like(values)
    for i, row in enumerate(values):
        finite = np.isfinite(row)
        num = np.convolve(np.where(finite, row, 0.0), kernel, mode="same")
        den = np.convolve(finite.astype(np.float64), kernel, mode="same")
        with np.errstate(invalid="ignore", divide="ignore"):
            out[i] = np.where(den > 0, num / np.maximum(den, 1), np.nan)
        out[i][~finite] = np.nan  # do not invent values where the run logged none
    return out


def _smoothing_window(n_steps: int) -> int:
    return max(1, n_steps // 40)


def _legend_outside(ax: Any) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False, fontsize=9)


def _plot_curve(
    path: Path,
    groups: dict[str, list[RunRecord]],
    colours: dict[str, Any],
    metric: str,
    ylabel: str,
    title: str,
    x: str = "step",
    xlabel: str = "step",
    hline: tuple[float, str] | None = None,
) -> bool:
    """Learning curve of ``metric``: per recipe the mean over seeds and a min-max band. False if no data.

    ``x``: the logged key on the x axis (``env_steps`` for control runs); ``hline``: (value, label)
    of a dashed horizontal line (a cost limit)."""
    from matplotlib.figure import Figure

    data = {}
    for recipe, recs in groups.items():
        steps, values = series(recs, metric, x=x)
        if steps.size and np.isfinite(values).any():
            data[recipe] = (steps, values)
    if not data:
        return False
    n_steps = max(s.size for s, _ in data.values())
    window = _smoothing_window(n_steps)
    longest = max(len(f"{r} (n=00)") for r in data)
    fig = Figure(figsize=(8.0 + max(0.0, 0.075 * (longest - 24)), 4.2), layout="constrained")
    ax = fig.add_subplot()
    for recipe, (steps, values) in data.items():
        vals = _smooth(values, window)
        mean, lo, hi = _nan_stats(vals)
        n = int(np.isfinite(values).any(axis=1).sum())
        c = colours[recipe]
        ax.plot(steps, mean, color=c, ls=_linestyle(colours, recipe), lw=1.6, label=f"{recipe} (n={n})")
        if n > 1:
            ax.fill_between(steps, lo, hi, color=c, alpha=0.18, lw=0)
    if hline is not None:
        ax.axhline(hline[0], color="0.25", ls="--", lw=1.2, label=hline[1])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    note = "line: mean over seeds; band: min–max across seeds"
    if window > 1:
        note += f"; moving average over {window} {'steps' if x == 'step' else 'logged points'}"
    ax.set_title(f"{title}\n{note}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.01)
    _legend_outside(ax)
    _save_png(fig, path)
    return True


def _plot_final_scores(
    path: Path,
    rows: list[dict[str, Any]],
    colours: dict[str, Any],
    metrics: list[str],
    title: str,
) -> bool:
    """Per metric a panel: each recipe's mean with its bootstrap 95% CI, IQM and the seeds."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    metrics = [m for m in metrics if any(r["metrics"][m]["n"] for r in rows)]
    rows = [r for r in rows if any(r["metrics"][m]["n"] for m in metrics)]  # no finished run: no column
    if not metrics or not rows:
        return False
    recipes = [r["recipe"] for r in rows]
    rotate = max(len(r) for r in recipes) > 8 or len(recipes) > 6
    stacked = len(metrics) > 1 and len(recipes) > 5  # many recipes: one panel per row, shared x axis
    panel_w = max(3.6, 0.75 * len(recipes) + 1.2)
    if stacked:
        fig = Figure(figsize=(min(panel_w + 2.4, 16.0), 2.9 * len(metrics) + 1.6), layout="constrained")
        axes = fig.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
    else:
        fig = Figure(figsize=(min(panel_w * len(metrics) + 2.4, 16.0), 4.6), layout="constrained")
        axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    x = np.arange(len(recipes), dtype=np.float64)
    for ax, metric in zip(axes, metrics):
        for i, row in enumerate(rows):
            s = row["metrics"][metric]
            c = colours[row["recipe"]]
            seeds = np.asarray(s["values"], dtype=np.float64)
            seeds = seeds[np.isfinite(seeds)]
            if seeds.size:
                jitter = np.linspace(-0.15, 0.15, seeds.size) if seeds.size > 1 else np.zeros(1)
                ax.scatter(x[i] + jitter, seeds, s=12, color=c, alpha=0.45, lw=0, zorder=2)
            if not s["n"]:
                continue
            err = np.array([[s["mean"] - s["ci_low"]], [s["ci_high"] - s["mean"]]])
            ax.errorbar(
                x[i],
                s["mean"],
                yerr=np.clip(err, 0, None),
                fmt="o",
                color=c,
                ms=7,
                capsize=5,
                lw=1.8,
                zorder=3,
            )
            ax.scatter(
                x[i] + 0.28, s["iqm"], marker="D", s=30, facecolor="white", edgecolor=c, lw=1.5, zorder=4
            )
        ax.set_xticks(x)
        ax.set_xlim(-0.6, len(recipes) - 0.4)
        ax.set_ylabel(_short_label(metric))
        if not stacked or ax is axes[-1]:
            ax.set_xticklabels(recipes, rotation=30 if rotate else 0, ha="right" if rotate else "center")
            ax.set_xlabel("recipe")
        ax.grid(True, axis="y", alpha=0.3)
        lo, hi = ax.get_ylim()
        if lo >= -0.05 and hi <= 1.05:
            ax.set_ylim(max(-0.02, lo), min(1.02, hi))
    handles = [
        Line2D([], [], color="0.3", marker="o", ls="-", ms=7, label="mean, 95% bootstrap CI"),
        Line2D([], [], color="0.3", marker="D", ls="", mfc="white", ms=6, label="IQM"),
        Line2D([], [], color="0.3", marker="o", ls="", alpha=0.45, ms=4, label="one seed"),
    ]
    fig.legend(handles=handles, loc="outside right upper", frameon=False, fontsize=9)
    fig.suptitle(title, fontsize=11)
    _save_png(fig, path)
    return True


# --------------------------------------------------------------------------------------------------
# Report sections.


def _config_value(cfg: dict[str, Any], dotted: str) -> Any:
    cur: Any = cfg
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _flatten(cfg: Any) -> dict[str, str]:
    """Dotted settings as JSON text; empty sections are left out."""
    return {k: json.dumps(v, sort_keys=True, default=str) for k, v in flatten(cfg).items() if v != {}}


_PER_RUN_KEYS = ("recipe", "train.seed", "run.out", "method", "recipe_resolved")


def _varying_settings(records: Sequence[RunRecord], per_run: Sequence[str] = _PER_RUN_KEYS) -> list[str]:
    """Config keys (other than recipe, seed and output) whose value differs between runs."""
    flat = [_flatten(r.config) for r in records]
    keys = sorted(set().union(*flat)) if flat else []
    out = []
    for k in keys:
        if key_under(k, per_run):
            continue
        vals = {f.get(k, "(unset)") for f in flat}
        if len(vals) > 1:
            out.append(f"`{k}`: " + ", ".join(sorted(vals)))
    return out


def _join(values: Sequence[Any]) -> str:
    return ", ".join(str(v) for v in values) if values else "–"


def _per_recipe(records: Sequence[RunRecord]) -> str:
    """Number of seeds per recipe: ``5``, or a range ``4–5`` when the recipes differ."""
    counts: dict[str, set[int]] = {}
    for r in records:
        counts.setdefault(r.recipe, set()).add(r.seed)
    sizes = sorted({len(v) for v in counts.values()})
    return str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}–{sizes[-1]}"


def _score_metrics(records: Sequence[RunRecord]) -> list[str]:
    """Final-score metrics present in at least one finished run, eval metrics first."""
    fin = [r for r in records if r.status == "finished"]
    pass_keys = sorted(
        {f"eval/{k}" for r in fin for k in r.eval if isinstance(k, str) and k.startswith("pass@")},
        key=lambda m: (len(m), m),
    )
    candidates = ["eval/accuracy", *pass_keys, "eval/greedy_accuracy", "eval/format_rate", *_TRAIN_METRICS]
    return [m for m in candidates if any(math.isfinite(r.final(m)) for r in fin)]


def _best_accuracy(records: Sequence[RunRecord]) -> float | None:
    """The best recipe's final mean training accuracy (``reward/accuracy``); None when no run logs it."""
    from tether.arena.stats import summarize_recipe

    groups: dict[str, list[RunRecord]] = {}
    for r in records:
        groups.setdefault(r.recipe, []).append(r)
    means = [float(summarize_recipe(recs, "reward/accuracy")["mean"]) for recs in groups.values()]
    best = [b for b in means if math.isfinite(b)]
    return max(best) if best else None


def _default_target(records: Sequence[RunRecord]) -> float | None:
    """80% of the best recipe's final mean training accuracy, rounded down to 0.05; None without data
    or when that is 0 (a target every step reaches says nothing)."""
    best = _best_accuracy(records)
    if best is None:
        return None
    target = math.floor(0.8 * best * 20.0 + 1e-9) / 20.0
    return target if target > 0 else None


def _no_target_note(records: Sequence[RunRecord]) -> str:
    """Why there is no default target accuracy (see :func:`_default_target`)."""
    best = _best_accuracy(records)
    if best is None:
        return "no target accuracy: no finished run logs `reward/accuracy`; pass --target-accuracy"
    return (
        f"no target accuracy: the best recipe's final mean training accuracy is {_fmt(best, 2)}, too low for "
        "the default target (80% of it, rounded down to 0.05, is 0); pass --target-accuracy"
    )


def _verdict_notes(
    doc: Any, rows: Sequence[dict[str, Any]], metrics: Sequence[str], base: str | None
) -> None:
    """What better / worse / n.s. mean, and a warning where a recipe has too few seeds for an interval."""
    if base:
        doc.p(
            "*better* / *worse*: the 95% CI of P(X > baseline) lies above / below ½; *n.s.*: it contains ½, so "
            "these seeds show no significant difference. With few seeds the percentile bootstrap cannot be wider "
            "than the seeds' own spread and understates the uncertainty: read any verdict from fewer than 5 "
            "seeds per recipe as indicative only."
        )
    fewest = min((int(r["metrics"][m]["n"]) for r in rows for m in metrics), default=0)
    if metrics and fewest < 2:
        doc.p(
            "**Warning:** a recipe has fewer than 2 finished seeds here: no interval can be estimated for it."
        )


def _poi_cell(row: dict[str, Any], metric: str, baseline: str | None) -> str:
    if baseline is None:
        return "–"
    if row["recipe"] == baseline:
        return "baseline"
    p = row["poi"].get(metric)
    if not p or not math.isfinite(p["value"]):
        return "–"
    if not (math.isfinite(p["ci_low"]) and math.isfinite(p["ci_high"])):
        return f"{_fmt(p['value'], 2)} (no CI: fewer than 2 seeds)"
    verdict = "better" if p["ci_low"] > 0.5 else "worse" if p["ci_high"] < 0.5 else "n.s."
    return f"{_fmt(p['value'], 2)} [{_fmt(p['ci_low'], 2)}, {_fmt(p['ci_high'], 2)}] {verdict}"


def _reached(s: dict[str, Any] | None) -> str:
    if not s or not s.get("runs"):
        return "–"
    if not s.get("n"):
        return f"never (0/{s['runs']} runs)"
    trio = [float(s["mean"]), float(s["ci_low"]), float(s["ci_high"])]
    digits = 0 if all(math.isfinite(v) and abs(v - round(v)) < 1e-9 for v in trio) else 1
    a, lo, hi = (_fmt(v, digits) for v in trio)
    return f"{a} [{lo}, {hi}] ({s['reached']}/{s['runs']} runs)"


def _alarms_cell(stab: dict[str, Any]) -> str:
    kinds = stab.get("alarms") or {}
    if not kinds:
        return "none"
    return ", ".join(f"{k}: {_fmt(v, 1)}" for k, v in kinds.items())


def _section_for_task(
    doc: _Doc,
    root: Path,
    plots: Path,
    task: str,
    records: list[RunRecord],
    colours: dict[str, Any],
    baseline: str | None,
    target_accuracy: float | None,
    prefix: str,
    level: int,
    chosen: Sequence[str] = (),
    lower_extra: Sequence[str] = (),
) -> None:
    finished = [r for r in records if r.status == "finished"]
    metrics = list(chosen) if chosen else _score_metrics(records)
    lower = [m for m in metrics if lower_is_better(m, lower_extra)]
    recipes_here = list(dict.fromkeys(r.recipe for r in records))
    base = baseline if baseline in recipes_here else None
    target = target_accuracy
    target_note = ""
    if target is None:
        target = _default_target(finished)
        if target is not None:
            target_note = " (default: 80% of the best recipe's final mean training accuracy; set it with --target-accuracy)"
    rows = recipe_table(records, metrics, baseline=base, target_accuracy=target, lower_is_better=lower)

    # What was compared.
    doc.h(level, "What was compared")
    steps = sorted({v for r in records if isinstance(v := _config_value(r.config, "train.steps"), int)})
    seeds = sorted({r.seed for r in records})
    params = sorted(
        {json.dumps(_config_value(r.config, "task.params") or {}, sort_keys=True) for r in records}
    )
    model = sorted(
        {
            str(m)
            for r in records
            if (m := _config_value(r.config, "model.name") or _config_value(r.config, "model.path"))
            is not None
        }
    )
    items = [
        "recipes: "
        + ", ".join(f"`{r['recipe']}`" for r in rows)
        + (f" (baseline: `{base}`)" if base else ""),
        f"task: `{task}`" + (f", params {', '.join(f'`{p}`' for p in params)}" if params != ["{}"] else ""),
        f"seeds: {_join(seeds)} ({_per_recipe(records)} per recipe)",
        f"steps per run: {_join(steps)}",
    ]
    if model:
        items.append("model: " + ", ".join(f"`{m}`" for m in model))
    items.append(
        f"runs: {len(records)} ({len(finished)} finished, {sum(r.status == 'failed' for r in records)} failed, "
        f"{sum(r.status == 'incomplete' for r in records)} incomplete); statistics use the finished runs"
    )
    varying = _varying_settings(records)
    if varying:
        items.append("settings that differ between runs: " + "; ".join(varying))
    doc.ul(items)
    doc.table(
        ["recipe", "runs", "finished", "failed", "incomplete"],
        [
            [r["recipe"], str(r["runs"]), str(r["finished"]), str(r["failed"]), str(r["incomplete"])]
            for r in rows
        ],
    )

    # Final scores.
    doc.h(level, "Final scores")
    doc.p(
        "Across seeds: mean with its percentile-bootstrap 95% CI (2000 resamples), interquartile mean (IQM) "
        "and the probability that a run of the recipe beats a run of the baseline, P(X > Y) + ½ P(X = Y), "
        "with its bootstrap 95% CI (rliable; Agarwal et al. 2021, arXiv:2108.13264)."
    )
    _verdict_notes(doc, rows, metrics, base)
    if not metrics:
        doc.p("No finished run has a final score.")
    for m in metrics:
        table_rows = []
        for r in rows:
            s = r["metrics"][m]
            table_rows.append([r["recipe"], str(s["n"]), _mean_ci(s), _fmt(s["iqm"]), _poi_cell(r, m, base)])
        doc.table(
            ["recipe", "n", "mean [95% CI]", "IQM", f"P(> {base}) [95% CI]" if base else "P(> baseline)"],
            table_rows,
            caption=f"**{_label(m)}** (`{m}`)" + (" (lower is better)" if m in lower else ""),
        )
    eval_metrics = [m for m in metrics if m == "eval/accuracy" or m.startswith("eval/pass@")]
    plot_metrics = eval_metrics or [m for m in metrics if m == "reward/accuracy"]
    final_png = plots / f"{prefix}final_scores.png"
    if plot_metrics and _plot_final_scores(final_png, rows, colours, plot_metrics, f"Final scores — {task}"):
        doc.image(_rel(final_png, root), f"final scores, {task}")

    # Stability.
    doc.h(level, "Stability")
    has_gap = any(r["stability"]["reward_hacking_gap"] for r in rows)
    headers = [
        "recipe",
        "final entropy (nats)",
        "entropy half-life (steps)",
        "alarms by kind (per run)",
        "max ratio",
        "final KL",
        f"steps to accuracy ≥ {_fmt(target, 2)}" if target is not None else "steps to target accuracy",
    ]
    if has_gap:
        headers.append("reward-hacking gap (proxy − gold)")
    stab_rows = []
    for r in rows:
        st = r["stability"]
        cells = [
            r["recipe"],
            _mean_ci(st["entropy_final"]),
            _reached(st["entropy_half_life"]),
            _alarms_cell(st),
            _mean_ci(st["ratio_max"]),
            _mean_ci(st["kl_final"], 4),
            _reached(st["steps_to_target"]),
        ]
        if has_gap:
            cells.append(_mean_ci(st["reward_hacking_gap"]))
        stab_rows.append(cells)
    doc.table(headers, stab_rows)
    notes = [
        "values are mean [95% CI] across the finished seeds; half-life: steps until the entropy first falls to half "
        "its initial value (runs that got there / runs)",
        "max ratio: the largest `policy/ratio_max` of each run; final KL: last `policy/kl_ref` (– without a reference model)",
    ]
    if target is not None:
        notes.append(f"target accuracy {_fmt(target, 2)} on `reward/accuracy`{target_note}")
    else:
        notes.append(_no_target_note(finished))
    if not has_gap:
        notes.append("reward-hacking gap: not shown, no run logs both `reward/proxy` and `reward/gold`")
    doc.ul(notes)

    # Risk.
    doc.h(level, "Risk: the worst prompts")
    alpha = rows[0]["risk"]["alpha"] if rows else 0.1
    if any(r["risk"]["cvar"]["n"] for r in rows):
        risk_rows = []
        for r in rows:
            rk = r["risk"]
            gap = rk["mean"]["mean"] - rk["cvar"]["mean"] if rk["mean"]["n"] and rk["cvar"]["n"] else math.nan
            risk_rows.append(
                [r["recipe"], str(rk["cvar"]["n"]), _mean_ci(rk["mean"]), _mean_ci(rk["cvar"]), _fmt(gap)]
            )
        doc.table(
            [
                "recipe",
                "n",
                "mean per-prompt success [95% CI]",
                f"CVaR{round(alpha * 100)} [95% CI]",
                "mean − CVaR",
            ],
            risk_rows,
            caption=(
                f"Per-prompt success on the held-out prompts (eval `per_prompt_success`): its mean, and its CVaR at "
                f"{alpha:g}: the mean success on the worst {alpha:.0%} of prompts, per run, then across seeds."
            ),
        )
    else:
        doc.p("No finished run has per-prompt eval success (`eval.per_prompt_success` in summary.json).")

    # Learning curves.
    doc.h(level, "Learning curves")
    groups: dict[str, list[RunRecord]] = {}
    for r in rows:
        recs = [x for x in finished if x.recipe == r["recipe"]]
        if recs:
            groups[r["recipe"]] = recs
    drawn = 0
    for metric, ylabel, title in CURVES:
        png = plots / f"{prefix}curve_{_slug(metric)}.png"
        if groups and _plot_curve(png, groups, colours, metric, ylabel, f"{title} — {task}"):
            doc.image(_rel(png, root), f"{title} ({metric}), {task}")
            drawn += 1
    if not drawn:
        doc.p("No finished run has logged metrics to plot.")

    _failures(doc, root, records, level)


def _failures(doc: _Doc, root: Path, records: Sequence[RunRecord], level: int) -> None:
    """The section on failed runs (with their error.txt) and incomplete ones."""
    failed = [r for r in records if r.status == "failed"]
    incomplete = [r for r in records if r.status == "incomplete"]
    doc.h(level, "Failed and incomplete runs")
    if not failed and not incomplete:
        doc.p("None: every run finished.")
    for run in failed:
        doc.p(f"**failed**: `{run.recipe}` seed {run.seed} (`{_rel(run.path, root)}`)")
        doc.pre((run.error or "").strip() or "(empty error.txt)")
    if incomplete:
        doc.ul(
            [
                f"**incomplete** (no summary.json, no error.txt): `{r.recipe}` seed {r.seed} (`{_rel(r.path, root)}`), "
                f"{len(r.metrics)} steps logged"
                for r in incomplete
            ]
        )


def _iqm_ci(s: dict[str, Any], digits: int = 3) -> str:
    """``IQM [low, high]`` of a :func:`tether.arena.stats.summarize` dict (bootstrap CI of the IQM)."""
    if not s or not s.get("n"):
        return "–"
    low, high = iqm_ci(s["values"])
    return f"{_fmt(s['iqm'], digits)} [{_fmt(low, digits)}, {_fmt(high, digits)}]"


def _cost_limits(records: Sequence[RunRecord]) -> list[float]:
    """The distinct cost limits in the runs' summaries (``cost_limit``; none for unconstrained runs)."""
    limits = set()
    for r in records:
        v = r.summary.get("cost_limit") if r.summary else None
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            limits.add(float(v))
    return sorted(limits)


def _within_limit(records: Sequence[RunRecord]) -> str:
    """``k/n (d = limit)``: finished seeds whose final cost is within the limit, of those with a limit."""
    fin = [r for r in records if r.status == "finished" and r.summary]
    limited = [r for r in fin if _cost_limits([r])]
    if not limited:
        return "–"
    within = sum(bool(r.summary and r.summary.get("within_cost_limit") is True) for r in limited)
    unknown = sum(bool(r.summary and r.summary.get("within_cost_limit") is None) for r in limited)
    limits = ", ".join(_fmt(v, 3).rstrip("0").rstrip(".") for v in _cost_limits(limited))
    note = f", {unknown} without an episode" if unknown else ""
    return f"{within}/{len(limited)} (d = {limits}{note})"


def _poi_header(base: str | None, lower: bool) -> str:
    if not base:
        return "P(better than baseline)"
    return f"P({'<' if lower else '>'} {base}) [95% CI]"


def _section_for_env(
    doc: _Doc,
    root: Path,
    plots: Path,
    env: str,
    records: list[RunRecord],
    colours: dict[str, Any],
    baseline: str | None,
    prefix: str,
    level: int,
    chosen: Sequence[str] = (),
    lower_extra: Sequence[str] = (),
) -> None:
    """The report of control runs on one environment: return and cost, the cost limit, curves over env steps."""
    finished = [r for r in records if r.status == "finished"]
    metrics = list(chosen) or [m for m in CONTROL_METRICS if any(math.isfinite(r.final(m)) for r in finished)]
    lower = [m for m in metrics if lower_is_better(m, lower_extra)]
    recipes_here = list(dict.fromkeys(r.recipe for r in records))
    base = baseline if baseline in recipes_here else None
    rows = recipe_table(records, metrics, baseline=base, lower_is_better=lower)
    by_recipe = {r: [x for x in records if x.recipe == r] for r in recipes_here}

    # What was compared.
    doc.h(level, "What was compared")
    steps = sorted({v for r in records if isinstance(v := _config_value(r.config, "train.total_steps"), int)})
    seeds = sorted({r.seed for r in records})
    limits = _cost_limits(records)
    items = [
        "recipes: "
        + ", ".join(f"`{r['recipe']}`" for r in rows)
        + (f" (baseline: `{base}`)" if base else ""),
        f"environment: `{env}`",
        f"seeds: {_join(seeds)} ({_per_recipe(records)} per recipe)",
        f"environment steps per run: {_join(steps)}",
        "cost limit per episode: "
        + (_join([_fmt(v, 3).rstrip("0").rstrip(".") for v in limits]) if limits else "none")
        + " (`train.cost_limit`, else the recipe's constraint)",
        f"runs: {len(records)} ({len(finished)} finished, {sum(r.status == 'failed' for r in records)} failed, "
        f"{sum(r.status == 'incomplete' for r in records)} incomplete); statistics use the finished runs",
    ]
    varying = _varying_settings(records, (*_PER_RUN_KEYS, "recipe_path"))
    if varying:
        items.append("settings that differ between runs: " + "; ".join(varying))
    doc.ul(items)

    # Summary: return and cost per recipe, and the seeds within the cost limit.
    doc.h(level, "Summary")
    primary = metrics[0] if metrics else None
    cost = next((m for m in metrics if m in lower and m != primary), None)
    headers = ["recipe", "finished / runs"]
    for m in (primary, cost):
        if m is not None:
            headers += [f"`{m}` IQM [95% CI]", f"`{m}` mean [95% CI]"]
    headers.append("seeds within the cost limit")
    table_rows = []
    for r in rows:
        cells = [r["recipe"], f"{r['finished']}/{r['runs']}"]
        for m in (primary, cost):
            if m is not None:
                cells += [_iqm_ci(r["metrics"][m]), _mean_ci(r["metrics"][m])]
        cells.append(_within_limit(by_recipe[r["recipe"]]))
        table_rows.append(cells)
    doc.table(headers, table_rows)
    doc.ul(
        [
            "final values of the last update across seeds: interquartile mean (IQM) and mean, each with its "
            "percentile-bootstrap 95% CI (2000 resamples; rliable, Agarwal et al. 2021, arXiv:2108.13264)",
            "`episode/return_last10` / `episode/cost_last10`: mean return / cost of the last 10 episodes "
            "(higher return is better, lower cost is better)",
            "seeds within the cost limit: finished seeds whose final mean cost of the last 10 episodes is at most "
            "the limit d (summary.json `within_cost_limit`), of the seeds that have a limit",
        ]
    )

    # Final scores.
    doc.h(level, "Final scores")
    _verdict_notes(doc, rows, metrics, base)
    if not metrics:
        doc.p("No finished run has a final score.")
    for m in metrics:
        is_lower = m in lower
        score_rows = []
        for r in rows:
            s = r["metrics"][m]
            score_rows.append([r["recipe"], str(s["n"]), _mean_ci(s), _iqm_ci(s), _poi_cell(r, m, base)])
        doc.table(
            ["recipe", "n", "mean [95% CI]", "IQM [95% CI]", _poi_header(base, is_lower)],
            score_rows,
            caption=f"**{_label(m)}** (`{m}`), " + ("lower is better" if is_lower else "higher is better"),
        )
    if base:
        doc.p(
            "P: the probability that a run of the recipe does better than a run of the baseline, "
            "P(X better than Y) + ½ P(X = Y), with its bootstrap 95% CI; for a lower-is-better metric a lower "
            "value is better."
        )
    final_png = plots / f"{prefix}final_scores.png"
    if metrics and _plot_final_scores(final_png, rows, colours, metrics, f"Final scores — {env}"):
        doc.image(_rel(final_png, root), f"final scores, {env}")

    # Safety and stability.
    doc.h(level, "Safety and stability")
    has_multiplier = any(math.isfinite(r.final(_MULTIPLIER)) for r in finished)
    headers = ["recipe", "cost limit", "seeds within the cost limit"]
    if has_multiplier:
        headers.append("final λ [95% CI]")
    headers += ["final entropy [95% CI]", "alarms by kind (per run)"]
    safety_rows = []
    for r in rows:
        recs = by_recipe[r["recipe"]]
        lim = _cost_limits(recs)
        cells = [
            r["recipe"],
            _join([_fmt(v, 3).rstrip("0").rstrip(".") for v in lim]) if lim else "none",
            _within_limit(recs),
        ]
        if has_multiplier:
            cells.append(_mean_ci(summarize_recipe([x for x in recs if x.status == "finished"], _MULTIPLIER)))
        cells += [_mean_ci(r["stability"]["entropy_final"]), _alarms_cell(r["stability"])]
        safety_rows.append(cells)
    doc.table(headers, safety_rows)

    # Learning curves, over environment steps.
    doc.h(level, "Learning curves")
    x = "env_steps" if any("env_steps" in m for r in finished for m in r.metrics) else "step"
    xlabel = "environment steps" if x == "env_steps" else "update"
    doc.p(
        f"x axis: {'environment steps (`env_steps`, all environments together)' if x == 'env_steps' else 'updates'}; "
        "the dashed line on the cost curves is the cost limit when the runs share one."
    )
    groups = {
        r["recipe"]: recs for r in rows if (recs := [x_ for x_ in finished if x_.recipe == r["recipe"]])
    }
    curves = list(CONTROL_CURVES) + [
        (m, _label(m), m)
        for m in metrics
        if m not in {c[0] for c in CONTROL_CURVES} and not m.startswith("eval/")
    ]
    drawn = 0
    for metric, ylabel, title in curves:
        png = plots / f"{prefix}curve_{_slug(metric)}.png"
        hline = None
        if metric.startswith("episode/cost") and len(limits) == 1:
            hline = (limits[0], f"cost limit {_fmt(limits[0], 3).rstrip('0').rstrip('.')}")
        if groups and _plot_curve(
            png, groups, colours, metric, ylabel, f"{title} — {env}", x=x, xlabel=xlabel, hline=hline
        ):
            doc.image(_rel(png, root), f"{title} ({metric}), {env}")
            drawn += 1
    if not drawn:
        doc.p("No finished run has logged metrics to plot.")

    _failures(doc, root, records, level)


def _default_baseline(root: Path, recipes: Sequence[str], default: str = "grpo") -> str | None:
    """The baseline named in comparison.json (written by ``tether compare``), else ``grpo`` (``ppo``
    for control runs), else the first recipe."""
    manifest = root / "comparison.json"
    if manifest.exists():
        try:
            data = json.loads(manifest.read_text())
        except (json.JSONDecodeError, OSError):
            data = {}
        b = data.get("baseline") if isinstance(data, dict) else None
        if isinstance(b, str) and b in recipes:
            return b
    if default in recipes:
        return default
    return recipes[0] if recipes else None


def build_report(
    comparison_dir: str | Path,
    baseline: str | None = None,
    target_accuracy: float | None = None,
    metrics: Sequence[str] | None = None,
    lower: Sequence[str] = (),
) -> tuple[Path, Path]:
    """Write ``report.md``, ``report.html`` and ``plots/*.png`` into ``comparison_dir``.

    ``baseline``: the recipe others are compared with (probability of improvement); by default the
    one recorded in comparison.json, else ``grpo`` (``ppo``) when present, else the first recipe.
    ``target_accuracy``: the training accuracy (``reward/accuracy``) whose first crossing is reported
    per run; by default 80% of the best recipe's final mean accuracy. ``metrics``: the final-score
    metrics (default: the eval metrics of LM runs; ``episode/return_last10``, ``episode/cost_last10``
    and ``safety/violation_rate`` of control runs, the first one the primary metric). ``lower``:
    metrics where lower is better, besides the cost-like ones (:func:`tether.arena.stats.lower_is_better`).
    Control runs (their config names an ``env.id``) get a section per environment. Returns
    (report.md, report.html). Raises TetherError when the directory is missing, holds no run, or
    ``baseline`` is not a recipe.
    """
    root = Path(comparison_dir)
    if not root.is_dir():
        raise TetherError(f"comparison directory {str(root)!r} does not exist")
    # a single run's directory (its config.yaml in DIR itself) is reported alone
    records = [load_run(root)] if (root / "config.yaml").is_file() else load_runs(root)
    if not records:
        raise TetherError(
            f"{str(root)!r} has no runs: expected a run directory (holding a config.yaml) or a comparison "
            "of run directories (DIR/<recipe>/seed<k>/ or DIR/<run>/), as written by `tether compare`"
        )
    if target_accuracy is not None and not (0.0 <= float(target_accuracy) <= 1.0):
        raise TetherError(f"--target-accuracy must be a fraction in [0, 1], got {target_accuracy}")
    all_recipes = list(dict.fromkeys(r.recipe for r in records))
    if baseline is not None and baseline not in all_recipes:
        raise TetherError(
            f"baseline recipe {baseline!r} has no runs in {str(root)!r}; recipes: {', '.join(all_recipes)}"
        )
    if baseline is None:
        all_control = all(r.world == "control" for r in records)
        baseline = _default_baseline(root, all_recipes, "ppo" if all_control else "grpo")
    order = [baseline, *[r for r in all_recipes if r != baseline]] if baseline else all_recipes
    colours = _colours(order)

    plots = root / "plots"
    plots.mkdir(exist_ok=True)
    previous = set(plots.glob("*.png"))  # removed after the new report is in place, if not redrawn
    drawn_since = time.time_ns()

    tasks = list(dict.fromkeys(r.task for r in records))
    control = {t for t in tasks if all(r.world == "control" for r in records if r.task == t)}
    chosen = list(dict.fromkeys(metrics or []))  # a repeated --metric gives one table
    _check_metrics(chosen, records)
    names = ", ".join(order) if len(order) <= 5 else f"{len(order)} recipes"
    title = f"Comparison: {names} on " + ", ".join(t or "(unnamed task)" for t in tasks)
    doc = _Doc()
    doc.h(1, title)
    doc.p(
        "Built from the run directories of this comparison alone; `tether report DIR` rebuilds it. "
        f"{len(records)} runs of {len(order)} recipes" + (f"; baseline `{baseline}`." if baseline else ".")
    )
    for task in tasks:
        recs = [r for r in records if r.task == task]
        prefix, level = "", 2
        if len(tasks) > 1:
            doc.h(2, f"{'Environment' if task in control else 'Task'} `{task}`")
            prefix, level = f"{_slug(task) or 'task'}-", 3
        if task in control:
            _section_for_env(
                doc,
                root,
                plots,
                task,
                recs,
                colours,
                baseline,
                prefix,
                level,
                chosen=chosen,
                lower_extra=lower,
            )
            continue
        _section_for_task(
            doc,
            root,
            plots,
            task or "(unnamed task)",
            recs,
            colours,
            baseline,
            target_accuracy,
            prefix,
            level,
            chosen=chosen,
            lower_extra=lower,
        )

    # Atomic writes, then the stale plots: a kill at any point leaves a report whose plots exist.
    md_path, html_path = root / "report.md", root / "report.html"
    atomic_write_text(md_path, _render_md(doc))
    atomic_write_text(html_path, _render_html(doc, root, title))
    for old in previous:
        if old.exists() and old.stat().st_mtime_ns < drawn_since:
            old.unlink()
    return md_path, html_path


def _check_metrics(chosen: Sequence[str], records: Sequence[RunRecord]) -> None:
    """Every ``--metric`` must be a final score some run has, else a clear error (not a table of "–")."""
    for metric in chosen:
        if any(math.isfinite(r.final(metric)) for r in records):
            continue
        known = sorted(
            {k for r in records for rec in r.metrics for k in rec if k != "step"}
            | {f"eval/{k}" for r in records for k in r.eval}
        )
        import difflib

        close = difflib.get_close_matches(metric, known, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise TetherError(f"--metric {metric!r}: no run of this comparison has it.{hint}")


def _save_png(fig: Any, path: Path) -> None:
    """A plot written to a temporary file and renamed into place (never a torn PNG)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=_DPI, metadata={"Software": None}, format="png")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# Command line.


def cmd_report(args: argparse.Namespace) -> int:
    md, html_path = build_report(
        args.dir,
        baseline=args.baseline,
        target_accuracy=args.target_accuracy,
        metrics=args.metric,
        lower=args.lower_is_better or (),
    )
    print(f"wrote {md} and {html_path}")
    return 0


def add_report_command(sub: Any) -> None:
    """Register ``tether report DIR [--baseline RECIPE] [--target-accuracy X] [--metric M ...]
    [--lower-is-better M ...]`` on an argparse subparsers."""
    p = sub.add_parser(
        "report",
        help="rebuild a comparison's report (report.md, report.html, plots/) from its run directories",
        description=(
            "Read every run directory under DIR, or DIR itself when it is a run (config.yaml, metrics.jsonl, "
            "summary.json, error.txt), and write "
            "DIR/report.md, a self-contained DIR/report.html and DIR/plots/*.png. Language-model and control "
            "comparisons alike: control runs are reported by final return and cost (IQM and mean with "
            "bootstrap CIs), seeds within the cost limit, and learning curves over environment steps."
        ),
    )
    p.add_argument(
        "dir",
        metavar="DIR",
        help="comparison directory (the --out of tether compare), or one run's directory (reported alone)",
    )
    p.add_argument(
        "--baseline",
        default=None,
        metavar="RECIPE",
        help="recipe the others are compared with (default: the compare's baseline, else grpo, else the first)",
    )
    p.add_argument(
        "--target-accuracy",
        type=float,
        default=None,
        metavar="X",
        help="training accuracy (fraction) for 'steps to target' (default: 80%% of the best final accuracy)",
    )
    p.add_argument(
        "--metric",
        action="append",
        default=None,
        metavar="M",
        help="final-score metric, repeatable; the first is the primary one (default: eval metrics for LM runs; "
        "episode/return_last10, episode/cost_last10, safety/violation_rate for control runs)",
    )
    p.add_argument(
        "--lower-is-better",
        action="append",
        default=None,
        metavar="M",
        help="a metric where lower is better, repeatable (costs and violation rates already are)",
    )
    p.set_defaults(func=cmd_report)
