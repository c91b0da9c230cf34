"""``tether control train``: PPO-family training on a Gymnasium task."""

from __future__ import annotations

import argparse
import json
from typing import Any

from tether.config import apply_overrides, from_dict, load_yaml


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
    return from_dict(ControlConfig, apply_overrides(data, flags + list(args.overrides)))


def cmd_control_train(args: argparse.Namespace) -> int:
    from tether.control.trainer import ControlTrainer

    cfg = build_control_config(args)
    trainer = ControlTrainer(cfg, resume=args.resume)
    summary = trainer.train()
    print(json.dumps({k: v for k, v in summary.items() if k != "final"}, indent=2))
    print(f"run directory: {trainer.run.path}")
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
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides (train.lr=1e-3)")
    p.set_defaults(func=cmd_control_train)
