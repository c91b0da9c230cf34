"""Plan and run a comparison: one run per (recipe, seed, task or environment), in parallel, then the report.

Two worlds (:data:`WORLDS`):

- ``lm`` (default): language-model runs, ``tether train --recipe R --task T --seed S --steps N``;
- ``control``: Gymnasium runs, ``tether control train --env E --recipe R --seed S --steps N``
  (``--steps`` counts environment steps, ``train.total_steps``).

:func:`plan_runs` lays the runs out under the comparison directory and validates every run's
configuration (recipe, task or environment id, overrides, ``--config``) exactly as the train
command would, before anything starts or any directory is created: ``OUT/<recipe>/seed<k>`` for
one task or environment, ``OUT/<task>/<recipe>/seed<k>`` for several (an environment id becomes a
filesystem-safe name, ``tether/PointHazard-v0`` -> ``tether_PointHazard-v0``). Keys that compare
sets per run (recipe, task / ``env.id``, seed, steps, ``run.out``) cannot be overridden. Runs share
the cores: each gets ``--threads`` threads (``run.threads`` of an LM run, with ``run.progress=false``;
``train.torch_threads`` of a control run) unless the overrides set them.
:func:`execute` hands the runs to an executor (:mod:`tether.arena.executors`): a finished run
(``summary.json``, with its held-out ``eval`` for an LM run) is reused, an interrupted one (a
checkpoint or logs but no finished summary) is resumed with ``--resume``, a failing one gets
``error.txt`` and does not stop the others. :func:`run_comparison` does both and builds the report.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tether.config import ConfigError
from tether.lm.config import RUN_LOGGING as LM_RUN_LOGGING
from tether.runs.files import atomic_write_text

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
_CONTROL_PLANNED_KEYS = {
    "recipe": "--recipes",
    "env.id": "--env",
    "train.seed": "--seeds",
    "train.total_steps": "--steps",
    "run.out": "--out",
}
ERROR_FILE = "error.txt"


@dataclass
class RunSpec:
    """One planned run: ``tether train --recipe R --task T --seed S --steps N --out run_dir overrides``
    (``world="lm"``), or ``tether control train --env T --recipe R --seed S --steps N --out run_dir
    overrides`` (``world="control"``: ``task`` holds the environment id)."""

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
    world: str = "lm"
    config: str | None = None  # a --config YAML file given to every run

    @property
    def label(self) -> str:
        name = recipe_label(self.recipe)
        return f"{self.task}/{name}/seed{self.seed}"

    def train_args(self, resume: bool = False, out: str | Path | None = None) -> list[str]:
        """Arguments of the train command (``tether train`` or ``tether control train``) of this run
        (``out`` replaces the run directory)."""
        if self.command is not None:
            custom = list(self.command)
            if out is not None and "--out" in custom:
                custom[custom.index("--out") + 1] = str(out)
            return custom
        args = get_world(self.world).train_args(self)
        if self.steps is not None:
            args += ["--steps", str(self.steps)]
        if self.config is not None:
            args += ["--config", self.config]
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
    """The run's resolved configuration (:class:`~tether.lm.config.LMConfig`, or
    :class:`~tether.control.config.ControlConfig` for a control run), exactly as its train command
    builds it, without creating anything; raises for an unknown recipe, task or environment id, a
    method parameter or a bad override (the errors the train command would give, before any run)."""
    return get_world(spec.world).build_config(spec)


def _build_lm_config(spec: RunSpec) -> Any:
    from tether.lm.cli import build_lm_config
    from tether.lm.trainer import plan_run

    args = argparse.Namespace(
        recipe=spec.recipe,
        task=spec.task,
        steps=spec.steps,
        seed=spec.seed,
        out=str(spec.run_dir),
        config=spec.config,
        overrides=list(spec.overrides),
    )
    cfg = build_lm_config(args)
    plan_run(cfg)  # the trainer's own checks: imports, recipe, components, task, rewards, inputs
    return cfg


def _build_control_config(spec: RunSpec) -> Any:
    """The checks of ``ControlTrainer.__init__`` that come before any work: config, env id, recipe."""
    from tether.control.cli import build_control_config
    from tether.control.trainer import build_method

    args = argparse.Namespace(
        env=spec.task,
        recipe=spec.recipe,
        steps=spec.steps,
        seed=spec.seed,
        out=str(spec.run_dir),
        config=spec.config,
        overrides=list(spec.overrides),
    )
    cfg = build_control_config(args)
    build_method(cfg)
    return cfg


def safe_name(name: str) -> str:
    """A directory name for a task or environment id: ``tether/PointHazard-v0`` -> ``tether_PointHazard-v0``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "env"


