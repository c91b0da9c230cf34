"""Log-probabilities of the distribution that is actually sampled from.

The sampler (:mod:`tether.lm.rollout`) and the trainer must agree on which distribution a
token was drawn from, or the importance ratio ``pi_theta / pi_old`` is wrong from the first
step (TRL #4159, #6789, #4772: temperature not applied, top-p / top-k truncation ignored).
Both go through :func:`processed_logprobs`: logits divided by the temperature, truncated to
the top-k and then to the nucleus (top-p), renormalised. The sampler records the log-prob of
each sampled token under it; :func:`completion_logprobs` recomputes the same quantity with
one forward pass of the model, differentiably. Their difference is the sampler/trainer
log-prob gap (``rollout/logprob_gap_*``), ~0 for our own sampler.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from tether.lm.precision import autocast_context

__all__ = [
    "completion_logits",
    "completion_logprobs",
    "completion_token_stats",
    "entropy_from_logprobs",
    "position_ids_from_mask",
    "processed_logprobs",
    "prompt_groups",
    "sum_pi_squared",
    "truncation_mask",
]


@torch.no_grad()
def truncation_mask(scaled_logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor | None:
    """Boolean mask [..., V] of the tokens kept by top-k then top-p, or None when both are off.

    Top-k keeps every token whose logit is >= the k-th largest (ties kept, as Hugging Face's
    ``TopKLogitsWarper``). Top-p (nucleus) then keeps, of the renormalised top-k distribution,
    the smallest set of most probable tokens whose cumulative probability reaches ``top_p``,
    and every token tied with the least probable of them; the most probable token is always
    kept. ``top_k=0`` and ``top_p=1.0`` switch them off.

    The mask depends only on the logit values, never on the order of the vocabulary or on the
    other rows of the batch: a tie at the nucleus boundary keeps all tied tokens (Hugging Face's
    ``TopPLogitsWarper`` splits it by sort order), so the sampler's [N, V] steps and the
    trainer's [N, T, V] pass keep the same set.
    """
    vocab = scaled_logits.shape[-1]
    keep: Tensor | None = None
    x = scaled_logits
    if 0 < top_k < vocab:
        top_vals, _ = torch.topk(x, top_k, dim=-1)
        keep = x >= top_vals[..., -1:]
        if top_p < 1.0 and bool((keep.sum(dim=-1) == top_k).all()):
            # no ties at the k-th logit: the sorted kept logits are topk's own (sorted) output,
            # and the nucleus is taken among them without sorting the whole vocabulary
            return x >= _nucleus_threshold(top_vals, top_p)
        x = x.masked_fill(~keep, float("-inf"))
    if top_p < 1.0:
        sorted_logits, _ = torch.sort(x, dim=-1, descending=True)
        nucleus = x >= _nucleus_threshold(sorted_logits, top_p)
        keep = nucleus if keep is None else keep & nucleus
    return keep


def _nucleus_threshold(sorted_logits: Tensor, top_p: float) -> Tensor:
    """[..., 1]: the logit of the least probable token of the nucleus of descending ``sorted_logits``."""
    probs = sorted_logits.float().softmax(dim=-1)
    # mass strictly before each token; the first token has 0 < top_p and is always kept
    before = probs.cumsum(dim=-1) - probs
    last = (before < top_p).sum(dim=-1, keepdim=True).clamp(min=1) - 1
    return sorted_logits.gather(-1, last)


def processed_logprobs(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    sampled_ids: Tensor | None = None,
) -> Tensor:
    """Log-softmax [..., V] (float32) of the distribution sampled from.

    ``logits / temperature``, then top-k and top-p truncation (others set to -inf, the mask
    computed without gradient), then ``log_softmax`` so that the kept tokens are renormalised.
    Differentiable with respect to ``logits``; truncated tokens get -inf and zero gradient.

    ``sampled_ids`` [...]: tokens that stay in the support whatever the truncation. The trainer
    passes the sampled completion: under the sampler's distribution each sampled token was kept
    by construction, but a policy that has moved since (a later mini-batch or epoch), the
    reference model, or bf16 rounding at the top-k / top-p boundary may truncate it, and its
    log-prob would be -inf (an infinite ratio or KL, and a NaN loss). Kept, it gets its
    probability among the kept tokens and itself; where it was kept anyway nothing changes.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scaled = logits.float()
    if temperature != 1.0:
        scaled = scaled / temperature
    keep = truncation_mask(scaled.detach(), top_k, top_p)
    if keep is not None:
        if sampled_ids is not None:
            keep = keep.scatter(-1, sampled_ids.unsqueeze(-1), True)
        scaled = scaled.masked_fill(~keep, float("-inf"))
    return F.log_softmax(scaled, dim=-1)


