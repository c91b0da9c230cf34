"""RLVMR: episode advantage plus a tag-normalised meta-reasoning step advantage."""

from __future__ import annotations

from typing import Literal

import torch

from tether.catalogue.advantages.broadcast import check_outcome, to_tokens
from tether.catalogue.advantages.group_stats import (
    GRPO_EPS,
    group_stats,
    groups_of,
    grpo_standardise,
    verl_single_sample,
)
from tether.catalogue.contracts import Metrics, check_groups, check_same_shape, detached
from tether.catalogue.registry import register
from tether.errors import InvalidInputError

TAG_NAMES = {1: "planning", 2: "explore", 3: "reflection"}


def _normalise(values: torch.Tensor, keys: torch.Tensor, mode: str, eps: float) -> torch.Tensor:
    stats = group_stats(values, groups_of(keys, values.shape[0]))
    if mode == "mean":
        return values - verl_single_sample(stats)[0]
    return grpo_standardise(values, stats, eps)


def step_runs(step_tags: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps = maximal runs of valid tokens carrying the same nonzero tag within a row.

    Returns (run index per token [B, T], -1 where untagged or padding; start flag [B, T]).
    """
    tagged = (step_tags > 0) & response_mask.bool()
    prev_tag = torch.nn.functional.pad(step_tags[:, :-1], (1, 0), value=0)
    prev_tagged = torch.nn.functional.pad(tagged[:, :-1], (1, 0), value=False)
    start = tagged & (~prev_tagged | (prev_tag != step_tags))
    run = torch.cumsum(start.flatten().long(), 0).reshape(step_tags.shape) - 1
    return torch.where(tagged, run, torch.full_like(run, -1)), start


@register(
    "advantage",
    "rlvmr",
    paper="RLVMR: Reinforcement Learning with Verifiable Meta-Reasoning Rewards for Robust Long-Horizon Agents",
    arxiv="2507.22844",
    status="exact",
    card="adv#B29",
)
def rlvmr(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    response_mask: torch.Tensor,
    step_tags: torch.Tensor,
    step_rewards: torch.Tensor,
    step_weight: float = 0.5,
    norm: Literal["mean_std", "mean"] = "mean_std",
    eps: float = GRPO_EPS,
) -> tuple[torch.Tensor, Metrics]:
    """RLVMR: A = A_ep + w A_tag on tagged meta-reasoning steps, A_ep elsewhere.

    Paper: Zhang et al., "RLVMR: Reinforcement Learning with Verifiable Meta-Reasoning Rewards for
    Robust Long-Horizon Agents", arXiv 2507.22844. Exact (zzjweb/digitalhuman RLVMR/code,
    core_rlvmr.py; defaults: w = 0.5 from the config (1.0 in the ALFWorld script), mean_std_norm).

    Inputs: rewards, group_ids [B]; response_mask [B, T]; ``step_tags`` [B, T] long with 0 = untagged,
    1 = <planning>, 2 = <explore>, 3 = <reflection>; ``step_rewards`` [B, T] the meta-reasoning reward
    of the step each token belongs to (R_plan / R_exp / R_ref / invalid-action penalty, computed by
    the environment), constant over a step. A step is a maximal run of valid tokens with the same
    nonzero tag (separate consecutive same-tag turns by an untagged or masked token); its reward is
    read at its first token.
      A_ep  = (r - mean_g r) / (std_g r + eps)     ("mean": r - mean_g r)
      A_tag = the same normalisation of step rewards over the steps of one (prompt group, tag)
      A_{i,t} = A_ep_i + w A_tag(step of t) on tagged tokens, A_ep_i on untagged tokens.
    A lone step (or sample) in its normalisation set uses mean 0, std 1 (verl's convention).
    """
    check_outcome(rewards, response_mask)
    check_groups(group_ids, rewards.shape[0])
    check_same_shape("response_mask", response_mask, step_tags=step_tags, step_rewards=step_rewards)
    if norm not in ("mean_std", "mean"):
        raise InvalidInputError(f"rlvmr: norm must be 'mean_std' or 'mean', got {norm!r}")
    if bool((step_tags < 0).any()) or bool((step_tags > 3).any()):
        raise InvalidInputError(
            "rlvmr: step_tags must be 0 (untagged), 1 (planning), 2 (explore) or 3 (reflection)"
        )
    r = rewards.detach()
    a_ep = _normalise(r, group_ids, norm, eps)
    tags = step_tags.long()
    run, start = step_runs(tags, response_mask)
    token_adv = a_ep.unsqueeze(-1).expand(response_mask.shape).clone().to(r.dtype)
    n_runs = int(start.sum().item())
    if n_runs > 0:
        rows = torch.arange(tags.shape[0], device=tags.device).unsqueeze(-1).expand_as(tags)
        run_reward = step_rewards.detach().to(r.dtype)[start]
        run_tag = tags[start]
        run_group = group_ids[rows[start]]
        key = run_group.long() * 4 + run_tag
        run_adv = _normalise(run_reward, key, norm, eps)
        gathered = run_adv[run.clamp(min=0)]
        token_adv = torch.where(run >= 0, token_adv + step_weight * gathered, token_adv)
    out = to_tokens(token_adv, response_mask)
    valid = response_mask.bool()
    tagged = run >= 0
    metrics: Metrics = {
        "rlvmr/episode_adv_abs_mean": detached(a_ep.abs().mean()),
        "rlvmr/tagged_token_frac": detached(
            tagged.to(r.dtype).sum() / valid.to(r.dtype).sum().clamp(min=1.0)
        ),
        "rlvmr/num_steps": detached(float(n_runs)),
    }
    return out, metrics
