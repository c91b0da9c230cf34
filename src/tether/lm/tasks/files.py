r"""Tasks from local files of (prompt, answer) rows: JSONL / JSON / Parquet, read with ``datasets``.

The file is read and checked when the task is built, before any training work: a missing file,
an unknown suffix, a missing column or an empty answer stops with a :class:`TetherError` naming
the file, the problem and the fix. Only local paths are read; nothing is downloaded.

Answers in the file are normalised: a GSM8K-style answer (reasoning then ``#### 72``) keeps the
part after ``####``; a ``\boxed{...}`` answer keeps the box's content; numbers and fractions are
normalised (``"1,000"`` -> ``"1000"``, ``"3.0"`` -> ``"3"``, ``"1/2"`` -> ``"0.5"``). The raw value
stays in ``meta["raw_answer"]``. A missing, empty or NaN answer stops the build, naming the row.

A completion is scored with :func:`tether.lm.tasks.extract.extract_answer` in ``answer_style``:
reward 1.0 when the extracted answer equals the file's answer, else 0.0; ``format_ok`` when an
answer could be extracted. :meth:`FileTask.reference` is ``"#### <answer>"``, or
``"\boxed{<answer>}"`` with ``answer_style="boxed"`` and, with ``"auto"``, for an answer that
``####`` does not read back whole (``"2 apples"``). The held-out split is drawn by distinct
prompt: rows that repeat a prompt all land in the same split.

The prompt column is given to the policy as is, unless the run renders prompts with a chat
template (``task.chat_template``, :mod:`tether.lm.chat`); a prompt that is a list of
``{"role", "content"}`` messages (TRL's conversational format) is kept in ``meta["messages"]``
(its text is the last user message) and always rendered that way. The row's
other columns are kept in ``meta["columns"]``; reward functions receive them by column name
(:mod:`tether.lm.tasks.rewards`).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

from tether.errors import TetherError
from tether.lm.tasks.base import Prompt, Score, Split, Task, register_task
from tether.lm.tasks.extract import (
    ANSWER_STYLES,
    AnswerStyle,
    answers_match,
    extract_answer,
    extract_boxed,
    extract_hash_answer,
    normalize_number,
)

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _has_no_rows(path: Path, builder: str) -> bool:
    """An empty file (only blank lines for JSONL / JSON; zero rows for Parquet), read cheaply."""
    if builder == "parquet":
        import pyarrow.parquet as pq

        try:
            return int(pq.ParquetFile(path).metadata.num_rows) == 0
        except Exception:  # not a readable parquet file: load_dataset reports it
            return False
    with path.open("rb") as handle:
        return not any(line.strip() for line in handle)


def normalize_reference_answer(raw: Any) -> str:
    r"""The answer a file row states: after ``####``, inside ``\boxed{}``, or the value itself."""
    text = str(raw).strip()
    if "####" in text:
        found = extract_hash_answer(text)
    elif "\\boxed" in text:
        found = extract_boxed(text)
    else:
        found = text
    return normalize_number(found) if found is not None else ""