def entropy_from_logprobs(logprobs: Tensor) -> Tensor:
    """Entropy ``-sum p log p`` over the last dimension; truncated (-inf) tokens contribute 0.

    Written so that the gradient is finite (no ``0 * -inf``) on truncated tokens.
    """
    finite_min = torch.finfo(logprobs.dtype).min
    return -(logprobs.exp() * logprobs.clamp(min=finite_min)).sum(dim=-1)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids for left-padded rows: ``cumsum(mask) - 1``, clamped at 0 on padding."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def _accepts_logits_to_keep(model: Any) -> bool:
    cached = getattr(model, "_tether_logits_to_keep", None)
    if cached is None:
        try:
            cached = "logits_to_keep" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            cached = False
        try:
            model._tether_logits_to_keep = cached
        except AttributeError:  # pragma: no cover - exotic wrappers
            pass
    return bool(cached)


def sum_pi_squared(logprobs: Tensor) -> Tensor:
    """``sum_v pi(v)^2`` over the last dimension of normalised log-probs (truncated -inf entries: 0).

    With the probability of the sampled token, it gives the squared norm of the gradient of that
    token's log-prob with respect to the logits: ``||e_y - pi||^2 = 1 - 2 pi_y + sum_v pi_v^2``
    (OTB's logit-gradient proxy). Computed as ``exp(logsumexp(2 log pi))``, stable for any logits.
    """
    return torch.logsumexp(2.0 * logprobs, dim=-1).exp()


