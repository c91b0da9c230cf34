"""``tether compare`` (and ``tether report``, from :mod:`tether.arena.report`): the arena's commands.

``tether compare`` plans language-model runs (``tether train``, ``--task``) or, with ``--world control``
(or ``--env``), control runs (``tether control train``, ``--env``); see :mod:`tether.arena.compare`.
"""

from __future__ import annotations

import argparse
from typing import Any

from tether.config import ConfigError
from tether.errors import RunInterrupted


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _seeds(text: str) -> int | list[int]:
    """``5``: seeds 0..4; ``0,3,7``: those seeds."""
    try:
        if "," in text:
            return [int(t) for t in _names(text)]
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a count (5) or a comma-separated list (0,3,7)") from None


def _world_and_targets(args: argparse.Namespace) -> tuple[str, list[str]]:
    """``--world`` (default: control when --env is given, else lm) and its tasks or environments."""
    world = args.world or ("control" if args.env is not None else "lm")
    if world == "control":
        if args.task is not None:
            raise ConfigError("--task is for language-model runs; control runs take --env ID[,ID...]")
        if not args.env:
            raise ConfigError(
                "--world control: name the environment(s) with --env (e.g. tether/PointHazard-v0)"
            )
        return world, _names(args.env)
    if args.env is not None:
        raise ConfigError("--env is for control runs (--world control); language-model runs take --task")
    return world, _names(args.task or "arithmetic")


def _run(args: argparse.Namespace, world: str, targets: Any, overrides: list[str], executor: Any) -> Any:
    from tether.arena.compare import run_comparison

    return run_comparison(
        recipes=_names(args.recipes),
        tasks=targets,
        seeds=args.seeds,
        steps=args.steps,
        overrides=overrides,
        out=args.out,
        executor=executor,
        baseline=args.baseline,
        threads=args.threads,
        report=not args.no_report,
        world=world,
        config=args.config,
    )


def cmd_compare(args: argparse.Namespace) -> int:
    from rich.console import Console

    from tether.arena.executors import Executor, LocalExecutor, RayExecutor

    overrides = [*(args.set or []), *args.overrides]
    world, targets = _world_and_targets(args)
    executor: Executor
    if args.ray is not None or args.executor == "ray":
        if args.workers is not None:
            raise ConfigError("--workers is for the local executor; Ray schedules by --threads per run")
        executor = RayExecutor(address=args.ray or "local")
    else:
        executor = LocalExecutor(max_workers=args.workers)
    try:
        results = _run(args, world, targets, overrides, executor)
    except KeyboardInterrupt:
        raise RunInterrupted(
            "the comparison was interrupted: finished runs are kept and the running ones stopped at a step "
            "boundary with a checkpoint; run the same command again to continue it"
        ) from None
    console = Console()
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    console.print(
        f"{len(results)} runs in {args.out}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
        highlight=False,
    )
    failed = [r for r in results if r.status == "failed"]
    for r in failed:
        first = (r.error or "").strip().splitlines()
        console.print(
            f"[red]failed[/] {r.spec.label}: {first[0] if first else 'unknown error'} "
            f"(see {r.spec.run_dir / 'error.txt'})",
            highlight=False,
        )
    return 1 if failed else 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "compare",
        help="run recipes across seeds (and tasks or environments) in parallel and report the comparison",
        description=(
            "Plan one `tether train` run per (recipe, seed, task) under --out "
            "(OUT/<recipe>/seed<k>, or OUT/<task>/<recipe>/seed<k> for several tasks), run them in parallel "
            "and write the report. With --world control (or --env), one `tether control train` run per "
            "(recipe, seed, environment) instead (several environments: OUT/<env-name>/<recipe>/seed<k>, "
            "tether/PointHazard-v0 -> tether_PointHazard-v0). Every run's configuration is checked before any "
            "starts. Finished runs are reused and interrupted ones resumed, so the same "
            "command continues an interrupted comparison."
        ),
        epilog=(
            "examples: tether compare --recipes grpo,dapo --task arithmetic --seeds 5; "
            "tether compare --world control --env tether/PointHazard-v0 --recipes ppo,ppo_lag,pid_lag "
            "--seeds 3 --steps 100000 --out runs/safe train.cost_limit=2"
        ),
    )
    p.add_argument(
        "--recipes",
        required=True,
        help="comma-separated recipe names or YAML paths (grpo,dapo; control: ppo,ppo_lag,pid_lag)",
    )
    p.add_argument(
        "--world",
        choices=("lm", "control"),
        default=None,
        help="lm: tether train runs on --task; control: tether control train runs on --env "
        "(default: control when --env is given, else lm)",
    )
    p.add_argument("--task", default=None, help="LM task name, or comma-separated names (default arithmetic)")
    p.add_argument(
        "--env",
        default=None,
        metavar="ID[,ID...]",
        help="control: Gymnasium id(s), comma-separated (tether/PointHazard-v0,CartPole-v1)",
    )
    p.add_argument(
        "--seeds", type=_seeds, default=3, help="seed count (5: seeds 0-4) or list (0,3,7); default 3"
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="RL steps per run (default: the recipe's); control: environment steps (train.total_steps)",
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="YAML config file given to every run (as in tether train)",
    )
    p.add_argument(
        "--set",
        action="extend",
        nargs="+",
        default=None,
        metavar="KEY=VALUE",
        help="config override for every run (as in tether train / tether control train), e.g. --set train.lr=1e-4",
    )
    p.add_argument("--out", default="runs/compare", help="comparison directory (default runs/compare)")
    p.add_argument("--executor", choices=("local", "ray"), default="local", help="where runs execute")
    p.add_argument(
        "--ray",
        default=None,
        metavar="auto|ADDRESS",
        help="run on Ray: 'auto' (this machine's cluster), ray://host:port, or 'local' (a fresh instance)",
    )
    p.add_argument("--workers", type=int, default=None, help="local runs at once (default: cores // threads)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads per run (default 1): run.threads of an LM run, train.torch_threads of a control run",
    )
    p.add_argument(
        "--baseline", default=None, help="recipe to compare the others with (probability of improvement)"
    )
    p.add_argument(
        "--no-report", action="store_true", help="only run; build the report later with tether report"
    )
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides for every run")
    p.set_defaults(func=cmd_compare)
    from tether.arena.evidence import add_evidence_command

    add_evidence_command(sub)
    try:
        from tether.arena.report import add_report_command
    except ImportError:  # the report module is optional until it exists
        return
    add_report_command(sub)
