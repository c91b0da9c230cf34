r"""Reward functions: a task's reward from the user's own scoring code, combined with weights.

``task.rewards`` lists reward functions and ``task.reward_weights`` weighs them (1 each when
not given), as TRL's ``reward_funcs`` and ``reward_weights`` do. The reward of a completion is
the weighted mean of the functions that score it,

    r = sum_i w_i r_i / sum_{i: r_i is not None} w_i,

where each ``r_i`` is a number in [0, 1] or None ("does not apply to this completion"). TRL sums
``w_i r_i`` instead; the mean keeps the reward in [0, 1], the range of the task interface, and
differs from the sum only by the constant ``sum_i w_i`` when no function returns None, so
group-standardised advantages (GRPO, RLOO with std, ...) are the same. Accuracy, the format rate
and the cost still come from the task's own verifier; only the reward is replaced.

A function is named ``module:name`` (a module on the path or beside the command),
``path/to/file.py:name``, or one of the built-ins computed from the task's verifier:
``verifier`` (its reward), ``correct`` (1 when its answer is right) and ``format`` (1 when it
could read an answer). A user function is called once per rollout batch, with keywords:

    fn(prompts=[str], completions=[str], answer=[str], prompt_id=[str], meta=[dict],
       **columns) -> list[float | None]

where ``columns`` are the extra columns of a file task's rows, by column name. Keywords the
function does not take are left out unless it has ``**kwargs``; a function that cannot take
``completions`` is refused when the run is built.

Failures are isolated per completion. A function that raises on a batch is called again on each
completion alone, so only the completions it fails on are lost; a value outside [0, 1], NaN, or
a list of the wrong length is a failure too. A completion that any function fails on, or that
every function answers None for, gets reward 0 with the error on its :class:`Score`: the
trainer gives it advantage 0 and counts it in ``reward/verifier_errors``. Each function's mean
over the completions it scored is logged as ``reward_fn/<name>``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from tether.config import ConfigError
from tether.lm.tasks.base import Prompt, Score, Task, TaskWrapper, get_task, safe_score_batch
from tether.userimports import resolve_object

BUILTIN_REWARDS: dict[str, Callable[[Score], float]] = {
    "verifier": lambda s: float(s.reward),
    "correct": lambda s: float(s.correct),
    "format": lambda s: float(s.format_ok),
}
_STANDARD_KEYWORDS = ("prompts", "completions", "answer", "prompt_id", "meta")


class _Failed(str):
    """A function's failure on one completion (its message)."""