@dataclass(frozen=True)
class World:
    """What a comparison's runs differ in between worlds: the train command and its target flag,
    the keys set per run, the thread setting, what a finished run holds, how it is validated."""

    name: str
    command: tuple[str, ...]  # the subcommand of ``python -m tether.cli``
    target_flag: str  # "--task" / "--env"
    target_key: str  # name of the target in comparison.json ("task" / "env")
    planned_keys: Mapping[str, str]  # config key -> the compare flag that sets it per run
    threads_key: str  # the override that sets a run's CPU threads
    quiet: tuple[str, ...]  # overrides added unless set (no progress bars in subprocesses)
    needs_eval: bool  # whether a finished summary.json must hold an ``eval``
    build_config: Callable[[RunSpec], Any]  # the run's config, validated as its train command does
    dir_name: Callable[[str], str]
    # settings an existing run may differ in and still be reused or resumed by a comparison
    may_differ: tuple[str, ...] = ()

    def train_args(self, spec: RunSpec) -> list[str]:
        """The command's leading arguments, before --steps / --config / --out."""
        return [*self.command, "--recipe", spec.recipe, self.target_flag, spec.task, "--seed", str(spec.seed)]


WORLDS: dict[str, World] = {
    "lm": World(
        name="lm",
        command=("train",),
        target_flag="--task",
        target_key="task",
        planned_keys=_PLANNED_KEYS,
        threads_key="run.threads",
        quiet=("run.progress=false",),
        needs_eval=True,
        build_config=_build_lm_config,
        dir_name=str,
        may_differ=(*LM_RUN_LOGGING, "run.threads", "monitor"),
    ),
    "control": World(
        name="control",
        command=("control", "train"),
        target_flag="--env",
        target_key="env",
        planned_keys=_CONTROL_PLANNED_KEYS,
        threads_key="train.torch_threads",
        quiet=(),
        needs_eval=False,
        build_config=_build_control_config,
        dir_name=safe_name,
        may_differ=("train.torch_threads", "run", "monitor"),
    ),
}


def get_world(name: str) -> World:
    try:
        return WORLDS[name]
    except KeyError:
        raise ConfigError(f"--world {name!r}: expected one of {', '.join(WORLDS)}") from None


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
    world: str = "lm",
    config: str | Path | None = None,
) -> list[RunSpec]:
    """One :class:`RunSpec` per (task, recipe, seed), validated (``validate``) before any run starts.

    ``tasks``: task names (``world="lm"``) or environment ids (``world="control"``). ``seeds``: a
    count (seeds ``0 .. n-1``) or the seeds themselves. ``overrides`` apply to every run; unless they
    set the world's thread key, each run gets ``threads`` threads (``run.threads`` for an LM run,
    ``train.torch_threads`` for a control run), so that runs share the cores instead of each taking
    them all; an LM run also gets ``run.progress=false`` unless set. ``config``: a YAML config file
    given to every run (``--config``).
    """
    w = get_world(world)
    task_list = [tasks] if isinstance(tasks, str) else list(tasks)
    recipe_list = list(recipes)
    if not recipe_list:
        raise ConfigError("--recipes: name at least one recipe")
    if not task_list:
        raise ConfigError(f"{w.target_flag}: name at least one {'task' if w.name == 'lm' else 'environment'}")
    target_name = w.target_flag[2:] if w.name != "lm" else "tasks"
    for name, items in (("recipes", [recipe_label(r) for r in recipe_list]), (target_name, task_list)):
        if len(set(items)) != len(items):
            raise ConfigError(f"--{name} {','.join(items)}: names repeat")
    dirs = [w.dir_name(t) for t in task_list]
    if len(set(dirs)) != len(dirs):
        raise ConfigError(f"{w.target_flag} {','.join(task_list)}: two of them share a directory name")
    if threads < 1:
        raise ConfigError(f"--threads {threads}: must be >= 1")
    seed_list = _seed_list(seeds)
    keys = _set_keys(overrides)
    for key, flag in w.planned_keys.items():
        if key in keys:
            raise ConfigError(f"override {key}=...: compare sets it per run; use {flag} instead")
    extra = list(overrides)
    if w.threads_key in keys:
        value = next(o for o in reversed(extra) if o.split("=", 1)[0].strip() == w.threads_key)
        try:
            threads = int(value.split("=", 1)[1]) or 1
        except ValueError:
            pass  # not a number: validation below gives the train command's error
    else:
        extra.append(f"{w.threads_key}={threads}")
    for default in w.quiet:
        if default.split("=", 1)[0] not in keys:
            extra.append(default)
    config_file = None if config is None else str(Path(config).resolve())
    root = Path(out)
    specs: list[RunSpec] = []
    for task, dir_name in zip(task_list, dirs):
        for recipe in recipe_list:
            base = root / dir_name if len(task_list) > 1 else root
            for seed in seed_list:
                run_dir = base / recipe_label(recipe) / f"seed{seed}"
                specs.append(
                    RunSpec(
                        recipe,
                        task,
                        seed,
                        steps,
                        list(extra),
                        run_dir,
                        threads,
                        world=w.name,
                        config=config_file,
                    )
                )
    if validate:  # the errors of the train command, for every (recipe, task), before anything runs
        checked: set[tuple[str, str]] = set()
        for spec in specs:
            if (spec.recipe, spec.task) not in checked:
                build_run_config(spec)
                checked.add((spec.recipe, spec.task))
            check_existing_run(spec)
    return specs


