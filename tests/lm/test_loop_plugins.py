"""Loop plugins of tether.lm.loop: Knapsack, SPO, RiskPO bundles, Scaf-GRPO, DYPO routing, D^3S schedule."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.lm.test_trainer import record_grad_passes
from tether.catalogue import get
from tether.config import from_dict
from tether.errors import TetherError
from tether.lm.config import LMConfig
from tether.lm.plugins import LoopPlugin, Rollout, build_plugin
from tether.lm.rollout import RolloutBatch
from tether.lm.tasks.base import Prompt, Score, Split, Task, register_task
from tether.lm.trainer import RLTrainer, plan_run

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
        out = plugin.extra_loss(trainer, ro, torch.tensor(rows), torch.tensor(rows))
        if out is None:
            return None
        loss, metrics = out
        assert float(loss.detach()) > 0 and metrics["dypo/sft_prompts"] == float(
            any(r in groups[0] for r in rows)
        )
        loss.backward()
        return sum(float(p.grad.norm()) for p in trainer.model.parameters() if p.grad is not None)

    assert grad_norm(groups[2] + groups[3] + groups[1]) is None  # no all-wrong group: no term
    g = grad_norm(groups[0] + groups[2])
    assert g is not None and g > 0
    # micro-batch invariance: the parts of any split of the mini-batch add up to its term
    mb = torch.tensor(groups[0] + groups[2])
    whole = plugin.extra_loss(trainer, ro, mb, mb)[0]
    a = plugin.extra_loss(trainer, ro, torch.tensor(groups[0][:2] + groups[2][:2]), mb)[0]
    b = plugin.extra_loss(trainer, ro, torch.tensor(groups[0][2:] + groups[2][2:]), mb)[0]
    assert float(whole.detach()) == pytest.approx(float(a.detach()) + float(b.detach()), rel=1e-5)


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


# ------------------------------------------------------------------------------------ audit fixes
def _with_method(cfg: LMConfig, method: dict[str, Any]) -> LMConfig:
    return dataclasses.replace(cfg, method=method)


def _errors(ro: Rollout, rows: list[int]) -> None:
    """Turn the scores of ``rows`` into verifier errors (as safe_score leaves them: reward 0)."""
    scores = list(ro.scores)
    for i in rows:
        scores[i] = Score(reward=0.0, correct=False, error="RuntimeError: verifier failed")
    ro.scores = scores


@pytest.mark.parametrize(
    ("plugin", "params", "key"),
    [
        ("d3s_schedule", {"scope": "bogus"}, "scope"),
        ("knapsack", {"cost": "bogus"}, "cost"),
        ("knapsack", {"min_n": 0}, "min_n"),
        ("knapsack", {"alpha_c": 1.5}, "alpha_c"),
        ("knapsack", {"min_n": 4, "max_n": 3}, "max_n"),
        ("spo", {"rho_max": 2.0}, "rho_max"),
        ("spo", {"d_half": -1.0}, "d_half"),
        ("spo", {"rho_min": 0.99, "rho_max": 0.9}, "rho_max"),
        ("spo", {"rho_min": 1.0}, "rho_min"),
        ("scaf_grpo", {"max_level": 0}, "max_level"),
        ("dypo_routing", {"gamma": -1.0}, "gamma"),
        ("riskpo_bundles", {"bundle_size": 0}, "bundle_size"),
    ],
)
def test_bad_plugin_parameters_are_refused_when_built(plugin: str, params: dict[str, Any], key: str) -> None:
    with pytest.raises(TetherError, match=rf"method\.{plugin}\.{key}=.* must be"):
        build_plugin(plugin, params)


def test_bad_plugin_parameters_stop_the_run_at_load() -> None:
    """plan_run (what --dry-run calls) refuses them: a recipe's value, an override, a setting that
    only the run's config can rule out (Knapsack's fixed counts above train.group_size)."""
    with pytest.raises(TetherError, match=r"method\.spo\.rho_max=2\.0 must be in \[rho_min, 1\]"):
        plan_run(_with_method(config("spo"), {"spo": {"rho_max": 2.0}}))
    with pytest.raises(TetherError, match=r"method\.d3s_schedule\.scope='bogus'"):
        plan_run(_with_method(config("d3s"), {"d3s_schedule": {"scope": "bogus"}}))
    with pytest.raises(TetherError, match=r"method\.knapsack\.negative_n=6 exceeds train\.group_size=4"):
        plan_run(_with_method(config("knapsack"), {"knapsack": {"negative_n": 6}}))


def test_loop_plugin_parameters_can_be_overridden() -> None:
    plan = plan_run(_with_method(config("scaf_grpo"), {"scaf_grpo": {"warmup": 0, "max_level": 2}}))
    (plugin,) = plan.plugins
    assert plugin.warmup == 0 and plugin.max_level == 2 and plugin.replace_num == 1
    assert plan.recipe.loop[0]["params"]["warmup"] == 0  # saved with the run (config.yaml, resume)
    with pytest.raises(TetherError, match=r"no such component.*loop plugins: scaf_grpo"):
        plan_run(_with_method(config("scaf_grpo"), {"scaf": {"warmup": 0}}))


def test_dypo_success_threshold_cannot_differ_between_loss_and_routing() -> None:
    with pytest.raises(TetherError, match=r"method\.dypo_routing\.success_threshold=0\.7 and "):
        plan_run(_with_method(config("dypo_routing"), {"dypo_routing": {"success_threshold": 0.7}}))
    with pytest.raises(TetherError, match=r"method\.dypo\.success_threshold=0\.7"):
        plan_run(_with_method(config("dypo_routing"), {"dypo": {"success_threshold": 0.7}}))
    both = {"dypo": {"success_threshold": 0.7}, "dypo_routing": {"success_threshold": 0.7}}
    plan = plan_run(_with_method(config("dypo_routing"), both))
    assert plan.plugins[0].success_threshold == 0.7
    assert plan.method.policy_loss.params["success_threshold"] == 0.7


@pytest.mark.parametrize("recipe", RECIPES)
def test_dynamic_sampling_is_refused_where_it_would_silence_the_plugin(recipe: str) -> None:
    cfg = config(recipe, dynamic_sampling=True)
    if recipe in ("riskpo", "d3s"):  # they work on whatever batch dynamic sampling keeps
        plan_run(cfg)
        return
    with pytest.raises(
        TetherError, match=rf"{PLUGIN_OF[recipe]}' cannot run with train\.dynamic_sampling=true"
    ):
        plan_run(cfg)


def test_spo_draws_the_whole_budget_from_a_small_pool(tmp_path: Path) -> None:
    trainer = trainer_for(tmp_path, "spo")  # 16 train prompts
    plan = only_plugin(trainer).plan(trainer, 8, 4)  # a budget of 32 rows
    assert len(plan) == 32 and all(k == 1 for _, k in plan)
    assert len({p.id for p, _ in plan}) <= 16
    plan = only_plugin(trainer).plan(trainer, 4, 4)  # 16 rows: each prompt once
    assert len(plan) == 16 and len({p.id for p, _ in plan}) == 16


def test_scaf_grpo_hints_never_hold_the_whole_answer(tmp_path: Path) -> None:
    trainer = trainer_for(tmp_path, "scaf_grpo", task={"name": "loop_hint_test"})
    plugin = only_plugin(trainer)
    prompt = trainer.prompts.prompts[0]
    plugin.max_level = 10
    assert plugin.hints(trainer, prompt) == ["H", "HI", "HIN", "HINT"]  # the reference is "HINTS"
    plugin.max_level = 2
    assert plugin.hints(trainer, prompt) == ["H", "HI"]


def test_dypo_sft_uses_the_rollouts_prompt_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chat-rendered prompt begins with BOS: the SFT pass must see the prompt tokens the sampler
    used (one BOS), not the text tokenized again with special tokens (two)."""
    import tether.lm.loop.dypo_routing as routing
    from tether.lm.rollout import RolloutBatch, encode_prompts

    trainer = trainer_for(tmp_path, "dypo_routing")
    inner = trainer.tokenizer

    class BosTokenizer:  # Llama-like: add_special_tokens=True prepends <bos>
        bos_token, bos_token_id = inner.bos_token, inner.bos_token_id
        eos_token, eos_token_id, pad_token_id = inner.eos_token, inner.eos_token_id, inner.pad_token_id

        def __call__(self, texts: Any, add_special_tokens: bool = True) -> dict[str, Any]:
            ids = inner(texts, add_special_tokens=False)["input_ids"]
            if add_special_tokens:
                ids = (
                    [[self.bos_token_id, *x] for x in ids]
                    if isinstance(texts, list)
                    else [self.bos_token_id, *ids]
                )
            return {"input_ids": ids}

    trainer.tokenizer = BosTokenizer()
    text = inner.bos_token + "12+3="
    sampled = encode_prompts(trainer.tokenizer, [text])[0]
    assert sampled.count(inner.bos_token_id) == 1
    batch = RolloutBatch(
        prompt_ids=torch.tensor([sampled]),
        prompt_mask=torch.ones(1, len(sampled), dtype=torch.bool),
        completion_ids=torch.zeros(1, 1, dtype=torch.long),
        completion_mask=torch.ones(1, 1, dtype=torch.bool),
        sampler_logprobs=torch.zeros(1, 1),
        truncated=torch.zeros(1, dtype=torch.bool),
        completion_texts=[""],
        prompt_texts=[text],
    )
    ro = Rollout([Prompt("p", text, "15")], batch, [Score(0.0, False)], torch.zeros(1, dtype=torch.long))
    seen: list[list[int]] = []
    original = routing.completion_logprobs

    def spy(model: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *a: Any, **k: Any) -> Any:
        seen.append(prompt_ids[0][prompt_mask[0]].tolist())
        return original(model, prompt_ids, prompt_mask, *a, **k)

    monkeypatch.setattr(routing, "completion_logprobs", spy)
    only_plugin(trainer).sft_nll(trainer, ro, [0])
    assert seen == [sampled]