def _accepted_keywords(fn: Callable[..., Any], key: str) -> frozenset[str] | None:
    """Keywords ``fn`` takes (None: any, it has ``**kwargs``); refuses one that cannot take completions."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    params = sig.parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    names = frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    if "completions" not in names:
        raise ConfigError(
            f"{key}: reward function {getattr(fn, '__name__', fn)!r} does not take completions=; write it as "
            "def f(prompts, completions, **kwargs) -> list[float | None]"
        )
    required = [
        p.name
        for p in params
        if p.default is p.empty and p.kind is not p.VAR_POSITIONAL and p.name not in _STANDARD_KEYWORDS
    ]
    if required:
        raise ConfigError(
            f"{key}: reward function {getattr(fn, '__name__', fn)!r} requires {', '.join(required)}, which tether "
            f"does not pass; it passes {', '.join(_STANDARD_KEYWORDS)} and a file task's other columns "
            "(add **kwargs and read them from there, or give those parameters defaults)"
        )
    return names


@dataclasses.dataclass(frozen=True)
class RewardFunction:
    """One entry of ``task.rewards``: a built-in (computed from the verifier's score) or user code."""

    label: str
    weight: float
    builtin: str | None = None
    fn: Callable[..., Any] | None = None
    keywords: frozenset[str] | None = None  # None: the function takes **kwargs

    def values(
        self, prompts: Sequence[Prompt], completions: Sequence[str], base: Sequence[Score]
    ) -> list[Any]:
        """Per completion: a float in [0, 1], None, or a :class:`_Failed` message."""
        if self.builtin is not None:
            return [BUILTIN_REWARDS[self.builtin](s) for s in base]
        try:
            return self._checked(self._call(prompts, completions), len(prompts))
        except Exception as err:
            if len(prompts) == 1:
                return [_Failed(f"raised {type(err).__name__}: {err}")]
        # The batch failed: find the completions it fails on, one at a time.
        return [
            v
            for i in range(len(prompts))
            for v in self.values(prompts[i : i + 1], completions[i : i + 1], base)
        ]

    def _call(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> Any:
        kwargs: dict[str, Any] = {
            "prompts": [p.text for p in prompts],
            "completions": list(completions),
            "answer": [p.answer for p in prompts],
            "prompt_id": [p.id for p in prompts],
            "meta": [p.meta for p in prompts],
        }
        columns: dict[str, None] = {}
        for p in prompts:
            columns.update(dict.fromkeys(p.meta.get("columns", {})))
        for name in columns:
            kwargs.setdefault(name, [p.meta.get("columns", {}).get(name) for p in prompts])
        if self.keywords is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in self.keywords}
        assert self.fn is not None
        return self.fn(**kwargs)

    @staticmethod
    def _checked(out: Any, n: int) -> list[Any]:
        if hasattr(out, "tolist"):  # a tensor or an array
            out = out.tolist()
        if not isinstance(out, list | tuple) or len(out) != n:
            got = f"{len(out)} values" if isinstance(out, list | tuple) else repr(out)[:80]
            raise ValueError(
                f"returned {got} for {n} completion(s); return a list of one value per completion"
            )
        values: list[Any] = []
        for v in out:
            if v is None:
                values.append(None)
            elif isinstance(v, int | float) and math.isfinite(v) and 0.0 <= v <= 1.0:
                values.append(float(v))
            else:
                values.append(_Failed(f"returned {v!r}; a reward function returns numbers in [0, 1] or None"))
        return values


def build_reward_functions(names: Sequence[str], weights: Sequence[float]) -> list[RewardFunction]:
    """Resolve ``task.rewards`` / ``task.reward_weights`` (imports the user's modules)."""
    weights = list(weights) or [1.0] * len(names)
    functions: list[RewardFunction] = []
    labels: set[str] = set()
    for i, (name, weight) in enumerate(zip(names, weights)):
        key = f"task.rewards[{i}]"
        if name in BUILTIN_REWARDS:
            label, builtin, fn, keywords = name, name, None, None
        else:
            if ":" not in name and "." not in name:
                raise ConfigError(
                    f"{key}: {name!r} is neither a built-in reward ({', '.join(BUILTIN_REWARDS)}) nor "
                    "module:function / path/to/file.py:function"
                )
            fn = resolve_object(name, key)
            if not callable(fn):
                raise ConfigError(f"{key}: {name!r} is a {type(fn).__name__}, not a function")
            label, builtin = getattr(fn, "__name__", name.rpartition(":")[2]), None
            keywords = _accepted_keywords(fn, key)
        base, k = label, 2
        while label in labels:
            label, k = f"{base}_{k}", k + 1
        labels.add(label)
        functions.append(RewardFunction(label, float(weight), builtin, fn, keywords))
    return functions


class RewardedTask(TaskWrapper):
    """A task whose reward is the weighted mean of reward functions (its verifier still gives
    accuracy, format and cost)."""

    def __init__(self, base: Task, functions: Sequence[RewardFunction]) -> None:
        super().__init__(base)
        self.functions = list(functions)

    def score(self, prompt: Prompt, completion: str) -> Score:
        return self.score_batch([prompt], [completion])[0]

    def score_batch(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[Score]:
        base = safe_score_batch(self.base, prompts, completions)  # checked: the verifier part too
        columns = [f.values(prompts, completions, base) for f in self.functions]
        scores = []
        for i, s in enumerate(base):
            row = [(f, col[i]) for f, col in zip(self.functions, columns)]
            failed = [f"reward function {f.label!r} {v}" for f, v in row if isinstance(v, _Failed)]
            parts = {f.label: v for f, v in row if isinstance(v, float)}
            total = sum(f.weight for f, v in row if f.label in parts)
            error = s.error or ("; ".join(failed) if failed else None)
            if error is None and total <= 0.0:
                error = (
                    "unscorable: no reward function with a positive weight scored this completion (all None)"
                )
            reward = (
                0.0 if error else sum(f.weight * parts[f.label] for f, _ in row if f.label in parts) / total
            )
            scores.append(dataclasses.replace(s, reward=min(max(reward, 0.0), 1.0), error=error, parts=parts))
        return scores


def build_task(
    name: str, params: dict[str, Any], rewards: Sequence[str] = (), weights: Sequence[float] = ()
) -> Task:
    """The task ``name`` built with ``params``; with ``rewards``, its reward is theirs (see the module)."""
    task = get_task(name, **params)
    if not rewards:
        return task
    return RewardedTask(task, build_reward_functions(rewards, weights))


def reward_functions_of(task: Task) -> list[RewardFunction]:
    """The reward functions of ``task`` (through its wrappers), or [] when its verifier gives the reward."""
    while True:
        if isinstance(task, RewardedTask):
            return task.functions
        if not isinstance(task, TaskWrapper):
            return []
        task = task.base


def reward_parts(task: Task, scores: Sequence[Score]) -> tuple[torch.Tensor, tuple[float, ...]]:
    """Each reward function's value per completion, [N, K] float64 (NaN where it gave None or
    failed), and the K weights: the ``reward_parts`` / ``reward_weights`` catalogue inputs.

    A task without ``task.rewards`` has one part, its verifier's reward, with weight 1.
    """
    functions = reward_functions_of(task)
    if not functions:
        return torch.tensor([[s.reward] for s in scores], dtype=torch.float64).reshape(-1, 1), (1.0,)
    values = [[s.parts.get(f.label, math.nan) for f in functions] for s in scores]
    parts = torch.tensor(values, dtype=torch.float64).reshape(len(scores), len(functions))
    return parts, tuple(f.weight for f in functions)
