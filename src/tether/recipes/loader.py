"""Load and validate recipe files (``src/tether/recipes/*.yaml`` or any path)."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tether.errors import TetherError, UnknownNameError

RECIPE_DIR = Path(__file__).parent
TOP_KEYS = (
    "description",
    "paper",
    "arxiv",
    "status",
    "advantage",
    "policy_loss",
    "regularizers",
    "rewards",
    "train",
    "loop",
    "constraint",
)

#: Roles of a recipe's ``constraint`` block (a cost constraint J_c <= cost_limit); see compose.Constraint.
CONSTRAINT_ROLES = ("multiplier", "objective", "trust_region")


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    paper: str
    arxiv: str
    advantage: tuple[dict[str, Any], ...]  # a chain: the first computes, the rest transform
    policy_loss: dict[str, Any]
    regularizers: tuple[dict[str, Any], ...] = ()
    rewards: tuple[dict[str, Any], ...] = ()
    loop: tuple[dict[str, Any], ...] = ()  # loop plugins (tether.lm.plugins), world-specific
    constraint: dict[str, Any] | None = None  # roles -> component specs, plus cost_limit
    train: dict[str, Any] = field(default_factory=dict)
    status: str = "exact"
    path: str = ""


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def _component(source: str, key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        return {"name": value, "params": {}}
    if not isinstance(value, dict) or "name" not in value:
        raise TetherError(
            f"recipe {source}: {key} must be a name or a mapping with 'name' (and 'params'), got {value!r}"
        )
    unknown = set(value) - {"name", "params", "state"}
    if unknown:
        raise TetherError(
            f"recipe {source}: {key} has unknown keys {sorted(unknown)}; allowed: name, params, state"
        )
    return {"name": value["name"], "params": dict(value.get("params") or {}), "state": value.get("state")}


def _constraint(source: str, value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TetherError(
            f"recipe {source}: constraint must be a mapping with cost_limit and roles "
            f"({', '.join(CONSTRAINT_ROLES)}), got {value!r}"
        )
    unknown = set(value) - {*CONSTRAINT_ROLES, "cost_limit"}
    if unknown:
        raise TetherError(
            f"recipe {source}: constraint has unknown keys {sorted(unknown)}; "
            f"allowed: cost_limit, {', '.join(CONSTRAINT_ROLES)}"
        )
    roles = {r: _component(source, f"constraint.{r}", value[r]) for r in CONSTRAINT_ROLES if r in value}
    if not roles:
        raise TetherError(
            f"recipe {source}: constraint needs at least one of {', '.join(CONSTRAINT_ROLES)} "
            "(e.g. multiplier: lagrange_update, objective: lagrangian_advantage)"
        )
    if "objective" in roles and "multiplier" not in roles:
        raise TetherError(f"recipe {source}: constraint.objective needs a constraint.multiplier to set it")
    out: dict[str, Any] = dict(roles)
    if "cost_limit" in value:
        try:
            out["cost_limit"] = float(value["cost_limit"])
        except (TypeError, ValueError):
            raise TetherError(
                f"recipe {source}: constraint.cost_limit must be a number, got {value['cost_limit']!r}"
            ) from None
    return out


def absolute_recipe(name_or_path: str) -> str:
    """``name_or_path`` with a recipe file's path made absolute (``~`` expanded), as a run records
    it so that ``--resume`` and ``tether eval`` find it from any directory; a name is returned as given."""
    if Path(name_or_path).suffix in (".yaml", ".yml"):
        return os.path.abspath(os.path.expanduser(name_or_path))
    return name_or_path


def load_recipe(name_or_path: str) -> Recipe:
    """A recipe by registered name (``grpo``) or by path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise UnknownNameError(
            f"recipe file {name_or_path!r} {what}; pass an existing .yaml file or a recipe name "
            f"(tether recipes lists them)"
        )
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = RECIPE_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            names = recipe_names()
            close = difflib.get_close_matches(name_or_path, names, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UnknownNameError(
                f"unknown recipe {name_or_path!r}.{hint} Recipes: {', '.join(names)}; or pass a path to a .yaml file."
            )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise TetherError(f"recipe file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise TetherError(f"recipe file {str(path)!r} must hold a mapping")
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise TetherError(f"recipe {path.name}: unknown keys {unknown}; allowed: {', '.join(TOP_KEYS)}")
    for required in ("advantage", "policy_loss"):
        if required not in data:
            raise TetherError(f"recipe {path.name}: missing '{required}'")
    src = path.name
    return Recipe(
        name=path.stem,
        description=str(data.get("description", "")),
        paper=str(data.get("paper", "")),
        arxiv=str(data.get("arxiv", "")),
        status=str(data.get("status", "exact")),
        advantage=tuple(
            _component(src, f"advantage[{i}]", a)
            for i, a in enumerate(
                data["advantage"] if isinstance(data["advantage"], list) else [data["advantage"]]
            )
        ),
        policy_loss=_component(src, "policy_loss", data["policy_loss"]),
        regularizers=tuple(_component(src, "regularizers", r) for r in data.get("regularizers") or ()),
        rewards=tuple(_component(src, "rewards", r) for r in data.get("rewards") or ()),
        loop=tuple(_component(src, "loop", r) for r in data.get("loop") or ()),
        constraint=_constraint(src, data.get("constraint")),
        train=dict(data.get("train") or {}),
        path=str(path),
    )


def recipe_dict(recipe: Recipe) -> dict[str, Any]:
    """A recipe's components and parameters as plain data (``recipe_resolved`` in a run's config.yaml):
    what a resume compares, so that a recipe file edited since the run started is refused."""
    return {
        "name": recipe.name,
        "advantage": list(recipe.advantage),
        "policy_loss": recipe.policy_loss,
        "regularizers": list(recipe.regularizers),
        "rewards": list(recipe.rewards),
        "loop": list(recipe.loop),
        "constraint": recipe.constraint,
        "train": dict(recipe.train),
    }
