"""KL-to-reference estimators k1, k2, k3, low-variance k3, k3+ and |D| as loss terms (card ratio#B8).

All take the sampled-token log-probs of the current policy (``logprobs``) and of the frozen
reference (``ref_logprobs``) and return ``coef * aggregate(k(D))`` with D = lp - lp_ref, to be ADDED
to the policy loss. The coefficient is applied inside (parameter ``coef``).

What each one does to the gradient when used as a LOSS on on-policy samples (y ~ pi_theta),
checked on an exact categorical toy in tests/catalogue/test_kl.py:

- k1 = D:                     E[grad k1] = 0 (no pull at all; k1 belongs in the reward).
- k2 = D^2 / 2:               E[grad k2] = grad KL(pi_theta || pi_ref) (reverse KL).
- k3 = exp(-D) + D - 1:       E[grad k3] = grad KL(pi_ref || pi_theta) (forward KL, mass-covering).
- k3+ (value k3, grad k2):    the reverse-KL gradient with k3's low-variance, non-negative value.

Metrics: ``reg/kl`` is the aggregated estimate without the coefficient [TRL ``kl``; verl
``actor/kl_loss``]; ``reg/kl_loss`` is the term added to the loss (coef * reg/kl).

Fixed or adaptive coefficient: every estimator registers :func:`adaptive_kl_coef` (Ziegler et al.
2019) as its state update, so a recipe makes ``coef`` track a KL target by giving the entry a
``state`` (the trainer calls the update after each step with that step's KL)::

    regularizers:
      - name: kl_k3
        params: {coef: 0.04}
        state: {param: coef, inputs: {kl: policy/kl_ref}, params: {target: 0.01}}
"""

from __future__ import annotations

import torch

from tether.catalogue.aggregate import AggregationLike, aggregate, local
from tether.catalogue.contracts import LossOutput, check_2d, check_same_shape, detached
from tether.catalogue.ratio import log_ratio
from tether.catalogue.registry import register
from tether.errors import InvalidInputError

DEEPSEEKMATH = "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models"
PITFALLS = "On a few pitfalls in KL divergence gradient estimation for RL"

LOW_VAR_EXP_CLAMP = 20.0
LOW_VAR_VALUE_CLAMP = 10.0


