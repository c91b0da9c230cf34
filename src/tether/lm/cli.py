"""``tether sft | train | eval | demo``: the language-model commands."""

from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path
from typing import Any

import yaml

from tether.config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from tether.runs.resume import merge, resume_settings
from tether.userimports import import_user_code


def _base(args: argparse.Namespace) -> dict[str, Any]:
    return load_yaml(args.config) if getattr(args, "config", None) else {}


def build_lm_config(args: argparse.Namespace) -> Any:
    """Defaults <- recipe's train section <- --config file <- flags <- key=value overrides."""
    from tether.lm.config import LMConfig
    from tether.recipes import load_recipe

    base = _base(args)
    overrides = list(args.overrides)
    # The user's modules first: they may register the recipe's components, the task or a plugin.
    import_user_code(apply_overrides(base, overrides).get("imports"))
    recipe_name = args.recipe or base.get("recipe") or "grpo"
    for o in overrides:
        if o.startswith("recipe="):
            recipe_name = o.split("=", 1)[1]
    recipe = load_recipe(recipe_name)  # unknown recipe: clear error before any work
    data: dict[str, Any] = {"train": dict(recipe.train)}
    for key, value in base.items():
        if key == "train" and isinstance(value, dict):
            data["train"].update(value)
        else:
            data[key] = value
    data["recipe"] = recipe_name
    flags = []
    if args.task:
        flags.append(f"task.name={args.task}")
    if args.steps is not None:
        flags.append(f"train.steps={args.steps}")
    if args.seed is not None:
        flags.append(f"train.seed={args.seed}")
    if args.out:
        flags.append(f"run.out={args.out}")
    given = apply_overrides(data, flags + overrides)
    if getattr(args, "resume", False):  # a run continues with its own settings (config.yaml)
        from tether.lm.trainer import default_run_dir

        task = (given.get("task") or {}).get("name") or LMConfig().task.name
        seed = (given.get("train") or {}).get("seed") or 0
        saved = resume_settings(
            (given.get("run") or {}).get("out") or default_run_dir(recipe.name, task, seed)
        )
        if saved is not None:
            explicit = apply_overrides(base, flags + overrides) | (
                {"recipe": args.recipe} if args.recipe else {}
            )
            return from_dict(LMConfig, merge(saved, explicit))
    return from_dict(LMConfig, given)


def cmd_train(args: argparse.Namespace) -> int:
    from tether.lm.report import print_run_summary
    from tether.lm.trainer import RLTrainer

    cfg = build_lm_config(args)
    if args.dry_run:  # the resolved settings and plan; nothing is loaded or written
        from tether.lm.trainer import check_run_dir, plan_run

        plan = plan_run(cfg)
        check_run_dir(cfg, plan, cfg.run.out or plan.run_dir, args.resume)
        print(yaml.safe_dump(plan.describe(cfg), sort_keys=False), end="")
        return 0
    trainer = RLTrainer(cfg, resume=args.resume, evaluates=not args.no_eval)
    summary = trainer.train()
    if not args.no_eval:
        summary["eval"] = trainer.evaluate()
        trainer.run.write_summary(summary)
    print_run_summary(summary, trainer.run.path)
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from tether.lm.config import SFTConfig
    from tether.lm.report import print_run_summary
    from tether.lm.sft import check_sft_run_dir, plan_sft, run_sft, sft_run_dir

    data = _base(args)
    flags = []
    if args.task:
        flags.append(f"task.name={args.task}")
    if args.steps is not None:
        flags.append(f"sft.steps={args.steps}")
    if args.seed is not None:
        flags.append(f"sft.seed={args.seed}")
    given = apply_overrides(data, flags + list(args.overrides))
    saved = None
    if args.resume:  # a run continues with its own settings (config.yaml)
        task = (given.get("task") or {}).get("name") or SFTConfig().task.name
        seed = (given.get("sft") or {}).get("seed") or 0
        saved = resume_settings(args.out or (given.get("run") or {}).get("out") or sft_run_dir(task, seed))
    cfg = from_dict(SFTConfig, merge(saved, given) if saved is not None else given)
    if args.dry_run:  # the resolved settings and plan; nothing is loaded or written
        _, examples = plan_sft(cfg)
        run_dir = args.out or cfg.run.out or sft_run_dir(cfg.task.name, cfg.sft.seed)
        check_sft_run_dir(cfg, run_dir, args.resume)
        plan = {"run_dir": run_dir, "examples": len(examples), "steps": cfg.sft.steps}
        print(yaml.safe_dump({**to_dict(cfg), "plan": plan}, sort_keys=False), end="")
        return 0
    summary = run_sft(cfg, out=args.out, resume=args.resume)
    print_run_summary(summary, Path(summary["model_dir"]).parent)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tether.lm.chat import task_from_settings
    from tether.lm.config import EvalSettings, TaskConfig
    from tether.lm.evaluate import evaluate
    from tether.lm.model import ModelConfig, is_adapter_dir, load_policy, load_tokenizer
    from tether.lm.rollout import SamplingConfig
    from tether.lm.vllm_backend import check_backend, check_vllm_sampling

    path = Path(args.checkpoint)
    model_dir = path / "model" if (path / "model").is_dir() else path
    if not (model_dir / "config.json").exists() and not is_adapter_dir(model_dir):
        raise ConfigError(f"{str(path)!r} is neither a run directory with model/ nor a model directory")
    run_dir = _run_of(path, model_dir)
    _refuse_ignored_overrides(args.overrides)
    defaults = _run_eval_defaults(run_dir)
    seed = args.seed if args.seed is not None else _run_seed(run_dir)
    if args.task and defaults.get("task", {}).get("name") != args.task:
        defaults.pop("task", None)  # another task: none of the run's task settings apply
    data = apply_overrides(defaults, list(args.overrides))
    unknown = sorted(set(data) - set(EVAL_SECTIONS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], EVAL_SECTIONS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"tether eval takes no {unknown[0]!r} settings.{hint} It reads {', '.join(EVAL_SECTIONS)} "
            "(e.g. eval.temperature=0.5, eval.k=16)"
        )
    import_user_code(data.get("imports"))
    task_cfg = from_dict(
        TaskConfig, data.get("task", {}) | ({"name": args.task} if args.task else {}), "task."
    )
    flags = {k: v for k, v in (("prompts", args.prompts), ("k", args.k)) if v is not None}
    settings = from_dict(EvalSettings, data.get("eval", {}) | flags, "eval.")
    sampling = from_dict(SamplingConfig, data.get("sampling", {}), "sampling.")
    model_cfg = from_dict(ModelConfig, data.get("model", {}) | {"name_or_path": str(model_dir)}, "model.")
    # checked before the model loads: the backend, the temperature it samples at, the task
    check_backend(sampling.backend, model_cfg.lora_rank)
    check_vllm_sampling(sampling.backend, {"eval.temperature": settings.temperature})
    task = task_from_settings(task_cfg, lambda: load_tokenizer(model_cfg))
    model, tok = load_policy(model_cfg)
    result = evaluate(model, tok, task, settings, sampling, seed=seed)
    print(json.dumps({"task": task_cfg.name, **result}, indent=2))
    return 0


