"""The catalogue: pure, registered policy-optimization math.

Importing this package registers every entry (each module under ``losses``, ``advantages``,
``regularizers``, ``rewards``, ``selection`` and ``constraints`` registers itself on import).
Nothing here imports the language-model or control worlds.
"""

from __future__ import annotations

import importlib
import pkgutil

from tether.catalogue.aggregate import AGGREGATION_MODES, Aggregation, aggregate
from tether.catalogue.registry import KINDS, Entry, entries, get, names, register

_FAMILIES = ("losses", "advantages", "regularizers", "rewards", "selection", "constraints")


def _load_all() -> None:
    for family in _FAMILIES:
        try:
            package = importlib.import_module(f"{__name__}.{family}")
        except ModuleNotFoundError:
            continue
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package.__name__}.{info.name}")


_load_all()

__all__ = [
    "AGGREGATION_MODES",
    "KINDS",
    "Aggregation",
    "Entry",
    "aggregate",
    "entries",
    "get",
    "names",
    "register",
]
