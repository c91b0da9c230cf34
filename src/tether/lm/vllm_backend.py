"""vLLM rollout backend (GPU only, ``pip install tether[vllm]``), selected by ``sampling.backend=vllm``.

:class:`VLLMSampler` has the interface of :class:`tether.lm.rollout.HFSampler`: ``generate``
returns a :class:`~tether.lm.rollout.RolloutBatch`. It builds a ``vllm.LLM`` from the
policy's saved directory (written to a temporary directory when none is given) and
``sync_weights(model)`` loads the policy's current weights into the engine after each update.

Log-probs: vLLM reports the log-probs of the *raw* model distribution by default, not of the
distribution it sampled from. From vLLM 0.10 on (``EngineArgs`` has a ``logprobs_mode`` field),
the engine is created with ``logprobs_mode="processed_logprobs"`` (temperature, top-k and top-p
applied), which is what the importance ratio needs. With an older vLLM a warning says so and the
sampler/trainer gap (``rollout/logprob_gap``) shows the difference; the trainer recomputes old
log-probs itself, and refuses ``train.sampler_correction`` with processed sampling (temperature
not 1, top-k or top-p on) before any work, since its weights would compare the raw distribution
with the processed one (:func:`check_vllm_sampling`). vLLM raises any temperature below 0.01 to
0.01, so such a temperature is refused too: the samples and their log-probs would be at another
temperature than the trainer's. Sampling is seeded per request from the given ``torch.Generator``.

Precision: ``sampling.vllm_dtype=auto`` runs the engine in the policy's compute dtype (the
autocast dtype when the policy has one, else its parameters'). vLLM's own ``auto`` would run a
float32 policy in bf16, and the samples would come from another distribution than the one the
trainer scores (a log-prob gap of 0.006 against 0.0008 in float32). On one seed of the demo's GRPO
stage (H100) held-out accuracy went from 0.422 after SFT to 0.493 with a bf16 engine, 0.675 with
a float32 one and 0.709 with the HF sampler; bench/mismatch.py (CPU, a bf16 copy of the policy as
sampler, two seeds) found no such loss, so the bf16 row may be seed noise.

The engine runs in the trainer's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``; a setting of 1
is refused, since the weights could not be loaded into an engine in another process), and one
engine serves every sampling setting (:meth:`VLLMSampler.with_config`). Its ``max_model_len`` is
the longest prompt the caller will give plus ``sampling.max_new_tokens`` when the caller knows it
(the trainer, SFT and evaluation do), at most the model's context, so that a long-context model
does not reserve KV cache for a full-context sequence; a longer prompt is a clear error.
Building it seeds the process's global RNGs with 0 (vLLM's doing); the trainer builds it before
it restores a checkpoint's RNG states, so resumed runs are unaffected.

Speed, as measured on an H100 (BENCHMARKS.md): for the tiny and 100M-parameter models of the
tests, vLLM is slower than tether's own sampler (0.2-0.3x its tokens/s on 256 x 64 tokens;
returning log-probs, which the ratio needs, took about 60% of its time). It is there for large
models, where its paged KV cache and kernels pay off.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tether.errors import InvalidInputError, TetherError
from tether.lm.precision import autocast_dtype
from tether.lm.rollout import (
    RolloutBatch,
    SamplingConfig,
    _encode_left_padded,
    check_fits,
    context_length,
    decode_completions,
    eos_token_ids,
    pad_token_id,
)

__all__ = ["VLLMSampler", "check_vllm_sampling", "engine_length", "vllm_unavailable_reason"]

INSTALL_HINT = "install the extra on a machine with a CUDA GPU: pip install 'tether[vllm]'"


def vllm_unavailable_reason() -> str | None:
    """Why the vLLM backend cannot run here, or None when it can."""
    if importlib.util.find_spec("vllm") is None:
        return f"sampling.backend=vllm needs the vllm package, which is not installed; {INSTALL_HINT}"
    if not torch.cuda.is_available():
        return f"sampling.backend=vllm needs a CUDA GPU and none is available; {INSTALL_HINT}, or use sampling.backend=hf"
    return None


def check_backend(backend: str, lora_rank: int) -> None:
    """``sampling.backend`` checked before any work: vLLM must be installed with a GPU, run its
    engine in this process (not ``VLLM_ENABLE_V1_MULTIPROCESSING=1``), and sample from a plain (not
    LoRA) policy."""
    if backend != "vllm":
        return
    reason = vllm_unavailable_reason()
    if reason is not None:
        raise TetherError(reason)
    # The engine must run in this process (vLLM V1 otherwise starts an engine-core process), so
    # that sync_weights loads the policy's tensors straight into the engine's model each step, as
    # TRL's colocated mode does: an engine in another process cannot be reached that way.
    multiprocessing = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0").strip()
    if multiprocessing not in ("0", ""):
        raise TetherError(
            f"VLLM_ENABLE_V1_MULTIPROCESSING={multiprocessing} runs the vLLM engine in another process, "
            "where tether cannot load the policy's updated weights at each step; unset it or set "
            "VLLM_ENABLE_V1_MULTIPROCESSING=0 (tether runs the engine in its own process)"
        )
    if lora_rank > 0:
        raise InvalidInputError(
            "sampling.backend=vllm does not take a LoRA (PEFT) policy: its weights are not the "
            "base model's; use sampling.backend=hf with model.lora_rank > 0, or train without LoRA "
            "(model.lora_rank=0)"
        )


#: vLLM raises any temperature in (0, 0.01) to 0.01 (``SamplingParams``): samples and log-probs
#: would then be at another temperature than the trainer's.
VLLM_MIN_TEMPERATURE = 0.01


def has_processed_logprobs() -> bool:
    """Whether the installed vLLM can report processed log-probs (``EngineArgs.logprobs_mode``,
    vLLM >= 0.10), read from its engine settings without building an engine."""
    import vllm

    return "logprobs_mode" in {f.name for f in dataclasses.fields(vllm.EngineArgs)}


def check_vllm_sampling(
    backend: str,
    temperatures: Mapping[str, float],
    sampling: SamplingConfig | None = None,
    sampler_correction: str = "none",
) -> None:
    """With ``sampling.backend=vllm``, before any work (after :func:`check_backend`): every
    temperature the run samples at (``temperatures``: setting name -> value) must be one vLLM
    keeps (>= 0.01); and with a vLLM that reports raw log-probs, ``sampler_correction`` (RL's
    ``train.sampler_correction``) needs ``sampling`` to be the raw distribution (temperature 1,
    no top-k or top-p)."""
    if backend != "vllm":
        return
    for name, value in temperatures.items():
        if value < VLLM_MIN_TEMPERATURE:
            raise InvalidInputError(
                f"{name}={value} is below {VLLM_MIN_TEMPERATURE}, which vLLM raises any lower temperature "
                f"to: with sampling.backend=vllm the samples and their log-probs would be at "
                f"{VLLM_MIN_TEMPERATURE}, not at the temperature the trainer scores them with. Set "
                f"{name}={VLLM_MIN_TEMPERATURE} or higher, or use sampling.backend=hf"
            )
    if sampler_correction == "none" or sampling is None:
        return
    processed = sampling.temperature != 1.0 or sampling.top_k > 0 or sampling.top_p < 1.0
    if processed and not has_processed_logprobs():
        raise InvalidInputError(
            f"train.sampler_correction={sampler_correction} with sampling.backend=vllm needs the sampler's "
            "log-probs of the distribution it sampled from, but this vLLM (< 0.10, no logprobs_mode) reports "
            f"those of the raw model, and sampling is processed (sampling.temperature="
            f"{sampling.temperature}, top_k={sampling.top_k}, top_p={sampling.top_p}): the correction's "
            "weights would be biased. Upgrade to vllm>=0.10, set train.sampler_correction=none, sample "
            "from the raw distribution (sampling.temperature=1 top_k=0 top_p=1), or use sampling.backend=hf"
        )


def engine_length(sampling: SamplingConfig, context: int | None, max_prompt_tokens: int | None) -> int | None:
    """The vLLM engine's ``max_model_len`` for a model of ``context`` positions (None: unknown) whose
    caller gives prompts of at most ``max_prompt_tokens`` tokens (None: unknown):
    ``sampling.vllm_max_model_len`` when set, checked against both; else twice the longest prompt
    plus ``sampling.max_new_tokens``, at most ``context``; else ``context``."""
    explicit = sampling.vllm_max_model_len
    if not explicit:
        if max_prompt_tokens is None:
            return context
        auto = 2 * (max_prompt_tokens + sampling.max_new_tokens)
        return auto if context is None else min(context, auto)
    if context is not None and explicit > context:
        raise InvalidInputError(
            f"sampling.vllm_max_model_len={explicit} is past the model's context of {context} positions; "
            f"set it to at most {context}, or 0 for the length the run needs"
        )
    if max_prompt_tokens is not None and max_prompt_tokens + sampling.max_new_tokens > explicit:
        raise InvalidInputError(
            f"sampling.vllm_max_model_len={explicit} is shorter than the run's longest prompt "
            f"({max_prompt_tokens} tokens) plus sampling.max_new_tokens={sampling.max_new_tokens}; set it to "
            f"at least {max_prompt_tokens + sampling.max_new_tokens}, or 0 for the length the run needs"
        )
    return explicit


class VLLMSampler:
    """Samples completions with a vLLM engine; same ``generate`` interface as ``HFSampler``."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        config: SamplingConfig,
        model_dir: str | Path | None = None,
        gpu_memory_utilization: float = 0.3,
        dtype: str = "auto",
        max_prompt_tokens: int | None = None,
    ) -> None:
        check_backend("vllm", 1 if hasattr(model, "peft_config") else 0)  # an engine-core process too
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process (see check_backend)
        import vllm

        self.config = config
        self.tokenizer = tokenizer
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.pad_id = pad_token_id(tokenizer, self.eos_ids)
        # KV cache for the sequences the run will sample, not for the model's whole context
        self.max_model_len = engine_length(config, context_length(model), max_prompt_tokens)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if model_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="tether-vllm-")
            model_dir = self._tmp.name
            model.save_pretrained(model_dir, safe_serialization=True)
            tokenizer.save_pretrained(model_dir)
        if dtype == "auto":  # the policy's compute dtype: vLLM's own "auto" runs float32 weights in bf16
            dtype = str(autocast_dtype(model) or next(model.parameters()).dtype).removeprefix("torch.")
        self.dtype = dtype
        kwargs: dict[str, Any] = {
            "model": str(model_dir),
            "dtype": dtype,
            "gpu_memory_utilization": gpu_memory_utilization,
            "enable_prefix_caching": False,
            "seed": 0,
        }
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        self.processed_logprobs = has_processed_logprobs()
        if self.processed_logprobs:
            kwargs["logprobs_mode"] = "processed_logprobs"
        else:  # vLLM < 0.10: no logprobs_mode; log-probs are of the raw distribution
            warnings.warn(
                "this vLLM has no logprobs_mode option: sampler log-probs are of the raw (not "
                "temperature/top-k/top-p processed) distribution; upgrade to vllm>=0.10 for an exact match",
                stacklevel=2,
            )
        self.llm = vllm.LLM(**kwargs)

    def with_config(self, config: SamplingConfig) -> VLLMSampler:
        """This sampler with other sampling settings, on the same engine (vLLM takes temperature,
        top-k and top-p per request)."""
        other = copy.copy(self)
        other.config = config
        return other

    def sync_weights(self, model: Any) -> None:
        """Load ``model``'s current state dict into the vLLM engine (the trainer calls it before
        every rollout)."""
        weights = list(model.state_dict().items())
        engine = getattr(self.llm, "llm_engine", None)
        try:  # vLLM V0 and in-process V1 executors: only the lookup, never the loading, is guarded
            runner_model = engine.model_executor.driver_worker.model_runner.model  # type: ignore[union-attr]
        except AttributeError as err:
            if not hasattr(self.llm, "apply_model"):
                raise TetherError(
                    "cannot load weights into this vLLM engine; use a vLLM version with LLM.apply_model (>=0.9)"
                ) from err
            self.llm.apply_model(lambda m: m.load_weights(weights))
        else:
            runner_model.load_weights(weights)
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()

    def generate(self, prompts: list[str], generator: torch.Generator | None = None) -> RolloutBatch:
        if not prompts:
            raise InvalidInputError("generate() needs at least one prompt")
        from vllm import SamplingParams

        cfg = self.config
        prompt_ids, prompt_mask = _encode_left_padded(self.tokenizer, prompts, self.pad_id)
        if self.max_model_len is not None:  # the HF sampler's check, against the engine's length
            check_fits(
                self.max_model_len,
                int(prompt_mask.sum(dim=1).max()),
                cfg.max_new_tokens,
                "sampling",
                f"the vLLM engine's max_model_len of {self.max_model_len} positions (raise "
                "sampling.vllm_max_model_len, at most the model's context; 0 sizes the engine for the "
                "prompts the run was planned with)",
            )
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator).tolist()
        params = [
            SamplingParams(
                n=1,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                top_k=cfg.top_k if cfg.top_k > 0 else -1,
                max_tokens=cfg.max_new_tokens,
                logprobs=1,
                seed=int(seed),
                stop_token_ids=self.eos_ids,
                detokenize=False,  # texts are decoded here, once, from the token ids
            )
            for seed in seeds
        ]
        requests = [{"prompt_token_ids": ids[m].tolist()} for ids, m in zip(prompt_ids, prompt_mask)]
        outputs = self.llm.generate(requests, params, use_tqdm=False)

        rows: list[list[int]] = []
        row_logps: list[list[float]] = []
        truncated: list[bool] = []
        for out in outputs:
            completion = out.outputs[0]
            ids = list(completion.token_ids)
            logps = [float(step[tok].logprob) for tok, step in zip(ids, completion.logprobs or [])]
            rows.append(ids)
            row_logps.append(logps + [0.0] * (len(ids) - len(logps)))
            truncated.append(not (ids and ids[-1] in self.eos_ids))
        width = max((len(r) for r in rows), default=0)
        n = len(rows)
        completion_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        completion_mask = torch.zeros((n, width), dtype=torch.bool)
        sampler_logprobs = torch.zeros((n, width), dtype=torch.float32)
        for i, (ids, logps) in enumerate(zip(rows, row_logps)):
            completion_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            completion_mask[i, : len(ids)] = True
            sampler_logprobs[i, : len(ids)] = torch.tensor(logps, dtype=torch.float32)
        texts = decode_completions(self.tokenizer, rows, self.eos_ids)
        return RolloutBatch(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            sampler_logprobs=sampler_logprobs,
            truncated=torch.tensor(truncated, dtype=torch.bool),
            completion_texts=list(texts),
            prompt_texts=list(prompts),
        )