def _run_of(path: Path, model_dir: Path) -> Path:
    """The run directory whose settings ``tether eval PATH`` uses: PATH itself, or the run that
    PATH is the ``model/`` of (``tether eval RUN/model`` evaluates like ``tether eval RUN``)."""
    if (path / "config.yaml").is_file():
        return path
    parent = model_dir.parent
    if model_dir.name == "model" and (parent / "config.yaml").is_file():
        return parent
    return path


# Overrides tether eval would not use: it samples at eval.temperature and loads the checkpoint.
_EVAL_IGNORES = {
    "sampling.temperature": "tether eval samples at eval.temperature (default 1.0); set eval.temperature=...",
    "model.name_or_path": "tether eval loads the model it is given (CHECKPOINT); pass another path instead",
}


def _refuse_ignored_overrides(overrides: list[str]) -> None:
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in _EVAL_IGNORES:
            raise ConfigError(f"{key} is not used by tether eval: {_EVAL_IGNORES[key]}")


def _run_seed(path: Path) -> int:
    """The seed a run evaluated with (``train.seed``, or ``sft.seed`` for an SFT run); 0 otherwise."""
    config = path / "config.yaml"
    run = load_yaml(config) if config.is_file() else {}
    for section in ("train", "sft"):
        value = run.get(section, {}).get("seed") if isinstance(run.get(section), dict) else None
        if isinstance(value, int):
            return value
    return 0


EVAL_SECTIONS = ("imports", "task", "sampling", "eval", "model")
"""The settings ``tether eval`` reads (from the run's config.yaml and from key=value overrides)."""


def _run_eval_defaults(path: Path) -> dict[str, Any]:
    """What ``tether eval RUN_DIR`` takes from the run's own config.yaml: its task (with rewards,
    chat template), sampling, eval settings, imports and the model's device and precision."""
    config = path / "config.yaml"
    if not config.is_file():
        return {}
    run = load_yaml(config)
    out: dict[str, Any] = {
        k: run[k] for k in ("imports", "task", "sampling", "eval") if isinstance(run.get(k), dict | list)
    }
    model: dict[str, Any] = run["model"] if isinstance(run.get("model"), dict) else {}
    out["model"] = {k: model[k] for k in ("device", "dtype", "autocast", "attn_implementation") if k in model}
    return out


def cmd_demo(args: argparse.Namespace) -> int:
    from tether.lm.demo import run_demo

    run_demo(out=args.out, quick=args.quick, seed=args.seed)
    return 0


def add_commands(sub: Any) -> None:
    def common(p: argparse.ArgumentParser, steps_help: str) -> None:
        p.add_argument("--task", default=None, help="task name (arithmetic, countdown, file)")
        p.add_argument("--steps", type=int, default=None, help=steps_help)
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--out", default=None, help="run directory")
        p.add_argument("--config", default=None, help="YAML config file")
        p.add_argument(
            "--dry-run",
            action="store_true",
            help="check everything, print the resolved settings and what the run would do, train nothing",
        )
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides")

    p = sub.add_parser("train", help="RL on a language model with a recipe")
    p.add_argument("--recipe", default=None, help="recipe name (tether recipes) or path to YAML")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint (with none yet: start it again)",
    )
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation at the end")
    common(p, "RL steps")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sft", help="supervised warm start on a task's reference solutions")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint (with none yet: start it again)",
    )
    common(p, "SFT steps")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("eval", help="accuracy, pass@k and entropy of a checkpoint on held-out prompts")
    p.add_argument("checkpoint", help="run directory or model directory")
    p.add_argument("--task", default=None)
    p.add_argument("--prompts", type=int, default=None)
    p.add_argument("--k", type=int, default=None)
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seeds the held-out prompts and the samples (default: the run's train.seed / sft.seed, else 0)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="key.sub=value (task.params.digits=2, eval.temperature=0.7, eval.samples=16 for pass@k from 16)",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="the main job: SFT, then GRPO and a stabilizing recipe, side by side")
    p.add_argument(
        "--out", default=None, help="run directory (default runs/demo, runs/demo-s<seed> for seed > 0)"
    )
    p.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")
    p.add_argument(
        "--seed", type=int, default=0, help="seeds the tiny model's initial weights, the SFT and the RL runs"
    )
    p.set_defaults(func=cmd_demo)
