from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from tether.config import ConfigError, apply_overrides, from_dict, load, load_yaml, to_dict


@dataclass
class Optim:
    lr: float = field(default=1e-6, metadata={"min": 0.0, "min_exclusive": True})
    clip: float | None = None


@dataclass
class Cfg:
    group_size: int = field(default=8, metadata={"min": 2})
    recipe: str = "grpo"
    mode: Literal["token", "sequence"] = "token"
    optim: Optim = field(default_factory=Optim)
    tags: list[str] = field(default_factory=list)
    verbose: bool = False


def test_defaults_and_overrides() -> None:
    cfg = load(Cfg, {"recipe": "mhpo"}, ["optim.lr=3e-5", "group_size=4", "tags=a,b", "verbose=true"])
    assert cfg.recipe == "mhpo" and cfg.optim.lr == 3e-5 and cfg.group_size == 4
    assert cfg.tags == ["a", "b"] and cfg.verbose is True
    assert to_dict(cfg)["optim"] == {"lr": 3e-5, "clip": None}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("group_sise=4", "unknown config key 'group_sise'. Did you mean 'group_size'"),
        ("optim.lrr=1", "unknown config key 'optim.lrr'"),
        ("sft.lr=1", "unknown config key 'sft'. Did you mean 'optim.lr'"),  # another command's section
        ("group_size=1", "group_size: 1 is out of range; it must be >= 2"),
        ("optim.lr=-1e-5", "optim.lr: -1e-05 is out of range; it must be > 0"),
        ("group_size=abc", "group_size: expected an integer, got 'abc'"),
        ("mode=tokens", "mode: 'tokens' is not allowed; choose one of 'token', 'sequence'"),
        ("optim=3", "optim: expected a section"),
        ("nokey", "must look like key.sub=value"),
        # NaN compares false with every bound, so it must be refused before the range check
        ("optim.lr=nan", "optim.lr: 'nan' is not a finite number"),
        ("optim.lr=inf", "optim.lr: 'inf' is not a finite number"),
        ("optim.clip=-inf", "optim.clip: '-inf' is not a finite number"),
    ],
)
def test_bad_values_name_key_value_and_allowed(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(Cfg, {}, [override])
    assert message in str(err.value)


def test_override_creates_nested_and_rejects_value_as_section() -> None:
    assert apply_overrides({}, ["a.b=1"]) == {"a": {"b": 1}}
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_yaml_is_loaded_safely(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "c.yaml"
    p.write_text("recipe: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(p)
    p.write_text("group_size: 4\noptim: {lr: 0.001}\n")
    assert from_dict(Cfg, load_yaml(p)).optim.lr == 0.001
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
