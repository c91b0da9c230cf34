"""``tether control train``: PPO-family training on a Gymnasium task; ``tether control eval``: evaluate a run."""

from __future__ import annotations

import argparse
import json
from typing import Any

from tether.config import apply_overrides, from_dict, load_yaml
from tether.runs.resume import merge, resume_settings


def build_control_config(args: argparse.Namespace) -> Any:
    """Defaults <- --config file <- flags <- key=value overrides."""
    from tether.control.config import ControlConfig

    data: dict[str, Any] = load_yaml(args.config) if args.config else {}
    flags = []
    if args.env:
        flags.append(f"env.id={args.env}")
    if args.recipe:
        flags.append(f"recipe={args.recipe}")
    if args.steps is not None:
        flags.append(f"train.total_steps={args.steps}")
    if args.seed is not None:
        flags.append(f"train.seed={args.seed}")
    if args.out:
        flags.append(f"run.out={args.out}")
    given = apply_overrides(data, flags + list(args.overrides))
    if getattr(args, "resume", False):  # a run continues with its own settings (config.yaml)
        saved = resume_settings((given.get("run") or {}).get("out") or ControlConfig().run.out)
        if saved is not None:
            return from_dict(ControlConfig, merge(saved, given))
    return from_dict(ControlConfig, given)


def cmd_control_train(args: argparse.Namespace) -> int:
    from tether.control.trainer import ControlTrainer

    cfg = build_control_config(args)
    if args.dry_run:  # the resolved settings and plan; nothing is built or written
        import yaml

        from tether.config import to_dict
        from tether.control.trainer import build_method, check_control_run_dir, cost_limit_of

        method = build_method(cfg)  # env id, recipe, components, inputs
        check_control_run_dir(cfg, method.recipe, cfg.run.out, args.resume)
        plan = {
            "run_dir": cfg.run.out,
            "updates": cfg.num_updates,
            "env_steps_per_update": cfg.env.num_envs * cfg.train.num_steps,
            "cost_limit": cost_limit_of(cfg, method),
        }
        print(yaml.safe_dump({**to_dict(cfg), "plan": plan}, sort_keys=False), end="")
        return 0
    trainer = ControlTrainer(cfg, resume=args.resume)
    summary = trainer.train()
    print(json.dumps({k: v for k, v in summary.items() if k != "final"}, indent=2))
    print(f"run directory: {trainer.run.path}")
    return 0


def _pm(result: dict[str, Any], name: str) -> str:
    return f"{result[f'{name}_mean']:.3f} ± {result[f'{name}_std']:.3f}  ({result[f'{name}_min']:.3f} .. {result[f'{name}_max']:.3f})"


def cmd_control_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from tether.control.evaluate import EVAL_FILE, evaluate_run

    result = evaluate_run(
        args.run_dir,
        episodes=args.episodes,
        seed=args.seed,
        deterministic=not args.stochastic,
        env_id=args.env,
        checkpoint=args.checkpoint,
        video_dir=args.video,
        safety_layer=bool(args.safety_layer),
    )
    policy = "stochastic" if args.stochastic else "deterministic"
    table = Table(title=f"tether control eval: {result['env']} (step {result['checkpoint_step']}, {policy})")
    table.add_column("metric")
    table.add_column("value", overflow="fold")
    table.add_row(
        "episodes",
        f"{result['episodes']} (seeds {result['seed']}..{result['seed'] + result['episodes'] - 1})",
    )
    table.add_row("return: mean ± std (min .. max)", _pm(result, "return"))
    table.add_row("cost: mean ± std (min .. max)", _pm(result, "cost"))
    limit = result["cost_limit"]
    table.add_row(
        "violation rate",
        "-" if limit is None else f"{result['violation_rate']:.2f} (episode cost > {limit:g})",
    )
    table.add_row("episode length (mean)", f"{result['length_mean']:.1f}")
    if result["safety_layer"]:
        table.add_row("safety layer: corrected steps", f"{result['safety_layer/corrected_frac']:.3f}")
    if args.video:
        table.add_row("videos", f"{len(result['videos'])} in {args.video}")
    Console().print(table)
    print(f"results: {Path(args.run_dir) / EVAL_FILE}")
    return 0


def add_control_commands(sub: Any) -> None:
    control = sub.add_parser("control", help="control world: Gymnasium / MuJoCo tasks")
    csub = control.add_subparsers(dest="control_command", required=True)
    p = csub.add_parser("train", help="train a policy on a Gymnasium task with a control recipe")
    p.add_argument("--env", default=None, help="Gymnasium id (CartPole-v1, tether/SafeCartPole-v0, ...)")
    p.add_argument("--recipe", default=None, help="control recipe (ppo, ppo_mhpo) or path to YAML")
    p.add_argument("--steps", type=int, default=None, help="total environment steps")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", default=None, help="run directory")
    p.add_argument("--config", default=None, help="YAML config file (e.g. control/configs/cartpole_ppo.yaml)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything, print the resolved settings and what the run would do, train nothing",
    )
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides (train.lr=1e-3)")
    p.set_defaults(func=cmd_control_train)
    e = csub.add_parser(
        "eval",
        help="evaluate a trained policy: returns, costs, violation rate, optional video",
        description="Play RUN_DIR's policy (latest checkpoint) for N episodes with seeds S, S+1, ... and "
        "write RUN_DIR/eval.json. Videos need moviepy (pip install tether[video]); CartPole/Pendulum "
        "frames need pygame; MuJoCo frames need MUJOCO_GL=egl (GPU) or MUJOCO_GL=osmesa (CPU).",
    )
    e.add_argument("run_dir", help="the --out directory of `tether control train`")
    e.add_argument("--episodes", type=int, default=10, help="episodes to play (default 10)")
    e.add_argument("--seed", type=int, default=10_000, help="reset seed of the first episode (default 10000)")
    e.add_argument("--stochastic", action="store_true", help="sample actions instead of the policy's mode")
    e.add_argument("--env", default=None, help="evaluate on another Gymnasium id with the same spaces")
    e.add_argument("--checkpoint", default=None, help="a checkpoints/step_... directory (default: latest)")
    e.add_argument(
        "--video", default=None, metavar="DIR", help="record every episode as DIR/eval-episode-<i>.mp4"
    )
    e.add_argument(
        "--safety-layer",
        action="store_true",
        help="filter actions through a safety layer fitted on random exploration (envs with info['constraint'])",
    )
    e.set_defaults(func=cmd_control_eval)