def masked_log_ratio(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """D = lp - lp_ref on valid tokens and exactly 0 on padding (so no inf reaches a padded gradient)."""
    check_2d("logprobs", logprobs)
    check_same_shape("logprobs", logprobs, ref_logprobs=ref_logprobs, response_mask=response_mask)
    diff = logprobs - ref_logprobs.to(logprobs.dtype)
    return torch.where(response_mask.bool(), diff, torch.zeros((), dtype=diff.dtype, device=diff.device))


def k1_per_token(d: torch.Tensor) -> torch.Tensor:
    """k1 = D."""
    return d


def k2_per_token(d: torch.Tensor) -> torch.Tensor:
    """k2 = D^2 / 2 (verl ``mse``)."""
    return 0.5 * d.square()


def k3_per_token(d: torch.Tensor) -> torch.Tensor:
    """k3 = exp(-D) + D - 1, unclamped (TRL ``per_token_kl``); >= 0 and 0 iff D = 0."""
    return torch.exp(-d) + d - 1.0


def low_var_kl_per_token(d: torch.Tensor) -> torch.Tensor:
    """verl ``low_var_kl``: k3 with its exp argument clamped to [-20, 20] and the result to [-10, 10]."""
    x = torch.clamp(-d, -LOW_VAR_EXP_CLAMP, LOW_VAR_EXP_CLAMP)
    return torch.clamp(torch.exp(x) - x - 1.0, -LOW_VAR_VALUE_CLAMP, LOW_VAR_VALUE_CLAMP)


def k3_plus_per_token(d: torch.Tensor) -> torch.Tensor:
    """verl ``k3+``: the value of low_var_kl with the gradient of k2 (straight-through)."""
    k2 = k2_per_token(d)
    return k2 - k2.detach() + low_var_kl_per_token(d).detach()


def adaptive_kl_coef(
    coef: float, kl: float, target: float, rate: float = 0.1, error_clip: float = 0.2
) -> float:
    """The adaptive KL controller of Ziegler et al., "Fine-Tuning Language Models from Human
    Preferences", arXiv 1909.08593, section 2.2: one step.

    e = clip(kl / target - 1, -error_clip, error_clip);  coef <- coef * (1 + rate * e).

    ``rate`` is the paper's K_beta (0.1); the authors' code (openai/lm-human-preferences,
    ``AdaptiveKLController``) writes it as n_steps / horizon, the episodes of the update over a
    horizon of 10000 episodes. Exact. The coefficient grows while the measured KL is above
    ``target`` and shrinks while it is below, by at most 2% a step with the defaults. ``kl`` is
    the step's KL on whatever scale the recipe wires in (``policy/kl_ref`` is a token mean of k3;
    the paper's KL, and its target of 6 nats, are per sequence): set ``target`` on that scale.
    Pure: returns the new coefficient.
    """
    if not target > 0:
        raise InvalidInputError(
            f"adaptive_kl_coef: target must be a KL > 0, got {target!r}; give it in the recipe's "
            "state.params (e.g. {target: 0.01} for the token-mean policy/kl_ref)"
        )
    if rate < 0 or error_clip < 0:
        raise InvalidInputError(
            f"adaptive_kl_coef: rate and error_clip must be >= 0, got {rate}, {error_clip}"
        )
    error = min(max(float(kl) / target - 1.0, -error_clip), error_clip)
    return float(coef * (1.0 + rate * error))


def _finish(
    per_token: torch.Tensor, response_mask: torch.Tensor, coef: float, aggregation: AggregationLike
) -> LossOutput:
    if coef < 0:
        raise InvalidInputError(f"coef must be >= 0 (a KL penalty), got {coef}")
    term = coef * aggregate(per_token, response_mask, aggregation)
    kl = aggregate(per_token.detach(), response_mask, local(aggregation))
    return term, {"reg/kl": detached(kl), "reg/kl_loss": detached(term)}


@register(
    "regularizer",
    "kl_k1",
    paper=PITFALLS,
    arxiv="2506.09477",
    status="exact",
    card="ratio#B8",
    state_update=adaptive_kl_coef,
)
def kl_k1(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    coef: float = 0.04,
    aggregation: AggregationLike = "seq-mean-token-mean",
) -> LossOutput:
    """k1 KL estimate D = lp - lp_ref as a loss term: unbiased value, zero expected gradient.

    Paper: "On a few pitfalls in KL divergence gradient estimation for RL",
    arXiv 2506.09477 (the estimator is Schulman's k1; verl ``kl_penalty="k1"``). Exact.

    term = coef * agg(lp - lp_ref). On-policy E[k1] = KL(pi || pi_ref) but E[grad k1] = 0:
    as a loss it adds only noise. Use it in the reward (R - beta * k1) for the reverse-KL
    policy gradient. Defaults follow GRPO (beta 0.04, seq-mean-token-mean; see ``kl_k3``).
    """
    d = masked_log_ratio(logprobs, ref_logprobs, response_mask)
    return _finish(k1_per_token(d), response_mask, coef, aggregation)


@register(
    "regularizer",
    "kl_k2",
    paper=PITFALLS,
    arxiv="2506.09477",
    status="exact",
    card="ratio#B8",
    state_update=adaptive_kl_coef,
)
def kl_k2(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    coef: float = 0.04,
    aggregation: AggregationLike = "seq-mean-token-mean",
) -> LossOutput:
    """k2 = (lp - lp_ref)^2 / 2: biased value, but its gradient is the reverse-KL gradient.

    Paper: "On a few pitfalls in KL divergence gradient estimation for RL",
    arXiv 2506.09477 (verl ``kl_penalty="mse"`` / ``"k2"``). Exact.

    term = coef * agg(0.5 (lp - lp_ref)^2). On-policy E[grad k2] = grad KL(pi_theta || pi_ref)
    (per-token, i.e. without the credit of later tokens). Defaults follow GRPO (0.04,
    seq-mean-token-mean).
    """
    d = masked_log_ratio(logprobs, ref_logprobs, response_mask)
    return _finish(k2_per_token(d), response_mask, coef, aggregation)


@register(
    "regularizer",
    "kl_k3",
    paper=DEEPSEEKMATH,
    arxiv="2402.03300",
    status="exact",
    card="ratio#B8",
    state_update=adaptive_kl_coef,
    aliases=("grpo_kl",),
)
def kl_k3(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    coef: float = 0.04,
    aggregation: AggregationLike = "seq-mean-token-mean",
    old_logprobs: torch.Tensor | None = None,
) -> LossOutput:
    """GRPO's KL penalty k3 = exp(lp_ref - lp) - (lp_ref - lp) - 1, unclamped (TRL exactly).

    Paper: Shao et al., "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
    Language Models", arXiv 2402.03300 (GRPO objective, beta = 0.04). Exact (= TRL
    ``per_token_kl``).

    term = coef * agg(exp(lp_ref - lp) - (lp_ref - lp) - 1), seq-mean-token-mean as in GRPO.
    k3 >= 0, = 0 iff lp = lp_ref; on-policy E[k3] = KL(pi || pi_ref) but E[grad k3] =
    grad KL(pi_ref || pi) (forward KL). Other defaults: TRL ``beta`` = 0 (no reference model),
    verl examples ``kl_loss_coef`` = 0.001 with ``low_var_kl`` (see ``kl_low_var``).
    Unclamped: exp(lp_ref - lp) overflows float32 once lp_ref - lp > 88; use ``kl_low_var`` for
    a clamped version.

    ``old_logprobs`` (optional): TRL ``use_bias_correction_kl`` (DeepSeek-V3.2) multiplies k3
    by the importance ratio r = exp(lp - lp_old) (log r clamped to [-20, 20]); as in TRL, r
    carries the gradient.
    """
    d = masked_log_ratio(logprobs, ref_logprobs, response_mask)
    per_token = k3_per_token(d)
    if old_logprobs is not None:
        check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs)
        log_r = log_ratio(logprobs, old_logprobs.to(logprobs.dtype))
        log_r = torch.where(
            response_mask.bool(), log_r, torch.zeros((), dtype=log_r.dtype, device=log_r.device)
        )
        per_token = per_token * torch.exp(log_r)
    return _finish(per_token, response_mask, coef, aggregation)