def _token_stats(
    logits: Tensor,
    completion_ids: Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    compute_entropy: bool,
    compute_sum_pi_squared: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    logp = processed_logprobs(logits, temperature, top_k, top_p, sampled_ids=completion_ids)
    token_logp = logp.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    ent = entropy_from_logprobs(logp) if compute_entropy else torch.zeros_like(token_logp)
    sq = sum_pi_squared(logp) if compute_sum_pi_squared else torch.zeros_like(token_logp)
    return token_logp, ent, sq


def prompt_groups(prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor] | None:
    """Rows that repeat a prompt (a GRPO group): ``(first, inverse)`` or None when all rows differ.

    ``first`` [U] holds one row of each distinct (ids, mask) pair and ``inverse`` [N] the distinct
    index of every row, so that ``prompt_ids[first][inverse] == prompt_ids``.
    """
    n = prompt_ids.shape[0]
    if n < 2:
        return None
    key = torch.cat([prompt_ids, prompt_mask.long()], dim=1)
    uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
    if uniq.shape[0] == n:
        return None
    first = torch.empty(uniq.shape[0], dtype=torch.long, device=prompt_ids.device)
    first.scatter_(0, inverse, torch.arange(n, device=prompt_ids.device))  # any row: they are equal
    return first, inverse


def _expand_cache_rows(cache: Any, inverse: Tensor) -> None:
    """Re-index every layer's keys/values from the U distinct prompts to the N rows.

    ``index_select`` keeps the backward pass deterministic; Hugging Face's
    ``batch_select_indices`` (advanced indexing) is the fallback for caches without per-layer
    ``keys`` / ``values`` tensors.
    """
    layers = getattr(cache, "layers", None)
    if layers and all(
        isinstance(getattr(layer, "keys", None), Tensor)
        and isinstance(getattr(layer, "values", None), Tensor)
        for layer in layers
    ):
        for layer in layers:
            layer.keys = layer.keys.index_select(0, inverse)
            layer.values = layer.values.index_select(0, inverse)
        return
    cache.batch_select_indices(inverse)


def _can_share_prompts(model: Any) -> bool:
    """Whether the prompt's keys/values can be computed once and reused by its group's rows.

    Needs a key/value cache that can be re-indexed by row (Hugging Face's ``DynamicCache``), so
    not under activation checkpointing (which turns the cache off) nor with sliding-window or
    mixed attention layers (whose caches drop keys that the plain pass's mask would keep).
    """
    from tether.lm.model import is_checkpointing

    config = getattr(model, "config", None)
    if config is None or is_checkpointing(model):
        return False
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return False
    layer_types = getattr(config, "layer_types", None)
    return not (layer_types and any(t != "full_attention" for t in layer_types))


def resolve_share_prompts(setting: bool | Literal["auto"], device: torch.device) -> bool:
    """``auto`` shares prompts on the CPU only: on a GPU the extra model call and the cache
    re-indexing cost more than they saved in every batch measured (BENCHMARKS.md)."""
    return device.type == "cpu" if setting == "auto" else bool(setting)


def completion_logits(
    model: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    share_prompts: bool | Literal["auto"] = "auto",
) -> Tensor:
    """The model's logits [N, T, V] at the positions that predict each completion token.

    The input is ``cat(prompt, completion[:, :-1])`` (prompts left-padded, completions
    right-padded; the last completion token predicts nothing, so it is not fed), with the
    attention mask and position ids ``cumsum(mask) - 1``.

    ``share_prompts``: when rows repeat a prompt (G samples per prompt), each distinct prompt
    runs through the model once and its keys/values are re-indexed to its rows; the completions
    then run on top of that cache (Prefix Grouper, Liu et al. 2025, arXiv 2506.05433). The
    computation is the same, so the logits and their gradients equal the plain pass's up to
    float rounding (tested), at ``U * P + N * (T - 1)`` instead of ``N * (P + T - 1)`` token
    positions. Models that cannot do it (see ``_can_share_prompts``) get the plain pass. With
    dropout active, a group's rows share the prompt's dropout mask. ``"auto"`` shares on the
    CPU only (:func:`resolve_share_prompts`).

    The passes run under the model's autocast (:func:`tether.lm.precision.autocast_context`).
    """
    with autocast_context(model):
        return _completion_logits(
            model, prompt_ids, prompt_mask, completion_ids, completion_mask, share_prompts
        )


def _completion_logits(
    model: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    share_prompts: bool | Literal["auto"],
) -> Tensor:
    t = completion_ids.shape[1]
    p = prompt_ids.shape[1]
    full_mask = torch.cat([prompt_mask, completion_mask[:, :-1]], dim=1).long()
    position_ids = position_ids_from_mask(full_mask)
    keep = _accepts_logits_to_keep(model)
    share = resolve_share_prompts(share_prompts, prompt_ids.device)
    groups = prompt_groups(prompt_ids, prompt_mask) if share else None
    if groups is not None and t > 0 and _can_share_prompts(model):
        first, inverse = groups
        out = model(
            input_ids=prompt_ids[first],
            attention_mask=full_mask[first, :p],
            position_ids=position_ids[first, :p],
            use_cache=True,
            **({"logits_to_keep": 1} if keep else {}),
        )
        cache = getattr(out, "past_key_values", None)
        if cache is not None and hasattr(cache, "batch_select_indices"):
            # index_select, not x[inverse]: the CPU backward of advanced indexing accumulates in
            # parallel in no fixed order, so runs (and resumes) would differ in the last bits.
            head: Tensor = out.logits[:, -1:, :].index_select(0, inverse)  # predicts the first token
            if t == 1:
                return head
            _expand_cache_rows(cache, inverse)  # [U, ...] -> [N, ...], differentiable
            rest = model(
                input_ids=completion_ids[:, :-1],
                attention_mask=full_mask,
                position_ids=position_ids[:, p:],
                past_key_values=cache,
                use_cache=False,
            ).logits
            return torch.cat([head, rest], dim=1)
    out = model(
        input_ids=torch.cat([prompt_ids, completion_ids[:, :-1]], dim=1),
        attention_mask=full_mask,
        position_ids=position_ids,
        use_cache=False,
        **({"logits_to_keep": t} if keep else {}),
    )
    logits: Tensor = out.logits
    return logits[:, logits.shape[1] - t :, :]


class TokenStats(NamedTuple):
    """Per-token statistics of the processed distribution at each completion position, [N, T] each
    (0 on padding): the sampled token's log-prob, the entropy (None unless asked for) and
    ``sum_v pi(v)^2`` (None unless asked for)."""

    logprobs: Tensor
    entropy: Tensor | None
    sum_pi_squared: Tensor | None


def completion_token_stats(
    model: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    compute_entropy: bool = True,
    logits_chunk: int | None = None,
    share_prompts: bool | Literal["auto"] = "auto",
    compute_sum_pi_squared: bool = False,
) -> TokenStats:
    """:func:`completion_logprobs`, with ``sum_v pi(v)^2`` per position as well when
    ``compute_sum_pi_squared`` (the ``sum_pi_squared`` input of OTB; no full-vocabulary tensor is
    kept)."""
    n, t = completion_ids.shape
    if t == 0:
        empty = completion_ids.new_zeros((n, 0), dtype=torch.float32)
        return TokenStats(
            empty,
            empty.clone() if compute_entropy else None,
            empty.clone() if compute_sum_pi_squared else None,
        )
    chunk = n if not logits_chunk or logits_chunk <= 0 else logits_chunk

    parts: list[tuple[Tensor, Tensor, Tensor]] = []
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        logits = completion_logits(
            model,
            prompt_ids[rows],
            prompt_mask[rows],
            completion_ids[rows],
            completion_mask[rows],
            share_prompts=share_prompts,
        )
        args = (
            logits,
            completion_ids[rows],
            temperature,
            top_k,
            top_p,
            compute_entropy,
            compute_sum_pi_squared,
        )
        if torch.is_grad_enabled() and logits.requires_grad:
            parts.append(checkpoint(_token_stats, *args, use_reentrant=False))
        else:
            parts.append(_token_stats(*args))
    mask = completion_mask.bool()

    def column(i: int) -> Tensor:
        return torch.where(mask, torch.cat([p[i] for p in parts], dim=0), 0.0)

    return TokenStats(
        column(0), column(1) if compute_entropy else None, column(2) if compute_sum_pi_squared else None
    )


def completion_logprobs(
    model: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    compute_entropy: bool = True,
    logits_chunk: int | None = None,
    share_prompts: bool | Literal["auto"] = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs [N, T] of ``completion_ids`` under the processed distribution.

    One forward pass of ``model`` (see :func:`completion_logits`; ``share_prompts`` computes a
    repeated prompt once). Only the logits of the positions that predict completion tokens are
    materialised. Returns ``(logprobs, entropy)``: entropy [N, T] of the processed distribution
    at each completion position (``None`` if ``compute_entropy`` is False); both are 0 where
    ``completion_mask`` is False and both carry gradients.

    ``logits_chunk``: number of rows per forward pass (None: the whole batch at once). When
    gradients are on, the log-softmax/entropy step of each chunk is checkpointed so that only
    the logits [chunk, T, V] are kept for the backward pass, not several float32 copies.
    """
    stats = completion_token_stats(
        model,
        prompt_ids,
        prompt_mask,
        completion_ids,
        completion_mask,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        compute_entropy=compute_entropy,
        logits_chunk=logits_chunk,
        share_prompts=share_prompts,
    )
    return stats.logprobs, stats.entropy


def completion_distribution(
    model: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    share_prompts: bool | Literal["auto"] = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Like :func:`completion_logprobs`, but also returns the whole processed distribution.

    Returns ``(logprobs [N, T], entropy [N, T], distribution [N, T, V])`` where ``distribution``
    holds the processed log-probabilities of every vocabulary entry at each completion position
    (the ``logits`` input of catalogue entries that need the full distribution: SIREN, Lp-Reg,
    GRPO-Guard, ROVER, DCPO). Padded positions hold zeros in all three.
    """
    logits = completion_logits(
        model, prompt_ids, prompt_mask, completion_ids, completion_mask, share_prompts=share_prompts
    )
    logp = processed_logprobs(logits, temperature, top_k, top_p, sampled_ids=completion_ids)
    mask = completion_mask.bool()
    token_logp = torch.where(mask, logp.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1), 0.0)
    entropy = torch.where(mask, entropy_from_logprobs(logp), 0.0)
    # -inf entries (truncated by top-k / top-p) stay finite for downstream arithmetic.
    dist = torch.where(mask.unsqueeze(-1), logp.clamp(min=-1e4), 0.0)
    return token_logp, entropy, dist