def test_dypo_sft_and_rl_terms_are_expectations_over_the_same_prompts(tmp_path: Path) -> None:
    """Eq. 4, L = E_q[1_H gamma L_SFT + 1_M (alpha L_GRPO + (1 - alpha) L_GAL)]: adding two
    all-correct prompts to a mini-batch of one all-wrong and one mixed prompt halves both terms."""
    from tether.catalogue.aggregate import Aggregation, count_sequences, count_tokens
    from tether.lm.trainer import _take

    trainer = trainer_for(tmp_path, "dypo_routing")
    plugin = only_plugin(trainer)
    ro = trainer.rollout()
    groups = groups_of(ro)
    outcome = {0: [0.0] * 4, 1: [1.0, 0.0, 1.0, 0.0], 2: [1.0] * 4, 3: [1.0] * 4}  # hard, mixed, easy, easy

    def terms(kept: list[int]) -> tuple[float, float]:
        sel = torch.zeros(len(ro), dtype=torch.bool)
        sel[torch.tensor([i for g in kept for i in groups[g]])] = True
        sub = _take(ro, sel)
        rewards = torch.tensor([r for g in kept for r in outcome[g]])
        lp = sub.batch.sampler_logprobs.float()
        inputs: dict[str, Any] = {
            "rewards": rewards,
            "group_ids": sub.group_ids,
            "response_mask": sub.batch.completion_mask.clone(),
            "old_logprobs": lp,
            "ref_logprobs": lp - 0.03 * (torch.arange(len(sub)) % 4).unsqueeze(-1),  # same per group
        }
        adv, _ = trainer.method.compute_advantages(inputs)
        inputs["advantages"] = adv
        plugin.after_advantages(trainer, sub, inputs)
        rm = inputs["response_mask"]
        agg = Aggregation(num_tokens=max(count_tokens(rm), 1.0), num_sequences=max(count_sequences(rm), 1.0))
        rows = torch.arange(len(sub))
        lp_now = trainer._logprobs(trainer.model, sub.batch, rows, grad=True)[0]
        rl, _ = trainer.method.loss(
            {**inputs, "logprobs": lp_now, "num_prompts": sub.prompt_count(rows)}, agg
        )
        sft = plugin.extra_loss(trainer, sub, rows, rows)
        assert sft is not None
        return float(rl.detach()), float(sft[0].detach())

    rl_a, sft_a = terms([0, 1])
    rl_b, sft_b = terms([0, 1, 2, 3])
    assert rl_a > 0 and sft_a > 0
    assert rl_b == pytest.approx(rl_a / 2, rel=1e-5) and sft_b == pytest.approx(sft_a / 2, rel=1e-5)


