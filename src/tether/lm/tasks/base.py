"""The task interface: prompts with known answers, a verifier that scores a completion.

A :class:`Task` yields :class:`Prompt` objects for a ``"train"`` and a ``"test"`` split (disjoint,
and fixed by the task's own seed), scores a completion with a :class:`Score` (reward in [0, 1],
optional cost), gives a correct reference completion (the SFT target) and extracts the answer
from a completion. :func:`safe_score` isolates a verifier that raises: the sample gets reward 0
and the error is recorded on the score, so the run goes on and the trainer can count it.

Tasks register by name with :func:`register_task`; :func:`get_task` builds one from its name
and keyword parameters (an unknown name lists close matches and every name).
"""

from __future__ import annotations

import abc
import difflib
import inspect
import math
import os
import random
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from tether.config import check_value
from tether.errors import TetherError, UnknownNameError

Split = Literal["train", "test"]
SPLITS: tuple[Split, ...] = ("train", "test")


@dataclass(frozen=True)
class Prompt:
    """One problem: ``text`` is what the policy sees, ``answer`` the normalised correct answer.

    ``id`` is stable across runs (``<task>/<split>/<index>``); ``meta`` holds task-specific data
    (numbers, target, raw answer ...) and takes no part in equality or hashing.
    """

    id: str
    text: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class Score:
    """What the verifier says about one completion.

    ``reward`` in [0, 1]; ``correct`` whether the answer is right; ``format_ok`` whether the
    completion has the expected form; ``cost`` a safety cost (0 when the task has none);
    ``error`` is set (``"ExcType: message"``) when the verifier raised (see :func:`safe_score`);
    ``parts`` holds each reward function's value when the reward combines several
    (:mod:`tether.lm.tasks.rewards`).
    """

    reward: float
    correct: bool
    format_ok: bool = True
    cost: float = 0.0
    error: str | None = None
    parts: dict[str, float] = field(default_factory=dict, hash=False, compare=False)


