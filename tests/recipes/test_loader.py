"""Recipe files: lookup by name or path, clear errors, and composition into a Method."""

from __future__ import annotations

from pathlib import Path

import pytest

from tether.config import ConfigError
from tether.errors import TetherError, UnknownNameError
from tether.recipes import Method, load_recipe, recipe_names


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