# ------------------------------------------------------------------------------------ verifier errors
def test_spo_tracker_ignores_failed_verifications(tmp_path: Path) -> None:
    trainer = trainer_for(tmp_path, "spo")
    plugin = only_plugin(trainer)
    ro = trainer.rollout()
    _errors(ro, list(range(0, 16, 2)))
    inputs: dict[str, Any] = {
        "rewards": torch.tensor([s.reward for s in ro.scores]),
        "old_logprobs": ro.batch.sampler_logprobs.float(),
    }
    plugin.extra_inputs(trainer, ro, inputs)
    plugin.after_step(trainer, ro, inputs, {})
    for i, prompt in enumerate(ro.prompts):  # 16 distinct prompts, one sample each
        if i % 2 == 0:
            assert prompt.id not in plugin.trackers and prompt.id not in plugin.last
        else:
            assert plugin.trackers[prompt.id] != list(plugin.init) and prompt.id in plugin.last


def test_knapsack_history_ignores_failed_verifications(tmp_path: Path) -> None:
    trainer = trainer_for(tmp_path, "knapsack")
    plugin = only_plugin(trainer)
    ro = trainer.rollout()
    groups = groups_of(ro)
    _errors(ro, groups[0] + groups[1][:2])
    plugin.after_step(trainer, ro, {}, {})
    assert ro.prompts[groups[0][0]].id not in plugin.history  # nothing scored: nothing learnt
    assert plugin.history[ro.prompts[groups[1][0]].id] == [ro.scores[i].reward for i in groups[1][2:]]
    for rows in groups[2:]:
        assert plugin.history[ro.prompts[rows[0]].id] == [ro.scores[i].reward for i in rows]


