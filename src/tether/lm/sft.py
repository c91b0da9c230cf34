"""Supervised warm start on a task's reference solutions (loss on completion tokens only)."""

from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from tether.config import to_dict
from tether.errors import TetherError
from tether.lm.chat import task_from_settings
from tether.lm.config import RUN_LOGGING, SFTConfig
from tether.lm.evaluate import check_eval_context, check_test_split, eval_prompts, evaluate
from tether.lm.model import check_model_source, check_policy_eos, load_policy, load_tokenizer, save_model
from tether.lm.precision import autocast_context, clipped_step, make_grad_scaler, restore_grad_scaler
from tether.lm.progress import TrainProgress
from tether.lm.prompts import PromptStream
from tether.lm.rollout import (
    Sampler,
    SamplingConfig,
    check_context,
    context_length,
    encode_prompts,
    eos_token_ids,
    longest_prompt,
    make_sampler,
    sampler_for,
)
from tether.lm.tasks.base import Prompt, Task, safe_score_batch
from tether.lm.vllm_backend import check_backend, check_vllm_sampling, engine_length
from tether.runs import Checkpoint, RunDir, save_checkpoint
from tether.runs.checkpoint import (
    capture_rng,
    load_latest_checkpoint,
    restore_rng,
    restore_training_state,
    training_state,
)
from tether.runs.interrupt import StopRequest, interrupted
from tether.runs.resume import resolved_with
from tether.runs.rundir import check_run_dir as checked_run_dir
from tether.runs.rundir import mark_model_step
from tether.userimports import import_user_code


