"""Flow of Reasoning: GFlowNet trajectory balance, so trajectories are sampled in proportion to reward."""

from __future__ import annotations

import torch

from tether.catalogue.advantages.group_stats import groups_of
from tether.catalogue.contracts import LossOutput, check_2d, check_groups, check_same_shape, detached
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


@register(
    "policy_loss",
    "flow_of_reasoning",
    paper="Flow of Reasoning: Efficient Training of LLM Policy with Divergent Thinking",
    arxiv="2406.05673",
    status="exact",
    card="ratio#18",
)
def flow_of_reasoning(
    logprobs: torch.Tensor,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    response_mask: torch.Tensor,
    beta_r: float = 1.0,
    per_group: bool = True,
    reward_floor: float | None = 1e-4,
    log_z: torch.Tensor | None = None,
    backward_logprobs: torch.Tensor | None = None,
) -> LossOutput:
    """FoR: trajectory balance with log Z estimated as the mean (VarGrad), so P_F(tau) becomes proportional to R(tau).

    Paper: Yu et al., "Flow of Reasoning: Efficient Training of LLM Policy with Divergent Thinking",
    arXiv 2406.05673. Exact (cards ratio#18 and adv#B31, Yu-Fangxu/FoR "logpartition" mode).

    log P_F(tau_j) = sum_t lp_{j,t} over valid tokens; s_j = log P_F(tau_j) - beta_r log R_j - log P_B(tau_j)
    (log P_B = ``backward_logprobs`` [B], 0 by default: a tree). VarGrad (default, ``log_z`` None):
    loss = (1/B) sum_j (s_j - mean s)^2, with the mean over the trajectories of the same prompt
    (``per_group=True``) or over the whole batch (``per_group=False``, the released code's form: its
    batches hold one problem, so both agree there; with several prompts log Z(x) differs per prompt,
    hence per-group is the default). Learned-Z trajectory balance (``log_z`` given, scalar or [B] per
    row, it receives a gradient): loss = (1/B) sum_j (log Z + s_j)^2. B counts rows with a valid token.
    The loss is 0 iff every s_j (of a group) is equal, i.e. P_F is proportional to R^beta_r on the batch,
    and adding a constant to every log R leaves the VarGrad loss unchanged.
    Rewards must be positive. Binary verifiers give 0: with ``reward_floor`` (default 1e-4, not from
    the paper, whose reward adds a positive likelihood term) R is clamped to >= reward_floor before the
    log; ``reward_floor=None`` raises on any R <= 0. Negative rewards always raise.
    """
    check_2d("logprobs", logprobs)
    check_same_shape("logprobs", logprobs, response_mask=response_mask)
    batch = logprobs.shape[0]
    check_groups(group_ids, batch)
    if rewards.dim() != 1 or rewards.shape[0] != batch:
        raise InvalidInputError(
            f"flow_of_reasoning: rewards must be a [batch] tensor ({batch}), got shape {tuple(rewards.shape)}"
        )
    if beta_r <= 0:
        raise InvalidInputError(
            f"flow_of_reasoning: beta_r must be > 0 (the paper anneals 1 -> 2), got {beta_r}"
        )
    if reward_floor is not None and reward_floor <= 0:
        raise InvalidInputError(f"flow_of_reasoning: reward_floor must be > 0 or None, got {reward_floor}")
    if bool((rewards < 0).any()):
        raise InvalidInputError(
            "flow_of_reasoning: rewards must be >= 0 (GFlowNets sample in proportion to R); "
            "shift or exponentiate negative rewards before this loss"
        )
    if reward_floor is None and bool((rewards <= 0).any()):
        raise InvalidInputError(
            "flow_of_reasoning: rewards must be > 0 because log R is taken; pass reward_floor=1e-4 "
            "(or another epsilon) to clamp zero rewards, or add a positive constant to the reward"
        )
    if backward_logprobs is not None and backward_logprobs.shape != (batch,):
        raise InvalidInputError(
            f"flow_of_reasoning: backward_logprobs must be [batch] ({batch}), got {tuple(backward_logprobs.shape)}"
        )
    if log_z is not None and log_z.dim() != 0 and log_z.shape != (batch,):
        raise InvalidInputError(
            f"flow_of_reasoning: log_z must be a scalar or a [batch] tensor ({batch}), got {tuple(log_z.shape)}"
        )

    dtype = logprobs.dtype
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    valid = response_mask.bool()
    valid_rows = valid.any(-1)
    log_pf = torch.where(valid, logprobs, zero).sum(-1)
    r = rewards.to(dtype)
    if reward_floor is not None:
        r = r.clamp(min=reward_floor)
    log_reward = torch.log(r)
    s = log_pf - beta_r * log_reward
    if backward_logprobs is not None:
        s = s - backward_logprobs.to(dtype)
    s = torch.where(valid_rows, s, zero)
    n_valid = valid_rows.sum().to(dtype).clamp(min=1.0)

    if log_z is not None:
        residual = log_z.to(dtype) + s
        estimate = log_z.detach().to(dtype).expand(batch) if log_z.dim() == 0 else log_z.detach().to(dtype)
    else:
        if per_group:
            groups = groups_of(group_ids, batch)
            members, inverse = groups.members(valid_rows), groups.index
            m = members.to(dtype)
            group_mean = (m @ s) / m.sum(-1).clamp(min=1.0)
            baseline = group_mean[inverse]
        else:
            baseline = s.sum() / n_valid
        residual = s - baseline
        estimate = -baseline.detach() * torch.ones_like(s)
    per_row = torch.where(valid_rows, residual.square(), zero)
    loss = per_row.sum() / n_valid

    metrics = {"policy/loss": detached(loss)}
    with torch.no_grad():
        metrics["for/log_pf_mean"] = detached(torch.where(valid_rows, log_pf, zero).sum() / n_valid)
        metrics["for/log_reward_mean"] = detached(torch.where(valid_rows, log_reward, zero).sum() / n_valid)
        metrics["for/log_z_mean"] = detached(torch.where(valid_rows, estimate, zero).sum() / n_valid)
    return loss, metrics
