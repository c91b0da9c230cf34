"""vLLM rollout backend (GPU only, ``pip install tether[vllm]``), selected by ``sampling.backend=vllm``.

:class:`VLLMSampler` has the interface of :class:`tether.lm.rollout.HFSampler`: ``generate``
returns a :class:`~tether.lm.rollout.RolloutBatch`. It builds a ``vllm.LLM`` from the
policy's saved directory (written to a temporary directory when none is given) and
``sync_weights(model)`` loads the policy's current weights into the engine after each update.

Log-probs: vLLM reports the log-probs of the *raw* model distribution by default, not of the
distribution it sampled from. From vLLM 0.10 on, the engine is created with
``logprobs_mode="processed_logprobs"`` (temperature, top-k and top-p applied), which is what
the importance ratio needs. With an older vLLM a warning says so and the sampler/trainer gap
(``rollout/logprob_gap``) shows the difference; the trainer recomputes old log-probs itself.
Sampling is seeded per request from the given ``torch.Generator``.

Precision: ``sampling.vllm_dtype=auto`` runs the engine in the policy's compute dtype (the
autocast dtype when the policy has one, else its parameters'). vLLM's own ``auto`` would run a
float32 policy in bf16, and the samples would come from another distribution than the one the
trainer scores (a log-prob gap of 0.006 against 0.0008 in float32). On one seed of the demo's GRPO
stage (H100) held-out accuracy went from 0.422 after SFT to 0.493 with a bf16 engine, 0.675 with
a float32 one and 0.709 with the HF sampler; bench/mismatch.py (CPU, a bf16 copy of the policy as
sampler, two seeds) found no such loss, so the bf16 row may be seed noise.

The engine runs in the trainer's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless set
otherwise), and one engine serves every sampling setting (:meth:`VLLMSampler.with_config`).
Building it seeds the process's global RNGs with 0 (vLLM's doing); the trainer builds it before
it restores a checkpoint's RNG states, so resumed runs are unaffected.

Speed, as measured on an H100 (BENCHMARKS.md): for the tiny and 100M-parameter models of the
tests, vLLM is slower than tether's own sampler (0.2-0.3x its tokens/s on 256 x 64 tokens;
returning log-probs, which the ratio needs, took about 60% of its time). It is there for large
models, where its paged KV cache and kernels pay off.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from tether.errors import InvalidInputError, TetherError
from tether.lm.precision import autocast_dtype
from tether.lm.rollout import RolloutBatch, SamplingConfig, _encode_left_padded, eos_token_ids, pad_token_id

__all__ = ["VLLMSampler", "vllm_unavailable_reason"]

INSTALL_HINT = "install the extra on a machine with a CUDA GPU: pip install 'tether[vllm]'"


def vllm_unavailable_reason() -> str | None:
    """Why the vLLM backend cannot run here, or None when it can."""
    if importlib.util.find_spec("vllm") is None:
        return f"sampling.backend=vllm needs the vllm package, which is not installed; {INSTALL_HINT}"
    if not torch.cuda.is_available():
        return f"sampling.backend=vllm needs a CUDA GPU and none is available; {INSTALL_HINT}, or use sampling.backend=hf"
    return None


def check_backend(backend: str, lora_rank: int) -> None:
    """``sampling.backend`` checked before any work: vLLM must be installed with a GPU, and it
    samples from a plain (not LoRA) policy."""
    if backend != "vllm":
        return
    reason = vllm_unavailable_reason()
    if reason is not None:
        raise TetherError(reason)
    if lora_rank > 0:
        raise InvalidInputError(
            "sampling.backend=vllm does not take a LoRA (PEFT) policy: its weights are not the "
            "base model's; use sampling.backend=hf with model.lora_rank > 0, or train without LoRA "
            "(model.lora_rank=0)"
        )


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
    ) -> None:
        check_backend("vllm", 1 if hasattr(model, "peft_config") else 0)
        import vllm

        self.config = config
        self.tokenizer = tokenizer
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.pad_id = pad_token_id(tokenizer, self.eos_ids)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if model_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="tether-vllm-")
            model_dir = self._tmp.name
            model.save_pretrained(model_dir, safe_serialization=True)
            tokenizer.save_pretrained(model_dir)
        if dtype == "auto":  # the policy's compute dtype: vLLM's own "auto" runs float32 weights in bf16
            dtype = str(autocast_dtype(model) or next(model.parameters()).dtype).removeprefix("torch.")
        self.dtype = dtype
        # The engine runs in this process (vLLM V1 otherwise starts an engine-core process), so
        # sync_weights loads the policy's tensors straight into the engine's model, as TRL's
        # colocated mode does, instead of pickling every weight to another process each step.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        kwargs: dict[str, Any] = {
            "model": str(model_dir),
            "dtype": dtype,
            "gpu_memory_utilization": gpu_memory_utilization,
            "enable_prefix_caching": False,
            "seed": 0,
        }
        try:
            self.llm = vllm.LLM(logprobs_mode="processed_logprobs", **kwargs)
            self.processed_logprobs = True
        except TypeError:  # vLLM < 0.10: no logprobs_mode; log-probs are of the raw distribution
            warnings.warn(
                "this vLLM has no logprobs_mode option: sampler log-probs are of the raw (not "
                "temperature/top-k/top-p processed) distribution; upgrade to vllm>=0.10 for an exact match",
                stacklevel=2,
            )
            self.llm = vllm.LLM(**kwargs)
            self.processed_logprobs = False

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
        try:  # vLLM V0 and in-process V1 executors
            runner_model = engine.model_executor.driver_worker.model_runner.model  # type: ignore[union-attr]
            runner_model.load_weights(weights)
        except AttributeError:
            if not hasattr(self.llm, "apply_model"):
                raise TetherError(
                    "cannot load weights into this vLLM engine; use a vLLM version with LLM.apply_model (>=0.9)"
                ) from None
            self.llm.apply_model(lambda m: m.load_weights(weights))
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()

    def generate(self, prompts: list[str], generator: torch.Generator | None = None) -> RolloutBatch:
        if not prompts:
            raise InvalidInputError("generate() needs at least one prompt")
        from vllm import SamplingParams

        cfg = self.config
        prompt_ids, prompt_mask = _encode_left_padded(self.tokenizer, prompts, self.pad_id)
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
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
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