class Task(abc.ABC):
    """A task with verifiable rewards.

    Subclasses set ``name`` and implement :meth:`all_prompts` (the whole split, deterministic
    given the task's parameters), :meth:`score`, :meth:`reference` and :meth:`extract`.
    :meth:`prompts` then draws seeded subsets; a subclass may override it instead.
    """

    name: str = "task"
    #: Constructor parameters that name files: :func:`resolve_task_params` makes them absolute, so
    #: that the settings a run records name the same files from any working directory.
    path_params: typing.ClassVar[tuple[str, ...]] = ()

    def all_prompts(self, split: Split) -> list[Prompt]:
        """Every prompt of ``split``, in a fixed order. Train and test never share a problem."""
        raise NotImplementedError(f"{type(self).__name__} must implement all_prompts() or prompts()")

    def prompts(self, split: Split, n: int | None = None, seed: int = 0) -> list[Prompt]:
        """``n`` prompts of ``split`` drawn without replacement with ``seed`` (all, in order, when n is None)."""
        if split not in SPLITS:
            raise TetherError(f"unknown split {split!r}; use 'train' or 'test'")
        pool = self.all_prompts(split)
        if n is None:
            return list(pool)
        if n < 0:
            raise TetherError(f"asked for {n} prompts; n must be >= 0")
        if n > len(pool):
            raise TetherError(
                f"task {self.name!r} has {len(pool)} {split} prompts but {n} were asked for; "
                f"ask for at most {len(pool)} or enlarge the task's {split} split"
            )
        return random.Random(seed).sample(pool, n)

    @abc.abstractmethod
    def score(self, prompt: Prompt, completion: str) -> Score:
        """Score ``completion`` (the decoded text after the prompt, special tokens removed)."""

    @abc.abstractmethod
    def reference(self, prompt: Prompt) -> str:
        """A correct completion for ``prompt`` (the SFT target; the sampler appends EOS)."""

    @abc.abstractmethod
    def extract(self, completion: str) -> str | None:
        """The answer a completion gives, or None when it gives none."""

    def score_batch(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[Score]:
        """Score a batch (the trainer's call): by default each completion alone, with :func:`safe_score`.

        Override it to score a batch at once (a reward model, a sandbox); keep one score per
        completion and put a failure on that completion's ``error``.
        """
        return [safe_score(self, p, c) for p, c in zip(prompts, completions, strict=True)]


class TaskWrapper(Task):
    """A task built on another, ``base``: every method is the base's unless a subclass overrides it
    (:class:`~tether.lm.tasks.rewards.RewardedTask` its scores, :class:`~tether.lm.chat.ChatTask`
    its prompts)."""

    def __init__(self, base: Task) -> None:
        self.base = base
        self.name = base.name

    def all_prompts(self, split: Split) -> list[Prompt]:
        return self.base.all_prompts(split)

    def prompts(self, split: Split, n: int | None = None, seed: int = 0) -> list[Prompt]:
        return self.base.prompts(split, n, seed)

    def score(self, prompt: Prompt, completion: str) -> Score:
        return self.base.score(prompt, completion)

    def score_batch(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[Score]:
        return self.base.score_batch(prompts, completions)

    def reference(self, prompt: Prompt) -> str:
        return self.base.reference(prompt)

    def extract(self, completion: str) -> str | None:
        return self.base.extract(completion)


def _failed(err: Exception) -> Score:
    """The score of a completion whose verifier failed: reward 0, the error recorded."""
    return Score(reward=0.0, correct=False, format_ok=False, error=f"{type(err).__name__}: {err}")


def _checked(score: Score) -> Score:
    """``score``, or a failure when its reward is not a number in [0, 1] or its cost not finite."""
    try:
        if not 0.0 <= float(score.reward) <= 1.0:  # also False for NaN
            raise ValueError(f"verifier returned reward {score.reward!r} outside [0, 1]")
        if not math.isfinite(float(score.cost)):
            raise ValueError(f"verifier returned cost {score.cost!r}, which is not a finite number")
    except (TypeError, ValueError) as err:
        return _failed(err)
    return score


def safe_score(task: Task, prompt: Prompt, completion: str) -> Score:
    """``task.score`` with any exception turned into a zero-reward score carrying the error.

    The trainer gives such a sample advantage 0 and counts ``score.error is not None``.
    A reward outside [0, 1] (or not a number) is treated as a verifier error too.
    """
    try:
        return _checked(task.score(prompt, completion))
    except Exception as err:
        return _failed(err)


def safe_score_batch(task: Task, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[Score]:
    """``task.score_batch``, with a batch scorer that raises or miscounts turned into errors on every
    completion of the batch (the run goes on; see :func:`safe_score`)."""
    try:
        scores = task.score_batch(prompts, completions)
        if len(scores) != len(completions):
            raise ValueError(f"score_batch returned {len(scores)} scores for {len(completions)} completions")
    except Exception as err:
        return [_failed(err) for _ in completions]
    return [_checked(score) for score in scores]


TaskT = TypeVar("TaskT", bound=type[Task])
_TASKS: dict[str, type[Task]] = {}


def register_task(name: str) -> Callable[[TaskT], TaskT]:
    """Class decorator: make a :class:`Task` subclass available to :func:`get_task` as ``name``."""

    def decorator(cls: TaskT) -> TaskT:
        if name in _TASKS and _TASKS[name] is not cls:
            raise ValueError(f"task name {name!r} is already registered by {_TASKS[name].__qualname__}")
        cls.name = name
        _TASKS[name] = cls
        return cls

    return decorator


def _ensure_builtins() -> None:
    import tether.lm.tasks  # noqa: F401  (imports the built-in tasks, which register themselves)


def task_names() -> list[str]:
    """Names of every registered task, sorted."""
    _ensure_builtins()
    return sorted(_TASKS)


def get_task(name: str, **params: Any) -> Task:
    """Build the task registered as ``name`` with keyword ``params``.

    Raises :class:`UnknownNameError` for an unknown name (with close matches and every name) and
    :class:`TetherError` for a parameter the task does not take (listing those it takes).
    """
    _ensure_builtins()
    if name not in _TASKS:
        close = difflib.get_close_matches(name, list(_TASKS), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownNameError(f"unknown task {name!r}.{hint} Registered tasks: {', '.join(sorted(_TASKS))}")
    cls = _TASKS[name]
    accepted = [
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    signature = inspect.signature(cls.__init__)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    unknown = [k for k in params if k not in accepted]
    if unknown and not takes_any:
        close = difflib.get_close_matches(unknown[0], accepted, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise TetherError(
            f"task {name!r} has no parameter {unknown[0]!r}.{hint} Its parameters are: {', '.join(accepted)}"
        )
    missing = [
        p.name
        for p in signature.parameters.values()
        if p.name in accepted and p.default is p.empty and p.name not in params
    ]
    if missing:
        raise TetherError(
            f"task {name!r} needs task.params.{missing[0]} (its parameters are: {', '.join(accepted)}); "
            f"set it, e.g. task.params.{missing[0]}=..."
        )
    params = _typed_params(cls, name, params)
    try:
        return cls(**params)
    except TetherError:
        raise
    except (TypeError, ValueError) as err:
        raise TetherError(
            f"task {name!r} could not be built from task.params {params!r}: {type(err).__name__}: {err}"
        ) from err


def resolve_task_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` of task ``name`` with its file paths (the task's ``path_params``, e.g. the file
    task's ``path`` and ``test_path``) made absolute against the working directory, ``~`` expanded.

    A run records these, so that ``tether eval RUN`` and ``--resume`` read the same files from any
    working directory. Other parameters, and the parameters of a name no task is registered under
    yet (:func:`get_task` reports that), are returned as given.
    """
    _ensure_builtins()
    resolved = dict(params)
    cls = _TASKS.get(name)
    for key in cls.path_params if cls is not None else ():
        value = resolved.get(key)
        if isinstance(value, str) and value.strip():
            resolved[key] = os.path.abspath(os.path.expanduser(value.strip()))
    return resolved


def _typed_params(cls: type[Task], name: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` checked (and YAML-coerced) against the annotations of ``cls.__init__``: a
    parameter declared ``int`` given ``"abc"`` is a clear error naming ``task.params.<key>``."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations: leave the values as given
        return dict(params)
    return {
        key: check_value(f"task.params.{key}", value, hints[key]) if key in hints else value
        for key, value in params.items()
    }
