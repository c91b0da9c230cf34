"""Plan and run a comparison: one run per (recipe, seed, task), in parallel, then the report.

:func:`plan_runs` lays the runs out under the comparison directory and validates every run's
configuration (recipe, task, overrides) before anything starts or any directory is created:
``OUT/<recipe>/seed<k>`` for one task, ``OUT/<task>/<recipe>/seed<k>`` for several.
:func:`execute` hands the runs to an executor (:mod:`tether.arena.executors`): a finished run
(``summary.json`` with its held-out ``eval``) is reused, an interrupted one (a checkpoint or logs
but no finished summary) is resumed with ``--resume``, a failing one gets ``error.txt`` and does
not stop the others. :func:`run_comparison` does both and builds the report.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tether.config import ConfigError

if TYPE_CHECKING:
    from tether.arena.executors import Executor

RunState = Literal["finished", "interrupted", "new"]
Status = Literal["pending", "running", "finished", "resumed", "reused", "failed"]

# Keys that compare sets per run from its plan; an override of them would make runs collide.
_PLANNED_KEYS = {
    "recipe": "--recipes",
    "task.name": "--task",
    "train.seed": "--seeds",
    "train.steps": "--steps",
    "run.out": "--out",
}
ERROR_FILE = "error.txt"


@dataclass
class RunSpec:
    """One planned run: ``tether train --recipe R --task T --seed S --steps N --out run_dir overrides``."""

    recipe: str
    task: str
    seed: int
    steps: int | None
    overrides: list[str]
    run_dir: Path
    threads: int = 1
    # A custom command instead of ``tether train`` (arguments after ``python -m tether.cli``, with
    # ``--out DIR``), e.g. an evidence run on a test-bed; resuming does not apply to it.
    command: list[str] | None = None

    @property
    def label(self) -> str:
        name = recipe_label(self.recipe)
        return f"{self.task}/{name}/seed{self.seed}"

    def train_args(self, resume: bool = False, out: str | Path | None = None) -> list[str]:
        """Arguments of ``tether train`` for this run (``out`` replaces the run directory)."""
        if self.command is not None:
            custom = list(self.command)
            if out is not None and "--out" in custom:
                custom[custom.index("--out") + 1] = str(out)
            return custom
        args = ["train", "--recipe", self.recipe, "--task", self.task, "--seed", str(self.seed)]
        if self.steps is not None:
            args += ["--steps", str(self.steps)]
        args += ["--out", str(out if out is not None else self.run_dir)]
        if resume:
            args.append("--resume")
        # Overrides last: argparse takes the positional key=value list after the options.
        return args + list(self.overrides)


@dataclass
class RunResult:
    """What became of a run: ``finished``, ``resumed`` (finished after resuming), ``reused``
    (already finished, not run again) or ``failed`` (with ``error``)."""

    spec: RunSpec
    status: Status
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status != "failed"


@dataclass
class Job:
    """A run handed to an executor, with whether it continues an interrupted run."""

    spec: RunSpec
    resume: bool
    started: float = field(default=0.0)


def recipe_label(recipe: str) -> str:
    """Directory name of a recipe: its name, or the stem of a recipe YAML path."""
    p = Path(recipe)
    return p.stem if p.suffix in (".yaml", ".yml") else recipe


def _set_keys(overrides: Sequence[str]) -> set[str]:
    keys = set()
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r}: expected key.sub=value")
        keys.add(o.split("=", 1)[0].strip())
    return keys


def build_run_config(spec: RunSpec) -> Any:
    """The run's resolved :class:`~tether.lm.config.LMConfig`, exactly as ``tether train`` builds
    it, without creating anything; raises for an unknown recipe, task, method parameter or a bad
    override (the errors ``tether train`` would give, before any run starts)."""
    from tether.lm.cli import build_lm_config
    from tether.lm.tasks import get_task

    args = argparse.Namespace(
        recipe=spec.recipe,
        task=spec.task,
        steps=spec.steps,
        seed=spec.seed,
        out=str(spec.run_dir),
        config=None,
        overrides=list(spec.overrides),
    )
    cfg = build_lm_config(args)
    get_task(cfg.task.name, **cfg.task.params)  # task name and parameters (splits are built lazily)
    from tether.lm.trainer import apply_method_overrides
    from tether.recipes import Method, load_recipe

    Method(apply_method_overrides(load_recipe(cfg.recipe), cfg.method))  # components and parameters
    return cfg


def _seed_list(seeds: int | Sequence[int]) -> list[int]:
    if isinstance(seeds, int):
        if seeds < 1:
            raise ConfigError(f"--seeds {seeds}: need at least one seed")
        return list(range(seeds))
    out = [int(s) for s in seeds]
    if not out:
        raise ConfigError("--seeds: need at least one seed")
    if len(set(out)) != len(out):
        raise ConfigError(f"--seeds {out}: seeds repeat")
    return out


def plan_runs(
    recipes: Sequence[str],
    tasks: Sequence[str] | str,
    seeds: int | Sequence[int],
    steps: int | None,
    overrides: Sequence[str],
    out: str | Path,
    threads: int = 1,
    validate: bool = True,
) -> list[RunSpec]:
    """One :class:`RunSpec` per (task, recipe, seed), validated (``validate``) before any run starts.

    ``seeds``: a count (seeds ``0 .. n-1``) or the seeds themselves. ``overrides`` apply to every
    run; unless they set ``run.threads`` / ``run.progress``, each run gets ``run.threads=threads``
    (so that runs share the cores instead of each taking them all) and ``run.progress=false``.
    """
    task_list = [tasks] if isinstance(tasks, str) else list(tasks)
    recipe_list = list(recipes)
    if not recipe_list:
        raise ConfigError("--recipes: name at least one recipe")
    if not task_list:
        raise ConfigError("--task: name at least one task")
    for name, items in (("recipes", [recipe_label(r) for r in recipe_list]), ("tasks", task_list)):
        if len(set(items)) != len(items):
            raise ConfigError(f"--{name} {','.join(items)}: names repeat")
    if threads < 1:
        raise ConfigError(f"--threads {threads}: must be >= 1")
    seed_list = _seed_list(seeds)
    keys = _set_keys(overrides)
    for key, flag in _PLANNED_KEYS.items():
        if key in keys:
            raise ConfigError(f"override {key}=...: compare sets it per run; use {flag} instead")
    extra = list(overrides)
    if "run.threads" in keys:
        threads = int(next(o for o in reversed(extra) if o.startswith("run.threads=")).split("=", 1)[1]) or 1
    else:
        extra.append(f"run.threads={threads}")
    if "run.progress" not in keys:
        extra.append("run.progress=false")
    root = Path(out)
    specs: list[RunSpec] = []
    for task in task_list:
        for recipe in recipe_list:
            base = root / task if len(task_list) > 1 else root
            for seed in seed_list:
                run_dir = base / recipe_label(recipe) / f"seed{seed}"
                specs.append(RunSpec(recipe, task, seed, steps, list(extra), run_dir, threads))
    if validate:  # the errors of `tether train`, for every (recipe, task), before anything runs
        checked: set[tuple[str, str]] = set()
        for spec in specs:
            if (spec.recipe, spec.task) not in checked:
                build_run_config(spec)
                checked.add((spec.recipe, spec.task))
    return specs


def run_state(run_dir: str | Path) -> RunState:
    """``finished``: summary.json with its ``eval``; ``interrupted``: a checkpoint or logs but no
    finished summary; ``new``: nothing to continue."""
    from tether.runs import latest_checkpoint

    path = Path(run_dir)
    summary = path / "summary.json"
    if summary.is_file():
        try:
            data = json.loads(summary.read_text())
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict) and "eval" in data:
            return "finished"
    if latest_checkpoint(path) is not None or (path / "metrics.jsonl").exists():
        return "interrupted"
    return "new"


Listener = Callable[[RunSpec, str, str | None], None]


def execute(
    specs: Sequence[RunSpec],
    executor: Executor | None = None,
    listener: Listener | None = None,
    progress: bool | None = None,
) -> list[RunResult]:
    """Run ``specs`` with ``executor`` (default: a :class:`~tether.arena.executors.LocalExecutor`);
    results in the order of ``specs``. Finished runs are reused, interrupted ones resumed.

    ``listener(spec, status, error)`` hears every change of status; ``progress`` shows a live
    table (``None``: when the console is a terminal) or, when False, one line per change."""
    from tether.arena.executors import LocalExecutor, ProgressBoard

    executor = executor or LocalExecutor()
    results: dict[int, RunResult] = {}
    jobs: list[Job] = []
    for i, spec in enumerate(specs):
        state = run_state(spec.run_dir)
        if state == "finished":
            results[i] = RunResult(spec, "reused")
        else:
            jobs.append(Job(spec, resume=state == "interrupted"))
    board = ProgressBoard(list(specs), live=progress, listener=listener)
    with board:
        for r in results.values():
            board.update(r.spec, "reused")
        done = executor.run(jobs, board) if jobs else []
    by_dir = {r.spec.run_dir: r for r in done}
    for i, spec in enumerate(specs):
        if i not in results:
            results[i] = by_dir.get(spec.run_dir) or RunResult(
                spec, "failed", "the executor returned no result"
            )
    for r in results.values():
        if r.status == "failed":
            write_error(r.spec.run_dir, r.error or "failed")
        elif r.status in ("finished", "resumed"):
            (r.spec.run_dir / ERROR_FILE).unlink(missing_ok=True)
    return [results[i] for i in range(len(specs))]


def write_error(run_dir: Path, text: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ERROR_FILE).write_text(text.rstrip() + "\n")


def _write_manifest(out: Path, specs: Sequence[RunSpec], results: Sequence[RunResult], **info: Any) -> None:
    data = {
        **info,
        "runs": [
            {
                "recipe": r.spec.recipe,
                "task": r.spec.task,
                "seed": r.spec.seed,
                "run_dir": str(r.spec.run_dir.relative_to(out)),
                "status": r.status,
                "error": r.error,
                "seconds": round(r.seconds, 2),
            }
            for r in results
        ],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(data, indent=2) + "\n")


def run_comparison(
    recipes: Sequence[str],
    tasks: Sequence[str] | str,
    seeds: int | Sequence[int],
    steps: int | None,
    overrides: Sequence[str],
    out: str | Path,
    executor: Executor | None = None,
    baseline: str | None = None,
    threads: int = 1,
    report: bool = True,
    progress: bool | None = None,
) -> list[RunResult]:
    """Plan (validating every run first), run in parallel, write ``comparison.json`` and the report."""
    out = Path(out)
    if baseline is not None and baseline not in [recipe_label(r) for r in recipes]:
        raise ConfigError(f"--baseline {baseline!r} is not one of the recipes ({', '.join(recipes)})")
    specs = plan_runs(recipes, tasks, seeds, steps, overrides, out, threads=threads)
    results = execute(specs, executor, progress=progress)
    _write_manifest(
        out,
        specs,
        results,
        recipes=[recipe_label(r) for r in recipes],
        tasks=[tasks] if isinstance(tasks, str) else list(tasks),
        seeds=_seed_list(seeds),
        steps=steps,
        overrides=list(overrides),
        baseline=baseline,
    )
    if report and any(r.ok for r in results):
        build_report = _report_builder()
        if build_report is not None:
            build_report(out, baseline=baseline)
    return results


def _report_builder() -> Callable[..., Any] | None:
    try:
        from tether.arena import report
    except ImportError:
        return None
    fn = getattr(report, "build_report", None)
    return fn if callable(fn) else None
