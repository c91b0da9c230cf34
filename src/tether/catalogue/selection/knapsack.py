"""Knapsack RL: allocate a fixed rollout budget across prompts by a knapsack DP."""

from __future__ import annotations

import math
from typing import Literal

import torch

from tether.catalogue.contracts import Metrics, detached
from tether.catalogue.registry import register
from tether.errors import InvalidInputError


def rollout_value(num_rollouts: torch.Tensor | int, p: torch.Tensor | float) -> torch.Tensor:
    """V(N, p) = [1 - p^N - (1 - p)^N] p (1 - p)^2: P(group non-degenerate) x information gain."""
    n = torch.as_tensor(num_rollouts, dtype=torch.float64)
    q = torch.as_tensor(p, dtype=torch.float64)
    return (1.0 - q**n - (1.0 - q) ** n) * q * (1.0 - q) ** 2


def rollout_cost(p: float, mode: str, alpha_c: float) -> float:
    """Estimated rollouts needed: ln(1 - alpha_c)/ln(max(p, 1-p)) ("probability") or 1/(p(1-p)) - 1."""
    if mode == "probability":
        return math.log(1.0 - alpha_c) / math.log(max(p, 1.0 - p))
    return 1.0 / (p * (1.0 - p)) - 1.0


def knapsack_extra(rates: list[float], budget: int, base: int, max_extra: int) -> tuple[list[int], float]:
    """Extra rollouts k_i in [0, max_extra] with sum k_i = w maximising sum 1[k_i > 0] V(base + k_i, p_i).

    w is ``budget`` when feasible, else the largest feasible amount (the caller spreads the rest).
    Returns (k per item, optimal value).
    """
    n_items = len(rates)
    if n_items == 0 or budget <= 0:
        return [0] * n_items, 0.0
    neg = -math.inf
    ks = torch.arange(0, max_extra + 1, dtype=torch.float64)
    dp = torch.full((budget + 1,), neg, dtype=torch.float64)
    dp[0] = 0.0
    choices: list[torch.Tensor] = []
    for p in rates:
        gain = torch.where(ks > 0, rollout_value(ks + base, p), torch.zeros_like(ks))
        cand = torch.full((max_extra + 1, budget + 1), neg, dtype=torch.float64)
        for k in range(min(max_extra, budget) + 1):
            cand[k, k:] = dp[: budget + 1 - k] + gain[k]
        dp, arg = cand.max(0)
        choices.append(arg)
    feasible = torch.nonzero(dp > neg).flatten()
    w = int(feasible.max().item())
    value = float(dp[w])
    out = [0] * n_items
    for i in range(n_items - 1, -1, -1):
        k = int(choices[i][w].item())
        out[i] = k
        w -= k
    return out, value


def _spread(counts: list[int], indices: list[int], amount: int) -> None:
    if not indices or amount <= 0:
        return
    each, rest = divmod(amount, len(indices))
    for j, i in enumerate(indices):
        counts[i] += each + (1 if j < rest else 0)


