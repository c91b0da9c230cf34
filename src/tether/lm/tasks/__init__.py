"""Tasks with verifiable rewards: the interface, the registry and the built-in tasks.

Built in: ``arithmetic`` (:class:`ArithmeticTask`), ``countdown`` (:class:`CountdownTask`) and
``file`` (:class:`FileTask`, JSONL / JSON / Parquet files).
:func:`build_task` builds one from a run's ``task`` settings, with the reward replaced by the
user's reward functions when ``task.rewards`` names some (:mod:`tether.lm.tasks.rewards`).
"""

from tether.lm.tasks.arithmetic import ArithmeticTask
from tether.lm.tasks.base import (
    Prompt,
    Score,
    Split,
    Task,
    get_task,
    register_task,
    resolve_task_params,
    safe_score,
    safe_score_batch,
    task_names,
)
from tether.lm.tasks.countdown import CountdownTask
from tether.lm.tasks.files import FileTask
from tether.lm.tasks.rewards import RewardedTask, build_task

__all__ = [
    "ArithmeticTask",
    "CountdownTask",
    "FileTask",
    "Prompt",
    "RewardedTask",
    "Score",
    "Split",
    "Task",
    "build_task",
    "get_task",
    "register_task",
    "resolve_task_params",
    "safe_score",
    "safe_score_batch",
    "task_names",
]
