"""RiskPO's loop side: bundles of consecutive prompts, rollout indices and the quantile tracker."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from tether.catalogue.advantages.riskpo import riskpo_update_quantiles
from tether.lm.loop._groups import group_rows
from tether.lm.plugins import LoopPlugin, Rollout, check_param, register_plugin

if TYPE_CHECKING:
    from tether.lm.trainer import RLTrainer


@register_plugin("riskpo_bundles")
class RiskBundles(LoopPlugin):
    """RiskPO: bundle ids, rollout indices and the tracked quantile grid for the ``riskpo`` advantage.

    Paper: Ren et al., "RiskPO: Risk-based Policy Optimization via Verifiable Reward for LLM
    Post-Training", arXiv 2510.00911. Exact (RTkenny/RiskPO ray_trainer.py; card adv#B2).

    ``extra_inputs`` adds ``bundle_ids`` (the k-th group of the batch, by order of first row, is in
    bundle k // bundle_size) and ``sample_index`` (the rollout index j of a row within its prompt), and,
    from the second step on, ``quantile_grid``: the tracked quantiles at levels 0.05..0.95 (the first
    step uses per-bundle empirical quantiles). A paper (bundle, j) with a failed verification in it
    (or a prompt with fewer than j + 1 samples) is incomplete: its rows get ``sample_index`` -1, so
    they belong to no paper, get advantage 0 and move no statistic (the reference code keeps only
    complete papers; a partial score would be on another scale). ``after_step`` advances the grid with
    ``riskpo_update_quantiles`` (the entry's registered state update) on this step's (shaped) rewards
    of the complete papers.
    The grid lives here rather than in the recipe's ``state:`` wiring because its update reads tensors
    (rewards, bundles), while StateWiring feeds state updates with float metrics only.
    ``track=False`` never passes the grid (every step uses per-bundle empirical quantiles).
    """

    provides = ("bundle_ids", "sample_index", "quantile_grid")
    per_row = ("bundle_ids", "sample_index")  # the grid is batch-level
    paper = "RiskPO: Risk-based Policy Optimization via Verifiable Reward for LLM Post-Training"
    arxiv = "2510.00911"
    status = "exact"

    def __init__(self, bundle_size: int = 5, eta: float = 0.1, track: bool = True) -> None:
        check_param(bundle_size >= 1, "bundle_size", bundle_size, "must be >= 1")
        check_param(eta >= 0, "eta", eta, "must be >= 0")
        self.bundle_size = bundle_size
        self.eta = eta
        self.track = track
        self.grid: list[float] | None = None

    def bundles(
        self, group_ids: torch.Tensor, scored: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(bundle_ids, sample_index) [N] long for the rows of a rollout. With ``scored`` ([N] bool),
        the rows of incomplete papers (a paper (bundle, j) needs a scored j-th sample of every prompt
        of its bundle) get sample_index -1."""
        bundle_ids = torch.zeros(group_ids.shape[0], dtype=torch.long)
        sample_index = torch.zeros(group_ids.shape[0], dtype=torch.long)
        groups = group_rows(group_ids)
        for k, rows in enumerate(groups):
            idx = torch.tensor(rows, dtype=torch.long)
            bundle_ids[idx] = k // self.bundle_size
            sample_index[idx] = torch.arange(len(rows))
        if scored is not None:
            for start in range(0, len(groups), self.bundle_size):
                bundle = groups[start : start + self.bundle_size]
                for j in range(max(len(rows) for rows in bundle)):
                    if all(j < len(rows) and bool(scored[rows[j]]) for rows in bundle):
                        continue
                    for rows in bundle:
                        if j < len(rows):
                            sample_index[rows[j]] = -1
        return bundle_ids, sample_index

    def extra_inputs(self, trainer: RLTrainer, rollout: Rollout, inputs: dict[str, Any]) -> None:
        bundle_ids, sample_index = self.bundles(rollout.group_ids, rollout.scored)
        inputs["bundle_ids"] = bundle_ids
        inputs["sample_index"] = sample_index
        if self.track and self.grid is not None:
            inputs["quantile_grid"] = torch.tensor(self.grid, dtype=torch.float64)

    def after_step(
        self, trainer: RLTrainer, rollout: Rollout, inputs: dict[str, Any], metrics: dict[str, float]
    ) -> None:
        grid = None if self.grid is None else torch.tensor(self.grid, dtype=torch.float64)
        keep = rollout.scored & (inputs["sample_index"] >= 0)  # complete papers only
        new = riskpo_update_quantiles(
            grid,
            inputs["rewards"].detach().double()[keep],
            inputs["bundle_ids"][keep],
            inputs["sample_index"][keep],
            eta=self.eta,
            group_ids=rollout.group_ids[keep],
        )
        if new is not None:
            self.grid = [float(x) for x in new.tolist()]
        metrics["riskpo/bundles"] = float(int(inputs["bundle_ids"].max()) + 1) if len(rollout) else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"grid": self.grid}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        grid = state.get("grid")
        self.grid = None if grid is None else [float(x) for x in grid]
