"""Loop plugins of tether.lm.loop: Knapsack, SPO, RiskPO bundles, Scaf-GRPO, DYPO routing, D^3S schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tether.catalogue import get
from tether.config import from_dict
from tether.lm.config import LMConfig
from tether.lm.plugins import LoopPlugin, Rollout
from tether.lm.tasks.base import Prompt, Score, Split, Task, register_task
from tether.lm.trainer import RLTrainer

ARITH = {"name": "arithmetic", "params": {"digits": 2, "operations": "+", "train_size": 16, "test_size": 4}}


@register_task("loop_hint_test")
class HintTask(Task):
    """Reward 1 only when the scored text contains "HINT": the random tiny model never writes it."""

    def all_prompts(self, split: Split) -> list[Prompt]:
        return [Prompt(f"loop_hint_test/{split}/{i}", f"q{i}=", "HINTS") for i in range(8)]

    def score(self, prompt: Prompt, completion: str) -> Score:
        ok = "HINT" in completion
        return Score(reward=float(ok), correct=ok)

    def reference(self, prompt: Prompt) -> str:
        return "HINTS"

    def extract(self, completion: str) -> str | None:
        return completion or None


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))


def config(recipe: str, task: dict[str, Any] | None = None, **train: Any) -> LMConfig:
    return from_dict(
        LMConfig,
        {
            "recipe": recipe,
            "model": {
                "device": "cpu",
                "tiny_hidden": 32,
                "tiny_layers": 1,
                "tiny_heads": 2,
                "tiny_intermediate": 64,
            },
            "task": task or ARITH,
            "sampling": {"max_new_tokens": 6},
            "train": {"prompts_per_step": 4, "group_size": 4, "steps": 1, **train},
            "run": {"progress": False},
        },
    )


def trainer_for(tmp_path: Path, recipe: str, task: dict[str, Any] | None = None, **train: Any) -> RLTrainer:
    return RLTrainer(config(recipe, task, **train), out=tmp_path / "run")


def only_plugin(trainer: RLTrainer) -> Any:
    assert len(trainer.plugins) == 1
    return trainer.plugins[0]


def groups_of(ro: Rollout) -> list[list[int]]:
    out: dict[int, list[int]] = {}
    for i, g in enumerate(ro.group_ids.tolist()):
        out.setdefault(g, []).append(i)
    return list(out.values())


# ------------------------------------------------------------------------------------ every recipe

RECIPES = ["knapsack", "spo", "riskpo", "scaf_grpo", "dypo_routing", "d3s"]
PLUGIN_OF = {
    "knapsack": "knapsack",
    "spo": "spo",
    "riskpo": "riskpo_bundles",
    "scaf_grpo": "scaf_grpo",
    "dypo_routing": "dypo_routing",
    "d3s": "d3s_schedule",
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_a_step_and_plugin_state_is_checkpointed(tmp_path: Path, recipe: str) -> None:
    trainer = trainer_for(tmp_path, recipe)
    plugin = only_plugin(trainer)
    assert isinstance(plugin, LoopPlugin) and plugin.name == PLUGIN_OF[recipe]
    summary = trainer.train()  # one step, then a checkpoint
    assert summary["steps"] == 1
    final = summary["final"]
    assert math.isfinite(final["grad/norm"]) and math.isfinite(final["reward/mean"])
    state = plugin.state_dict()
    json.dumps(state)  # the checkpoint's state is JSON
    resumed = RLTrainer(config(recipe), resume=True, out=tmp_path / "run")
    assert only_plugin(resumed).state_dict() == json.loads(json.dumps(state))
    if recipe in ("knapsack", "spo", "riskpo"):
        assert any(v for v in state.values())  # stateful plugins have something to restore


# ------------------------------------------------------------------------------------ knapsack


def test_knapsack_budget_and_fixed_counts(tmp_path: Path) -> None:
    trainer = trainer_for(tmp_path, "knapsack")
    plugin = only_plugin(trainer)
    plan = plugin.plan(trainer, 4, 4)
    assert [k for _, k in plan] == [4, 4, 4, 4]  # unseen prompts get the default n
    # history for every train prompt: one failing, one solved, the rest effective (p = 0.5)
    pool = trainer.prompts.prompts
    failing, solved = pool[0].id, pool[1].id
    for p in pool:
        plugin.history[p.id] = [0.0, 0.0] if p.id == failing else [1.0, 1.0] if p.id == solved else [0.0, 1.0]
    plugin.params["fallback"] = False
    seen: dict[str, int] = {}
    for _ in range(len(pool) // 4):  # one pass over the stream: every prompt once
        plan = plugin.plan(trainer, 4, 4)
        assert sum(k for _, k in plan) == 16
        seen.update({p.id: k for p, k in plan})
    assert seen[failing] == 2 and seen[solved] == 2  # negative_n, positive_n


def test_knapsack_records_success_rates(tmp_path: Path) -> None:
    trainer = trainer_for(tmp_path, "knapsack")
    plugin = only_plugin(trainer)
    ro = trainer.rollout()
    plugin.after_step(trainer, ro, {}, {})
    for rows in groups_of(ro):
        pid = ro.prompts[rows[0]].id
        assert plugin.history[pid] == [ro.scores[i].reward for i in rows]
        assert plugin.success_rate(pid) == pytest.approx(sum(ro.scores[i].reward for i in rows) / len(rows))


# ------------------------------------------------------------------------------------ spo


def test_spo_group_free_tracker_and_state(tmp_path: Path) -> None:
    trainer = trainer_for(tmp_path, "spo", lr=1e-3)
    plugin = only_plugin(trainer)
    ro = trainer.rollout()
    assert len(ro) == 16  # prompts_per_step x group_size prompts, one sample each
    assert ro.group_ids.unique().numel() == 16
    assert len({p.id for p in ro.prompts}) == 16
    inputs: dict[str, Any] = {"rewards": torch.tensor([s.reward for s in ro.scores])}
    inputs["rewards"][::2] = 1.0  # make sure rewards differ
    plugin.extra_inputs(trainer, ro, inputs)
    adv, _ = get("advantage", "spo").fn(
        inputs["rewards"], ro.batch.completion_mask, inputs["tracker_alpha"], inputs["tracker_beta"]
    )
    per_sample = adv[:, 0]
    assert abs(float(per_sample.mean())) < 1e-5 and float(per_sample.std()) == pytest.approx(1.0, abs=1e-4)

    m1 = trainer.step()  # 16 of the 16 train prompts: all first visits
    assert m1["spo/revisit_frac"] == 0.0
    assert len(plugin.trackers) == 16
    assert all(tuple(v) != plugin.init for v in plugin.trackers.values())
    before = {k: list(v) for k, v in plugin.trackers.items()}
    with torch.no_grad():  # a policy change (a tiny model's first step may have zero advantages)
        for prm in trainer.model.parameters():
            prm.add_(0.05 * torch.randn(prm.shape, generator=torch.Generator().manual_seed(1)))
    m2 = trainer.step()  # every prompt again: D from the stored responses
    assert m2["spo/revisit_frac"] == 1.0 and m2["spo/divergence_mean"] > 0.0
    assert plugin.trackers != before

    state = json.loads(json.dumps(plugin.state_dict()))
    fresh = type(plugin)()
    fresh.load_state_dict(state)
    assert fresh.trackers == plugin.trackers and fresh.last == plugin.last
    assert fresh.divergence(trainer, ro.prompts).tolist() == plugin.divergence(trainer, ro.prompts).tolist()


# ------------------------------------------------------------------------------------ riskpo


def test_riskpo_bundles_and_sample_index(tmp_path: Path) -> None:
    from tether.lm.loop.riskpo_bundles import RiskBundles

    bundles = RiskBundles(bundle_size=5)
    group_ids = torch.tensor([g for g in [3, 1, 7, 0, 2, 9, 4] for _ in range(3)])
    bundle_ids, sample_index = bundles.bundles(group_ids)
    assert bundle_ids.tolist() == [0] * 15 + [1] * 6
    assert sample_index.tolist() == [0, 1, 2] * 7

    trainer = trainer_for(tmp_path, "riskpo")
    plugin2 = only_plugin(trainer)
    ro = trainer.rollout()
    inputs: dict[str, Any] = {}
    plugin2.extra_inputs(trainer, ro, inputs)
    assert "quantile_grid" not in inputs  # first step: per-bundle empirical quantiles
    assert inputs["sample_index"].tolist() == [0, 1, 2, 3] * 4 and inputs["bundle_ids"].tolist() == [0] * 16
    trainer.step()
    assert plugin2.grid is not None and len(plugin2.grid) == 19
    grid = list(plugin2.grid)
    trainer.step()  # the tracked grid is an input now, and it moves
    assert plugin2.grid != grid


# ------------------------------------------------------------------------------------ scaf-grpo


def test_scaf_grpo_rescues_all_zero_groups(tmp_path: Path) -> None:
    trainer = trainer_for(tmp_path, "scaf_grpo", task={"name": "loop_hint_test"})
    plugin = only_plugin(trainer)
    ro = trainer._generate(trainer._plan(4), 0)
    assert all(s.reward == 0 for s in ro.scores)
    assert plugin.after_rollout(trainer, ro) is ro  # warm-up (50 steps) not over

    plugin.warmup = 0
    groups = groups_of(ro)
    solved = groups[1]
    scores = list(ro.scores)
    for i in solved:
        scores[i] = Score(reward=1.0, correct=True)
    ro.scores = scores
    out = plugin.after_rollout(trainer, ro)
    assert len(out) == len(ro) and torch.equal(out.group_ids, ro.group_ids)
    for rows in groups:
        changed = [i for i in rows if out.prompts[i].text != ro.prompts[i].text]
        if rows is solved:
            assert changed == []
            continue
        assert changed == [rows[-1]]  # exactly one row replaced
        i = rows[-1]
        assert out.prompts[i].text == ro.prompts[i].text + "HINT"  # lowest successful level: 4
        assert out.prompts[i].meta["scaf_hint_level"] == 4 and out.prompts[i].id == ro.prompts[i].id
        assert out.scores[i].reward == 1.0
        assert out.batch.prompt_texts[i] == out.prompts[i].text
        for j in rows[:-1]:
            assert out.scores[j] is ro.scores[j]
            assert out.batch.completion_texts[j] == ro.batch.completion_texts[j]
            n = int(ro.batch.completion_mask[j].sum())
            assert out.batch.completion_ids[j, :n].tolist() == ro.batch.completion_ids[j, :n].tolist()
    metrics: dict[str, float] = {}
    plugin.after_step(trainer, out, {}, metrics)
    assert metrics["scaf/rescued_groups"] == 3.0 and metrics["scaf/hard_groups"] == 3.0
    # the rescued rows train: GRPO gives them the only positive advantage of their group
    m = trainer.step()
    assert m["scaf/rescued_groups"] == 4.0 and m["reward/mean"] == pytest.approx(4 / 16)


# ------------------------------------------------------------------------------------ dypo


def test_dypo_routing_masks_and_sft_loss(tmp_path: Path) -> None:
    trainer = trainer_for(tmp_path, "dypo_routing")
    assert trainer.ref_model is not None
    plugin = only_plugin(trainer)
    ro = trainer.rollout()
    groups = groups_of(ro)
    rewards = torch.zeros(16)
    rewards[torch.tensor(groups[1])] = 1.0  # all correct
    rewards[torch.tensor(groups[2][:2])] = 1.0  # mixed
    rewards[torch.tensor(groups[3][:1])] = 1.0  # mixed; groups[0] all wrong
    mask = ro.batch.completion_mask.clone()
    inputs: dict[str, Any] = {"rewards": rewards, "response_mask": mask}
    plugin.after_advantages(trainer, ro, inputs)
    new = inputs["response_mask"]
    for i in groups[0] + groups[1]:
        assert not bool(new[i].any())
    for i in groups[2] + groups[3]:
        assert torch.equal(new[i], mask[i])

    def grad_norm(rows: list[int]) -> float | None:
        trainer.model.zero_grad(set_to_none=True)
        out = plugin.extra_loss(trainer, ro, torch.tensor(rows))
        if out is None:
            return None
        loss, metrics = out
        assert float(loss.detach()) > 0 and metrics["dypo/sft_rows"] == len(
            [r for r in rows if r in groups[0]]
        )
        loss.backward()
        return sum(float(p.grad.norm()) for p in trainer.model.parameters() if p.grad is not None)

    assert grad_norm(groups[2] + groups[3] + groups[1]) is None  # no all-wrong group: no term
    g = grad_norm(groups[0] + groups[2])
    assert g is not None and g > 0
    # micro-batch invariance: halves weighted by their share give the whole
    whole = plugin.extra_loss(trainer, ro, torch.tensor(groups[0] + groups[2]))[0]
    a = plugin.extra_loss(trainer, ro, torch.tensor(groups[0][:2] + groups[2][:2]))[0]
    b = plugin.extra_loss(trainer, ro, torch.tensor(groups[0][2:] + groups[2][2:]))[0]
    assert float(whole.detach()) == pytest.approx(float(a.detach()) * 0.5 + float(b.detach()) * 0.5, rel=1e-5)


# ------------------------------------------------------------------------------------ d3s


def test_d3s_schedule_fraction_and_end(tmp_path: Path) -> None:
    trainer = trainer_for(tmp_path, "d3s")
    plugin = only_plugin(trainer)
    assert plugin.kappas(0) == (0.5, 0.5)
    assert plugin.kappas(50) == pytest.approx((0.75, 0.75))
    assert plugin.kappas(100) == (1.0, 1.0) and plugin.kappas(500) == (1.0, 1.0)
    ro = trainer.rollout()
    mask = ro.batch.completion_mask.clone()
    gen = torch.Generator().manual_seed(0)
    adv = torch.randn(mask.shape, generator=gen) * mask

    def run(step: int) -> torch.Tensor:
        trainer.step_idx = step
        inputs = {"advantages": adv, "group_ids": ro.group_ids, "response_mask": mask.clone()}
        plugin.after_advantages(trainer, ro, inputs)
        out: torch.Tensor = inputs["response_mask"]
        assert not bool((out & ~mask).any())  # only ever removes tokens
        return out

    plugin.k0 = (1.0, 0.5)  # every sample; half of the tokens
    valid = int(mask.sum())
    assert int(run(0).sum()) == math.ceil(0.5 * valid)
    assert int(run(50).sum()) == math.ceil(0.75 * valid)
    assert torch.equal(run(100), mask)  # the schedule reaches 1: nothing dropped
    plugin.k0 = (0.5, 1.0)  # half the samples of each group, all their tokens
    kept = run(0)
    for rows in groups_of(ro):
        assert sum(bool(kept[i].any()) for i in rows) <= 2