def test_riskpo_leaves_out_the_papers_of_failed_verifications(tmp_path: Path) -> None:
    """A paper (bundle, j) with a failed verification has no score (the reference keeps complete
    papers only): its rows get advantage 0, and the other papers' weights and the tracked quantiles
    are those of the batch without that paper."""
    from tether.lm.trainer import _take

    trainer = trainer_for(tmp_path, "riskpo")
    plugin = only_plugin(trainer)
    advantage = trainer.method.advantages[0]
    ro = trainer.rollout()  # 4 prompts x 4 samples: one bundle of 4 papers
    groups = groups_of(ro)
    table = [[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    ro.scores = [
        Score(reward=table[g][k], correct=True) for g, rows in enumerate(groups) for k in range(len(rows))
    ]
    _errors(ro, [groups[1][2]])  # prompt 1, rollout j = 2
    paper2 = torch.zeros(len(ro), dtype=torch.bool)
    paper2[torch.tensor([rows[2] for rows in groups])] = True

    def run(
        rollout: Rollout, grid: list[float] | None, credit: str
    ) -> tuple[torch.Tensor, list[float] | None]:
        plugin.grid = grid
        advantage.params["credit"] = credit
        inputs: dict[str, Any] = {
            "rewards": torch.tensor([s.reward for s in rollout.scores]),
            "group_ids": rollout.group_ids,
            "response_mask": rollout.batch.completion_mask.clone(),
        }
        plugin.extra_inputs(trainer, rollout, inputs)
        adv, _ = trainer._advantages(inputs, rollout.scored)
        plugin.after_step(trainer, rollout, inputs, {})
        return adv[:, 0], plugin.grid

    without = _take(ro, ~paper2)
    for grid in (None, [0.1 * k for k in range(19)]):
        weights, new_grid = run(ro, grid, "uniform")  # every row of a paper gets the paper's weight g
        expected, expected_grid = run(without, grid, "uniform")
        assert torch.all(weights[paper2] == 0) and bool((weights != 0).any())
        torch.testing.assert_close(weights[~paper2], expected)
        assert new_grid == expected_grid
        credits, _ = run(ro, grid, "sum-mean")  # the credits of a paper sum to its weight
        assert torch.all(credits[paper2] == 0)
        for j in (0, 1, 3):
            rows = torch.tensor([r[j] for r in groups])
            assert float(credits[rows].sum()) == pytest.approx(float(weights[rows[0]]), abs=1e-5)


def test_riskpo_entry_scores_complete_papers_only() -> None:
    """Called on the scored rows alone (a sample of prompt 1 missing from paper j = 2), the
    ``riskpo`` advantage and its tracker give that paper no score, as if it had not been sampled."""
    from tether.catalogue.advantages.riskpo import riskpo_update_quantiles

    riskpo = get("advantage", "riskpo").fn
    rewards = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]]).flatten()
    group_ids = torch.arange(3).repeat_interleave(4)
    sample_index = torch.arange(4).repeat(3)
    bundle_ids = torch.zeros(12, dtype=torch.long)
    mask = torch.ones(12, 2, dtype=torch.bool)
    missing = 6  # prompt 1, j = 2
    kept = torch.arange(12) != missing
    partial, _ = riskpo(
        rewards[kept], group_ids[kept], bundle_ids[kept], sample_index[kept], mask[kept], credit="uniform"
    )
    no_paper = sample_index != 2
    expected, _ = riskpo(
        rewards[no_paper],
        group_ids[no_paper],
        bundle_ids[no_paper],
        sample_index[no_paper],
        mask[no_paper],
        credit="uniform",
    )
    in_paper2 = (sample_index[kept] == 2).tolist()
    assert torch.all(partial[torch.tensor(in_paper2)] == 0)
    torch.testing.assert_close(partial[~torch.tensor(in_paper2)], expected)
    grid = riskpo_update_quantiles(
        None, rewards[kept], bundle_ids[kept], sample_index[kept], group_ids=group_ids[kept]
    )
    same = riskpo_update_quantiles(None, rewards[no_paper], bundle_ids[no_paper], sample_index[no_paper])
    assert grid is not None and same is not None and torch.equal(grid, same)