@register_task("file")
class FileTask(Task):
    """Prompts and answers from a local JSONL / JSON / Parquet file.

    Args:
        path: the file (``.jsonl``, ``.json`` or ``.parquet``).
        prompt_column / answer_column: the columns holding the prompt text and the answer.
        answer_style: how answers are extracted from completions (auto, hash, boxed, last_number).
        test_fraction: share of rows held out as the test split (0 <= f < 1).
        seed: fixes which rows are held out.
    """

    def __init__(
        self,
        path: str,
        prompt_column: str = "prompt",
        answer_column: str = "answer",
        answer_style: AnswerStyle = "auto",
        test_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        if answer_style not in ANSWER_STYLES:
            raise TetherError(
                f"task.params.answer_style={answer_style!r} is not allowed; choose one of {', '.join(ANSWER_STYLES)}"
            )
        if not 0.0 <= test_fraction < 1.0:
            raise TetherError(f"task.params.test_fraction={test_fraction}: must be in [0, 1)")
        self.path = Path(path).expanduser()
        self.prompt_column = prompt_column
        self.answer_column = answer_column
        self.answer_style: AnswerStyle = answer_style
        self.test_fraction = test_fraction
        self.seed = seed
        rows = self._read()
        # The split is by distinct prompt, so that rows repeating a prompt never straddle it
        # (with distinct prompts this is the split by row).
        keys = {self._prompt_key(text, row_meta): None for text, _, row_meta in rows}
        order = list(range(len(keys)))
        random.Random(seed).shuffle(order)
        n_test = round(test_fraction * len(keys))
        if test_fraction > 0 and n_test == 0 and len(keys) >= 2:
            n_test = 1
        key_index = {key: i for i, key in enumerate(keys)}
        held_out = set(order[:n_test])
        self._splits: dict[str, list[Prompt]] = {"train": [], "test": []}
        for index, (text, answer, row_meta) in enumerate(rows):
            split = "test" if key_index[self._prompt_key(text, row_meta)] in held_out else "train"
            meta = {"row": index, "source": str(self.path), **row_meta}
            self._splits[split].append(
                Prompt(id=f"{self.name}/{split}/{index}", text=text, answer=answer, meta=meta)
            )

    @staticmethod
    def _prompt_key(text: str, meta: dict[str, Any]) -> str:
        messages = meta.get("messages")
        return repr(messages) if messages is not None else text

    def _read(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(prompt text, answer, meta) per row; meta holds the raw answer, the other columns and,
        for a conversational prompt, its messages (rendered later with the chat template)."""
        path = self.path
        if not path.is_file():
            what = "is a directory, not a file" if path.is_dir() else "does not exist"
            raise TetherError(
                f"task file {str(path)!r} {what}; set task.params.path to a .jsonl, .json or .parquet file"
            )
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise TetherError(
                f"task file {str(path)!r} has suffix {path.suffix!r}; tether reads .jsonl, .json and .parquet "
                "files: convert it or rename it with the right suffix"
            )
        if _has_no_rows(path, builder):
            raise TetherError(f"task file {str(path)!r} has no rows; add (prompt, answer) rows to it")
        import datasets

        try:
            data = datasets.load_dataset(builder, data_files=str(path.resolve()), split="train")
        except Exception as err:
            raise TetherError(
                f"task file {str(path)!r} could not be read as {builder} ({type(err).__name__}: {err}); "
                "check that it is valid (one JSON object per line for .jsonl)"
            ) from err
        columns = list(data.column_names)
        for key, column in (("prompt_column", self.prompt_column), ("answer_column", self.answer_column)):
            if column not in columns:
                raise TetherError(
                    f"task file {str(path)!r} has no column {column!r}; its columns are {columns}; "
                    f"set task.params.{key}=<one of them> (or rename the column in the file)"
                )
        if len(data) == 0:
            raise TetherError(f"task file {str(path)!r} has no rows; add (prompt, answer) rows to it")
        others = [c for c in columns if c not in (self.prompt_column, self.answer_column)]
        extra = [dict(zip(others, values)) for values in zip(*(data[c] for c in others))] or [
            {} for _ in data
        ]
        rows: list[tuple[str, str, dict[str, Any]]] = []
        for index, (text, raw) in enumerate(zip(data[self.prompt_column], data[self.answer_column])):
            meta: dict[str, Any] = {"raw_answer": raw, "columns": extra[index]}
            if isinstance(text, list):  # conversational: a list of {"role", "content"} messages
                meta["messages"] = self._messages(text, index)
                text = next(
                    (m["content"] for m in reversed(text) if m["role"] == "user"), text[-1]["content"]
                )
            if text is None or not str(text).strip():
                raise TetherError(
                    f"task file {str(path)!r}, row {index}: column {self.prompt_column!r} is empty; "
                    "fill it in or remove the row"
                )
            missing = raw is None or (isinstance(raw, float) and math.isnan(raw))
            answer = "" if missing else normalize_reference_answer(raw)
            if not answer:
                raise TetherError(
                    f"task file {str(path)!r}, row {index}: no answer could be read from column "
                    f"{self.answer_column!r} (value {raw!r}); fill it in or remove the row"
                )
            rows.append((str(text), answer, meta))
        return rows

    def _messages(self, value: list[Any], index: int) -> list[dict[str, str]]:
        ok = bool(value) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value
        )
        if not ok:
            raise TetherError(
                f"task file {str(self.path)!r}, row {index}: column {self.prompt_column!r} is a list but not a "
                'conversation; write it as [{"role": "user", "content": "..."}, ...] or as plain text'
            )
        return [{"role": m["role"], "content": m["content"]} for m in value]

    def all_prompts(self, split: Split) -> list[Prompt]:
        return self._splits[split]

    def reference(self, prompt: Prompt) -> str:
        boxed = f"\\boxed{{{prompt.answer}}}"
        if self.answer_style == "boxed":
            return boxed
        hashed = f"#### {prompt.answer}"
        if self.answer_style == "auto" and not answers_match(self.extract(hashed), prompt.answer):
            return boxed  # an answer that is not a number ("2 apples") reads back only from a box
        return hashed

    def extract(self, completion: str) -> str | None:
        return extract_answer(completion, self.answer_style)

    def score(self, prompt: Prompt, completion: str) -> Score:
        found = self.extract(completion)
        correct = answers_match(found, prompt.answer)
        return Score(reward=1.0 if correct else 0.0, correct=correct, format_ok=found is not None)
