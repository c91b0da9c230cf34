"""Configuration of the language-model world: one dataclass per section, validated at load.

Every field has a documented default; ranges are declared in the field metadata and checked by
:mod:`tether.config` before any work. Method-specific trainer defaults come from the recipe's
``train:`` section and are overridden by the command line (``train.lr=1e-5``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from tether.config import ConfigError
from tether.lm.model import ModelConfig
from tether.lm.rollout import SamplingConfig
from tether.monitor import MonitorConfig
from tether.recipes.loader import absolute_recipe
from tether.userimports import absolute_spec

IMPORTS_HELP = (
    "your modules or .py files, imported first: they may register tasks, loop plugins and catalogue "
    "entries (tether.userimports)"
)


@dataclass
class TaskConfig:
    name: str = field(default="arithmetic", metadata={"help": "registered task: arithmetic, countdown, file"})
    params: dict[str, Any] = field(default_factory=dict, metadata={"help": "task constructor arguments"})
    rewards: list[str] = field(
        default_factory=list,
        metadata={
            "help": "reward functions replacing the task's reward by their weighted mean (tether.lm.tasks."
            "rewards): module:function, path/to/file.py:function, or verifier / correct / format"
        },
    )
    reward_weights: list[float] = field(
        default_factory=list, metadata={"help": "one weight >= 0 per reward function (default: 1 each)"}
    )
    chat_template: bool = field(
        default=False,
        metadata={
            "help": "render each prompt as a user message with the tokenizer's chat template (instruct "
            "models); a file's conversational prompts (lists of role/content messages) always are"
        },
    )
    system_prompt: str = field(
        default="", metadata={"help": "a system message before each prompt (needs a chat template)"}
    )

    def validate(self) -> None:
        # File paths are stored absolute, so the run can be resumed and evaluated from any directory.
        from tether.lm.tasks.base import resolve_task_params

        self.params = resolve_task_params(self.name, self.params)
        self.rewards = [absolute_spec(r) for r in self.rewards]
        if self.reward_weights and len(self.reward_weights) != len(self.rewards):
            raise ConfigError(
                f"task.reward_weights has {len(self.reward_weights)} weights for {len(self.rewards)} "
                "task.rewards; give one weight per reward function (or none for 1 each)"
            )
        if any(not w >= 0.0 for w in self.reward_weights):  # also NaN
            raise ConfigError(f"task.reward_weights={self.reward_weights}: weights must be >= 0")
        if self.rewards and self.reward_weights and sum(self.reward_weights) <= 0.0:
            raise ConfigError(
                "task.reward_weights are all 0; give at least one reward function a positive weight"
            )


@dataclass
class TrainSettings:
    steps: int = field(default=100, metadata={"min": 1, "help": "RL steps (one rollout batch each)"})
    prompts_per_step: int = field(default=16, metadata={"min": 1, "help": "prompts per rollout batch"})
    group_size: int = field(
        default=8, metadata={"min": 2, "help": "G: samples per prompt (>= 2 for group baselines)"}
    )
    epochs: int = field(
        default=1, metadata={"min": 1, "help": "K: passes over each rollout batch (PPO epochs)"}
    )
    minibatches: int = field(default=1, metadata={"min": 1, "help": "optimizer steps per epoch"})
    micro_batch_size: int = field(
        default=0,
        metadata={
            "min": 0,
            "help": "sequences per forward pass (0: whole mini-batch); no effect on the math",
        },
    )
    lr: float = field(
        default=1e-5, metadata={"min": 0.0, "min_exclusive": True, "help": "AdamW learning rate"}
    )
    weight_decay: float = field(default=0.0, metadata={"min": 0.0})
    adam_beta1: float = field(default=0.9, metadata={"min": 0.0, "max": 1.0, "max_exclusive": True})
    adam_beta2: float = field(default=0.999, metadata={"min": 0.0, "max": 1.0, "max_exclusive": True})
    warmup_steps: int = field(default=0, metadata={"min": 0, "help": "linear learning-rate warm-up"})
    max_grad_norm: float = field(default=1.0, metadata={"min": 0.0, "min_exclusive": True})
    seed: int = field(
        default=0,
        metadata={"min": 0, "max": 2**32 - 1, "help": "seeds prompts, sampling, and everything else"},
    )
    reference: Literal["auto", "always", "never"] = field(
        default="auto",
        metadata={"help": "frozen reference model: auto = when a component needs ref_logprobs"},
    )
    dynamic_sampling: bool = field(
        default=False, metadata={"help": "DAPO: drop groups with identical rewards and refill the batch"}
    )
    max_refill_rounds: int = field(
        default=3, metadata={"min": 0, "help": "extra rollout rounds for refilling"}
    )
    mask_truncated: bool = field(
        default=False, metadata={"help": "overlong filtering: truncated completions carry no loss"}
    )
    old_logprobs: Literal["auto", "recompute", "reuse"] = field(
        default="auto",
        metadata={
            "help": "old log-probs for the ratio: recompute with a no-grad pass, or reuse the training pass's "
            "(exact when one epoch has one mini-batch); auto = reuse exactly then, with the built-in sampler"
        },
    )
    sampler_correction: Literal[
        "none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"
    ] = field(
        default="none",
        metadata={
            "help": "importance weights for the sampler/trainer mismatch, on each token's policy-gradient "
            "term (tether.catalogue.mismatch): token_truncate = TIS (Yao et al. 2025), min(pi_old/mu, max); the "
            "others as TRL's vllm_importance_sampling_mode. For a sampler that is not exact, e.g. a bf16 "
            "vLLM engine; old log-probs are then always recomputed by the trainer"
        },
    )
    sampler_correction_min: float = field(
        default=0.0, metadata={"min": 0.0, "help": "lower bound C_min of the importance ratio"}
    )
    sampler_correction_max: float = field(
        default=2.0,
        metadata={
            "min": 0.0,
            "min_exclusive": True,
            "help": "upper bound C_max of the importance ratio (TIS: C=2)",
        },
    )
    share_prompts: bool | Literal["auto"] = field(
        default="auto",
        metadata={
            "help": "run each distinct prompt once per forward pass and reuse its keys/values for the G "
            "completions of its group (exact; false: one plain pass over prompt + completion per row). "
            "auto = true for a CPU model, false on a GPU, where the extra model call and cache re-indexing "
            "cost more than they saved in every batch measured (BENCHMARKS.md)"
        },
    )
    max_nan_skips: int = field(
        default=3, metadata={"min": 1, "help": "consecutive non-finite steps before the run stops"}
    )


@dataclass
class RunSettings:
    out: str | None = field(
        default=None, metadata={"help": "run directory (default runs/<recipe>-<task>-s<seed>)"}
    )
    checkpoint_every: int = field(default=25, metadata={"min": 1, "help": "steps between checkpoints"})
    keep_checkpoints: int = field(default=2, metadata={"min": 1})
    log_samples: int = field(
        default=4, metadata={"min": 0, "help": "completions written to samples.jsonl per step"}
    )
    tensorboard: bool = field(
        default=False, metadata={"help": "also log metrics to TensorBoard (tether[tensorboard])"}
    )
    progress: bool = field(default=True, metadata={"help": "rich progress bar with ETA and key metrics"})
    threads: int = field(default=0, metadata={"min": 0, "help": "torch CPU threads (0: torch's default)"})
    deterministic: bool = field(
        default=False,
        metadata={
            "help": "deterministic kernels (torch.use_deterministic_algorithms, cuBLAS workspace config): "
            "on a GPU, a resumed run then repeats an uninterrupted one exactly; on the CPU the kernels "
            "used here are deterministic already"
        },
    )

    def apply(self) -> None:
        """Process-wide torch settings of a run: CPU threads and deterministic kernels."""
        if self.threads:
            torch.set_num_threads(self.threads)
        if self.deterministic:
            # cuBLAS reads this when its handle is created: set it before the first CUDA matmul.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False


#: Run settings that log, checkpoint or show progress but never change the numbers of a step (so a
#: resume may change them); not run.threads nor run.deterministic: the thread count changes rounding.
RUN_LOGGING = (
    "run.out",
    "run.checkpoint_every",
    "run.keep_checkpoints",
    "run.log_samples",
    "run.tensorboard",
    "run.progress",
)


@dataclass
class EvalSettings:
    prompts: int = field(
        default=200, metadata={"min": 1, "help": "held-out prompts (the whole test split when it has fewer)"}
    )
    k: int = field(default=8, metadata={"min": 1, "help": "k of pass@k"})
    samples: int = field(
        default=0,
        metadata={
            "min": 0,
            "help": "samples per prompt, n >= k (0: n = k); pass@k is the unbiased estimate from n samples",
        },
    )
    temperature: float = field(
        default=1.0, metadata={"min": 0.0, "min_exclusive": True, "help": "sampling temperature of the eval"}
    )
    batch_size: int = field(default=256, metadata={"min": 1})

    def validate(self) -> None:
        if self.samples and self.samples < self.k:
            raise ConfigError(
                f"eval.samples={self.samples} is fewer than eval.k={self.k}: pass@k needs at least k samples "
                "per prompt; raise eval.samples or set it to 0 (n = k)"
            )


@dataclass
class LMConfig:
    """``tether train``: the RL loop on a language model."""

    recipe: str = field(default="grpo", metadata={"help": "recipe name or path to a recipe YAML"})
    imports: list[str] = field(default_factory=list, metadata={"help": IMPORTS_HELP})
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    run: RunSettings = field(default_factory=RunSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    method: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "parameter overrides per component: method.<slot or entry name>.<param>=value"},
    )

    def validate(self) -> None:
        self.imports = [absolute_spec(e) for e in self.imports]
        self.recipe = absolute_recipe(self.recipe)
        if self.train.old_logprobs == "reuse" and (self.train.epochs > 1 or self.train.minibatches > 1):
            raise ConfigError(
                "train.old_logprobs=reuse is only exact for one epoch over one mini-batch; "
                "use train.old_logprobs=auto or recompute"
            )
        if self.train.sampler_correction != "none" and self.train.old_logprobs == "reuse":
            raise ConfigError(
                f"train.sampler_correction={self.train.sampler_correction} compares the sampler's log-probs "
                "with the trainer's, which train.old_logprobs=reuse replaces by the sampler's own; "
                "use train.old_logprobs=auto or recompute"
            )
        if self.train.sampler_correction_min >= self.train.sampler_correction_max:
            raise ConfigError(
                f"train.sampler_correction_min={self.train.sampler_correction_min} must be below "
                f"train.sampler_correction_max={self.train.sampler_correction_max}"
            )
        if self.train.sampler_correction != "none":
            # Where the recipe meets the config: an entry whose formula needs the sampler weights
            # (e.g. otb) is refused. The user's modules first: they may register the recipe's entries.
            from tether.recipes import load_recipe
            from tether.recipes.compose import check_sampler_correction
            from tether.userimports import import_user_code

            import_user_code(self.imports)
            check_sampler_correction(load_recipe(self.recipe), self.train.sampler_correction)
        rows = self.train.prompts_per_step * self.train.group_size
        if self.train.minibatches > rows:
            raise ConfigError(
                f"train.minibatches={self.train.minibatches} exceeds the rollout batch "
                f"({self.train.prompts_per_step} x {self.train.group_size}); lower it"
            )
        if rows % self.train.minibatches:
            divisors = [d for d in range(1, rows + 1) if rows % d == 0]
            raise ConfigError(
                f"train.minibatches={self.train.minibatches} does not divide the {rows} rows of a step "
                f"({self.train.prompts_per_step} x {self.train.group_size}), so mini-batches would differ in "
                f"size; choose one of {', '.join(map(str, divisors))}"
            )


@dataclass
class SFTSettings:
    steps: int = field(default=300, metadata={"min": 1})
    batch_size: int = field(default=64, metadata={"min": 1})
    lr: float = field(default=1e-3, metadata={"min": 0.0, "min_exclusive": True})
    weight_decay: float = field(default=0.0, metadata={"min": 0.0})
    warmup_steps: int = field(default=20, metadata={"min": 0})
    max_grad_norm: float = field(default=1.0, metadata={"min": 0.0, "min_exclusive": True})
    seed: int = field(default=0, metadata={"min": 0, "max": 2**32 - 1})
    examples: int = field(
        default=0, metadata={"min": 0, "help": "train examples used (0: the whole train split)"}
    )
    stop_at_accuracy: float = field(
        default=0.0,
        metadata={
            "min": 0.0,
            "max": 1.0,
            "help": "stop once the sampled accuracy on check_prompts train prompts reaches this "
            "(0: run all steps); steps is then the budget",
        },
    )
    check_every: int = field(default=50, metadata={"min": 1, "help": "steps between accuracy checks"})
    check_prompts: int = field(
        default=128, metadata={"min": 1, "help": "train prompts sampled once each per accuracy check"}
    )


@dataclass
class SFTConfig:
    """``tether sft``: supervised warm start on a task's reference solutions."""

    imports: list[str] = field(default_factory=list, metadata={"help": IMPORTS_HELP})
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    sft: SFTSettings = field(default_factory=SFTSettings)
    run: RunSettings = field(default_factory=RunSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def validate(self) -> None:
        self.imports = [absolute_spec(e) for e in self.imports]
