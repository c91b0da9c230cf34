"""The main job (``make demo``): SFT a tiny model on arithmetic, then train GRPO and a
stabilizing recipe from the same SFT checkpoint, evaluate both on held-out prompts and print a
side-by-side table. Everything is built locally; nothing is downloaded."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tether.config import from_dict
from tether.lm.config import LMConfig, SFTConfig
from tether.lm.evaluate import evaluate
from tether.lm.report import print_comparison
from tether.lm.sft import run_sft
from tether.lm.trainer import RLTrainer
from tether.recipes import load_recipe
from tether.runs import RunDir, atomic_write_json

RECIPES = ("grpo", "mhpo")
# Two-digit addition with the answer's digits written least-significant first (the format small
# transformers learn quickly; see ArithmeticTask). SFT gets the model to about half right; RL
# then has to turn its pass@8 into pass@1.
TASK = {"name": "arithmetic", "params": {"digits": 2, "operations": "+", "answer_format": "reversed"}}
SAMPLING = {"temperature": 1.0, "max_new_tokens": 6}
EVAL = {"prompts": 300, "k": 8}


def demo_settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"sft_steps": 40, "rl_steps": 4, "eval_prompts": 40}
    return {"sft_steps": 600, "rl_steps": 300, "eval_prompts": EVAL["prompts"]}


# Settings of the RL runs, the same for every recipe (fixed before looking at MHPO's numbers).
RL_TRAIN = {"prompts_per_step": 32, "group_size": 8, "lr": 3e-4, "warmup_steps": 30, "seed": 0}


def run_demo(out: str = "runs/demo", quick: bool = False) -> dict[str, Any]:
    root = Path(out)
    settings = demo_settings(quick)
    t0 = time.perf_counter()
    eval_cfg = {**EVAL, "prompts": settings["eval_prompts"]}
    sft_dir = root / "sft"
    if RunDir(sft_dir).read_summary() is None:
        sft_cfg = from_dict(
            SFTConfig,
            {
                "task": TASK,
                "sft": {
                    "steps": settings["sft_steps"],
                    "batch_size": 64,
                    "lr": 3e-3,
                    "warmup_steps": 20,
                    "seed": 0,
                },
                "sampling": SAMPLING,
                "eval": eval_cfg,
                "run": {"progress": True},
            },
        )
        sft_summary = run_sft(sft_cfg, out=str(sft_dir))
    else:
        sft_summary = RunDir(sft_dir).read_summary() or {}
    sft_eval = sft_summary["eval"]
    rows: dict[str, dict[str, Any]] = {"sft": _row(sft_eval, None)}
    sft_numbers = {k: v for k, v in sft_eval.items() if k != "per_prompt_success"}
    result: dict[str, Any] = {"sft": sft_numbers, "recipes": {}}
    for name in RECIPES:
        run_dir = root / name
        existing = RunDir(run_dir).read_summary()
        if existing is None or "eval" not in existing:
            load_recipe(name)
            cfg = from_dict(
                LMConfig,
                {
                    "recipe": name,
                    "model": {"name_or_path": str(sft_dir / "model")},
                    "task": TASK,
                    "sampling": SAMPLING,
                    "eval": eval_cfg,
                    "train": {"steps": settings["rl_steps"], **RL_TRAIN},
                    "run": {"checkpoint_every": 1000},
                },
            )
            trainer = RLTrainer(cfg, out=run_dir)
            summary = trainer.train()
            summary["eval"] = evaluate(
                trainer.model, trainer.tokenizer, trainer.task, cfg.eval, cfg.sampling, seed=0
            )
            trainer.run.write_summary(summary)
        else:
            summary = existing
        rows[name] = _row(summary["eval"], summary.get("alarm_count", 0))
        result["recipes"][name] = {
            "accuracy": summary["eval"]["accuracy"],
            "accuracy_gain_over_sft": summary["eval"]["accuracy"] - sft_eval["accuracy"],
            f"pass@{EVAL['k']}": summary["eval"][f"pass@{EVAL['k']}"],
            "greedy_accuracy": summary["eval"]["greedy_accuracy"],
            "entropy": summary["eval"]["entropy"],
            "alarm_count": summary.get("alarm_count", 0),
            "alarms": summary.get("alarms", {}),
        }
    result["seconds"] = time.perf_counter() - t0
    result["settings"] = {**settings, "task": TASK, "sampling": SAMPLING, "eval": eval_cfg}
    atomic_write_json(root / "summary.json", result)
    print_comparison(rows, title=f"tether demo: arithmetic, held-out prompts ({result['seconds']:.0f} s)")
    return result


def _row(ev: dict[str, float], alarms: int | None) -> dict[str, Any]:
    k = int(ev.get("k", EVAL["k"]))
    return {
        "accuracy (pass@1)": ev["accuracy"],
        f"pass@{k}": ev[f"pass@{k}"],
        "greedy accuracy": ev["greedy_accuracy"],
        "entropy": ev["entropy"],
        "alarms": "-" if alarms is None else alarms,
    }
