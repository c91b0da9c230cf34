"""``tether compare`` (and ``tether report``, from :mod:`tether.arena.report`): the arena's commands."""

from __future__ import annotations

import argparse
from typing import Any

from tether.config import ConfigError


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


def cmd_compare(args: argparse.Namespace) -> int:
    from rich.console import Console

    from tether.arena.compare import run_comparison
    from tether.arena.executors import Executor, LocalExecutor, RayExecutor

    overrides = [*(args.set or []), *args.overrides]
    executor: Executor
    if args.ray is not None or args.executor == "ray":
        if args.workers is not None:
            raise ConfigError("--workers is for the local executor; Ray schedules by --threads per run")
        executor = RayExecutor(address=args.ray or "local")
    else:
        executor = LocalExecutor(max_workers=args.workers)
    results = run_comparison(
        recipes=_names(args.recipes),
        tasks=_names(args.task),
        seeds=args.seeds,
        steps=args.steps,
        overrides=overrides,
        out=args.out,
        executor=executor,
        baseline=args.baseline,
        threads=args.threads,
        report=not args.no_report,
    )
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
        help="run recipes across seeds (and tasks) in parallel and report the comparison",
        description=(
            "Plan one `tether train` run per (recipe, seed, task) under --out "
            "(OUT/<recipe>/seed<k>, or OUT/<task>/<recipe>/seed<k> for several tasks), run them in parallel "
            "and write the report. Finished runs are reused and interrupted ones resumed, so the same "
            "command continues an interrupted comparison."
        ),
    )
    p.add_argument("--recipes", required=True, help="comma-separated recipe names or YAML paths (grpo,dapo)")
    p.add_argument(
        "--task", default="arithmetic", help="task name, or comma-separated names (default arithmetic)"
    )
    p.add_argument(
        "--seeds", type=_seeds, default=3, help="seed count (5: seeds 0-4) or list (0,3,7); default 3"
    )
    p.add_argument("--steps", type=int, default=None, help="RL steps per run (default: the recipe's)")
    p.add_argument(
        "--set",
        action="extend",
        nargs="+",
        default=None,
        metavar="KEY=VALUE",
        help="config override for every run (as in tether train), e.g. --set train.lr=1e-4",
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
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run (default 1)")
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
