"""D^3S: dynamic dual-level down-sampling (samples by advantage variance, tokens by |A| x entropy)."""

from __future__ import annotations

import math
from typing import Literal

import torch

from tether.catalogue.advantages.group_stats import groups_of
from tether.catalogue.aggregate import masked_seq_mean
from tether.catalogue.contracts import Metrics, check_2d, check_groups, check_same_shape, detached
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


def max_variance_subset(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of a size-k subset of ``values`` [n] with the largest variance.

    For scalars the optimum is the k_top largest plus the k - k_top smallest values: sort once
    and scan k_top = 0..k.
    """
    n = values.numel()
    k = max(0, min(k, n))
    if k == n:
        return torch.arange(n, device=values.device)
    order = torch.argsort(values)
    best_var, best_top = -math.inf, 0
    for k_top in range(k + 1):
        idx = torch.cat([order[: k - k_top], order[n - k_top :]]) if k_top > 0 else order[:k]
        sub = values[idx]
        var = float(((sub - sub.mean()) ** 2).mean()) if k > 0 else 0.0
        if var > best_var + 1e-12:
            best_var, best_top = var, k_top
    if best_top > 0:
        return torch.cat([order[: k - best_top], order[n - best_top :]])
    return order[:k]


@register(
    "selection",
    "d3s",
    paper="Learning More with Less: A Dynamic Dual-Level Down-Sampling Framework for Efficient Policy "
    "Optimization",
    arxiv="2509.22115",
    status="reconstructed",
    card="adv#B5",
)
def d3s(
    advantages: torch.Tensor,
    group_ids: torch.Tensor,
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
    kappa_sample: float = 0.5,
    kappa_token: float = 0.5,
    scope: Literal["group", "batch"] = "group",
) -> tuple[torch.Tensor, Metrics]:
    """D^3S: keep the rollouts that maximise advantage variance, then their top |A| x H tokens.

    Paper: "Learning More with Less: A Dynamic Dual-Level Down-Sampling Framework for Efficient
    Policy Optimization", arXiv 2509.22115. Reconstructed (no public code; card adv#B5).

    Sample level: in each group ("group", D3S-I) or over the batch ("batch"), choose S with
    |S| = k = ceil(kappa_sample G) maximising Var_{i in S}(A_i) (top k_top + bottom k - k_top, scanned).
    Token level: score s_{i,t} = |A_{i,t}| H_{i,t}; keep the top ceil(kappa_token N) valid tokens of the
    selected samples (N = their valid tokens). Returns a [B, T] bool token mask; aggregate the loss
    over it (token-mean then divides by the kept count). Advantages are not recomputed on the subset.
    ``entropy`` should be the behaviour policy's (used detached). kappa schedules (rising to 1 over
    training) and their start values are unknown; 0.5 is our default. kappa = 1 keeps every token.
    """
    check_2d("response_mask", response_mask)
    check_groups(group_ids, response_mask.shape[0])
    check_same_shape("response_mask", response_mask, entropy=entropy)
    if not (0.0 < kappa_sample <= 1.0 and 0.0 < kappa_token <= 1.0):
        raise InvalidInputError(
            f"d3s: kappa_sample and kappa_token must be in (0, 1], got {kappa_sample}, {kappa_token}"
        )
    if scope not in ("group", "batch"):
        raise InvalidInputError(f"d3s: scope must be 'group' or 'batch', got {scope!r}")
    valid = response_mask.bool()
    adv = advantages.detach()
    if adv.dim() == 2:
        check_same_shape("response_mask", response_mask, advantages=adv)
        sample_adv = masked_seq_mean(adv, response_mask)
        token_adv = adv
    else:
        sample_adv = adv
        token_adv = adv.unsqueeze(-1).expand(response_mask.shape)
    keep_sample = torch.zeros(adv.shape[0], dtype=torch.bool, device=adv.device)
    if scope == "group":
        groups = groups_of(group_ids, response_mask.shape[0])
        inverse, n = groups.index, groups.num
    else:
        inverse, n = torch.zeros_like(group_ids), 1
    for g in range(n):
        members = torch.nonzero(inverse == g).flatten()
        k = math.ceil(kappa_sample * members.numel() - 1e-9)
        chosen = max_variance_subset(sample_adv[members], k)
        keep_sample[members[chosen]] = True
    candidates = valid & keep_sample.unsqueeze(-1)
    n_tok = int(candidates.sum().item())
    k_tok = math.ceil(kappa_token * n_tok - 1e-9)
    score = token_adv.abs() * entropy.detach().abs()
    flat = torch.where(candidates, score, torch.full_like(score, -1.0)).flatten()
    token_mask = torch.zeros_like(flat, dtype=torch.bool)
    if k_tok > 0:
        top = torch.topk(flat, k_tok).indices
        token_mask[top] = True
    token_mask = token_mask.reshape(response_mask.shape) & candidates
    metrics: Metrics = {
        "selection/sample_kept_frac": detached(
            keep_sample.float().mean() if adv.numel() else torch.zeros(())
        ),
        "selection/token_kept_frac": detached(token_mask.sum().float() / valid.sum().float().clamp(min=1.0)),
        "selection/kept_tokens": detached(float(token_mask.sum().item())),
    }
    return token_mask, metrics