def test_dypo_routes_groups_by_their_scored_samples(tmp_path: Path) -> None:
    trainer = trainer_for(tmp_path, "dypo_routing")
    plugin = only_plugin(trainer)
    ro = trainer.rollout()
    groups = groups_of(ro)
    outcome = [[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0] * 4, [1.0, 0.0, 0.0, 1.0]]
    ro.scores = [
        Score(reward=outcome[g][k], correct=True) for g, rows in enumerate(groups) for k in range(len(rows))
    ]
    _errors(ro, [groups[0][3], groups[1][2], *groups[2]])  # each time the odd one out fails
    rewards = torch.tensor([s.reward for s in ro.scores])
    hard, easy = plugin.route(rewards, ro.group_ids, ro.scored)
    assert easy.tolist() == [i in groups[0] for i in range(16)]  # three successes and an error: easy
    assert hard.tolist() == [i in groups[1] for i in range(16)]  # three failures and an error: hard
    # a group without a score is routed nowhere (neither SFT nor dropped): group 2; group 3 is mixed


# ------------------------------------------------------------------------------------ per-row inputs
def test_batch_level_inputs_are_never_sliced_whatever_their_length(tmp_path: Path) -> None:
    """RiskPO's quantile grid has 19 entries: with 19 rows and a failed verification it must still
    reach the advantage whole (inputs are sliced by name, not by shape)."""
    trainer = trainer_for(tmp_path, "riskpo")
    plugin = only_plugin(trainer)
    plugin.grid = [0.1 * k for k in range(19)]
    group_ids = torch.tensor([0] * 4 + [1] * 4 + [2] * 4 + [3] * 4 + [4] * 3)
    rewards = (torch.arange(19) % 3 == 0).float()
    ro = Rollout(
        [Prompt(f"p{g}", "q", "a") for g in group_ids.tolist()],
        RolloutBatch(
            prompt_ids=torch.ones(19, 1, dtype=torch.long),
            prompt_mask=torch.ones(19, 1, dtype=torch.bool),
            completion_ids=torch.ones(19, 2, dtype=torch.long),
            completion_mask=torch.ones(19, 2, dtype=torch.bool),
            sampler_logprobs=torch.zeros(19, 2),
            truncated=torch.zeros(19, dtype=torch.bool),
            completion_texts=[""] * 19,
            prompt_texts=["q"] * 19,
        ),
        [Score(reward=float(r), correct=bool(r)) for r in rewards.tolist()],
        group_ids,
    )
    _errors(ro, [5])
    inputs: dict[str, Any] = {
        "rewards": rewards,
        "group_ids": group_ids,
        "response_mask": ro.batch.completion_mask,
    }
    plugin.extra_inputs(trainer, ro, inputs)
    adv, metrics = trainer._advantages(inputs, ro.scored)
    assert adv.shape == (19, 2) and torch.isfinite(adv).all()
    assert float(metrics["riskpo/quantile_low"]) == pytest.approx(plugin.grid[3])  # the tracked grid
    assert float(metrics["riskpo/quantile_high"]) == pytest.approx(plugin.grid[15])


