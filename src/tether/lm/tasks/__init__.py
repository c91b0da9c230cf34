"""Tasks with verifiable rewards: the interface, the registry and the built-in tasks.

Built in: ``arithmetic`` (:class:`ArithmeticTask`), ``countdown`` (:class:`CountdownTask`) and
``file`` (:class:`FileTask`, JSONL / JSON / Parquet through ``datasets``, imported lazily).
"""

from tether.lm.tasks.arithmetic import ArithmeticTask
from tether.lm.tasks.base import (
    Prompt,
    Score,
    Split,
    Task,
    get_task,
    register_task,
    safe_score,
    task_names,
)
from tether.lm.tasks.countdown import CountdownTask
from tether.lm.tasks.files import FileTask

__all__ = [
    "ArithmeticTask",
    "CountdownTask",
    "FileTask",
    "Prompt",
    "Score",
    "Split",
    "Task",
    "get_task",
    "register_task",
    "safe_score",
    "task_names",
]