def check_existing_run(spec: RunSpec) -> None:
    """Refuse to reuse or resume a run directory that holds a run with other settings (another
    learning rate, budget or eval), before anything runs: its results would be reported as this
    comparison's. Only the world's ``may_differ`` settings (logging, threads) may differ."""
    from tether.config import to_dict
    from tether.runs.resume import changed_settings, describe_changes, resolved_with, saved_config

    if run_state(spec.run_dir, spec.world) == "new" or saved_config(spec.run_dir) is None:
        return
    cfg = build_run_config(spec)
    changed = changed_settings(
        spec.run_dir, to_dict(cfg), get_world(spec.world).may_differ, resolved_with(type(cfg))
    )
    if changed:
        raise ConfigError(
            f"{spec.run_dir} holds a run with other settings than this comparison asks "
            f"({describe_changes(changed)}); its results are not this comparison's: use another --out, "
            "or remove that run"
        )


def run_state(run_dir: str | Path, world: str = "lm") -> RunState:
    """``finished``: summary.json (with its ``eval`` for an LM run); ``interrupted``: a checkpoint or
    logs but no finished summary; ``new``: nothing to continue."""
    from tether.runs import latest_checkpoint

    needs_eval = get_world(world).needs_eval

    path = Path(run_dir)
    summary = path / "summary.json"
    if summary.is_file():
        try:
            data = json.loads(summary.read_text())
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict) and (not needs_eval or "eval" in data):
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
        state = run_state(spec.run_dir, spec.world)
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
    atomic_write_text(run_dir / ERROR_FILE, text.rstrip() + "\n")


def _write_manifest(out: Path, specs: Sequence[RunSpec], results: Sequence[RunResult], **info: Any) -> None:
    data = {
        **info,
        "runs": [
            {
                "recipe": r.spec.recipe,
                get_world(r.spec.world).target_key: r.spec.task,
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
    atomic_write_text(out / "comparison.json", json.dumps(data, indent=2) + "\n")


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
    world: str = "lm",
    config: str | Path | None = None,
) -> list[RunResult]:
    """Plan (validating every run first), run in parallel, write ``comparison.json`` and the report.

    ``world="control"``: ``tasks`` are Gymnasium environment ids and the runs are ``tether control
    train`` runs (see :func:`plan_runs`)."""
    out = Path(out)
    w = get_world(world)
    if baseline is not None and baseline not in [recipe_label(r) for r in recipes]:
        raise ConfigError(f"--baseline {baseline!r} is not one of the recipes ({', '.join(recipes)})")
    specs = plan_runs(
        recipes, tasks, seeds, steps, overrides, out, threads=threads, world=world, config=config
    )
    results = execute(specs, executor, progress=progress)
    targets = {("tasks" if w.name == "lm" else "envs"): [tasks] if isinstance(tasks, str) else list(tasks)}
    _write_manifest(
        out,
        specs,
        results,
        world=w.name,
        recipes=[recipe_label(r) for r in recipes],
        **targets,
        seeds=_seed_list(seeds),
        steps=steps,
        config=None if config is None else str(config),
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
