"""Recipe files: lookup by name or path, clear errors, and composition into a Method."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tether.config import ConfigError
from tether.errors import TetherError, UnknownNameError
from tether.recipes import Method, load_recipe, recipe_names
from tether.recipes.compose import call_entry


def test_every_recipe_composes() -> None:
    for name in recipe_names():
        recipe = load_recipe(name)
        method = Method(recipe)
        assert method.policy_loss.name == recipe.policy_loss["name"]


def test_unknown_recipe_lists_close_matches() -> None:
    with pytest.raises(UnknownNameError, match=r"unknown recipe 'dapoo'\. Did you mean 'dapo'"):
        load_recipe("dapoo")


def test_recipe_from_a_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("advantage: grpo\npolicy_loss: {name: ppo_clip, params: {eps_high: 0.3}}\n")
    recipe = load_recipe(str(path))
    assert recipe.name == "mine" and recipe.policy_loss["params"] == {"eps_high": 0.3}
    assert Method(recipe).policy_loss.params["eps_high"] == 0.3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("advantage: grpo\n", "missing 'policy_loss'"),
        ("advantage: grpo\npolicy_loss: ppo_clip\nregularisers: []\n", "unknown keys \\['regularisers'\\]"),
        ("advantage: grpo\npolicy_loss: {params: {}}\n", "must be a name or a mapping with 'name'"),
        ("advantage: [grpo\n", "not valid YAML"),
    ],
)
def test_bad_recipe_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(TetherError, match=message):
        load_recipe(str(path))


def test_unknown_parameter_and_entry_are_clear(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("advantage: grpo\npolicy_loss: {name: ppo_clip, params: {eps_hi: 0.3}}\n")
    with pytest.raises(ConfigError, match=r"has no parameter 'eps_hi'.*eps_high"):
        Method(load_recipe(str(path)))
    path.write_text("advantage: grpo\npolicy_loss: ppo_clipp\n")
    with pytest.raises(TetherError, match="ppo_clipp"):
        Method(load_recipe(str(path)))


def test_state_wiring_needs_a_state_update(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("advantage: grpo\npolicy_loss: {name: ppo_clip, state: {param: eps_low}}\n")
    with pytest.raises(ConfigError, match="no registered state update"):
        Method(load_recipe(str(path)))


ADAPTIVE_KL = """
advantage: grpo
policy_loss: ppo_clip
regularizers:
  - name: kl_k3
    params: {coef: 0.04}
    state: {param: coef, inputs: {kl: policy/kl_ref}, params: {target: 0.01}}
"""


def test_state_arguments_are_checked_when_the_recipe_is_built(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text(ADAPTIVE_KL.replace("params: {target: 0.01}", "params: {}"))
    with pytest.raises(ConfigError, match="adaptive_kl_coef needs target"):
        Method(load_recipe(str(path)))
    path.write_text(ADAPTIVE_KL.replace("target: 0.01", "target: 0.01, horizon: 10"))
    with pytest.raises(ConfigError, match=r"'horizon' is not an argument.*error_clip, kl, rate, target"):
        Method(load_recipe(str(path)))


def test_adaptive_kl_coefficient_follows_the_measured_kl(tmp_path: Path) -> None:
    """Ziegler et al.'s controller through the recipe: coef *= 1 + 0.1 clip(kl / 0.01 - 1, +-0.2)."""
    path = tmp_path / "a.yaml"
    path.write_text(ADAPTIVE_KL)
    method = Method(load_recipe(str(path)))
    (kl,) = [c for c in method.components if c.state is not None]
    expected = 0.04
    for measured, factor in ((0.05, 1.02), (0.011, 1.01), (0.009, 0.99), (0.0, 0.98)):
        method.update_state({"policy/kl_ref": measured})
        expected *= factor
        assert kl.params["coef"] == pytest.approx(expected, rel=1e-12)
    # the KL term of the loss uses the updated coefficient
    lp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    inputs = {"logprobs": lp, "ref_logprobs": ref, "response_mask": mask}
    term, metrics = call_entry(kl, inputs)
    assert float(term) == pytest.approx(expected * float(metrics["reg/kl"]), rel=1e-6)
    assert float(metrics["reg/kl"]) > 0
