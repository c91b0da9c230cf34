"""OTB: the optimal token baseline, weighted by each sample's accumulated gradient energy."""

from __future__ import annotations

import torch

from tether.catalogue.advantages.baselines import AdvantageOutput
from tether.catalogue.advantages.broadcast import advantage_metrics, as_float, check_outcome
from tether.catalogue.advantages.group_stats import group_count, group_stats, group_sum, groups_of
from tether.catalogue.contracts import check_same_shape, detached
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


def path_energy(
    old_logprobs: torch.Tensor, sum_pi_squared: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """W_t = sum_{j <= t} (1 - 2 pi_j + sum_v pi_j(v)^2) over valid tokens, [B, T].

    Each term is ``||e_{y_j} - pi_j||^2``, the squared norm of the gradient of log pi(y_j) with
    respect to the logits (the logit-gradient proxy): >= 0, so it is clamped at 0 against rounding.
    """
    valid = response_mask.bool()
    w = (1.0 - 2.0 * old_logprobs.exp() + sum_pi_squared).clamp(min=0.0)
    return torch.where(valid, w, torch.zeros((), dtype=w.dtype)).cumsum(dim=-1)


@register(
    "advantage",
    "otb",
    paper="The Optimal Token Baseline: Variance Reduction for Long-Horizon LLM-RL",
    arxiv="2602.07078",
    status="exact",
    card="lessons#feature-bar",
    aliases=("optimal_token_baseline",),
    sampler_weights_conflict=(
        "its baseline must weight each token's energy by the squared sampler importance weight "
        "(verl: w_t * rho_t^2 when rollout IS correction is on), which it does not receive: the "
        "trainer applies the weights to the policy-gradient term only, after the advantages"
    ),
)
def otb(
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids: torch.Tensor,
    old_logprobs: torch.Tensor,
    sum_pi_squared: torch.Tensor,
    handle_zero_tail: bool = True,
    eps: float = 1e-8,
) -> AdvantageOutput:
    """OTB: A_t^i = G_t^i - B_t, with a baseline per token position weighted by gradient energy.

    Paper: Li et al., "The Optimal Token Baseline: Variance Reduction for Long-Horizon LLM-RL",
    arXiv 2602.07078. Exact against the authors' implementation in verl
    (``compute_optimal_token_baseline_advantage``, ``algorithm.adv_estimator=optimal_token_baseline``):

        w_j = 1 - 2 pi_old(y_j) + sum_v pi_old(v)^2        (= ||e_{y_j} - pi_old||^2, logit-gradient proxy)
        W_t^i = sum_{j <= t} w_j^i                           (realized energy up to token t)
        B_t = sum_i G_t^i W_t^i m_t^i / (sum_i W_t^i m_t^i + eps)   over the samples i of the group
        A_t^i = (G_t^i - B_t) m_t^i

    The variance-minimising baseline for token t weights each sample by the squared norm of its
    cumulative score function, which the proxy W_t estimates from forward probabilities alone.
    G_t is the reward-to-go; with one outcome reward per sample it is that reward at every token.
    ``sum_pi_squared`` [B, T] and ``old_logprobs`` come from the old policy's pass (the processed
    distribution: temperature and truncation applied). A single-sample group has baseline 0
    (advantage = reward). ``handle_zero_tail`` (verl's default, True): past the second-longest
    response of a group, a unique longest response is alone, its baseline would be its own reward
    and its advantage 0; its baseline there is set to 0 instead.

    Sampler importance weights (verl's ``rollout_is_weights``) are not supported: with rollout IS
    correction on, verl scales each token's energy by the squared weight, w_t rho_t^2, so that the
    baseline minimises the variance of the IS-weighted gradient. tether's ``train.sampler_correction``
    multiplies the advantages by the weights after this estimator and cannot hand them to it, so
    a run that combines ``otb`` with a sampler correction is refused at config load
    (``sampler_weights_conflict``) rather than run with the unweighted baseline.
    """
    check_outcome(rewards, response_mask)
    check_same_shape("old_logprobs", old_logprobs, sum_pi_squared=sum_pi_squared, response_mask=response_mask)
    if not eps > 0:
        raise InvalidInputError(f"otb: eps must be > 0, got {eps}")
    r = as_float(rewards)
    dtype = torch.promote_types(r.dtype, old_logprobs.dtype)
    valid = response_mask.bool()
    m = valid.to(dtype)
    groups = groups_of(group_ids, r.shape[0])
    energy = path_energy(old_logprobs.detach().to(dtype), sum_pi_squared.detach().to(dtype), valid)
    g = r.to(dtype).unsqueeze(-1).expand_as(energy) * m  # reward-to-go of an outcome reward
    num = group_sum(g * energy * m, groups)  # [Q, T]
    den = group_sum(energy * m, groups) + eps
    baseline = groups.gather(num / den)
    size = groups.gather(group_count(groups, dtype=dtype))
    baseline = torch.where((size > 1).unsqueeze(-1), baseline, torch.zeros((), dtype=dtype))
    if handle_zero_tail:
        lengths = valid.sum(-1)
        for q in range(groups.num):
            rows = (groups.index == q).nonzero().squeeze(-1)
            if rows.numel() < 2:
                continue
            ls, order = lengths[rows].sort(descending=True)
            if int(ls[0]) > int(ls[1]):  # a unique longest response
                baseline[rows[order[0]], int(ls[1]) :] = 0.0
    adv = torch.where(valid, g - baseline, torch.zeros((), dtype=dtype))
    metrics = advantage_metrics(adv, response_mask, r, group_stats(r, groups).zero_std_frac())
    with torch.no_grad():
        final = energy.gather(-1, (valid.sum(-1, keepdim=True) - 1).clamp(min=0)).squeeze(-1)
        has = valid.any(-1)
        metrics["otb/energy_mean"] = detached(final[has].mean() if bool(has.any()) else torch.zeros(()))
    return adv, metrics