# ------------------------------------------------------------------------------------ whole groups


def test_pack_groups_keeps_groups_whole_within_the_micro_batch_size() -> None:
    from tether.lm.trainer import pack_groups

    def sizes(groups: list[int], limit: int) -> list[list[int]]:
        tensors = [torch.arange(n) for n in groups]
        return [[len(g) for g in pack] for pack in pack_groups(tensors, limit)]

    assert sizes([4, 4, 4, 4], 8) == [[4, 4], [4, 4]]  # uniform groups: limit // group_size per pack
    assert sizes([4, 4, 4, 4], 0) == [[4, 4, 4, 4]]  # 0: the whole mini-batch
    assert sizes([6, 2, 2, 6], 8) == [[6, 2], [2, 6]]  # Knapsack's uneven budgets: filled in order
    assert sizes([2, 10, 2], 8) == [[2], [10], [2]]  # a group over the limit runs alone, never cut
    assert sizes([], 8) == []


def test_knapsack_with_a_whole_group_loss_keeps_micro_batches_within_their_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Knapsack gives groups of 2 to 12 rows: micro-batches of whole groups stay within
    train.micro_batch_size rows (it used to put micro_batch_size // group_size groups in each)."""
    recipe = tmp_path / "knapsack_real.yaml"
    recipe.write_text(
        "description: Knapsack budgets with REAL's group-wise loss\n"
        "advantage: {name: grpo}\n"
        "policy_loss: {name: real, params: {tau: 0.5}}\n"
        "loop:\n  - {name: knapsack, params: {min_n: 2, negative_n: 2, positive_n: 2, max_n: 12}}\n"
    )
    trainer = trainer_for(tmp_path, str(recipe), micro_batch_size=8)
    assert trainer.whole_groups
    plugin = only_plugin(trainer)
    counts = iter([[2, 6, 6, 2], [6, 2, 2, 6]])
    monkeypatch.setattr(
        plugin, "plan", lambda t, n, g: list(zip(t.prompts.next(n), next(counts), strict=True))
    )
    passes = record_grad_passes(trainer)
    for _ in range(2):
        passes.clear()
        trainer.step()
        groups = [set(g) for g in groups_of(trainer.last_rollout)]  # type: ignore[arg-type]
        assert sorted(len(g) for g in groups) == [2, 2, 6, 6]
        assert all(len(rows) <= 8 for rows in passes)
        for rows in passes:  # every micro-batch is a union of whole groups
            assert set(rows) == set().union(*[g for g in groups if g & set(rows)])
        assert sorted(r for rows in passes for r in rows) == list(range(16))