@register(
    "regularizer",
    "kl_low_var",
    paper=DEEPSEEKMATH,
    arxiv="2402.03300",
    status="exact",
    card="ratio#B8",
    state_update=adaptive_kl_coef,
    aliases=("low_var_kl",),
)
def kl_low_var(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    coef: float = 0.04,
    aggregation: AggregationLike = "seq-mean-token-mean",
) -> LossOutput:
    """verl's ``low_var_kl``: GRPO's k3 with clamps, safe under large log-ratios.

    Paper: Shao et al., "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
    Language Models", arXiv 2402.03300 (the k3 estimator). Exact (verl ``kl_penalty``).

    x = clamp(lp_ref - lp, -20, 20); k = clamp(exp(x) - x - 1, -10, 10); term = coef * agg(k).
    Equal to ``kl_k3`` while k3 <= 10; beyond the clamps the token has zero gradient.
    Defaults follow the GRPO paper (0.04, seq-mean-token-mean); verl examples use
    ``kl_loss_coef`` = 0.001 with ``loss_agg_mode`` token-mean.
    """
    d = masked_log_ratio(logprobs, ref_logprobs, response_mask)
    return _finish(low_var_kl_per_token(d), response_mask, coef, aggregation)


@register(
    "regularizer",
    "kl_k3_plus",
    paper=PITFALLS,
    arxiv="2506.09477",
    status="exact",
    card="ratio#B8",
    state_update=adaptive_kl_coef,
)
def kl_k3_plus(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    coef: float = 0.04,
    aggregation: AggregationLike = "seq-mean-token-mean",
) -> LossOutput:
    """verl's ``k3+``: the value of (low-variance) k3 with the gradient of k2 (reverse KL).

    Paper: "On a few pitfalls in KL divergence gradient estimation for RL",
    arXiv 2506.09477 (why k2's gradient is the right one). Exact (verl ``kl_penalty="k3+"``).

    k = k2 - sg(k2) + sg(low_var_kl), k2 = (lp - lp_ref)^2 / 2; term = coef * agg(k). The logged
    value is verl's clamped k3, the expected gradient that of KL(pi_theta || pi_ref).
    """
    d = masked_log_ratio(logprobs, ref_logprobs, response_mask)
    return _finish(k3_plus_per_token(d), response_mask, coef, aggregation)


@register(
    "regularizer",
    "kl_abs",
    paper=PITFALLS,
    arxiv="2506.09477",
    status="exact",
    card="ratio#B8",
    state_update=adaptive_kl_coef,
)
def kl_abs(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    coef: float = 0.04,
    aggregation: AggregationLike = "seq-mean-token-mean",
) -> LossOutput:
    """|lp - lp_ref| as a KL proxy (verl ``kl_penalty="abs"``): non-negative but biased.

    Paper: "On a few pitfalls in KL divergence gradient estimation for RL",
    arXiv 2506.09477 (analysis of differentiating KL estimates). Exact (verl ``kl_penalty``).

    term = coef * agg(|lp - lp_ref|); gradient coef * sign(D) per token (0 at D = 0).
    """
    d = masked_log_ratio(logprobs, ref_logprobs, response_mask)
    return _finish(d.abs(), response_mask, coef, aggregation)
