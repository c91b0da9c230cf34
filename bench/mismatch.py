"""Miniature experiment: a sampler that is not the trainer's own precision, with and without the
importance correction (``train.sampler_correction``).

The demo's GRPO stage (arithmetic, 32 prompts x G=8, 300 steps, lr 3e-4) from the demo's SFT
model, with three rollout settings:

- ``exact``: tether's sampler on the float32 policy (the demo);
- ``bf16``: the same sampler on a bf16 copy of the policy, synced before every rollout: the
  mismatch a bf16 inference engine brings (on an H100, vLLM's default bf16 engine cut the demo's
  GRPO gain from +25 to +7 points; BENCHMARKS.md);
- ``bf16+tis``: the bf16 sampler with ``train.sampler_correction=token_truncate`` (TIS, C=2).

    .venv/bin/python bench/mismatch.py --sft runs/demo/sft/model --seeds 0 1 --out runs/mismatch

Prints held-out accuracy per setting and seed, and the median sampler/trainer gap and
importance-sampling ESS over the run. Results are as measured, whatever they show.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from tether.config import from_dict
from tether.lm.config import LMConfig
from tether.lm.demo import EVAL, RL_TRAIN, SAMPLING, TASK
from tether.lm.rollout import HFSampler, RolloutBatch, SamplingConfig
from tether.lm.trainer import RLTrainer
from tether.recipes import load_recipe


class LowPrecisionSampler:
    """tether's sampler on a copy of the policy in ``dtype``, loaded from the policy before every
    rollout; the trainer keeps its float32 weights."""

    def __init__(self, model: Any, tokenizer: Any, config: SamplingConfig, dtype: torch.dtype) -> None:
        self.config = config
        self.copy = copy.deepcopy(model).to(dtype)
        self.inner = HFSampler(self.copy, tokenizer, config)

    def sync_weights(self, model: Any) -> None:
        with torch.no_grad():
            for dst, src in zip(self.copy.parameters(), model.parameters(), strict=True):
                dst.copy_(src)

    def with_config(self, config: SamplingConfig) -> HFSampler:
        return self.inner.with_config(config)

    def generate(self, prompts: list[str], generator: torch.Generator | None = None) -> RolloutBatch:
        return self.inner.generate(prompts, generator)


def run(setting: str, seed: int, sft: str, out: Path, steps: int, eval_prompts: int) -> dict[str, Any]:
    load_recipe("grpo")
    train: dict[str, Any] = {**RL_TRAIN, "steps": steps, "seed": seed}
    if setting == "bf16+tis":
        train["sampler_correction"] = "token_truncate"
    cfg = from_dict(
        LMConfig,
        {
            "recipe": "grpo",
            "model": {"name_or_path": sft},
            "task": TASK,
            "sampling": SAMPLING,
            "eval": {**EVAL, "prompts": eval_prompts},
            "train": train,
            "run": {"checkpoint_every": 10**6, "progress": False, "out": str(out / f"{setting}-s{seed}")},
        },
    )
    trainer = RLTrainer(cfg)
    exact = trainer.sampler
    if setting != "exact":
        trainer.sampler = LowPrecisionSampler(trainer.model, trainer.tokenizer, cfg.sampling, torch.bfloat16)
    records: list[dict[str, float]] = []
    trainer.on_step = lambda step, m: records.append(m)
    start = time.perf_counter()
    trainer.train()
    trainer.sampler = exact  # held-out evaluation samples the float32 policy in every setting
    result = trainer.evaluate()
    return {
        "setting": setting,
        "seed": seed,
        "accuracy": result["accuracy"],
        "gap": statistics.median(r["rollout/logprob_gap"] for r in records),
        "ess": statistics.median(r.get("rollout/is_ess", float("nan")) for r in records),
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sft", default="runs/demo/sft/model", help="the SFT model to start from")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--settings", nargs="+", default=["exact", "bf16", "bf16+tis"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-prompts", type=int, default=300)
    parser.add_argument("--out", default="runs/mismatch")
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    for seed in args.seeds:
        for setting in args.settings:
            row = run(setting, seed, args.sft, out, args.steps, args.eval_prompts)
            rows.append(row)
            print(json.dumps(row), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"{'setting':10s} {'seed':>4s} {'accuracy':>8s} {'gap':>9s} {'ESS':>7s}")
    for r in rows:
        print(f"{r['setting']:10s} {r['seed']:4d} {r['accuracy']:8.3f} {r['gap']:9.5f} {r['ess']:7.4f}")


if __name__ == "__main__":
    main()
