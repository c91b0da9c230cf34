"""Held-out evaluation: accuracy (pass@1), pass@k, greedy accuracy, entropy, length."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from tether.errors import TetherError
from tether.lm.config import EvalSettings
from tether.lm.logprobs import completion_logprobs
from tether.lm.rollout import (
    Sampler,
    SamplingConfig,
    check_context,
    context_length,
    encode_prompts,
    greedy,
    longest_prompt,
    sampler_for,
)
from tether.lm.tasks.base import Prompt, Task, safe_score_batch

# The entropy pass materialises [rows, T, V] logits; it runs on as many rows at a time as keep that
# within this many elements (256 MiB in float32): a 150k vocabulary at 1024 tokens takes one row at a
# time, the tiny model the whole batch.
ENTROPY_LOGITS_BUDGET = 2**26


def entropy_rows(tokens: int, vocab: int, budget: int | None = None) -> int:
    """Rows per forward pass of the eval entropy pass: [rows, tokens, vocab] logits within budget."""
    return max(1, (ENTROPY_LOGITS_BUDGET if budget is None else budget) // max(1, tokens * vocab))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k).

    Needs n >= k (k of fewer samples is not defined) and 0 <= c <= n.
    """
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def check_test_split(task: Task, name: str | None = None) -> int:
    """The number of held-out prompts of ``task``; a clear error when it has none (checked before
    a run starts, so that a run does not train only to fail at its final evaluation)."""
    available = len(task.prompts("test"))
    if available == 0:
        raise TetherError(
            f"task {name or task.name!r} has no test prompts to evaluate on; give it a test split "
            "(task.params.test_size for arithmetic and countdown; task.params.test_fraction or "
            "task.params.test_path, a held-out file, for the file task)"
        )
    return available


def eval_prompts(task: Task, settings: EvalSettings, seed: int = 0) -> list[Prompt]:
    """The held-out prompts :func:`evaluate` scores: ``settings.prompts`` of the test split (all of
    it when it has fewer), drawn with ``seed``."""
    available = check_test_split(task)
    return task.prompts("test", min(settings.prompts, available), seed=seed)


def check_eval_context(
    model: Any, tokenizer: Any, task: Task, settings: EvalSettings, sampling: SamplingConfig, seed: int = 0
) -> None:
    """Before any work, for a run that evaluates at its end: the longest of the test prompts
    :func:`evaluate` will use (``settings.prompts`` drawn with ``seed``, the seed given to
    :func:`evaluate`) plus ``sampling.max_new_tokens`` must fit the model's context; a clear error
    naming the test prompts otherwise, rather than one after training."""
    if context_length(model) is None:
        return
    prompts = eval_prompts(task, settings, seed)
    lengths = [len(ids) for ids in encode_prompts(tokenizer, [p.text for p in prompts])]
    i = max(range(len(prompts)), key=lengths.__getitem__)
    check_context(
        model,
        lengths[i],
        sampling.max_new_tokens,
        where=f"the test prompts of the final eval (the longest: {prompts[i].id!r})",
    )


@torch.no_grad()
def evaluate(
    model: Any,
    tokenizer: Any,
    task: Task,
    settings: EvalSettings,
    sampling: SamplingConfig,
    seed: int = 0,
    sampler: Sampler | None = None,
) -> dict[str, Any]:
    """Score ``n`` samples per held-out prompt (``settings.samples``, or ``settings.k`` when 0)
    and one greedy completion; pass@k is the unbiased estimate from the n samples.

    ``sampler``: the backend to sample with (a trainer's, so that a vLLM engine is reused and
    not built again); it is synced to ``model`` first. None builds one from ``sampling``.
    A test split smaller than ``settings.prompts`` is used whole (the result's ``prompts`` says
    how many were scored). The model is in eval mode throughout (no dropout in the entropy
    pass) and is put back in the mode it came in.
    """
    was_training = model.training
    model.eval()
    try:
        return _evaluate(model, tokenizer, task, settings, sampling, seed, sampler)
    finally:
        model.train(was_training)


def _evaluate(
    model: Any,
    tokenizer: Any,
    task: Task,
    settings: EvalSettings,
    sampling: SamplingConfig,
    seed: int,
    sampler: Sampler | None,
) -> dict[str, Any]:
    prompts = eval_prompts(task, settings, seed)
    device = next(model.parameters()).device
    sample_cfg = dataclasses.replace(sampling, temperature=settings.temperature)
    # a new vLLM engine is sized for these prompts (a reused one was sized by its owner)
    sized = sampler is None and sampling.backend == "vllm"
    budget = longest_prompt(tokenizer, [p.text for p in prompts]) if sized else None
    sampler = sampler_for(model, tokenizer, sample_cfg, reuse=sampler, max_prompt_tokens=budget)
    greedy_sampler = sampler.with_config(greedy(sampling))
    gen = torch.Generator().manual_seed(seed + 1)
    correct: list[int] = []
    greedy_correct = 0
    fmt = 0
    n_samples = 0
    ent_sum = 0.0
    ent_tokens = 0.0
    len_sum = 0.0
    n = settings.samples or settings.k
    vocab = int(model.config.vocab_size)
    per_prompt = max(1, settings.batch_size // n)
    for start in range(0, len(prompts), per_prompt):
        chunk = prompts[start : start + per_prompt]
        texts = [p.text for p in chunk for _ in range(n)]
        batch = sampler.generate(texts, generator=gen)
        scores = safe_score_batch(task, [p for p in chunk for _ in range(n)], batch.completion_texts)
        for i in range(len(chunk)):
            c = 0
            for s in scores[i * n : (i + 1) * n]:
                c += int(s.correct)
                fmt += int(s.format_ok)
                n_samples += 1
            correct.append(c)
        _, ent = completion_logprobs(
            model,
            batch.prompt_ids.to(device),
            batch.prompt_mask.to(device),
            batch.completion_ids.to(device),
            batch.completion_mask.to(device),
            temperature=sample_cfg.temperature,
            top_k=sample_cfg.top_k,
            top_p=sample_cfg.top_p,
            compute_entropy=True,
            logits_chunk=entropy_rows(batch.completion_ids.shape[1], vocab),
        )
        m = batch.completion_mask.to(device).float()
        if ent is not None:
            ent_sum += float((ent * m).sum())
        ent_tokens += float(m.sum())
        len_sum += float(m.sum())
        g = greedy_sampler.generate([p.text for p in chunk], generator=gen)
        greedy_correct += sum(int(s.correct) for s in safe_score_batch(task, chunk, g.completion_texts))
    k = settings.k
    return {
        "accuracy": sum(correct) / max(n_samples, 1),
        f"pass@{k}": sum(pass_at_k(n, c, k) for c in correct) / max(len(correct), 1),
        "greedy_accuracy": greedy_correct / max(len(prompts), 1),
        "entropy": ent_sum / max(ent_tokens, 1.0),
        "format_rate": fmt / max(n_samples, 1),
        "length_mean": len_sum / max(n_samples, 1),
        "prompts": float(len(prompts)),
        "k": float(k),
        "samples": float(n),
        # Fraction of the n samples that were correct, per held-out prompt (the arena's risk view).
        "per_prompt_success": [c / n for c in correct],
    }
