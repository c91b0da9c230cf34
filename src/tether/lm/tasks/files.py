r"""Tasks from local files of (prompt, answer) rows: JSONL / JSON / Parquet.

The file is read and checked when the task is built, before any training work: a missing file,
an unknown suffix, a missing column or an empty answer stops with a :class:`TetherError` naming
the file, the problem and the fix. Only local paths are read; nothing is downloaded or cached, so
a file rewritten in place is read anew. JSON is read with Python's ``json`` (integers stay exact,
whatever their size, even in a column that also holds decimals) and Parquet with ``pyarrow``. A
``.jsonl`` file holds one JSON object per line; a ``.json`` file a list of such objects (or JSON
Lines, as ``datasets`` reads them). A key a row lacks is None in that row.

Answers in the file are normalised: a GSM8K-style answer (reasoning then ``#### 72``) keeps the
part after ``####``; a ``\boxed{...}`` answer keeps the box's content; numbers and fractions are
normalised (``"1,000"`` -> ``"1000"``, ``"3.0"`` -> ``"3"``, ``"1/2"`` -> ``"0.5"``), the same
way as answers extracted from completions (:func:`tether.lm.tasks.extract.normalize_number`). The
raw value stays in ``meta["raw_answer"]``. A missing, empty or NaN answer stops the build, naming
the row.

A completion is scored with :func:`tether.lm.tasks.extract.extract_answer` in ``answer_style``:
reward 1.0 when the extracted answer equals the file's answer, else 0.0; ``format_ok`` when an
answer could be extracted. :meth:`FileTask.reference` (the SFT target) is the file's worked
solution when its answer column holds one (a raw answer with ``####`` or ``\boxed`` that reads
back to the answer in ``answer_style``, as GSM8K's and MATH's do); otherwise ``"#### <answer>"``,
or ``"\boxed{<answer>}"`` with ``answer_style="boxed"`` and, with ``"auto"``, for an answer that
``####`` does not read back whole (``"2 apples"``).

The held-out (test) split is either a share of the file's rows, ``test_fraction`` (0.1 unless
set; 1 holds out every row, to evaluate on a whole file), drawn by distinct prompt so that rows
repeating a prompt all land in the same split; or a second file, ``test_path``, with the same
columns, every row of ``path`` then being a train row. Paths are made absolute when the task is
built (``meta["source"]`` names the file read).

The prompt column is given to the policy as is, unless the run renders prompts with a chat
template (``task.chat_template``, :mod:`tether.lm.chat`); a prompt that is a list of
``{"role", "content"}`` messages (TRL's conversational format) is kept in ``meta["messages"]``
(its text is the last user message) and always rendered that way. The row's
other columns are kept in ``meta["columns"]``; reward functions receive them by column name
(:mod:`tether.lm.tasks.rewards`).
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any, ClassVar

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

_SUFFIXES = (".jsonl", ".json", ".parquet")
DEFAULT_TEST_FRACTION = 0.1
_MARKERS = ("####", "\\boxed", "\\fbox")

Row = tuple[str, str, dict[str, Any]]


def normalize_reference_answer(raw: Any) -> str:
    r"""The answer a file row states: after ``####``, inside ``\boxed{}``, or the value itself."""
    text = str(raw).strip()
    if "####" in text:
        found = extract_hash_answer(text)
    elif "\\boxed" in text or "\\fbox" in text:
        found = extract_boxed(text)
    else:
        found = text
    return normalize_number(found) if found is not None else ""


def _json_rows(path: Path, text: str) -> list[Any]:
    """The rows of a JSON Lines text (blank lines skipped); a line that is not JSON is an error naming it."""
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise TetherError(
                f"task file {str(path)!r}, line {number}: not valid JSON ({err.msg}, column {err.colno}); "
                'write one JSON object per line, such as {"prompt": "...", "answer": "..."}'
            ) from err
    return rows


