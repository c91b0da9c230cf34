"""The user's own code: modules and ``.py`` files a run imports before it is built.

A run's ``imports`` setting lists Python modules (``my_project.rewards``) or ``.py`` files
(``./my_task.py``). They are imported before the recipe, the task or anything else is looked
up, so their decorators can register tasks (:func:`tether.lm.tasks.register_task`), loop plugins
(:func:`tether.lm.plugins.register_plugin`) and catalogue entries, which the run then names like
built-in ones. :func:`resolve_object` finds a single object, such as a reward function, by
``module:name`` or ``path/to/file.py:name``.

As with ``python -m``, the working directory is searched for modules, so a ``my_rewards.py``
beside the command is found as ``my_rewards``. A file is imported once per process, under a
module name made from its absolute path, with its directory on ``sys.path`` so that it can
import its neighbours. Every failure is a :class:`~tether.config.ConfigError` that names the
entry, what went wrong and the fix, raised before any run directory or model exists.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from tether.config import ConfigError


def _is_file_entry(entry: str) -> bool:
    return entry.endswith(".py") or "/" in entry or os.sep in entry


def _import_file(entry: str, key: str) -> ModuleType:
    path = Path(entry).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(
            f"{key}: {entry!r} is not a file (looked for {str(path)!r}); give the path of a .py file, "
            "absolute or relative to the working directory, or a module name such as my_package.rewards"
        )
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    name = f"tether_user_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{key}: {str(path)!r} cannot be imported as Python source; give a .py file")
    module = importlib.util.module_from_spec(spec)
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise ConfigError(
            f"{key}: importing {str(path)!r} raised {type(err).__name__}: {err}; fix that file"
        ) from err
    return module


def _import_module(entry: str, key: str) -> ModuleType:
    cwd = os.getcwd()
    if cwd not in sys.path:  # as `python -m` does: modules beside the command are found
        sys.path.append(cwd)
    try:
        return importlib.import_module(entry)
    except ModuleNotFoundError as err:
        if err.name is not None and entry.split(".")[0] == err.name.split(".")[0]:
            raise ConfigError(
                f"{key}: no module named {entry!r} (searched the working directory {cwd!r} and sys.path); "
                "check the name, install the package, or give the path of a .py file"
            ) from err
        raise ConfigError(
            f"{key}: importing {entry!r} raised ModuleNotFoundError: {err}; fix that module"
        ) from err
    except Exception as err:
        raise ConfigError(
            f"{key}: importing {entry!r} raised {type(err).__name__}: {err}; fix that module"
        ) from err


def import_entry(entry: str, key: str = "imports") -> ModuleType:
    """Import one module name or ``.py`` file (``key`` names the setting in error messages)."""
    if not isinstance(entry, str) or not entry.strip():
        raise ConfigError(f"{key}: {entry!r} is not a module name or a .py path")
    entry = entry.strip()
    return _import_file(entry, key) if _is_file_entry(entry) else _import_module(entry, key)


def import_user_code(entries: Iterable[str] | str | None, key: str = "imports") -> list[ModuleType]:
    """Import every entry of a run's ``imports`` setting, in order (a comma-separated string is a list)."""
    if entries is None:
        return []
    if isinstance(entries, str):
        entries = [e for e in entries.split(",") if e.strip()]
    return [import_entry(e, f"{key}[{i}]") for i, e in enumerate(entries)]


def absolute_spec(spec: str) -> str:
    """``spec`` (an ``imports`` entry, or a ``task.rewards`` entry such as ``rewards.py:brevity``) with
    the path of a ``.py`` file made absolute against the working directory; a module name, a
    built-in name or an absolute path is returned as given.

    A run records its entries so: a run that imported ``./rewards.py`` still finds it when
    ``tether eval RUN`` or ``--resume`` runs from another directory.
    """
    if not isinstance(spec, str) or not spec.strip():
        return spec
    spec = spec.strip()
    where, colon, attr = spec.rpartition(":")
    if colon and where and _is_file_entry(where):
        return f"{os.path.abspath(os.path.expanduser(where))}:{attr}"
    if not colon and _is_file_entry(spec):
        return os.path.abspath(os.path.expanduser(spec))
    return spec


def resolve_object(spec: str, key: str) -> Any:
    """The object named by ``module:name``, ``module.name`` or ``path/to/file.py:name``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"{key}: {spec!r} does not name an object; write module:name or file.py:name")
    spec = spec.strip()
    if ":" in spec:
        where, _, attr = spec.rpartition(":")
    elif "." in spec and not _is_file_entry(spec):
        where, _, attr = spec.rpartition(".")
    else:
        raise ConfigError(
            f"{key}: {spec!r} does not say where to find it; write module:name (e.g. my_rewards:brevity) "
            "or path/to/file.py:name"
        )
    if not where or not attr:
        raise ConfigError(f"{key}: {spec!r} must look like module:name or file.py:name")
    module = import_entry(where, key)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n in dir(module) if not n.startswith("_"))
            raise ConfigError(
                f"{key}: {where!r} has no attribute {attr!r}; it defines {', '.join(names) or 'nothing public'}"
            )
        obj = getattr(obj, part)
    return obj
