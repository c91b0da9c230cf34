"""Every recipe loads and runs one RL step on the tiny model; stateful recipes advance their state."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.lm.test_trainer import make_config
from tether.lm.trainer import RLTrainer
from tether.recipes import load_recipe, recipe_names


@pytest.fixture(scope="module", autouse=True)
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    cache = tmp_path_factory.mktemp("tether_cache")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TETHER_CACHE", str(cache))
        yield cache
    torch.set_num_threads(threads)


def test_there_are_recipes() -> None:
    assert {"grpo", "dapo", "r2vpo", "siren"} <= set(recipe_names())


@pytest.mark.parametrize("name", recipe_names())
def test_recipe_runs_one_step(name: str, tmp_path: Path) -> None:
    recipe = load_recipe(name)
    assert recipe.name == name and recipe.description
    # max_refill_rounds=0 keeps dynamic-sampling recipes at one extra round at most.
    trainer = RLTrainer(
        make_config(tmp_path / "run", "train.steps=1", "train.max_refill_rounds=0", recipe=name)
    )
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    metrics = trainer.step()
    assert math.isfinite(metrics["policy/entropy"]) and math.isfinite(metrics["grad/norm"])
    assert metrics["train/nan_skips"] == 0.0
    after = trainer.model.state_dict()
    changed = any(not torch.equal(before[k], after[k]) for k in before)
    assert changed == (metrics["grad/norm"] > 0), "a nonzero gradient must update the policy (and only then)"


@pytest.mark.parametrize(
    ("name", "key"),
    [("r2vpo", "lagrange_multiplier"), ("siren", "anchor_entropy")],
)
def test_stateful_recipe_advances_state(name: str, key: str, tmp_path: Path) -> None:
    # A large learning rate moves the ratios of later epochs far from 1, so r2vpo's ratio variance
    # exceeds its delta and the multiplier grows from 0.
    trainer = RLTrainer(
        make_config(tmp_path / "run", "train.steps=2", "train.lr=0.3", "train.minibatches=4", recipe=name)
    )
    (state_key,) = trainer.method.state_dict()
    first = trainer.method.state_dict()[state_key]
    trainer.step()
    second = trainer.method.state_dict()[state_key]
    if name == "siren":
        assert first is None and isinstance(second, float) and second > 0  # anchored on the first batch
        trainer.step()
        assert trainer.method.state_dict()[state_key] == second  # and kept afterwards
    else:
        assert second != first
    (comp,) = [c for c in trainer.method.components if c.state is not None]
    assert comp.state is not None and comp.state.param == key
    # The state is part of the checkpoint.
    trainer.step_idx = 1
    trainer.save()
    resumed = RLTrainer(
        make_config(tmp_path / "run", "train.steps=2", "train.lr=0.3", "train.minibatches=4", recipe=name),
        resume=True,
    )
    assert resumed.method.state_dict() == trainer.method.state_dict()


def test_adaptive_kl_coefficient_tracks_the_runs_kl_and_resumes(tmp_path: Path) -> None:
    recipe = tmp_path / "grpo_adaptive_kl.yaml"
    recipe.write_text(
        "advantage: grpo\npolicy_loss: ppo_clip\nregularizers:\n"
        "  - name: kl_k3\n    params: {coef: 0.04}\n"
        "    state: {param: coef, inputs: {kl: policy/kl_ref}, params: {target: 1.0e-6}}\n"
    )
    out = tmp_path / "run"
    cfg = make_config(out, "train.steps=3", "train.lr=0.05", "run.checkpoint_every=2", recipe=str(recipe))
    trainer = RLTrainer(cfg)
    coefs = [trainer.method.state_dict()["2:kl_k3"]]
    kls = []
    for _ in range(3):
        kls.append(trainer.step()["policy/kl_ref"])
        trainer.step_idx += 1
        coefs.append(trainer.method.state_dict()["2:kl_k3"])
    # step 1 starts at the reference (KL 0: shrink 2%); later ones are far above the tiny target (grow 2%)
    assert kls[0] < 1e-9 and all(k > 1e-6 for k in kls[1:])
    assert coefs[1] == pytest.approx(0.04 * 0.98) and coefs[3] == pytest.approx(0.04 * 0.98 * 1.02 * 1.02)
    trainer.save()
    resumed = RLTrainer(make_config(out, "train.steps=3", "train.lr=0.05", recipe=str(recipe)), resume=True)
    assert resumed.method.state_dict() == trainer.method.state_dict()


def test_kl_in_the_reward_loads_a_reference_and_shifts_the_rewards(tmp_path: Path) -> None:
    recipe = tmp_path / "grpo_kl_reward.yaml"
    recipe.write_text(
        "advantage: grpo\npolicy_loss: ppo_clip\nrewards:\n"
        "  - name: kl_in_reward\n    params: {coef: 0.5, estimator: k3}\n"
        "    state: {param: coef, inputs: {kl: reward/kl}, params: {target: 1.0}}\n"
    )
    trainer = RLTrainer(make_config(tmp_path / "run", "train.steps=3", "train.lr=0.05", recipe=str(recipe)))
    assert trainer.ref_model is not None  # the reward entry needs ref_logprobs
    coef = 0.5
    for _ in range(3):
        m = trainer.step()
        trainer.step_idx += 1
        assert m["adv/reward_mean"] == pytest.approx(m["reward/mean"] - m["reward/kl_penalty"], abs=1e-6)
        assert m["reward/kl_penalty"] == pytest.approx(coef * m["reward/kl"], rel=1e-5, abs=1e-12)
        coef *= 1 + 0.1 * min(max(m["reward/kl"] / 1.0 - 1, -0.2), 0.2)
        assert trainer.method.state_dict()["0:kl_in_reward"] == pytest.approx(coef)
    assert m["reward/kl"] > 0  # the policy has left the reference by the last step
