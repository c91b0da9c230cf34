"""A resumed run keeps the settings it was started with.

A run's ``config.yaml`` holds its resolved settings. :func:`saved_config` reads them back (the
command line builds a resumed run from them, so ``--out DIR --resume`` alone continues it), and
:func:`check_resume_config` refuses, before any work, a resume whose settings differ from them
anywhere a resume may not change them: a different learning rate, model or task would continue
a run that never existed. What a resume may change is listed per trainer (the step budget, to
extend a run; logging, checkpoint cadence and evaluation, which do not touch the training math).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tether.config import flatten, from_dict, key_under, setting_changes, to_dict
from tether.errors import TetherError
from tether.runs.checkpoint import latest_checkpoint

#: Keys of config.yaml that describe the run but are not settings.
DERIVED_KEYS = ("recipe_resolved", "recipe_path")


def resume_settings(run_dir: str | Path) -> dict[str, Any] | None:
    """:func:`saved_config` for ``--resume`` on the command line: None for a directory that does not
    exist yet (a fresh start); a refusal for a directory that is not a tether run, and for a run that
    never wrote its settings (killed while it was starting), which would otherwise continue with the
    defaults of every setting."""
    path = Path(run_dir)
    if path.is_dir() and any(path.iterdir()):
        from tether.runs.rundir import RunDir

        if not RunDir(path).is_run():  # another program's directory, a config.yaml of its own included
            names = sorted(p.name for p in path.iterdir())
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            raise TetherError(
                f"cannot resume {str(run_dir)!r}: it is not a tether run directory (it holds {shown}, and no "
                "run marker, checkpoint or metrics.jsonl); check --out, or start a new run in a new or "
                "empty directory without --resume"
            )
    saved = saved_config(run_dir)
    if saved is None and path.is_dir() and any(path.iterdir()):
        raise TetherError(
            f"cannot resume {str(run_dir)!r}: it holds no config.yaml (the run was stopped while it was starting, "
            "before it saved its settings); start it again without --resume, giving its settings"
        )
    return saved


def saved_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The settings a run was started with (its config.yaml without derived keys), or None."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        return None
    return {k: v for k, v in data.items() if k not in DERIVED_KEYS}


def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` laid over it, section by section."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


_UNSET = "(not set)"


def _settings(data: Mapping[str, Any]) -> dict[str, Any]:
    """Flattened settings, an empty section (``method: {}``) counting as nothing set."""
    return {k: v for k, v in flatten(dict(data)).items() if v != {}}


def resolved_with(cls: type[Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A ``resolve`` for :func:`changed_settings`: saved settings built into today's full config of
    the dataclass ``cls`` (defaults filled in)."""
    return lambda data: to_dict(from_dict(cls, data))


def changed_settings(
    run_dir: str | Path,
    config: Mapping[str, Any],
    may_change: Collection[str],
    resolve: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
) -> list[tuple[str, Any, Any]]:
    """``(key, value in the run, value now)`` for every setting of ``config`` that differs from the
    run's saved settings outside ``may_change`` (dotted keys or sections); [] for a run without a
    saved config or without a checkpoint (nothing of it was kept).

    Every setting of either side is compared, so a key the saved file lacks (a new
    ``method.<entry>.<param>``, a new ``task.params`` entry) is a change too. ``resolve`` builds
    the saved settings into the full config of today's tether (defaults filled in), so that a
    setting added since the run started counts as unchanged unless it was set now.
    """
    saved = saved_config(run_dir)
    if saved is None or latest_checkpoint(Path(run_dir)) is None:
        return []
    if resolve is not None:
        try:
            saved = dict(resolve(saved))
        except TetherError:  # a config tether no longer reads: compare it as written
            pass
    changed = setting_changes(_settings(saved), _settings(config), _UNSET)
    return [c for c in changed if not key_under(c[0], may_change)]


def describe_changes(changed: Sequence[tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{key}: {old!r} in the run, {new!r} now" for key, old, new in changed)


def recipe_changes(run_dir: str | Path, recipe: Mapping[str, Any] | None) -> list[tuple[str, Any, Any]]:
    """The recipe's own components and parameters (``recipe_resolved`` in config.yaml) where they
    differ from ``recipe``: a recipe file edited since the run started is another method. Only the
    parts both sides record are compared (older runs recorded fewer)."""
    path = Path(run_dir) / "config.yaml"
    if recipe is None or not path.is_file() or latest_checkpoint(Path(run_dir)) is None:
        return []
    data = yaml.safe_load(path.read_text())
    before = data.get("recipe_resolved") if isinstance(data, dict) else None
    if not isinstance(before, dict):
        return []
    return [
        (f"recipe_resolved.{key}", before[key], recipe[key])
        for key in sorted(before.keys() & recipe.keys())
        if before[key] != recipe[key]
    ]


def check_resume_config(
    run_dir: str | Path,
    config: Mapping[str, Any],
    may_change: Collection[str],
    resolve: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
    recipe: Mapping[str, Any] | None = None,
) -> None:
    """Refuse to resume ``run_dir`` with ``config`` where it differs from the run's saved settings
    outside ``may_change`` (see :func:`changed_settings`), or with a recipe whose components or
    parameters changed since it started (``recipe``: the resolved recipe now, see :func:`recipe_changes`)."""
    changed = changed_settings(run_dir, config, may_change, resolve)
    changed += recipe_changes(run_dir, recipe)
    if changed:
        raise TetherError(
            f"cannot resume {str(run_dir)!r} with settings other than those it was started with "
            f"({describe_changes(changed)}). Resume with the run's own settings (--out DIR --resume alone "
            "takes them from its config.yaml), or start a new run with another --out. A resume may change "
            f"only: {', '.join(sorted(may_change))}"
        )
