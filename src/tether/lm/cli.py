"""``tether sft | train | eval | demo``: the language-model commands."""

from __future__ import annotations

import argparse
import difflib
import json
import shlex
import sys
from dataclasses import dataclass
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
        run_dir = (given.get("run") or {}).get("out") or default_run_dir(recipe.name, task, seed)
        saved = resume_settings(run_dir)
        if saved is not None:
            _refuse_other_kind(saved, run_dir, "train")
            explicit = apply_overrides(base, flags + overrides) | (
                {"recipe": args.recipe} if args.recipe else {}
            )
            return from_dict(LMConfig, merge(saved, explicit))
    return from_dict(LMConfig, given)


def _refuse_other_kind(saved: dict[str, Any], run_dir: str, command: str) -> None:
    """``tether train --resume`` on an SFT run, or ``tether sft --resume`` on an RL run: say which
    it is and the command that continues it (rather than an unknown ``sft`` or ``train`` key)."""
    if command == "train" and "sft" in saved and "train" not in saved:
        raise ConfigError(
            f"{run_dir!r} is an SFT run (tether sft), not an RL run; continue it with: "
            f"tether sft --out {shlex.quote(run_dir)} --resume"
        )
    if command == "sft" and "sft" not in saved and ("train" in saved or "recipe" in saved):
        raise ConfigError(
            f"{run_dir!r} is an RL run (tether train), not an SFT run; continue it with: "
            f"tether train --out {shlex.quote(run_dir)} --resume"
        )


def cmd_train(args: argparse.Namespace) -> int:
    from tether.lm.report import print_run_summary
    from tether.lm.trainer import RLTrainer

    cfg = build_lm_config(args)
    evaluates = not args.no_eval
    if args.dry_run:  # the resolved settings and plan; nothing is loaded or written
        from tether.lm.trainer import plan_run, preflight

        plan = plan_run(cfg)
        preflight(cfg, plan, cfg.run.out or plan.run_dir, args.resume, evaluates)  # the real run's checks
        print(yaml.safe_dump(plan.describe(cfg), sort_keys=False), end="")
        return 0
    trainer = RLTrainer(cfg, resume=args.resume, evaluates=evaluates)
    summary = trainer.train()
    if evaluates:
        summary = trainer.add_eval(summary)
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
        run_dir = args.out or (given.get("run") or {}).get("out") or sft_run_dir(task, seed)
        saved = resume_settings(run_dir)
        if saved is not None:
            _refuse_other_kind(saved, run_dir, "sft")
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
    """Evaluate a run (its ``model/``), a model directory or a checkpoint of a run
    (``RUN/checkpoints/step_N``) on held-out prompts and print the results as JSON, with the step
    whose weights were evaluated (``step``, when known). Nothing is written: a run's own final eval
    (``eval`` in its summary.json) is never replaced."""
    from tether.lm.chat import task_from_settings
    from tether.lm.config import EvalSettings, TaskConfig
    from tether.lm.evaluate import evaluate
    from tether.lm.model import ModelConfig, load_policy, load_tokenizer
    from tether.lm.rollout import SamplingConfig
    from tether.lm.vllm_backend import check_backend, check_vllm_sampling
    from tether.runs.checkpoint import load_model_weights

    target = _eval_target(Path(args.checkpoint))
    run_dir = target.run_dir
    _refuse_ignored_overrides(args.overrides)
    defaults = _run_eval_defaults(run_dir, target.checkpoint is not None)
    if target.model_dir is not None:
        defaults["model"] = defaults.get("model", {}) | {"name_or_path": str(target.model_dir)}
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
    model_cfg = from_dict(ModelConfig, data.get("model", {}), "model.")
    # checked before the model loads: the backend, the temperature it samples at, the task
    check_backend(sampling.backend, model_cfg.lora_rank)
    check_vllm_sampling(sampling.backend, {"eval.temperature": settings.temperature})
    task = task_from_settings(task_cfg, lambda: load_tokenizer(model_cfg))
    target.note()
    model, tok = load_policy(model_cfg)
    if target.checkpoint is not None:  # the run's model, then the checkpoint's weights in place of its own
        load_model_weights(target.checkpoint, model)
    result = evaluate(model, tok, task, settings, sampling, seed=seed)
    where: dict[str, Any] = {"step": target.step} if target.step is not None else {}
    if target.checkpoint is not None:
        where["checkpoint"] = str(target.checkpoint)
    print(json.dumps({"task": task_cfg.name, **where, **result}, indent=2))
    return 0


@dataclass
class _EvalTarget:
    """What ``tether eval PATH`` evaluates: the settings of ``run_dir`` (its config.yaml, when it has
    one), the model in ``model_dir`` (None: the run's own model settings build it) and, for a
    checkpoint, the checkpoint directory whose weights replace the model's. ``step``: the step whose
    weights these are (None: not recorded)."""

    run_dir: Path
    model_dir: Path | None
    checkpoint: Path | None = None
    step: int | None = None
    unfinished: str = ""  # the run is still training (or was stopped): what its model/ holds

    def note(self) -> None:
        if self.unfinished:
            print(f"tether eval: {self.unfinished}", file=sys.stderr)


