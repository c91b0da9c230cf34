"""The catalogue registry: every method registered by kind and name, with its paper.

Entries are plain functions. Registration records where the method comes from (paper,
arXiv id, method card) and whether the formula is *exact* (checked against the authors'
code or equations) or *reconstructed* (our best reading; a hypothesis).

The signature of a registered function is its contract: parameters without a default are
the tensors it needs (``logprobs``, ``advantages``, ``response_mask`` ...), parameters with a
default are hyperparameters whose defaults are the paper's. A trainer fills the inputs by
name and never branches on the method's name.

Two declarations complete the contract where the signature cannot say it, so that a recipe that
composes an entry with something it would silently ignore is refused before any work
(:mod:`tether.recipes.compose`): ``metric_only`` names inputs the entry takes only for its
metrics (GDPO's ``rewards``: its value comes from ``reward_parts``), and
``sampler_weights_conflict`` says why the entry cannot run while the world multiplies the
advantages by sampler importance weights (:mod:`tether.catalogue.mismatch`) after it.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from tether.errors import TetherError, UnknownNameError

Kind = Literal["policy_loss", "advantage", "regularizer", "reward", "selection", "constraint"]
Status = Literal["exact", "reconstructed"]

KINDS: tuple[Kind, ...] = ("policy_loss", "advantage", "regularizer", "reward", "selection", "constraint")
KIND_DESCRIPTIONS: dict[Kind, str] = {
    "policy_loss": "per-token surrogate objective on log-probs, aggregated to a scalar loss",
    "advantage": "turns rewards (and values, log-probs) into per-token advantages",
    "regularizer": "a term added to the policy loss (KL, entropy, divergences)",
    "reward": "reshapes or corrects rewards before advantages are computed",
    "selection": "chooses which groups, samples, tokens or budgets enter the update",
    "constraint": "cost constraints: Lagrange multipliers and their updates, CPO step, action projection",
}

F = TypeVar("F", bound=Callable[..., Any])


_SIGNATURES: dict[Callable[..., Any], inspect.Signature] = {}


@dataclass(frozen=True)
class Entry:
    """One registered method."""

    kind: Kind
    name: str
    fn: Callable[..., Any]
    paper: str
    arxiv: str
    status: Status
    card: str
    aliases: tuple[str, ...] = ()
    state_update: Callable[..., Any] | None = None
    summary: str = field(default="")
    metric_only: tuple[str, ...] = ()
    sampler_weights_conflict: str = ""

    @property
    def signature(self) -> inspect.Signature:
        """``inspect.signature(fn)``, computed once (trainers call entries in their inner loop)."""
        sig = _SIGNATURES.get(self.fn)
        if sig is None:
            sig = _SIGNATURES[self.fn] = inspect.signature(self.fn)
        return sig

    @property
    def inputs(self) -> tuple[str, ...]:
        """Names of the required inputs (parameters without a default)."""
        sig = self.signature
        return tuple(
            p.name
            for p in sig.parameters.values()
            if p.default is inspect.Parameter.empty
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        )

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """Hyperparameters and their (paper) defaults."""
        sig = self.signature
        return {
            p.name: p.default for p in sig.parameters.values() if p.default is not inspect.Parameter.empty
        }

    def reads(self, name: str) -> bool:
        """Whether the entry's output depends on input ``name``: a required input that is not
        declared ``metric_only``."""
        return name in self.inputs and name not in self.metric_only

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "paper": self.paper,
            "arxiv": self.arxiv,
            "status": self.status,
            "card": self.card,
            "summary": self.summary,
            "aliases": list(self.aliases),
            "inputs": list(self.inputs),
            "hyperparameters": {k: _jsonable(v) for k, v in self.hyperparameters.items()},
        }


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return repr(value)


_REGISTRY: dict[Kind, dict[str, Entry]] = {k: {} for k in KINDS}
_ALIASES: dict[Kind, dict[str, str]] = {k: {} for k in KINDS}


def _first_line(doc: str | None) -> str:
    if not doc:
        return ""
    for line in doc.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def register(
    kind: Kind,
    name: str,
    *,
    paper: str,
    arxiv: str,
    status: Status,
    card: str,
    aliases: tuple[str, ...] = (),
    state_update: Callable[..., Any] | None = None,
    metric_only: tuple[str, ...] = (),
    sampler_weights_conflict: str = "",
) -> Callable[[F], F]:
    """Decorator: register ``fn`` under ``kind`` / ``name``.

    ``paper`` is the paper's title, ``arxiv`` its arXiv id ("" only for textbook methods with
    no arXiv paper), ``status`` says whether the formula is exact or reconstructed, and
    ``card`` points at the method card (e.g. ``ratio#1`` or ``adv#B4``). A stateful method names
    the pure function that advances its state in ``state_update``.

    ``metric_only`` lists required inputs that feed only the entry's metrics, never its output
    (a recipe that reshapes such an input before the entry is refused). ``sampler_weights_conflict``,
    when not empty, says why the entry's formula is wrong once the world multiplies the advantages
    by sampler importance weights after it (a run with a sampler correction is then refused).
    """
    if kind not in _REGISTRY:
        raise TetherError(f"unknown catalogue kind {kind!r}; kinds are {', '.join(KINDS)}")
    if status not in ("exact", "reconstructed"):
        raise TetherError(f"status must be 'exact' or 'reconstructed', got {status!r} for {name!r}")
    metric_only = tuple(metric_only)

    def decorator(fn: F) -> F:
        if name in _REGISTRY[kind] or name in _ALIASES[kind]:
            raise TetherError(f"{kind} {name!r} is registered twice")
        if not fn.__doc__ or not fn.__doc__.strip():
            raise TetherError(f"{kind} {name!r} needs a docstring citing its paper")
        params = inspect.signature(fn).parameters
        unknown = [
            n for n in metric_only if n not in params or params[n].default is not inspect.Parameter.empty
        ]
        if unknown:
            raise TetherError(
                f"{kind} {name!r}: metric_only names {unknown}, which are not required inputs of "
                f"{fn.__name__}; list only parameters without a default"
            )
        entry = Entry(
            kind=kind,
            name=name,
            fn=fn,
            paper=paper,
            arxiv=arxiv,
            status=status,
            card=card,
            aliases=aliases,
            state_update=state_update,
            summary=_first_line(fn.__doc__),
            metric_only=metric_only,
            sampler_weights_conflict=sampler_weights_conflict,
        )
        _REGISTRY[kind][name] = entry
        for alias in aliases:
            _ALIASES[kind][alias] = name
        return fn

    return decorator


def get(kind: Kind, name: str) -> Entry:
    """Look up an entry; an unknown name raises an error listing close matches and all names."""
    if kind not in _REGISTRY:
        raise UnknownNameError(f"unknown catalogue kind {kind!r}; kinds are: {', '.join(KINDS)}")
    table = _REGISTRY[kind]
    key = _ALIASES[kind].get(name, name)
    if key in table:
        return table[key]
    names = sorted(table) + sorted(_ALIASES[kind])
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownNameError(
        f"unknown {kind} {name!r}.{hint} Registered {kind} names: {', '.join(sorted(table))}. "
        "Run `tether list` to see the whole catalogue."
    )


def names(kind: Kind) -> list[str]:
    return sorted(_REGISTRY[kind])


def entries(kind: Kind | None = None) -> list[Entry]:
    """All entries, sorted by kind (in KINDS order) then name."""
    kinds = KINDS if kind is None else (kind,)
    return [_REGISTRY[k][n] for k in kinds for n in sorted(_REGISTRY[k])]
