"""Rollouts: a batched sampler with a KV cache for Hugging Face causal language models.

:class:`HFSampler` samples completions for a list of prompts in one batch (prompts
left-padded, a ``DynamicCache`` carried through plain ``model(...)`` calls) and records the
log-probability of every sampled token under the distribution it was drawn from
(:func:`tether.lm.logprobs.processed_logprobs`: temperature applied, top-k / top-p
truncation accounted for). The trainer recomputes the same quantity with
:func:`tether.lm.logprobs.completion_logprobs`; for this sampler the gap is ~0 (float
rounding). It is faster than ``model.generate`` on CPU for tiny models (1.35-1.9x,
``bench/rollout_speed.py``): no logits processors, stopping criteria or per-step input
preparation, a precomputed attention mask and position ids, ``torch.inference_mode``, and
for Llama-style models a module-free prefill and decode (:class:`_FastDecoder`) that computes
repeated prompts and the prefix common to all prompts once.

:func:`make_sampler` picks it or the vLLM backend (:mod:`tether.lm.vllm_backend`) from
``SamplingConfig.backend``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from tether.errors import InvalidInputError, TetherError
from tether.lm.logprobs import position_ids_from_mask, processed_logprobs, prompt_groups
from tether.lm.precision import autocast_context, autocast_dtype

__all__ = [
    "HFSampler",
    "RolloutBatch",
    "Sampler",
    "SamplingConfig",
    "decode_completions",
    "encode_prompts",
    "eos_token_ids",
    "make_sampler",
    "pad_token_id",
    "sample_from_logprobs",
]


@dataclass
class SamplingConfig:
    """How completions are sampled. The trainer uses the same values to recompute log-probs."""

    temperature: float = field(
        default=1.0,
        metadata={
            "min": 0.0,
            "min_exclusive": True,
            "help": "Logits are divided by it before sampling (TRL/vLLM `temperature`). Small values "
            "approach greedy decoding.",
        },
    )
    top_p: float = field(
        default=1.0,
        metadata={
            "min": 0.0,
            "min_exclusive": True,
            "max": 1.0,
            "help": "Nucleus sampling: keep the smallest set of most probable tokens whose probability "
            "reaches top_p (1.0: off). Applied after top_k.",
        },
    )
    top_k: int = field(
        default=0,
        metadata={"min": 0, "help": "Keep only the k most probable tokens (0: off)."},
    )
    max_new_tokens: int = field(
        default=16,
        metadata={"min": 1, "help": "Completion length limit; rows without EOS by then are `truncated`."},
    )
    backend: Literal["hf", "vllm"] = field(
        default="hf",
        metadata={
            "help": "`hf`: tether's batched KV-cache sampler on the policy itself (CPU or GPU). "
            "`vllm`: a vLLM engine (GPU only, `pip install tether[vllm]`)."
        },
    )
    vllm_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto",
        metadata={
            "help": "Weights and activations of the vLLM engine. `auto`: the policy's compute dtype (its "
            "autocast dtype when model.autocast gives one, else its parameters' dtype), so that samples "
            "come from the trainer's distribution (vLLM's own `auto` would run a float32 policy in bf16, "
            "and the samples drift off-policy)."
        },
    )
    vllm_max_model_len: int = field(
        default=0,
        metadata={
            "min": 0,
            "help": "Longest sequence (prompt + completion) the vLLM engine takes; its KV cache must hold "
            "one such sequence. 0: twice the run's longest prompt plus max_new_tokens (room for prompts "
            "a loop plugin lengthens, such as Scaf-GRPO's hints), at most the model's context, so that a "
            "long-context model does not reserve KV cache for a full-context sequence it never samples.",
        },
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3,
        metadata={
            "min": 0.0,
            "min_exclusive": True,
            "max": 1.0,
            "help": "Fraction of the GPU's memory the vLLM engine may take (weights and KV cache); "
            "the policy, its optimizer and the reference model share the rest.",
        },
    )


@dataclass
class RolloutBatch:
    """Sampled completions and their log-probs. Shapes: N rows, P prompt and T completion tokens."""

    prompt_ids: Tensor  # [N, P] long, left-padded with the pad id
    prompt_mask: Tensor  # [N, P] bool
    completion_ids: Tensor  # [N, T] long, right-padded with the pad id
    completion_mask: Tensor  # [N, T] bool: the sampled tokens, EOS included, nothing after it
    sampler_logprobs: Tensor  # [N, T] float32: log-prob of each token under the processed distribution
    truncated: Tensor  # [N] bool: no EOS within max_new_tokens
    completion_texts: list[str]  # decoded without special tokens
    prompt_texts: list[str]

    def __len__(self) -> int:
        return int(self.completion_ids.shape[0])

    def to(self, device: torch.device | str) -> RolloutBatch:
        return RolloutBatch(
            prompt_ids=self.prompt_ids.to(device),
            prompt_mask=self.prompt_mask.to(device),
            completion_ids=self.completion_ids.to(device),
            completion_mask=self.completion_mask.to(device),
            sampler_logprobs=self.sampler_logprobs.to(device),
            truncated=self.truncated.to(device),
            completion_texts=list(self.completion_texts),
            prompt_texts=list(self.prompt_texts),
        )

    def select(self, rows: Tensor | list[int]) -> RolloutBatch:
        """The rows ``rows`` (indices or a bool mask), in that order."""
        idx = torch.as_tensor(rows)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().squeeze(-1)
        picked = idx.tolist()
        return RolloutBatch(
            prompt_ids=self.prompt_ids[idx],
            prompt_mask=self.prompt_mask[idx],
            completion_ids=self.completion_ids[idx],
            completion_mask=self.completion_mask[idx],
            sampler_logprobs=self.sampler_logprobs[idx],
            truncated=self.truncated[idx],
            completion_texts=[self.completion_texts[i] for i in picked],
            prompt_texts=[self.prompt_texts[i] for i in picked],
        )

    @staticmethod
    def concat(batches: list[RolloutBatch], pad_id: int) -> RolloutBatch:
        """Rows of several batches, re-padded (prompts on the left, completions on the right)."""
        if len(batches) == 1:
            return batches[0]

        def cat(name: str, left: bool, fill: float | bool) -> Tensor:
            ts = [getattr(b, name) for b in batches]
            width = max(t.shape[1] for t in ts)
            out = []
            for t in ts:
                pad = width - t.shape[1]
                if pad:
                    filler = torch.full((t.shape[0], pad), fill, dtype=t.dtype, device=t.device)
                    t = torch.cat([filler, t] if left else [t, filler], dim=1)
                out.append(t)
            return torch.cat(out)

        return RolloutBatch(
            prompt_ids=cat("prompt_ids", True, pad_id),
            prompt_mask=cat("prompt_mask", True, False),
            completion_ids=cat("completion_ids", False, pad_id),
            completion_mask=cat("completion_mask", False, False),
            sampler_logprobs=cat("sampler_logprobs", False, 0.0),
            truncated=torch.cat([b.truncated for b in batches]),
            completion_texts=[t for b in batches for t in b.completion_texts],
            prompt_texts=[t for b in batches for t in b.prompt_texts],
        )


class Sampler(Protocol):
    """What the trainer needs from a rollout backend.

    ``sync_weights(model)`` makes the next ``generate`` sample from ``model``'s current weights
    (the trainer calls it before every rollout); ``with_config(config)`` is a sampler with other
    sampling settings on the same backend (evaluation's sampled and greedy passes), so one vLLM
    engine serves training, checks and evaluation.
    """

    config: SamplingConfig

    def generate(self, prompts: list[str], generator: torch.Generator | None = None) -> RolloutBatch: ...

    def sync_weights(self, model: Any) -> None: ...

    def with_config(self, config: SamplingConfig) -> Sampler: ...


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-sequence ids: the tokenizer's and the model's generation config's."""
    ids: list[int] = []
    candidates = [getattr(tokenizer, "eos_token_id", None)]
    gen_cfg = getattr(model, "generation_config", None)
    if gen_cfg is not None:
        candidates.append(getattr(gen_cfg, "eos_token_id", None))
    for c in candidates:
        for i in c if isinstance(c, list | tuple) else [c]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def pad_token_id(tokenizer: Any, eos_ids: list[int]) -> int:
    """The tokenizer's pad id, else the first EOS id, else 0."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is not None:
        return int(pad)
    return eos_ids[0] if eos_ids else 0


def decode_completions(tokenizer: Any, rows: list[list[int]], eos_ids: Sequence[int]) -> list[str]:
    """The texts of completions ``rows`` (token ids, each up to its stop token): a final stop id is
    left out before decoding (an end-of-turn token that is not flagged special, as some chat models
    ship theirs, would otherwise end the text and fail a strict verifier), and special tokens are
    skipped. The ids themselves keep the stop token: the policy is trained to emit it."""
    stops = set(eos_ids)
    kept = [row[:-1] if row and row[-1] in stops else row for row in rows]
    return list(tokenizer.batch_decode(kept, skip_special_tokens=True))


def sample_from_logprobs(logprobs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One token per row from log-probs [N, V] (Gumbel-max with exponential noise), [N] long.

    ``argmax(logp - log E)`` with ``E ~ Exp(1)`` is an exact sample of ``softmax(logp)``;
    -inf (truncated) tokens are never drawn. The noise comes from ``generator`` (drawn on the
    generator's device and moved when it differs from the logits').
    """
    gen_device = generator.device if generator is not None else logprobs.device
    noise = torch.empty(logprobs.shape, dtype=torch.float32, device=gen_device).exponential_(
        generator=generator
    )
    if noise.device != logprobs.device:
        noise = noise.to(logprobs.device)
    # a draw of exactly 0 would give -inf - log(0) = NaN on a truncated token, which argmax picks
    noise.clamp_(min=torch.finfo(torch.float32).tiny)
    return (logprobs - noise.log()).argmax(dim=-1)


def bos_prefix(tokenizer: Any) -> list[int]:
    """The BOS the tokenizer puts before a text when it adds its special tokens (``[bos_id]``), or
    ``[]`` when it adds none there (Qwen's, the embedded character tokenizer). Read from the
    tokenizer itself: a probe encoded with and without special tokens."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return []
    with_special = list(tokenizer(["a"], add_special_tokens=True)["input_ids"][0])
    without = list(tokenizer(["a"], add_special_tokens=False)["input_ids"][0])
    return [int(bos_id)] if with_special[:1] == [bos_id] and without[:1] != [bos_id] else []


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt as the policy sees it, for sampling and SFT alike: the text's own
    tokens after the tokenizer's BOS (when it adds one), except for a text that already begins
    with the BOS (a rendered chat template), which would otherwise get it twice.

    Only the BOS: a tokenizer that also appends an EOS when it adds special tokens (Llama's with
    ``add_eos_token``) would end the prompt with it, and the policy would answer after an EOS."""
    prefix = bos_prefix(tokenizer)
    encoded = [list(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    if not prefix:
        return encoded
    return [ids if ids[: len(prefix)] == prefix else prefix + ids for ids in encoded]


def greedy(config: SamplingConfig) -> SamplingConfig:
    """``config`` with argmax decoding (top_k=1; temperature and top-p then change nothing)."""
    return replace(config, temperature=1.0, top_k=1, top_p=1.0)


def context_length(model: Any) -> int | None:
    """The longest sequence the model's positions cover (``max_position_embeddings``, or GPT-2's
    ``n_positions``), or None when its config does not say."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(model: Any, longest_prompt: int, new_tokens: int, where: str = "sampling") -> None:
    """A clear error when a prompt of ``longest_prompt`` tokens plus ``new_tokens`` does not fit the
    model's context (a model with learned positions fails with a bare IndexError; one with rotary
    positions silently runs past what it was built for)."""
    limit = context_length(model)
    if limit is not None:
        check_fits(limit, longest_prompt, new_tokens, where, f"the model's context of {limit} positions")


def check_fits(limit: int, longest_prompt: int, new_tokens: int, where: str, what: str) -> None:
    """:func:`check_context` against ``limit`` positions, named ``what`` in the message."""
    if longest_prompt + new_tokens > limit:
        raise InvalidInputError(
            f"{where}: a prompt of {longest_prompt} tokens plus {new_tokens} new tokens is "
            f"{longest_prompt + new_tokens}, past {what}; "
            "shorten the prompts, lower sampling.max_new_tokens, or use a model with a longer context "
            "(for the tiny model: model.tiny_max_positions)"
        )


def longest_prompt(tokenizer: Any, prompts: Sequence[str]) -> int:
    """Tokens of the longest of ``prompts`` as the sampler encodes them (0 for none)."""
    return max((len(ids) for ids in encode_prompts(tokenizer, prompts)), default=0)


def _encode_left_padded(tokenizer: Any, prompts: list[str], pad_id: int) -> tuple[Tensor, Tensor]:
    encoded = encode_prompts(tokenizer, prompts)
    lengths = [len(ids) for ids in encoded]
    if min(lengths) == 0:
        bad = prompts[lengths.index(0)]
        raise InvalidInputError(
            f"prompt {bad!r} encodes to no tokens; give a non-empty prompt or a tokenizer that adds a BOS token"
        )
    width = max(lengths)
    ids = torch.tensor([[pad_id] * (width - len(seq)) + list(seq) for seq in encoded], dtype=torch.long)
    starts = width - torch.tensor(lengths, dtype=torch.long)
    mask = torch.arange(width)[None, :] >= starts[:, None]
    return ids, mask


def _supports_4d_mask(model: Any) -> bool:
    """True when a prepared 4D additive mask can be passed to the model at decode steps.

    Hugging Face's mask builders return a 4D mask as it is; this is right for full-attention
    models on the ``sdpa`` and ``eager`` kernels. Sliding-window or mixed layer types, and other
    kernels, get the ordinary 2D mask (slower, always correct).
    """
    config = getattr(model, "config", None)
    if config is None:
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return False
    layer_types = getattr(config, "layer_types", None)
    return not (layer_types and any(t != "full_attention" for t in layer_types))


_FAST_MODEL_TYPES = ("llama", "mistral", "qwen2")


class _FastDecoder:
    """Prefill and decode steps of Llama-style models (Llama, Mistral, Qwen2) without the module stack.

    For tiny models the per-step cost of ``model(...)`` is Python and mask-building overhead,
    not arithmetic. This runs the same computation as Hugging Face's modules (RMSNorm, fused
    q/k/v and gate/up projections, the model's own rotary table, attention over a
    preallocated KV cache) with the model's own weights, read at each ``generate`` call. The
    prefill runs once per distinct prompt (GRPO groups repeat prompts) and, in the last layer,
    only the attention output and MLP of the last position (the one whose logits are kept).
    It is used only for architectures whose structure it checks; anything else goes through
    ``model(...)``. The log-prob test against ``completion_logprobs`` (a plain forward pass)
    keeps the two paths equal.
    """

    # attention scores held at once in the prefill before switching to SDPA (elements)
    _MAX_PREFILL_SCORES = 1 << 24

    def __init__(self, model: Any, full_mask: Tensor, positions: Tensor, max_len: int) -> None:
        base = model.model
        cfg = model.config
        self.embed = base.embed_tokens.weight
        self.final_norm = (base.norm.weight, float(base.norm.variance_epsilon))
        self.lm_head = model.lm_head
        dtype = self.embed.dtype
        device = full_mask.device
        self.dtype = dtype
        # Masked scores get half the lowest finite value of the narrowest dtype in play (the
        # weights' or autocast's): a score plus it stays finite, so a row with every key masked
        # (a left-padding position) gets a uniform softmax, not NaN, also in bf16 / fp16.
        autocast = autocast_dtype(model)
        narrow = min((dtype, autocast) if autocast else (dtype,), key=lambda t: torch.finfo(t).max)
        self.masked = torch.finfo(narrow).min / 2
        n = full_mask.shape[0]
        # additive mask [N, 1, 1, max_len]: 0 where attended, ``masked`` on padding
        self.attn_mask = torch.zeros(full_mask.shape, dtype=dtype, device=device)
        self.attn_mask.masked_fill_(full_mask == 0, self.masked)
        self.attn_mask = self.attn_mask[:, None, None, :]
        # rotary cos/sin of every position, computed once by the model's own rotary module
        all_pos = torch.arange(max_len, device=device)[None, :]
        cos, sin = base.rotary_emb(self.embed[:1, None, :], all_pos)
        self.cos_all = cos[0]  # [max_len, d]
        # rotate_half(x) * sin == roll(x, d / 2) * sin_signed: one op instead of four per step
        half = cos.shape[-1] // 2
        self.sin_all = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)
        self.cos = self.cos_all[positions][:, :, None, :]  # [N, T, 1, d]
        self.sin = self.sin_all[positions][:, :, None, :]
        fuse = sum(p.numel() for p in model.parameters()) <= 200_000_000
        n_q = int(cfg.num_attention_heads)
        self.layers = []
        for layer in base.layers:
            att, mlp = layer.self_attn, layer.mlp
            projections = [att.q_proj, att.k_proj, att.v_proj]
            biases = [m.bias for m in projections]
            uniform_bias = all(x is None for x in biases) or all(x is not None for x in biases)
            w: Tensor | None = None
            b: Tensor | None = None
            gu: Tensor | None = None
            if fuse and uniform_bias:
                w = torch.cat([m.weight for m in projections], dim=0)
                b = None if biases[0] is None else torch.cat(biases, dim=0)
            if fuse and mlp.gate_proj.bias is None and mlp.up_proj.bias is None:
                gu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)
            d = int(att.head_dim)
            h_kv = int(att.k_proj.weight.shape[0]) // d
            self.layers.append(
                {
                    "ln1": (layer.input_layernorm.weight, float(layer.input_layernorm.variance_epsilon)),
                    "ln2": (
                        layer.post_attention_layernorm.weight,
                        float(layer.post_attention_layernorm.variance_epsilon),
                    ),
                    "qkv": (w, b),
                    "proj": projections,
                    "o": att.o_proj.weight,
                    "gu": gu,
                    "mlp": mlp,
                    "down": mlp.down_proj.weight,
                    "k": torch.empty((n, h_kv, max_len, d), dtype=dtype, device=device),
                    "v": torch.empty((n, h_kv, max_len, d), dtype=dtype, device=device),
                    "n_q": n_q,
                    "n_kv": h_kv,
                    "n_qk": n_q + h_kv,
                    "head_dim": d,
                    "scaling": float(att.scaling),
                }
            )

    @classmethod
    def build(cls, model: Any, full_mask: Tensor, positions: Tensor, max_len: int) -> _FastDecoder | None:
        """The fast decoder when ``model`` has the structure it implements, else None."""
        cfg = getattr(model, "config", None)
        if cfg is None or getattr(cfg, "model_type", None) not in _FAST_MODEL_TYPES:
            return None
        if not _supports_4d_mask(model) or getattr(cfg, "hidden_act", None) != "silu":
            return None
        if getattr(cfg, "mlp_bias", False) or getattr(cfg, "pretraining_tp", 1) != 1:
            return None
        base = getattr(model, "model", None)
        layers = getattr(base, "layers", None)
        if base is None or layers is None or len(layers) == 0:
            return None
        for layer in layers:
            att = getattr(layer, "self_attn", None)
            if att is None or getattr(att, "o_proj", None) is None or att.o_proj.bias is not None:
                return None
            if hasattr(att, "q_norm") or hasattr(att, "k_norm"):
                return None
            mlp = getattr(layer, "mlp", None)
            if mlp is None or getattr(mlp.down_proj, "bias", None) is not None:
                return None
            n_q = int(cfg.num_attention_heads)
            if att.q_proj.weight.shape[0] != n_q * int(att.head_dim):
                return None
        try:
            return cls(model, full_mask, positions, max_len)
        except (AttributeError, TypeError, ValueError, IndexError, RuntimeError):
            return None

    @staticmethod
    def _rms(x: Tensor, weight_eps: tuple[Tensor, float]) -> Tensor:
        weight, eps = weight_eps
        if x.dtype == torch.float32 and weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), weight, eps=eps)  # one op; the same products
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)

    @staticmethod
    def _qkv(x: Tensor, ly: dict[str, Any]) -> Tensor:
        w, b = ly["qkv"]
        if w is not None:
            return F.linear(x, w, b)
        return torch.cat([m(x) for m in ly["proj"]], dim=-1)

    @staticmethod
    def _mlp(x: Tensor, ly: dict[str, Any]) -> Tensor:
        if ly["gu"] is not None:
            gate, up = F.linear(x, ly["gu"]).chunk(2, dim=-1)
        else:
            mlp = ly["mlp"]
            gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        return F.linear(F.silu(gate) * up, ly["down"])

    @staticmethod
    def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
        """Softmax attention of q [N, Hkv, G*Q, d] (G query heads per KV head) over k/v [N, Hkv, L, d].

        ``mask`` [N, 1, Q, L] is additive. Returns [N, Hkv, G*Q, d].
        """
        n, h_kv, gq, _ = q.shape
        q_len, kv_len = mask.shape[-2], mask.shape[-1]
        scores = torch.matmul(q, k.transpose(-1, -2))
        scores.view(n, h_kv, gq // q_len, q_len, kv_len).mul_(scale).add_(mask[:, :, None])
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v)

    def _additive(self, allowed: Tensor) -> Tensor:
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device)
        return mask.masked_fill_(~allowed, self.masked)

    def _forward(
        self,
        ids: Tensor,
        pos: Tensor,
        mask: Tensor,
        past: list[tuple[Tensor, Tensor]] | None,
        want_logits: bool,
    ) -> tuple[list[tuple[Tensor, Tensor]], Tensor | None]:
        """Run ``ids`` [B, S] at positions ``pos`` [B, S] after the keys/values ``past`` (one
        [1, Hkv, C, d] pair per layer, shared by all rows) under the additive ``mask``
        [B, 1, S, C + S]. Returns the new keys/values of each layer and, if ``want_logits``,
        the logits [B, V] of the last position."""
        bsz, seq = ids.shape
        cos = self.cos_all[pos][:, :, None, :]  # [B, S, 1, d]
        sin = self.sin_all[pos][:, :, None, :]
        half = self.cos_all.shape[-1] // 2
        h = F.embedding(ids, self.embed)  # [B, S, D]
        last = len(self.layers) - 1
        kvs: list[tuple[Tensor, Tensor]] = []
        for i, ly in enumerate(self.layers):
            d, n_q, n_kv, n_qk = ly["head_dim"], ly["n_q"], ly["n_kv"], ly["n_qk"]
            x = self._rms(h, ly["ln1"])
            qkv = self._qkv(x, ly).view(bsz, seq, -1, d)  # [B, S, Hq + 2 Hkv, d]
            qk = qkv[:, :, :n_qk]
            qk = qk * cos + qk.roll(half, dims=-1) * sin
            k = qk[:, :, n_q:].transpose(1, 2)  # [B, Hkv, S, d]
            v = qkv[:, :, n_qk:].transpose(1, 2)
            kvs.append((k, v))
            if i == last and not want_logits:
                break
            if past is not None:
                pk, pv = past[i]
                k = torch.cat([pk.expand(bsz, -1, -1, -1), k], dim=2)
                v = torch.cat([pv.expand(bsz, -1, -1, -1), v], dim=2)
            q = qk[:, :, :n_q]
            att_mask = mask
            if i == last:  # only the last position's output is needed from here on
                q = q[:, -1:]
                h = h[:, -1:]
                att_mask = mask[:, :, -1:]
            q_len = q.shape[1]
            q = q.transpose(1, 2)  # [B, Hq, Q, d]
            if bsz * n_q * q_len * k.shape[2] <= self._MAX_PREFILL_SCORES:
                g = n_q // n_kv
                att = self._attend(q.reshape(bsz, n_kv, g * q_len, d), k, v, att_mask, ly["scaling"]).view(
                    bsz, n_q, q_len, d
                )
            else:
                att = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=att_mask, scale=ly["scaling"], enable_gqa=n_q != n_kv
                )
            h = h + F.linear(att.transpose(1, 2).reshape(bsz, q_len, n_q * d), ly["o"])
            h = h + self._mlp(self._rms(h, ly["ln2"]), ly)
        if not want_logits:
            return kvs, None
        logits: Tensor = self.lm_head(self._rms(h[:, -1], self.final_norm))
        return kvs, logits

    def prefill(self, prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
        """Fill the KV cache with the prompts; logits [N, V] of each row's last position.

        Identical rows (a prompt repeated for a group of samples) are computed once, and so is
        the prefix common to all prompts (a shared template): its keys and values take the
        first cache slots of every row, before each row's left-padded remainder (attention
        does not depend on the order of the keys; positions are explicit).
        """
        p = prompt_ids.shape[1]
        device = prompt_ids.device
        ids, mask = prompt_ids, prompt_mask
        inverse: Tensor | None = None
        groups = prompt_groups(ids, mask)  # rows of the same prompt are computed once
        if groups is not None:
            keep, inverse = groups
            ids, mask = ids[keep], mask[keep]
        # longest common prefix of the rows' tokens, leaving every row at least one token
        lengths = mask.sum(dim=1)
        min_len = int(lengths.min())
        shared = 0
        if ids.shape[0] > 1 and min_len > 2:
            starts = p - lengths  # first real column of each row
            cols = (starts[:, None] + torch.arange(min_len - 1, device=device)).clamp(max=p - 1)
            real = ids.gather(1, cols)  # [U, min_len - 1]
            same = (real == real[:1]).all(dim=0)
            shared = int(same.long().cumprod(dim=0).sum())
        causal = torch.ones((p, p), dtype=torch.bool, device=device).tril_()
        if shared >= 2:
            c = shared
            row0 = int(p - lengths[0])
            pre_ids = ids[:1, row0 : row0 + c]
            pre_pos = torch.arange(c, device=device)[None, :]
            past, _ = self._forward(pre_ids, pre_pos, self._additive(causal[None, None, :c, :c]), None, False)
            s = p - c
            suf_ids = ids[:, c:]
            suf_mask = mask[:, :s]  # row i's suffix starts at column p - len_i of the suffix block
            suf_pos = position_ids_from_mask(suf_mask) + c
            allowed = torch.cat(
                [
                    torch.ones((ids.shape[0], 1, s, c), dtype=torch.bool, device=device),
                    causal[None, None, :s, :s] & suf_mask[:, None, None, :],
                ],
                dim=-1,
            )
            kvs, logits = self._forward(suf_ids, suf_pos, self._additive(allowed), past, True)
            for ly, (pk, pv), (k, v) in zip(self.layers, past, kvs, strict=True):
                ly["k"][:, :, :c] = pk
                ly["v"][:, :, :c] = pv
                ly["k"][:, :, c:p] = k if inverse is None else k[inverse]
                ly["v"][:, :, c:p] = v if inverse is None else v[inverse]
            # cache slots: the shared prefix, then each row's left-padded remainder
            self.attn_mask[:, :, :, :c] = 0.0
            self.attn_mask[:, :, :, c:p] = self._additive(prompt_mask[:, None, None, :s])
        else:
            allowed = causal[None, None] & mask[:, None, None, :]
            kvs, logits = self._forward(
                ids, position_ids_from_mask(mask), self._additive(allowed), None, True
            )
            for ly, (k, v) in zip(self.layers, kvs, strict=True):
                ly["k"][:, :, :p] = k if inverse is None else k[inverse]
                ly["v"][:, :, :p] = v if inverse is None else v[inverse]
        assert logits is not None
        return logits if inverse is None else logits[inverse]

    def step(self, tok: Tensor, step: int, kv_len: int) -> Tensor:
        """Logits [N, V] after feeding ``tok`` (sampled at ``step``) at cache slot ``kv_len - 1``."""
        n = tok.shape[0]
        h = F.embedding(tok, self.embed)  # [N, D]
        cos = self.cos[:, step]  # [N, 1, d]
        sin = self.sin[:, step]
        half = self.cos_all.shape[-1] // 2
        mask = self.attn_mask[..., :kv_len]
        slot = kv_len - 1
        for ly in self.layers:
            d, n_q, n_kv, n_qk = ly["head_dim"], ly["n_q"], ly["n_kv"], ly["n_qk"]
            x = self._rms(h, ly["ln1"])
            qkv = self._qkv(x, ly).view(n, -1, d)  # [N, Hq + 2 Hkv, d]
            qk = qkv[:, :n_qk]
            qk = qk * cos + qk.roll(half, dims=-1) * sin
            k_buf, v_buf = ly["k"], ly["v"]
            k_buf[:, :, slot] = qk[:, n_q:]
            v_buf[:, :, slot] = qkv[:, n_qk:]
            q = qk[:, :n_q].reshape(n, n_kv, n_q // n_kv, d)  # [N, Hkv, G, d]
            att = self._attend(q, k_buf[:, :, :kv_len], v_buf[:, :, :kv_len], mask, ly["scaling"])
            h = h + F.linear(att.reshape(n, -1), ly["o"])
            h = h + self._mlp(self._rms(h, ly["ln2"]), ly)
        logits: Tensor = self.lm_head(self._rms(h, self.final_norm))
        return logits


class HFSampler:
    """Batched sampling with a KV cache through plain ``model(...)`` calls (CPU or GPU).

    Prompts are left-padded; a ``DynamicCache`` holds keys and values; each row stops at its
    first EOS (which is kept in the completion) and the loop stops when every row is done.
    Sampling draws from ``processed_logprobs`` with the given ``torch.Generator``: the same
    generator seed gives the same samples. The model runs in eval mode under
    ``torch.inference_mode`` and its training mode is restored afterwards.
    """

    def __init__(self, model: Any, tokenizer: Any, config: SamplingConfig, fast_decode: bool = True) -> None:
        self.model = model
        self.fast_decode = fast_decode
        self.tokenizer = tokenizer
        self.config = config
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.pad_id = pad_token_id(tokenizer, self.eos_ids)

    @property
    def device(self) -> torch.device:
        device: torch.device = next(self.model.parameters()).device
        return device

    def sync_weights(self, model: Any) -> None:
        """Nothing to copy: this sampler runs the live module. ``model`` must be that module."""
        if model is not self.model:
            raise TetherError(
                "HFSampler samples from the module it was built with; build a new sampler for another model"
            )

    def with_config(self, config: SamplingConfig) -> HFSampler:
        return HFSampler(self.model, self.tokenizer, config, fast_decode=self.fast_decode)

    def generate(self, prompts: list[str], generator: torch.Generator | None = None) -> RolloutBatch:
        if not prompts:
            raise InvalidInputError("generate() needs at least one prompt")
        prompt_ids, prompt_mask = _encode_left_padded(self.tokenizer, prompts, self.pad_id)
        check_context(self.model, int(prompt_mask.sum(dim=1).max()), self.config.max_new_tokens)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode(), autocast_context(self.model):
                completion_ids, completion_mask, logprobs, truncated = self._sample(
                    prompt_ids.to(self.device), prompt_mask.to(self.device), generator
                )
        finally:
            self.model.train(was_training)
        # outside inference mode: ordinary tensors that autograd may save (embedding indices)
        completion_ids = completion_ids.cpu().clone()
        completion_mask = completion_mask.cpu().clone()
        logprobs = logprobs.cpu().clone()
        truncated = truncated.cpu().clone()
        # the mask is a prefix of each row (alive until EOS)
        lengths = completion_mask.sum(dim=1).tolist()
        rows = [ids[:k] for ids, k in zip(completion_ids.tolist(), lengths, strict=True)]
        texts = decode_completions(self.tokenizer, rows, self.eos_ids)
        return RolloutBatch(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            sampler_logprobs=logprobs,
            truncated=truncated,
            completion_texts=list(texts),
            prompt_texts=list(prompts),
        )

    def _sample(
        self, prompt_ids: Tensor, prompt_mask: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from transformers import DynamicCache

        cfg = self.config
        model = self.model
        device = prompt_ids.device
        n, p = prompt_ids.shape
        t_max = cfg.max_new_tokens

        cache = DynamicCache(config=model.config) if hasattr(model, "config") else DynamicCache()
        # attention over prompt + completion slots, built once and sliced at each step
        full_mask = torch.ones((n, p + t_max), dtype=torch.long, device=device)
        full_mask[:, :p] = prompt_mask.long()
        use_4d = _supports_4d_mask(model)
        if use_4d:
            dtype = next(model.parameters()).dtype
            additive = torch.zeros((n, 1, 1, p + t_max), dtype=dtype, device=device)
            additive.masked_fill_(full_mask[:, None, None, :] == 0, torch.finfo(dtype).min)
        positions = prompt_mask.long().sum(dim=1, keepdim=True) + torch.arange(t_max, device=device)

        eos = torch.tensor(self.eos_ids or [-1], dtype=torch.long, device=device)
        tokens = torch.full((n, t_max), self.pad_id, dtype=torch.long, device=device)
        logps = torch.zeros((n, t_max), dtype=torch.float32, device=device)
        alive_mask = torch.zeros((n, t_max), dtype=torch.bool, device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        pad = torch.full((n,), self.pad_id, dtype=torch.long, device=device)

        fast = _FastDecoder.build(model, full_mask, positions, p + t_max) if self.fast_decode else None
        if fast is not None:
            logits = fast.prefill(prompt_ids, prompt_mask)
        else:
            out = model(
                input_ids=prompt_ids,
                attention_mask=full_mask[:, :p],
                position_ids=position_ids_from_mask(prompt_mask),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            logits = out.logits[:, -1, :]
        steps = 0
        for step in range(t_max):
            lp = processed_logprobs(logits, cfg.temperature, cfg.top_k, cfg.top_p)
            tok = sample_from_logprobs(lp, generator)
            alive = ~done
            tok = torch.where(alive, tok, pad)
            tokens[:, step] = tok
            logps[:, step] = torch.where(alive, lp.gather(-1, tok[:, None]).squeeze(-1), 0.0)
            alive_mask[:, step] = alive
            done = done | torch.isin(tok, eos)
            steps = step + 1
            if steps == t_max or bool(done.all()):
                break
            kv_len = p + steps
            if fast is not None:
                logits = fast.step(tok, step, kv_len)
                continue
            mask = additive[:, :, :, :kv_len] if use_4d else full_mask[:, :kv_len]
            out = model(
                input_ids=tok[:, None],
                attention_mask=mask,
                position_ids=positions[:, step : step + 1],
                past_key_values=cache,
                use_cache=True,
            )
            logits = out.logits[:, -1, :]
        return tokens[:, :steps], alive_mask[:, :steps], logps[:, :steps], ~done


def sampler_for(
    model: Any,
    tokenizer: Any,
    config: SamplingConfig,
    reuse: Sampler | None = None,
    max_prompt_tokens: int | None = None,
) -> Sampler:
    """A sampler for ``model`` with ``config``: ``reuse`` synced to ``model`` and set to ``config``
    (its backend kept, e.g. a trainer's vLLM engine), else a new one from ``config`` (see
    :func:`make_sampler` for ``max_prompt_tokens``)."""
    if reuse is None:
        return make_sampler(model, tokenizer, config, max_prompt_tokens=max_prompt_tokens)
    reuse.sync_weights(model)
    return reuse.with_config(config)


def make_sampler(
    model: Any, tokenizer: Any, config: SamplingConfig, max_prompt_tokens: int | None = None
) -> Sampler:
    """The rollout backend named by ``config.backend``: ``hf`` or ``vllm``.

    ``max_prompt_tokens``: the longest prompt the sampler will be given, when the caller knows it;
    a vLLM engine is then sized for it (``max_model_len``: that plus ``config.max_new_tokens``,
    at most the model's context), not for the model's whole context."""
    if config.backend == "hf":
        return HFSampler(model, tokenizer, config)
    if config.backend == "vllm":
        from tether.lm.vllm_backend import VLLMSampler

        return VLLMSampler(
            model,
            tokenizer,
            config,
            gpu_memory_utilization=config.vllm_gpu_memory_utilization,
            dtype=config.vllm_dtype,
            max_prompt_tokens=max_prompt_tokens,
        )
    raise InvalidInputError(
        f"sampling.backend: {config.backend!r} is not allowed; choose one of 'hf', 'vllm'"
    )