def _eval_target(path: Path) -> _EvalTarget:
    """Which of a run directory, a model directory or a checkpoint directory ``path`` is (see
    :class:`_EvalTarget`); a clear error for anything else."""
    from tether.lm.model import is_adapter_dir
    from tether.runs import latest_checkpoint
    from tether.runs.rundir import model_step

    def is_model(directory: Path) -> bool:
        return (directory / "config.json").is_file() or is_adapter_dir(directory)

    if path.name == "latest" and path.parent.name == "checkpoints" and path.is_file():
        path = latest_checkpoint(path.parent.parent) or path  # the pointer file: its checkpoint
    if (path / "state.json").is_file() and (path / "tensors.safetensors").is_file():
        run_dir = path.parent.parent
        if path.parent.name != "checkpoints" or not (run_dir / "config.yaml").is_file():
            raise ConfigError(
                f"{str(path)!r} is a checkpoint outside a run directory: tether eval builds a checkpoint's model "
                "from its run's settings, so give it as RUN/checkpoints/step_N inside the run (with RUN/config.yaml)"
            )
        try:
            step = int(json.loads((path / "state.json").read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(
                f"cannot read the checkpoint {str(path)!r}: its state.json is damaged"
            ) from None
        model_dir = run_dir / "model"
        # the run's model/ gives the architecture and tokenizer; an SFT run writes it only at its end,
        # until then the run's own model settings (model.name_or_path, tiny_*) build the model
        return _EvalTarget(run_dir, model_dir if is_model(model_dir) else None, path, step)
    model_dir = path / "model" if (path / "model").is_dir() else path
    if not is_model(model_dir):
        latest = latest_checkpoint(path) if path.is_dir() else None
        if latest is not None:
            raise ConfigError(
                f"{str(path)!r} has no model/ yet (an SFT run writes it when it ends; an RL run with its first "
                f"checkpoint); evaluate its latest checkpoint: tether eval {shlex.quote(str(latest))}"
            )
        raise ConfigError(
            f"{str(path)!r} is neither a run directory with model/, a checkpoint directory "
            "(RUN/checkpoints/step_N) nor a model directory (config.json, or LoRA adapters)"
        )
    run_dir = _run_of(path, model_dir)
    target = _EvalTarget(run_dir, model_dir, step=model_step(model_dir))
    if (run_dir / "config.yaml").is_file() and not (run_dir / "summary.json").is_file():
        held = (
            f"the weights of step {target.step}"
            if target.step is not None
            else "weights of an unrecorded step"
        )
        total = _run_steps(run_dir)
        of = f" of {total}" if total is not None and target.step is not None else ""
        target.unfinished = (
            f"{str(run_dir)!r} has not finished (no summary.json: still training, or stopped); its model/ "
            f"holds {held}{of} (its last checkpoint); evaluate another with tether eval RUN/checkpoints/step_N"
        )
    return target


def _run_steps(path: Path) -> int | None:
    """The step budget of a run (``train.steps``, or ``sft.steps``), None when not recorded."""
    run = load_yaml(path / "config.yaml")
    for section in ("train", "sft"):
        value = run.get(section, {}).get("steps") if isinstance(run.get(section), dict) else None
        if isinstance(value, int):
            return value
    return None


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


#: What ``tether eval`` takes from a run's model settings: its device and precision. A checkpoint's
#: model takes every model setting but gradient checkpointing (no training here), so that the model
#: built for its weights is the one the run trained (LoRA adapters on their base: the keys of the
#: checkpoint's tensors), built from the run's model/ or, before the run has one (an SFT run still
#: training), from the run's own model.name_or_path.
_EVAL_MODEL_KEYS = ("device", "dtype", "autocast", "attn_implementation")


def _run_eval_defaults(path: Path, checkpoint: bool = False) -> dict[str, Any]:
    """What ``tether eval RUN_DIR`` takes from the run's own config.yaml: its task (with rewards,
    chat template), sampling, eval settings, imports and the model's device and precision; for a
    checkpoint (``checkpoint``) every model setting (the model it trained, LoRA included)."""
    config = path / "config.yaml"
    if not config.is_file():
        return {}
    run = load_yaml(config)
    out: dict[str, Any] = {
        k: run[k] for k in ("imports", "task", "sampling", "eval") if isinstance(run.get(k), dict | list)
    }
    model: dict[str, Any] = run["model"] if isinstance(run.get("model"), dict) else {}
    keys = set(model) - {"gradient_checkpointing"} if checkpoint else set(_EVAL_MODEL_KEYS)
    out["model"] = {k: v for k, v in model.items() if k in keys}
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
    p.add_argument(
        "checkpoint",
        help="run directory (its model/), model directory, or checkpoint directory (RUN/checkpoints/step_N); "
        "the results are printed as JSON with the step evaluated, nothing is written",
    )
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
