"""GRPO step throughput: tether's RLTrainer against TRL's GRPOTrainer, in one process.

    .venv/bin/python bench/lm_throughput.py --steps 10 --prompts 16 --group-size 8 --threads 2
    python bench/lm_throughput.py --device cuda --autocast bfloat16 --hidden 1024 --layers 8 --heads 16 \
        --intermediate 2816   # a GPU machine, a ~100M-parameter model

Both sides get the same inputs: tether's embedded tiny model (a ~1.8M-parameter Llama with the
character tokenizer), written once with ``build_tiny_model`` to a temporary directory and loaded
from there by both with ``from_pretrained``; the same 2-digit addition prompts
(``arithmetic``, ``operations="+"``) and the same verifier as the reward; P prompts x G
completions per optimizer step, ``max_new_tokens`` 8, temperature 1.0 (no top-k / top-p);
the GRPO recipe (group-standardised advantages, PPO clip 0.2, k3 KL to a frozen reference with
coefficient 0.04, seq-mean-token-mean); AdamW lr 1e-5, one optimizer step per rollout, no
gradient checkpointing, the same torch thread count. Precision: float32 by default;
``--dtype bfloat16``: bf16 weights on both sides (TRL with ``bf16=True``); ``--autocast
bfloat16``: float32 weights with bf16 autocast, tether's default on a GPU (TRL with
``bf16=True``, accelerate's autocast). ``--device cuda`` puts both on the GPU; ``--hidden``,
``--layers``, ``--heads``, ``--intermediate`` size the model (same build, larger). TRL runs
through ``trainer.train()``
(``max_steps`` = warm-up + measured steps, ``logging_steps=1``, no tqdm).

What is timed, per step (medians over the measured steps, after ``--warmup`` steps each):

- rollout: sampling the completions plus scoring them. tether: ``time/rollout_s``. TRL: its
  ``_generate`` (tokenize, ``model.generate``, decode) plus ``_calculate_rewards``, timed by
  wrapping those methods on the instance.
- update: everything else in the step: the no-grad log-prob passes (tether: policy "old"
  log-probs and reference log-probs; TRL: reference only, since with one iteration per
  generation it reuses the detached training pass as the old log-probs), advantages, the
  training forward/backward and the optimizer step.
- step: tether's ``time/step_s``; TRL: ``on_step_begin`` -> ``on_step_end`` of a
  ``TrainerCallback`` (generation runs inside ``training_step``, after ``on_step_begin``). TRL's
  per-step logging, which runs after ``on_step_end``, is reported separately as the
  begin-to-begin wall time ("step wall").

Tokens are the completion tokens sampled in the step (EOS included, padding excluded), counted
on each side from its own rollout; rates are tokens / seconds of that phase.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import io
import os
import platform
import pstats
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch

TASK_PARAMS: dict[str, Any] = {"digits": 2, "operations": "+"}
# --long-prompt: an instruction before each problem, as RLVR prompts usually carry (88 tokens in
# all with the character tokenizer instead of 6). The G completions of a prompt share it.
INSTRUCTION = "Add the two numbers below and reply with their sum only, in digits, nothing else.\n"


@dataclass
class BenchArgs:
    steps: int = 10
    warmup: int = 2
    prompts: int = 16
    group_size: int = 8
    max_new_tokens: int = 8
    threads: int = 2
    seed: int = 0
    instruction: str = ""
    device: str = "cpu"  # "cpu" or "cuda"
    dtype: str = "float32"  # "float32" or "bfloat16": the weights, on both sides
    autocast: str = "off"  # "off" or "bfloat16": forward passes under autocast (TRL: bf16=True)
    hidden: int = 192  # tiny model sizes (the defaults are tether's embedded model)
    layers: int = 4
    heads: int = 4
    intermediate: int = 512
    tether_set: tuple[
        str, ...
    ] = ()  # key=value overrides of tether's config (e.g. train.share_prompts=false)


@dataclass
class StepTimes:
    """One measured step: seconds per phase and completion tokens."""

    rollout_s: float
    update_s: float
    step_s: float
    tokens: float
    logprobs_s: float = float("nan")  # no-grad log-prob passes (part of update_s)
    wall_s: float = float("nan")  # begin-to-begin (TRL only: includes its logging)


@dataclass
class SideResult:
    name: str
    steps: list[StepTimes] = field(default_factory=list)

    def median(self, attr: str) -> float:
        values = [getattr(s, attr) for s in self.steps]
        values = [v for v in values if v == v]
        return statistics.median(values) if values else float("nan")

    def summary(self) -> dict[str, float]:
        tokens = self.median("tokens")
        rollout, update, step = self.median("rollout_s"), self.median("update_s"), self.median("step_s")
        return {
            "tokens": tokens,
            "rollout_s": rollout,
            "logprobs_s": self.median("logprobs_s"),
            "update_s": update,
            "step_s": step,
            "wall_s": self.median("wall_s"),
            "rollout_tok_s": _median_rate(self.steps, "rollout_s"),
            "update_tok_s": _median_rate(self.steps, "update_s"),
            "step_tok_s": _median_rate(self.steps, "step_s"),
        }


def _median_rate(steps: list[StepTimes], attr: str) -> float:
    return statistics.median(s.tokens / max(getattr(s, attr), 1e-9) for s in steps)


# --------------------------------------------------------------------------- shared inputs


def write_model(directory: Path, args: BenchArgs) -> Path:
    """tether's tiny model (default sizes: the embedded default), written with save_pretrained;
    both sides load it from there."""
    from tether.lm.model import ModelConfig, build_tiny_model

    config = ModelConfig(
        tiny_hidden=args.hidden,
        tiny_layers=args.layers,
        tiny_heads=args.heads,
        tiny_intermediate=args.intermediate,
    )
    return build_tiny_model(directory / "tiny", config)


def _register_bench_task() -> None:
    from tether.lm.tasks.arithmetic import ArithmeticTask
    from tether.lm.tasks.base import Split, register_task, task_names

    if "bench_arithmetic" in task_names():  # already registered (this module loaded before)
        return

    @register_task("bench_arithmetic")
    class InstructedArithmetic(ArithmeticTask):
        def __init__(self, instruction: str = "", digits: int = 2, operations: str = "+") -> None:
            super().__init__(digits=digits, operations=operations)
            self.instruction = instruction

        def all_prompts(self, split: Split) -> list[Any]:
            return [replace(p, text=self.instruction + p.text) for p in super().all_prompts(split)]


def bench_task(instruction: str) -> Any:
    """The 2-digit addition task, each prompt preceded by ``instruction`` (registered for tether)."""
    from tether.lm.tasks import get_task

    _register_bench_task()
    return get_task("bench_arithmetic", instruction=instruction, **TASK_PARAMS)


def train_prompts(args: BenchArgs) -> list[Any]:
    return bench_task(args.instruction).prompts("train", None, seed=args.seed)


# --------------------------------------------------------------------------- tether


def make_tether(model_dir: Path, args: BenchArgs, out: Path) -> Any:
    from tether.config import apply_overrides, from_dict
    from tether.lm.config import LMConfig
    from tether.lm.trainer import RLTrainer

    _register_bench_task()
    cfg = from_dict(
        LMConfig,
        apply_overrides(
            {
                "recipe": "grpo",
                "model": {
                    "name_or_path": str(model_dir),
                    "device": args.device,
                    "dtype": args.dtype,
                    "autocast": False if args.autocast == "off" else args.autocast,
                },
                "task": {
                    "name": "bench_arithmetic",
                    "params": {"instruction": args.instruction, **TASK_PARAMS},
                },
                "sampling": {"max_new_tokens": args.max_new_tokens, "temperature": 1.0},
                "train": {
                    "steps": args.warmup + args.steps,
                    "prompts_per_step": args.prompts,
                    "group_size": args.group_size,
                    "lr": 1e-5,
                    "reference": "auto",
                    "seed": args.seed,
                },
                "run": {"progress": False, "checkpoint_every": 100000, "threads": args.threads},
            },
            list(args.tether_set),
        ),
    )
    return RLTrainer(cfg, out=out)


def tether_step(trainer: Any, args: BenchArgs, result: SideResult, index: int) -> None:
    """One tether step; recorded unless it is one of the first ``args.warmup``."""
    m = trainer.step()
    if index < args.warmup:
        return
    result.steps.append(
        StepTimes(
            rollout_s=m["time/rollout_s"],
            update_s=m["time/step_s"] - m["time/rollout_s"],
            step_s=m["time/step_s"],
            tokens=m["response/length_mean"] * args.prompts * args.group_size,
            logprobs_s=m["time/logprobs_s"],
        )
    )


def run_tether(trainer: Any, args: BenchArgs) -> SideResult:
    result = SideResult("tether")
    for i in range(args.warmup + args.steps):
        tether_step(trainer, args, result, i)
    return result


# --------------------------------------------------------------------------- TRL


def make_trl(
    model_dir: Path, args: BenchArgs, out: Path, after_step: Callable[[], None] | None = None
) -> tuple[Any, SideResult]:
    """A GRPOTrainer on the same model, prompts, verifier and recipe; its timers record into the result.

    ``after_step`` runs after each TRL step (at ``on_step_end``, outside TRL's timing; its time is
    also taken out of TRL's begin-to-begin wall time): used to interleave the two trainers.
    """
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    task = bench_task(args.instruction)
    prompts = train_prompts(args)
    by_text = {p.text: p for p in prompts}

    def arithmetic_reward(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        return [float(task.score(by_text[p], c).reward) for p, c in zip(prompts, completions)]

    n = args.prompts * args.group_size
    config = GRPOConfig(
        output_dir=str(out),
        use_cpu=args.device == "cpu",
        bf16=args.dtype == "bfloat16" or args.autocast == "bfloat16",  # accelerate's autocast
        report_to="none",
        activation_checkpointing=False,  # TRL turns gradient checkpointing on by default
        num_generations=args.group_size,
        per_device_train_batch_size=n,  # one optimizer step = P prompts x G completions
        gradient_accumulation_steps=1,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.04,
        loss_type="grpo",
        epsilon=0.2,
        use_bias_correction_kl=False,  # tether's kl_k3 is the plain k3 estimator
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        max_steps=args.warmup + args.steps,
        save_strategy="no",
        disable_tqdm=True,
        seed=args.seed,
        dataloader_num_workers=0,
    )
    dataset = Dataset.from_list([{"prompt": p.text} for p in prompts])
    with warnings.catch_warnings():  # TRL probes the deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", category=FutureWarning)
        trainer = GRPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)),
            reward_funcs=arithmetic_reward,
            args=config,
            train_dataset=dataset,
            processing_class=AutoTokenizer.from_pretrained(model_dir),
        )
    result = SideResult("TRL GRPOTrainer")
    clock: dict[str, float] = {}

    def timed(name: str, fn: Any, count_tokens: bool = False) -> Any:
        def wrapper(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            out = fn(*a, **kw)
            clock[name] = clock.get(name, 0.0) + time.perf_counter() - t
            if count_tokens:  # _generate returns (prompt_ids, completion_ids, ...)
                clock["tokens"] = clock.get("tokens", 0.0) + sum(len(ids) for ids in out[1])
            return out

        return wrapper

    trainer._generate = timed("generate", trainer._generate, count_tokens=True)
    trainer._calculate_rewards = timed("rewards", trainer._calculate_rewards)
    inner_logps = trainer._get_per_token_logps_and_entropies

    def logps(*a: Any, **kw: Any) -> Any:
        if torch.is_grad_enabled():
            return inner_logps(*a, **kw)
        t = time.perf_counter()
        out = inner_logps(*a, **kw)
        clock["logprobs"] = clock.get("logprobs", 0.0) + time.perf_counter() - t
        return out

    trainer._get_per_token_logps_and_entropies = logps

    class StepTimer(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.begin = 0.0
            self.last_begin: float | None = None
            self.index = 0
            self.excluded = 0.0

        def on_step_begin(self, *a: Any, **kw: Any) -> None:
            now = time.perf_counter()
            if self.last_begin is not None and self.index > args.warmup and result.steps:
                result.steps[-1].wall_s = now - self.last_begin - self.excluded
            self.last_begin = self.begin = now
            self.excluded = 0.0
            clock.clear()

        def on_step_end(self, *a: Any, **kw: Any) -> None:
            step = time.perf_counter() - self.begin
            self.index += 1
            if self.index > args.warmup:
                rollout = clock.get("generate", 0.0) + clock.get("rewards", 0.0)
                result.steps.append(
                    StepTimes(
                        rollout_s=rollout,
                        update_s=step - rollout,
                        step_s=step,
                        tokens=clock.get("tokens", 0.0),
                        logprobs_s=clock.get("logprobs", 0.0),
                    )
                )
            if after_step is not None:
                t = time.perf_counter()
                after_step()
                self.excluded += time.perf_counter() - t

    trainer.remove_callback(PrinterCallback)  # disable_tqdm swaps the progress bar for a log printer
    trainer.add_callback(StepTimer())
    return trainer, result


def run_trl(trainer: Any, result: SideResult) -> SideResult:
    trainer.train()
    return result


# --------------------------------------------------------------------------- report


def machine_info(threads: int) -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import transformers
    import trl

    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "threads": str(threads),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def format_table(ours: dict[str, float], theirs: dict[str, float]) -> str:
    """Markdown table; the last column is tether's speed-up (> 1: tether faster)."""
    rows = [  # (label, key, format, kind): rate -> ours/theirs, time -> theirs/ours
        ("completion tokens / step", "tokens", "{:.0f}", "count"),
        ("rollout tokens/s", "rollout_tok_s", "{:.0f}", "rate"),
        ("update tokens/s", "update_tok_s", "{:.0f}", "rate"),
        ("step tokens/s", "step_tok_s", "{:.0f}", "rate"),
        ("rollout s / step", "rollout_s", "{:.3f}", "time"),
        ("update s / step", "update_s", "{:.3f}", "time"),
        ("  of which no-grad log-prob passes s", "logprobs_s", "{:.3f}", "time"),
        ("seconds / step", "step_s", "{:.3f}", "time"),
    ]
    lines = [
        f"| {'median over measured steps':<38} | {'tether':>8} | {'TRL':>8} | {'tether speed-up':>15} |",
        f"|{'-' * 40}|{'-' * 9}:|{'-' * 9}:|{'-' * 16}:|",
    ]
    for label, key, fmt, kind in rows:
        a, b = ours[key], theirs[key]
        if kind == "rate":
            ratio = f"{a / b:.2f}x"
        elif kind == "time":
            ratio = f"{b / a:.2f}x"
        else:
            ratio = ""
        lines.append(f"| {label:<38} | {fmt.format(a):>8} | {fmt.format(b):>8} | {ratio:>15} |")
    lines.append("")
    lines.append(
        f"step throughput tether / TRL: {ours['step_tok_s'] / theirs['step_tok_s']:.2f}x in tokens/s, "
        f"{theirs['step_s'] / ours['step_s']:.2f}x in steps/s "
        f"(TRL begin-to-begin step wall time, with its per-step logging: {theirs['wall_s']:.3f} s)"
    )
    return "\n".join(lines)


@contextlib.contextmanager
def maybe_profile(enabled: bool, label: str) -> Iterator[None]:
    if not enabled:
        yield
        return
    prof = cProfile.Profile()
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(30)
        print(f"\n===== cProfile: {label} (cumulative) =====")
        print(buf.getvalue())


def bench(args: BenchArgs, profile: bool = False, interleave: bool = True) -> tuple[SideResult, SideResult]:
    """Run both sides; interleaved (TRL step, tether step, ...) so both see the same machine load."""
    with warnings.catch_warnings():  # TRL / Trainer probe the deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return _bench(args, profile, interleave)


def _bench(args: BenchArgs, profile: bool, interleave: bool) -> tuple[SideResult, SideResult]:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="tether-bench-") as tmp:
        root = Path(tmp)
        model_dir = write_model(root, args)
        tether_trainer = make_tether(model_dir, args, root / "tether-run")
        ours = SideResult("tether")
        if interleave and not profile:
            counter = iter(range(args.warmup + args.steps))

            def after_step() -> None:
                tether_step(tether_trainer, args, ours, next(counter))

            trl_trainer, theirs = make_trl(model_dir, args, root / "trl-run", after_step)
            torch.set_num_threads(args.threads)  # in case a library changed it
            run_trl(trl_trainer, theirs)
            return ours, theirs
        trl_trainer, theirs = make_trl(model_dir, args, root / "trl-run")
        torch.set_num_threads(args.threads)
        with maybe_profile(profile, "tether"):
            ours = run_tether(tether_trainer, args)
        torch.set_num_threads(args.threads)
        with maybe_profile(profile, "TRL"):
            run_trl(trl_trainer, theirs)
    return ours, theirs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10, help="measured steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps first, per side")
    parser.add_argument("--prompts", type=int, default=16, help="P: prompts per step")
    parser.add_argument("--group-size", type=int, default=8, help="G: completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (both sides)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--long-prompt",
        action="store_true",
        help="put an 82-character instruction before each problem (88-token prompts instead of 6)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="both sides")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="the weights, both sides"
    )
    parser.add_argument(
        "--autocast",
        choices=("off", "bfloat16"),
        default="off",
        help="forward passes under bf16 autocast (tether model.autocast; TRL bf16=True on float32 weights)",
    )
    parser.add_argument("--hidden", type=int, default=192, help="tiny model hidden size")
    parser.add_argument("--layers", type=int, default=4, help="tiny model decoder layers")
    parser.add_argument("--heads", type=int, default=4, help="tiny model attention heads")
    parser.add_argument("--intermediate", type=int, default=512, help="tiny model MLP inner size")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override tether's config (repeatable), e.g. --set train.share_prompts=false",
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="all tether steps, then all TRL steps (default: alternate one step of each)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="print a cProfile of each side (implies --sequential)"
    )
    ns = parser.parse_args()
    args = BenchArgs(
        steps=ns.steps,
        warmup=ns.warmup,
        prompts=ns.prompts,
        group_size=ns.group_size,
        max_new_tokens=ns.max_new_tokens,
        threads=ns.threads,
        seed=ns.seed,
        instruction=INSTRUCTION if ns.long_prompt else "",
        device=ns.device,
        dtype=ns.dtype,
        autocast=ns.autocast,
        hidden=ns.hidden,
        layers=ns.layers,
        heads=ns.heads,
        intermediate=ns.intermediate,
        tether_set=tuple(ns.set),
    )
    info = machine_info(args.threads)
    gpu = f", GPU {torch.cuda.get_device_name()}" if args.device == "cuda" else ""
    print(
        f"machine: {info['cpu']}, {info['cores']} cores{gpu}; torch {info['torch']}, "
        f"transformers {info['transformers']}, trl {info['trl']}; threads {info['threads']}; "
        f"load avg {info['load']}; {info['date']}"
    )
    print(
        f"setup: P={args.prompts} prompts x G={args.group_size}, max_new_tokens={args.max_new_tokens}, "
        f"prompt tokens {len(args.instruction) + 6}, {args.device} {args.dtype} weights, "
        f"autocast {args.autocast}, "
        f"model hidden {args.hidden} x {args.layers} layers (MLP {args.intermediate}), "
        f"tether overrides {list(args.tether_set) or 'none'}, "
        f"warm-up {args.warmup} + {args.steps} measured steps per side, "
        f"{'sequential' if ns.sequential or ns.profile else 'interleaved (TRL step, tether step, ...)'}"
    )
    ours, theirs = bench(args, profile=ns.profile, interleave=not ns.sequential)
    print(format_table(ours.summary(), theirs.summary()))
    print(f"load avg after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
