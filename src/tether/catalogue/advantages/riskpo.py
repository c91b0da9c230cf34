"""RiskPO: mixed Value-at-Risk advantages over bundles of prompts, with a quantile tracker."""

from __future__ import annotations

from typing import Literal

import torch

from tether.catalogue.advantages.broadcast import check_outcome, to_tokens
from tether.catalogue.advantages.group_stats import group_stats, groups_of, verl_single_sample
from tether.catalogue.contracts import Metrics, check_groups, detached
from tether.catalogue.registry import register
from tether.errors import InvalidInputError

RiskCredit = Literal["sum-mean", "uniform", "std", "score"]

# Levels of the tracked quantile grid: 0.05, 0.10, ..., 0.95.
QUANTILE_LEVELS: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(1, 20))


def paper_scores(
    rewards: torch.Tensor,
    bundle_ids: torch.Tensor,
    sample_index: torch.Tensor,
    group_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paper scores S_{b,j} = sum over prompts q in bundle b of r_{q,j}, over complete papers only.

    A paper is one (bundle, rollout index j) pair; it is complete when it holds a row of every prompt
    of its bundle (the prompts are the distinct ``group_ids`` of the bundle, or without them as many
    as the bundle's largest paper holds). As in the reference code (whose papers are the first
    min_q n_q rollouts of each prompt), an incomplete paper has no score: a partial sum would sit on
    another scale than the others. Rows with ``sample_index < 0`` belong to no paper.

    Returns (scores [P], paper index per sample [B] (-1: no paper), bundle index per paper [P]),
    papers ordered by (bundle, j).
    """
    n = rewards.shape[0]
    if n == 0:
        empty = torch.zeros(0, dtype=torch.long, device=rewards.device)
        return torch.zeros(0, dtype=rewards.dtype, device=rewards.device), empty, empty
    bundle_inv = groups_of(bundle_ids, n).index
    n_bundles = int(bundle_inv.max().item()) + 1
    placed = sample_index >= 0
    j = sample_index.long().clamp(min=0)
    span = int(j.max().item()) + 1
    key = torch.where(placed, bundle_inv * span + j, torch.full_like(j, -1))
    uniq, key_inv = torch.unique(key, return_inverse=True)
    rows_per_key = torch.zeros_like(uniq).index_add(0, key_inv, torch.ones_like(key_inv))
    key_bundle = torch.div(uniq, span, rounding_mode="floor")  # -1 for the unplaced rows
    if group_ids is not None:
        group_inv = groups_of(group_ids, n).index
        n_groups = int(group_inv.max().item()) + 1
        pairs = torch.unique(bundle_inv * n_groups + group_inv)
        prompts = torch.bincount(torch.div(pairs, n_groups, rounding_mode="floor"), minlength=n_bundles)
    else:
        prompts = torch.zeros(n_bundles, dtype=torch.long, device=rewards.device)
        real = uniq >= 0
        prompts = prompts.scatter_reduce(0, key_bundle[real], rows_per_key[real], reduce="amax")
    complete = (uniq >= 0) & (rows_per_key == prompts[key_bundle.clamp(min=0)])
    paper_of_key = torch.where(complete, torch.cumsum(complete.long(), 0) - 1, torch.full_like(uniq, -1))
    paper_inv = paper_of_key[key_inv]
    in_paper = paper_inv >= 0
    n_papers = int(complete.sum().item())
    scores = torch.zeros(n_papers, dtype=rewards.dtype, device=rewards.device)
    scores = scores.index_add(0, paper_inv[in_paper], rewards.detach()[in_paper])
    return scores, paper_inv, key_bundle[complete]


def mixed_var_weight(
    scores: torch.Tensor,
    a: torch.Tensor,
    c: torch.Tensor,
    alpha: float,
    beta: float,
    w: float,
    kappa: float,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-paper weight g = (w g_C + g_R) / (w + 1) before the per-bundle std normalisation.

    g_R = [(S - a)^+ - (S - c)^+ + kappa (a - c)] / (beta - alpha + eps);  g_C = -(a - S)^+ / (alpha + eps).
    """
    g_r = (torch.relu(scores - a) - torch.relu(scores - c) + kappa * (a - c)) / (beta - alpha + eps)
    g_c = -torch.relu(a - scores) / (alpha + eps)
    return (w * g_c + g_r) / (w + 1.0)


def _nearest_level(level: float) -> int:
    return min(range(len(QUANTILE_LEVELS)), key=lambda k: abs(QUANTILE_LEVELS[k] - level))


def _check_grid(quantile_grid: torch.Tensor) -> None:
    if quantile_grid.shape != (len(QUANTILE_LEVELS),):
        raise InvalidInputError(
            f"quantile_grid must be a [{len(QUANTILE_LEVELS)}] tensor of tracked quantiles at levels "
            f"0.05..0.95, got shape {tuple(quantile_grid.shape)}; pass None at the first step"
        )


def riskpo_update_quantiles(
    quantile_grid: torch.Tensor | None,
    rewards: torch.Tensor,
    bundle_ids: torch.Tensor,
    sample_index: torch.Tensor,
    eta: float = 0.1,
    group_ids: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """RiskPO's quantile tracker: q_lambda <- q_lambda + eta (lambda - F_hat(q_lambda)).

    F_hat(x) = fraction of this step's (complete, see ``paper_scores``) paper scores strictly below x.
    With ``quantile_grid=None`` (first step) the grid is initialised at the empirical lambda-quantiles
    of the paper scores. A step without any complete paper leaves the grid as it is.
    """
    scores, _, _ = paper_scores(rewards, bundle_ids, sample_index, group_ids)
    if quantile_grid is not None:
        _check_grid(quantile_grid)
    if scores.numel() == 0:
        return quantile_grid
    levels = torch.tensor(QUANTILE_LEVELS, dtype=scores.dtype, device=scores.device)
    if quantile_grid is None:
        return torch.quantile(scores, levels)
    grid = quantile_grid.detach().to(scores.dtype)
    below = (scores.unsqueeze(0) < grid.unsqueeze(1)).to(scores.dtype).mean(-1)
    return grid + eta * (levels - below)


@register(
    "advantage",
    "riskpo",
    paper="RiskPO: Risk-based Policy Optimization via Verifiable Reward for LLM Post-Training",
    arxiv="2510.00911",
    status="exact",
    card="adv#B2",
    state_update=riskpo_update_quantiles,
)
def riskpo(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    bundle_ids: torch.Tensor,
    sample_index: torch.Tensor,
    response_mask: torch.Tensor,
    quantile_grid: torch.Tensor | None = None,
    alpha: float = 0.2,
    beta: float = 0.8,
    w: float = 1.5,
    kappa: float = 0.0,
    credit: RiskCredit = "sum-mean",
    eps: float = 1e-6,
) -> tuple[torch.Tensor, Metrics]:
    """RiskPO: a mixed Value-at-Risk objective over bundles of prompts stresses the low-score tail.

    Paper: Ren et al., "RiskPO: Risk-based Policy Optimization via Verifiable Reward for LLM
    Post-Training", arXiv 2510.00911. Exact (RTkenny/RiskPO, quantile-tracking bundle advantage;
    defaults of the DAPO-Math script: alpha=0.2, beta=0.8, w=1.5, kappa=0, credit "sum-mean").

    Paper (b, j) = rollout j of every prompt in bundle b; S_{b,j} = sum_{q in b} r_{q,j}.
    a, c = quantiles at levels alpha, beta: per-bundle empirical quantiles of S when
    ``quantile_grid`` is None (first step), else the tracked grid values nearest alpha and beta.
      g_R = [(S-a)^+ - (S-c)^+ + kappa (a-c)] / (beta-alpha+eps),  g_C = -(a-S)^+ / (alpha+eps)
      g = (w g_C + g_R) / (w+1),  g <- g / (std_j S_{b,j} + eps)   (std := 1 for a one-paper bundle)
    Credit to response (q, j): "sum-mean" A = g d_{q,j} / sum_{q' in b} d_{q',j} with d = r - mean_q
    (g / |b| when |sum d| <= 1e-6); "uniform" A = g; "std" A = g / (std_q + eps) (std_q := 1 if
    < 1e-3); "score" A = g * (0.5 if r > 0 else 1.5). The tracker is ``riskpo_update_quantiles``.
    As in the code, a bundle whose papers all tie has std 0, so under tracked quantiles its nonzero
    g is divided by eps alone (empirical quantiles give g = 0 there).
    Only complete papers count (a row of every prompt of the bundle; see ``paper_scores``): a row
    whose paper misses a prompt's sample (a failed verification, a shorter group, sample_index < 0)
    gets advantage 0 and moves no statistic, as in the code.
    Inputs: rewards, group_ids (prompt), bundle_ids (bundle of the prompt), sample_index (j) [B].
    """
    check_outcome(rewards, response_mask)
    check_groups(group_ids, rewards.shape[0])
    if not 0.0 < alpha < beta < 1.0:
        raise InvalidInputError(f"riskpo: need 0 < alpha < beta < 1, got alpha={alpha}, beta={beta}")
    if w < 0:
        raise InvalidInputError(f"riskpo: the CVaR weight w must be >= 0, got {w}")
    if bundle_ids.shape != rewards.shape or sample_index.shape != rewards.shape:
        raise InvalidInputError("riskpo: bundle_ids and sample_index must be [batch] tensors like rewards")
    if credit not in ("sum-mean", "uniform", "std", "score"):
        raise InvalidInputError(f"riskpo: credit must be sum-mean, uniform, std or score, got {credit!r}")
    r = rewards.detach()
    scores, paper_inv, paper_bundle = paper_scores(r, bundle_ids, sample_index, group_ids)
    in_paper = paper_inv >= 0
    if scores.numel() == 0:  # no complete paper: nothing to compare
        zero = torch.zeros((), dtype=r.dtype, device=r.device)
        metrics_none: Metrics = {
            name: detached(zero)
            for name in (
                "riskpo/paper_score_mean",
                "riskpo/quantile_low",
                "riskpo/quantile_high",
                "riskpo/weight_mean",
                "adv/mean",
                "adv/abs_max",
            )
        }
        return to_tokens(torch.zeros_like(r), response_mask), metrics_none
    inv = paper_inv.clamp(min=0)
    if quantile_grid is None:
        n_bundles = int(paper_bundle.max().item()) + 1
        a = torch.zeros(n_bundles, dtype=r.dtype, device=r.device)
        c = torch.zeros_like(a)
        for b in torch.unique(paper_bundle).tolist():
            s_b = scores[paper_bundle == b]
            a[b] = torch.quantile(s_b, alpha)
            c[b] = torch.quantile(s_b, beta)
        a_p, c_p = a[paper_bundle], c[paper_bundle]
    else:
        _check_grid(quantile_grid)
        grid = quantile_grid.detach().to(r.dtype)
        a_p = grid[_nearest_level(alpha)].expand_as(scores)
        c_p = grid[_nearest_level(beta)].expand_as(scores)
    g = mixed_var_weight(scores, a_p, c_p, alpha, beta, w, kappa, eps)
    _, s_std = verl_single_sample(group_stats(scores, groups_of(paper_bundle, scores.shape[0])))
    g = g / (s_std + eps)
    g_sample = torch.where(in_paper, g[inv], torch.zeros_like(r))
    if credit == "uniform":
        adv = g_sample
    elif credit == "score":
        adv = g_sample * torch.where(r > 0, torch.full_like(r, 0.5), torch.full_like(r, 1.5))
    elif credit == "std":
        q_stats = group_stats(r, groups_of(group_ids, r.shape[0]))
        q_std = q_stats.groups.gather(q_stats.std)
        q_std = torch.where(q_std < 1e-3, torch.ones_like(q_std), q_std)
        adv = g_sample / (q_std + eps)
    else:
        q_stats = group_stats(r, groups_of(group_ids, r.shape[0]))
        d = torch.where(in_paper, r - q_stats.groups.gather(q_stats.mean), torch.zeros_like(r))
        d_sum = torch.zeros_like(scores).index_add(0, inv, d)[inv]
        n_prompts = torch.zeros_like(scores).index_add(0, inv, in_paper.to(r.dtype))[inv].clamp(min=1.0)
        ok = d_sum.abs() > 1e-6
        adv = torch.where(
            ok, g_sample * d / torch.where(ok, d_sum, torch.ones_like(d_sum)), g_sample / n_prompts
        )
    adv = torch.where(in_paper, adv, torch.zeros_like(adv))
    out = to_tokens(adv, response_mask)
    metrics: Metrics = {
        "riskpo/paper_score_mean": detached(scores.mean()),
        "riskpo/quantile_low": detached(a_p.mean()),
        "riskpo/quantile_high": detached(c_p.mean()),
        "riskpo/weight_mean": detached(g.mean()),
        "adv/mean": detached(adv.mean()),
        "adv/abs_max": detached(adv.abs().max()),
    }
    return out, metrics