def _read_table(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """The column names (in order of first appearance) and the rows of a task file, each row
    holding every column (None where it lacks one)."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:
            raise TetherError(
                f"task file {str(path)!r} could not be read as Parquet ({type(err).__name__}: {err}); "
                "check that it is a valid Parquet file"
            ) from err
        return list(table.column_names), table.to_pylist()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise TetherError(f"task file {str(path)!r} is not UTF-8 text ({err}); save it as UTF-8") from err
    if path.suffix.lower() == ".json" and text.strip():
        try:
            data = json.loads(text)
            rows = data if isinstance(data, list) else [data]
        except json.JSONDecodeError as err:
            if not err.msg.startswith("Extra data"):  # JSON Lines in a .json file are read line by line
                raise TetherError(
                    f"task file {str(path)!r}: not valid JSON ({err.msg}, line {err.lineno} column {err.colno}); "
                    'write a list of objects, such as [{"prompt": "...", "answer": "..."}, ...]'
                ) from err
            rows = _json_rows(path, text)
    else:
        rows = _json_rows(path, text)
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TetherError(
                f"task file {str(path)!r}, row {index} is a JSON {type(row).__name__}, not an object; write each "
                'row as an object of columns, such as {"prompt": "...", "answer": "..."}'
            )
    columns = list({key: None for row in rows for key in row})
    return columns, [{c: row.get(c) for c in columns} for row in rows]


@register_task("file")
class FileTask(Task):
    """Prompts and answers from a local JSONL / JSON / Parquet file.

    Args:
        path: the file (``.jsonl``, ``.json`` or ``.parquet``).
        prompt_column / answer_column: the columns holding the prompt text and the answer.
        answer_style: how answers are extracted from completions (auto, hash, boxed, last_number).
        test_fraction: share of ``path``'s rows held out as the test split, 0 <= f <= 1 (0.1 when
            not set; 1 holds out every row, to evaluate on a whole file; training then refuses the
            empty train split).
        test_path: a second file, with the same columns, that is the test split; every row of
            ``path`` is then a train row (``test_fraction`` must be unset or 0). A prompt in both
            files is refused: train and test never share a problem.
        seed: fixes which rows are held out.
    """

    path_params: ClassVar[tuple[str, ...]] = ("path", "test_path")

    def __init__(
        self,
        path: str,
        prompt_column: str = "prompt",
        answer_column: str = "answer",
        answer_style: AnswerStyle = "auto",
        test_fraction: float | None = None,
        test_path: str | None = None,
        seed: int = 0,
    ) -> None:
        if answer_style not in ANSWER_STYLES:
            raise TetherError(
                f"task.params.answer_style={answer_style!r} is not allowed; choose one of {', '.join(ANSWER_STYLES)}"
            )
        if test_fraction is not None and not 0.0 <= test_fraction <= 1.0:  # also NaN
            raise TetherError(
                f"task.params.test_fraction={test_fraction}: must be in [0, 1] (the share of rows held out "
                "for the test split; 1 holds out every row, to evaluate on a whole file)"
            )
        if test_path is not None and test_fraction:
            raise TetherError(
                f"task.params.test_fraction={test_fraction} and task.params.test_path={test_path!r} are both "
                "set: with a test file every row of task.params.path is a train row; drop test_fraction "
                "(or drop test_path to hold out a share of task.params.path's rows)"
            )
        self.path = _absolute(path)
        self.test_path = _absolute(test_path) if test_path is not None else None
        self.prompt_column = prompt_column
        self.answer_column = answer_column
        self.answer_style: AnswerStyle = answer_style
        if test_fraction is None:
            test_fraction = 0.0 if test_path is not None else DEFAULT_TEST_FRACTION
        self.test_fraction = test_fraction
        self.seed = seed
        rows = self._read(self.path, "path")
        self._splits: dict[Split, list[Prompt]]
        if self.test_path is not None:
            test_rows = self._read(self.test_path, "test_path")
            self._check_disjoint(rows, test_rows)
            self._splits = {
                "train": self._prompts("train", rows, self.path),
                "test": self._prompts("test", test_rows, self.test_path),
            }
            return
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
        self._splits = {"train": [], "test": []}
        for index, (text, answer, row_meta) in enumerate(rows):
            split: Split = "test" if key_index[self._prompt_key(text, row_meta)] in held_out else "train"
            self._splits[split].append(self._prompt(split, index, text, answer, row_meta, self.path))

    def _prompt(
        self, split: Split, index: int, text: str, answer: str, row_meta: dict[str, Any], source: Path
    ) -> Prompt:
        meta = {"row": index, "source": str(source), **row_meta}
        return Prompt(id=f"{self.name}/{split}/{index}", text=text, answer=answer, meta=meta)

    def _prompts(self, split: Split, rows: list[Row], source: Path) -> list[Prompt]:
        return [
            self._prompt(split, i, text, answer, meta, source) for i, (text, answer, meta) in enumerate(rows)
        ]

    def _check_disjoint(self, train: list[Row], test: list[Row]) -> None:
        keys = {self._prompt_key(text, meta) for text, _, meta in train}
        shared = [text for text, _, meta in test if self._prompt_key(text, meta) in keys]
        if shared:
            raise TetherError(
                f"task.params.test_path {str(self.test_path)!r} repeats {len(shared)} prompt(s) of "
                f"task.params.path {str(self.path)!r} (the first: {shared[0][:80]!r}); train and test must "
                "not share a problem: remove them from one of the files"
            )

    @staticmethod
    def _prompt_key(text: str, meta: dict[str, Any]) -> str:
        messages = meta.get("messages")
        return repr(messages) if messages is not None else text

    def _read(self, path: Path, key: str) -> list[Row]:
        """(prompt text, answer, meta) per row of ``path`` (given as ``task.params.<key>``); meta holds
        the raw answer, the other columns and, for a conversational prompt, its messages (rendered
        later with the chat template)."""
        if not path.is_file():
            what = "is a directory, not a file" if path.is_dir() else "does not exist"
            raise TetherError(
                f"task file {str(path)!r} {what}; set task.params.{key} to a .jsonl, .json or .parquet file "
                f"(a relative path is read from the working directory, {os.getcwd()!r})"
            )
        if path.suffix.lower() not in _SUFFIXES:
            raise TetherError(
                f"task file {str(path)!r} has suffix {path.suffix!r}; tether reads .jsonl, .json and .parquet "
                "files: convert it or rename it with the right suffix"
            )
        columns, table = _read_table(path)
        if not table:
            raise TetherError(f"task file {str(path)!r} has no rows; add (prompt, answer) rows to it")
        for param, column in (("prompt_column", self.prompt_column), ("answer_column", self.answer_column)):
            if column not in columns:
                raise TetherError(
                    f"task file {str(path)!r} has no column {column!r}; its columns are {columns}; "
                    f"set task.params.{param}=<one of them> (or rename the column in the file)"
                )
        others = [c for c in columns if c not in (self.prompt_column, self.answer_column)]
        rows: list[Row] = []
        for index, record in enumerate(table):
            text, raw = record[self.prompt_column], record[self.answer_column]
            meta: dict[str, Any] = {"raw_answer": raw, "columns": {c: record[c] for c in others}}
            if isinstance(text, list):  # conversational: a list of {"role", "content"} messages
                meta["messages"] = self._messages(path, text, index)
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

    def _messages(self, path: Path, value: list[Any], index: int) -> list[dict[str, str]]:
        ok = bool(value) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value
        )
        if not ok:
            raise TetherError(
                f"task file {str(path)!r}, row {index}: column {self.prompt_column!r} is a list but not a "
                'conversation; write it as [{"role": "user", "content": "..."}, ...] or as plain text'
            )
        return [{"role": m["role"], "content": m["content"]} for m in value]

    def all_prompts(self, split: Split) -> list[Prompt]:
        return self._splits[split]

    def reference(self, prompt: Prompt) -> str:
        raw = prompt.meta.get("raw_answer")
        if isinstance(raw, str) and any(marker in raw for marker in _MARKERS):
            solution = raw.strip()  # a worked solution ending with its answer (GSM8K, MATH)
            if answers_match(self.extract(solution), prompt.answer):
                return solution
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


def _absolute(path: str) -> Path:
    """``path`` made absolute against the working directory (``~`` expanded, symbolic links kept)."""
    return Path(os.path.abspath(os.path.expanduser(path)))