def sft_batch(
    tokenizer: Any, prompts: list[str], targets: list[str], eos_id: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded prompt + target + EOS, with labels only on target and EOS tokens; the prompt is
    encoded exactly as the sampler encodes it (:func:`~tether.lm.rollout.encode_prompts`: with the
    tokenizer's BOS), so that SFT trains the policy on the inputs RL samples from.

    ``eos_id``: the end-of-sequence id the targets end with; None takes the tokenizer's. SFT passes
    the first of :func:`~tether.lm.rollout.eos_token_ids` (the tokenizer's, else the model's
    generation config's)."""
    eos = tokenizer.eos_token_id if eos_id is None else eos_id
    if eos is None:
        raise TetherError(
            "SFT targets need an end-of-sequence token, and the tokenizer has none; give sft_batch the "
            "model's (eos_id=eos_token_ids(model, tokenizer)[0]) or set tokenizer.eos_token"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows, labels = [], []
    for p_ids, t in zip(encode_prompts(tokenizer, prompts), targets):
        t_ids = tokenizer(t, add_special_tokens=False)["input_ids"] + [eos]
        rows.append(p_ids + t_ids)
        labels.append([-100] * len(p_ids) + t_ids)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    label_ids = torch.full((len(rows), width), -100, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labels)):
        input_ids[i, : len(r)] = torch.tensor(r)
        label_ids[i, : len(lab)] = torch.tensor(lab)
        attn[i, : len(r)] = 1
    return {"input_ids": input_ids, "attention_mask": attn, "labels": label_ids}


def check_sft_context(
    model: Any, tokenizer: Any, task: Task, prompts: list[Prompt], max_new_tokens: int
) -> None:
    """Before any work: the longest SFT example (prompt + reference + EOS) of ``prompts`` (the
    train examples) must fit the model's context, and so must their longest prompt +
    ``max_new_tokens`` (the sampled accuracy checks draw from them). The final eval's test prompts
    are :func:`~tether.lm.evaluate.check_eval_context`'s."""
    if context_length(model) is None:
        return
    p_len = [len(ids) for ids in encode_prompts(tokenizer, [p.text for p in prompts])]
    t_len = [len(tokenizer(task.reference(p), add_special_tokens=False)["input_ids"]) + 1 for p in prompts]
    i = max(range(len(prompts)), key=lambda j: p_len[j] + t_len[j])
    check_context(
        model, p_len[i], t_len[i], where=f"SFT example {prompts[i].id!r} (prompt + reference + EOS)"
    )
    check_context(model, max(p_len), max_new_tokens, where="SFT's sampled checks (train prompts)")


def sampled_accuracy(
    model: Any,
    tokenizer: Any,
    task: Task,
    prompts: list[Prompt],
    sampling: SamplingConfig,
    temperature: float,
    seed: int,
    batch_size: int = 256,
    sampler: Sampler | None = None,
) -> float:
    """Fraction of ``prompts`` answered correctly by one sample each at ``temperature``.

    ``sampler``: a backend to reuse (synced to ``model`` first); None builds one."""
    cfg = dataclasses.replace(sampling, temperature=temperature)
    sampler = sampler_for(model, tokenizer, cfg, reuse=sampler)
    gen = torch.Generator().manual_seed(seed)
    correct = 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        out = sampler.generate([p.text for p in chunk], generator=gen)
        correct += sum(int(s.correct) for s in safe_score_batch(task, chunk, out.completion_texts))
    return correct / max(len(prompts), 1)


def sft_run_dir(task: str, seed: int) -> str:
    """The SFT run directory when neither ``out`` nor ``run.out`` gives one."""
    return f"runs/sft-{task}-s{seed}"


#: Settings a resumed SFT run may change (see tether.runs.resume).
SFT_RESUME_MAY_CHANGE = (  # not sft.steps: the learning-rate schedule spans them
    *RUN_LOGGING,
    "eval",
    "sampling.vllm_gpu_memory_utilization",
    "sampling.vllm_max_model_len",
)


def plan_sft(cfg: SFTConfig) -> tuple[Task, list[Prompt]]:
    """The task and the SFT examples of ``cfg``, with every check that needs no model (the user's
    imports, the task's name, parameters, rewards and chat template, the examples asked for)."""
    import_user_code(cfg.imports)
    check_model_source(cfg.model)
    check_backend(cfg.sampling.backend, cfg.model.lora_rank)
    # SFT samples (its accuracy checks and the final eval) at eval.temperature only
    check_vllm_sampling(cfg.sampling.backend, {"eval.temperature": cfg.eval.temperature})
    check_policy_eos(cfg.model)
    task = task_from_settings(cfg.task, lambda: load_tokenizer(cfg.model))
    prompts = task.prompts("train", cfg.sft.examples or None, seed=cfg.sft.seed)
    if not prompts:
        raise TetherError(
            f"task {cfg.task.name!r} has no train prompts for SFT; give it a train split (for the file task: task.params.test_fraction below 1, or the held-out rows in task.params.test_path)"
        )
    check_test_split(task, cfg.task.name)
    return task, prompts


def check_sft_run_dir(cfg: SFTConfig, run_path: str | Path, resume: bool) -> RunDir:
    """The run directory's read-only checks for SFT (also for --dry-run; see
    :func:`tether.runs.rundir.check_run_dir`)."""
    return checked_run_dir(run_path, resume, to_dict(cfg), SFT_RESUME_MAY_CHANGE, resolved_with(SFTConfig))


def run_sft(config: SFTConfig, out: str | None = None, resume: bool = False) -> dict[str, Any]:
    """SFT on ``config.task``'s reference solutions; with ``resume`` it continues the run in
    ``out`` from its last checkpoint (every ``run.checkpoint_every`` steps and at the end), with
    the metrics an unbroken run writes."""
    cfg = config
    task, prompts = plan_sft(cfg)
    run_path = out or cfg.run.out or sft_run_dir(cfg.task.name, cfg.sft.seed)
    run = check_sft_run_dir(cfg, run_path, resume)
    cfg.run.apply()
    torch.manual_seed(cfg.sft.seed)
    model, tokenizer = load_policy(cfg.model)
    check_sft_context(model, tokenizer, task, prompts, cfg.sampling.max_new_tokens)
    check_eval_context(model, tokenizer, task, cfg.eval, cfg.sampling, seed=cfg.sft.seed)
    eos_ids = eos_token_ids(model, tokenizer)
    if not eos_ids:  # check_policy_eos refused it already, unless the model came from elsewhere
        raise TetherError(
            f"the model {cfg.model.name_or_path!r} has no end-of-sequence token (tokenizer or generation "
            "config), so SFT targets cannot end; set tokenizer.eos_token and save it next to the model"
        )
    # the prompts a sampler will see: the checks draw from the train examples, the eval from the test split
    prompt_budget: int | None = None
    if cfg.sampling.backend == "vllm":
        tested = eval_prompts(task, cfg.eval, cfg.sft.seed)
        prompt_budget = longest_prompt(tokenizer, [p.text for p in prompts + tested])
        engine_length(cfg.sampling, context_length(model), prompt_budget)
    # Only now is the run directory touched. A run killed before its first checkpoint lost
    # nothing but the logs of unsaved steps: it starts again.
    resume = resume and run.resumable()
    run.prepare(resume)
    run.write_config(to_dict(cfg))  # also on resume: the settings it continues with
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.sft.lr, weight_decay=cfg.sft.weight_decay
    )
    total = cfg.sft.steps
    warm = cfg.sft.warmup_steps

    def schedule(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    scaler = make_grad_scaler(model)  # float16 forward passes: dynamic loss scaling
    overflows = 0
    stream = PromptStream(prompts, seed=cfg.sft.seed)
    target = cfg.sft.stop_at_accuracy
    # The stop rule looks at train prompts (the ones SFT fits), never at the held-out split.
    check_set = random.Random(cfg.sft.seed + 1).sample(prompts, min(cfg.sft.check_prompts, len(prompts)))
    check_accuracy: float | None = None
    check_sampler: Sampler | None = None
    steps_run = 0
    done = False

    def save(step: int) -> None:
        tensors, o_meta = training_state(model, opt)
        r_tensors, r_state = capture_rng()
        tensors.update(r_tensors)
        state = {
            "optim": o_meta,
            "scheduler": sched.state_dict(),
            "prompts": stream.state_dict(),
            "check_accuracy": check_accuracy,
            "done": done,
            "overflows": overflows,
            **r_state,
        }
        if scaler is not None:
            state["grad_scaler"] = scaler.state_dict()
        save_checkpoint(run.path, Checkpoint(step, tensors, state), keep=cfg.run.keep_checkpoints)

    if resume:
        ck = load_latest_checkpoint(run.path)
        restore_training_state(ck, model, opt)
        sched.load_state_dict(ck.state["scheduler"])
        stream.load_state_dict(ck.state["prompts"])
        restore_rng(ck.tensors, ck.state)
        check_accuracy = ck.state["check_accuracy"]
        overflows = int(ck.state.get("overflows", 0))
        restore_grad_scaler(scaler, ck.state)
        done = bool(ck.state["done"])
        steps_run = ck.step
        run.truncate_logs(ck.step)
    model.train()
    t0 = time.perf_counter()
    with (
        TrainProgress(total=total, start=steps_run, enabled=cfg.run.progress, description="sft") as progress,
        StopRequest() as stop,
    ):
        for step in range(steps_run + 1, 1 if done else total + 1):
            chunk = stream.next(cfg.sft.batch_size)
            batch = {
                k: v.to(device)
                for k, v in sft_batch(
                    tokenizer, [p.text for p in chunk], [task.reference(p) for p in chunk], eos_ids[0]
                ).items()
            }
            with autocast_context(model):
                loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise TetherError(f"SFT loss became {float(loss)} at step {step}; lower sft.lr")
            (loss if scaler is None else scaler.scale(loss)).backward()
            lr = float(sched.get_last_lr()[0])  # the rate this step trains at
            params = [p for p in model.parameters() if p.requires_grad]
            norm, outcome = clipped_step(opt, params, cfg.sft.max_grad_norm, scaler)
            if outcome == "nonfinite":
                raise TetherError(f"SFT gradients became {norm} at step {step}; lower sft.lr")
            opt.zero_grad(set_to_none=True)
            sched.step()
            record: dict[str, float] = {"step": step, "sft/loss": float(loss.detach()), "train/lr": lr}
            if outcome == "stepped":
                record["grad/norm"] = norm
            if scaler is not None:  # updates skipped for an overflow of the scaled gradients
                overflows += outcome == "overflow"
                record["sft/overflow_skips"] = float(overflows)
                record["train/loss_scale"] = float(scaler.get_scale())
            steps_run = step
            if target > 0 and (step % cfg.sft.check_every == 0 or step == total):
                model.eval()
                if check_sampler is None:  # one backend for every check (a vLLM engine is costly)
                    check_sampler = make_sampler(
                        model, tokenizer, cfg.sampling, max_prompt_tokens=prompt_budget
                    )
                check_accuracy = sampled_accuracy(
                    model,
                    tokenizer,
                    task,
                    check_set,
                    cfg.sampling,
                    cfg.eval.temperature,
                    seed=cfg.sft.seed,
                    sampler=check_sampler,
                )
                model.train()
                record["sft/check_accuracy"] = check_accuracy
            run.metrics.append(record)
            progress.update(step, record)
            done = step == total or (check_accuracy is not None and check_accuracy >= target)
            if done or step % cfg.run.checkpoint_every == 0:
                save(step)
            if done:
                break
            if stop.requested:  # Ctrl-C: stop here, at a step boundary, with this step saved
                if step % cfg.run.checkpoint_every:
                    save(step)
                raise interrupted("SFT", step, total, str(run.path), "tether sft")
    model.eval()
    save_model(model, tokenizer, run.path / "model")
    mark_model_step(run.path / "model", steps_run)
    result = evaluate(
        model, tokenizer, task, cfg.eval, cfg.sampling, seed=cfg.sft.seed, sampler=check_sampler
    )
    summary = {
        "task": cfg.task.name,
        "steps": steps_run,
        "max_steps": total,
        "stop_at_accuracy": target,
        "stopped_early": steps_run < total,
        "check_accuracy": check_accuracy,
        "seconds": time.perf_counter() - t0,
        "eval": result,
        "model_dir": str(run.path / "model"),
    }
    run.write_summary(summary)
    return summary
