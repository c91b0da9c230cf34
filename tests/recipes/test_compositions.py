"""Recipes whose composition the authors' scripts fix, and compositions that are refused before any
work because one component would silently ignore another."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tether.config import ConfigError, from_dict
from tether.lm.config import LMConfig
from tether.recipes import Method, load_recipe


def outcome_inputs() -> dict[str, torch.Tensor]:
    """Two groups of 4 with rewards (1, 0, 0, 0) and (1, 1, 1, 0), 3 tokens each."""
    return {
        "rewards": torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64),
        "response_mask": torch.ones(8, 3, dtype=torch.bool),
        "group_ids": torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]),
    }


@pytest.mark.parametrize("name", ["dppo", "dppo_kl"])
def test_dppo_recipes_use_mean_centred_advantages_without_the_std(name: str) -> None:
    """The authors' script (verl examples/dppo_trainer/run_qwen3_30b_a3b_megatron.sh) runs grpo with
    algorithm.norm_adv_by_std_in_grpo=False: A = r - group mean. Group means 0.25 and 0.75; GRPO's
    division by the group std (0.5, unbiased) would double every advantage."""
    adv, _ = Method(load_recipe(name)).compute_advantages(outcome_inputs())
    want = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.25, 0.25, 0.25, -0.75], dtype=torch.float64)
    torch.testing.assert_close(adv.to(torch.float64), want[:, None].expand(8, 3))


# --------------------------------------------------------------------------- shaping an unread reward

GDPO_SHAPED = """
advantage: gdpo
policy_loss: ppo_clip
rewards:
  - {name: kl_in_reward, params: {coef: 0.1}}
"""


def test_gdpo_refuses_reward_shaping_it_would_ignore(tmp_path: Path) -> None:
    """gdpo's advantage comes from each reward function's reward_parts; the shaped ``rewards`` only
    feed a metric, so a reward entry in the recipe would change nothing."""
    path = tmp_path / "gdpo_shaped.yaml"
    path.write_text(GDPO_SHAPED)
    with pytest.raises(
        ConfigError,
        match=r"reward entries 'kl_in_reward' reshape the rewards, but the advantage 'gdpo' takes them "
        r"only for its metrics.*task\.rewards.*KL regularizer",
    ):
        Method(load_recipe(str(path)))
    # the shipped recipe with a shaping entry added (as apply_method_overrides or a user could)
    shaped = dataclasses.replace(
        load_recipe("gdpo"), rewards=({"name": "dapo_overlong", "params": {}, "state": None},)
    )
    with pytest.raises(ConfigError, match=r"'dapo_overlong'.*'gdpo'.*silently ignored"):
        Method(shaped)


def test_shaping_is_refused_for_an_advantage_that_does_not_take_rewards(tmp_path: Path) -> None:
    path = tmp_path / "gae_shaped.yaml"
    path.write_text(GDPO_SHAPED.replace("advantage: gdpo", "advantage: gae"))
    with pytest.raises(ConfigError, match=r"'gae' does not take them \(its inputs: token_rewards"):
        Method(load_recipe(str(path)))


def test_shaping_composes_with_an_advantage_that_reads_rewards(tmp_path: Path) -> None:
    path = tmp_path / "grpo_shaped.yaml"
    path.write_text(GDPO_SHAPED.replace("advantage: gdpo", "advantage: grpo"))
    assert [c.name for c in Method(load_recipe(str(path))).rewards] == ["kl_in_reward"]
    assert Method(load_recipe("gdpo")).advantages[0].name == "gdpo"  # no shaping: fine


# --------------------------------------------------------------------------- sampler weights


def test_otb_with_a_sampler_correction_is_refused_at_config_load() -> None:
    """verl folds the rollout IS weights into OTB's baseline (w_t rho_t^2); tether's sampler
    correction weights only the policy-gradient term, after the advantages, so the pair is refused."""
    with pytest.raises(
        ConfigError,
        match=r"train\.sampler_correction=token_truncate cannot be used with recipe 'otb': its advantage "
        r"'otb' would ignore the sampler importance weights.*train\.sampler_correction=none",
    ):
        from_dict(LMConfig, {"recipe": "otb", "train": {"sampler_correction": "token_truncate"}})
    assert from_dict(LMConfig, {"recipe": "otb"}).train.sampler_correction == "none"
    grpo = from_dict(LMConfig, {"recipe": "grpo", "train": {"sampler_correction": "sequence_mask"}})
    assert grpo.train.sampler_correction == "sequence_mask"