@register(
    "selection",
    "knapsack",
    paper="Knapsack RL: Unlocking Exploration of LLMs via Optimizing Budget Allocation",
    arxiv="2509.25849",
    status="exact",
    card="adv#B6",
)
def knapsack(
    success_rates: torch.Tensor,
    n: int = 8,
    min_n: int = 2,
    negative_n: int = 2,
    positive_n: int = 2,
    max_n: int = 128,
    cost: Literal["probability", "expectation"] = "probability",
    alpha_c: float = 0.9,
    fallback: bool = True,
) -> tuple[torch.Tensor, Metrics]:
    """Knapsack RL: per-prompt rollout counts that maximise the total learning value for budget P n.

    Paper: Li et al., "Knapsack RL: Unlocking Exploration of LLMs via Optimizing Budget Allocation",
    arXiv 2509.25849. Exact (liziniu/KnapsackRL, exploration_utils.py).

    ``success_rates`` [P]: each prompt's success rate at its previous visit, NaN for unseen prompts.
    Base counts: unseen n; p = 0 negative_n; p = 1 positive_n; 0 < p < 1 ("effective") min_n.
    Remaining budget R = P n - sum(base). Without effective prompts, R goes evenly to p = 0 prompts
    (if none, every prompt gets n). Otherwise, with cost c(p) = ln(1 - alpha_c)/ln(max(p, 1-p))
    ("probability") or 1/(p(1-p)) - 1 ("expectation"), if sum_eff int(min(max_n, c)) < R (and
    ``fallback``), the surplus goes evenly to p = 0 prompts (else to all non-effective prompts) and R
    shrinks to that sum (when every prompt is effective there is no one to take a surplus, and the
    fallback is skipped; the reference code would divide by zero). Then a DP picks extra k_i in [0, max_n - min_n] for effective prompts with
    sum k_i = R maximising sum 1[k_i > 0] V(min_n + k_i, p_i), V(N, p) = [1 - p^N - (1-p)^N] p (1-p)^2
    (k = 0 is valued 0, as the code); budget the DP cannot place is spread evenly over effective prompts.
    Returns counts [P] long with sum P n.
    """
    if success_rates.dim() != 1:
        raise InvalidInputError(
            f"knapsack: success_rates must be [prompts], got {tuple(success_rates.shape)}"
        )
    if not 1 <= min_n <= max_n:
        raise InvalidInputError(f"knapsack: need 1 <= min_n <= max_n, got {min_n}, {max_n}")
    if max(min_n, negative_n, positive_n) > n or min(negative_n, positive_n) < 0:
        raise InvalidInputError(
            "knapsack: min_n, negative_n and positive_n must be in [0, n] so the budget P n covers them"
        )
    if cost not in ("probability", "expectation"):
        raise InvalidInputError(f"knapsack: cost must be 'probability' or 'expectation', got {cost!r}")
    if not 0.0 < alpha_c < 1.0:
        raise InvalidInputError(f"knapsack: alpha_c must be in (0, 1), got {alpha_c}")
    rates = [float(x) for x in success_rates.detach().double().tolist()]
    if any(not math.isnan(x) and not 0.0 <= x <= 1.0 for x in rates):
        raise InvalidInputError("knapsack: success_rates must lie in [0, 1] (NaN for unseen prompts)")
    num = len(rates)
    total = num * n
    counts = [0] * num
    effective: list[int] = []
    zero: list[int] = []
    other: list[int] = []
    for i, p in enumerate(rates):
        if math.isnan(p):
            counts[i] = n
            other.append(i)
        elif p == 0.0:
            counts[i] = negative_n
            zero.append(i)
            other.append(i)
        elif p == 1.0:
            counts[i] = positive_n
            other.append(i)
        else:
            counts[i] = min_n
            effective.append(i)
    remaining = total - sum(counts)
    used_fallback = False
    value = 0.0
    if remaining > 0 and not effective:
        if zero:
            _spread(counts, zero, remaining)
        else:
            counts = [n] * num
    elif remaining > 0:
        estimated = sum(int(min(max_n, rollout_cost(rates[i], cost, alpha_c))) for i in effective)
        if fallback and estimated < remaining and other:
            used_fallback = True
            targets = zero if zero else other
            _spread(counts, targets, remaining - estimated)
            remaining = estimated
        extra, value = knapsack_extra([rates[i] for i in effective], remaining, min_n, max_n - min_n)
        for i, k in zip(effective, extra):
            counts[i] += k
        _spread(counts, effective, remaining - sum(extra))
    out = torch.tensor(counts, dtype=torch.long)
    metrics: Metrics = {
        "knapsack/effective_frac": detached(len(effective) / max(num, 1)),
        "knapsack/max_rollouts": detached(float(max(counts)) if counts else 0.0),
        "knapsack/value": detached(value),
        "knapsack/fallback": detached(float(used_fallback)),
    }
    return out, metrics
