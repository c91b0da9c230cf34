"""Integer arithmetic: ``"12+34="`` -> ``"46"``.

Operands have up to ``digits`` digits (0 .. 10**digits - 1); operators are drawn from
``operations`` (a subset of ``+-*``) and the usual precedence applies. Answers may be negative.
Prompts are short and space-free so that the tiny character-level model can learn them.

Scoring is strict (``answer_format="plain"``): the completion, stripped of surrounding white
space, must be exactly one integer (``-?\\d+``), and it is correct when it equals the answer
(leading zeros are tolerated: ``"046"`` equals 46). ``"46abc"`` is wrong and badly formatted,
though :meth:`ArithmeticTask.extract` still reports ``"46"`` (the first number) for logging.
With ``answer_format="hash"`` the completion may reason first and must end its answer as
``#### 46`` (GSM8K style); correct when the number after the last ``####`` equals the answer.
With ``answer_format="reversed"`` the digits are written least-significant first (``"12+39="``
-> ``"15"`` for 51, a sign stays in front): each output digit then depends only on the digits
already seen and a carry, which small transformers learn far faster (Lee et al., "Teaching
Arithmetic to Small Transformers", arXiv 2307.03381).

Reward: 1.0 when correct, else 0.0. ``format_ok`` says whether the completion has the
expected form. Train and test are disjoint sets of distinct problems, fixed by ``seed``.
"""

from __future__ import annotations

import random
import re
from typing import Literal

from tether.errors import TetherError
from tether.lm.tasks.base import Prompt, Score, Split, Task, register_task
from tether.lm.tasks.extract import extract_hash_answer, normalize_number

_OPS = "+-*"
_INT = re.compile(r"-?\d+")


@register_task("arithmetic")
class ArithmeticTask(Task):
    """Arithmetic on small integers with an exact-match verifier.

    Args:
        digits: maximum digits per operand (>= 1).
        operations: the operators to draw from, a non-empty subset of ``"+-*"``.
        num_operands: operands per problem (>= 2).
        train_size / test_size: distinct problems in each split.
        seed: fixes both splits.
        answer_format: ``"plain"`` (completion is just the number), ``"hash"`` (``#### n``) or
            ``"reversed"`` (digits least-significant first).
        pad_operands: write every operand with ``digits`` digits (``"05+76="``), the zero padding
            of Lee et al.; the answers are unchanged. Off by default. In one trial on the demo's
            tiny model (2-digit addition, reversed answers, SFT at lr 3e-3 for 800 steps, model
            seeds 0 and 1) it did not get the model off its loss plateau.
    """

    def __init__(
        self,
        digits: int = 2,
        operations: str = "+-",
        num_operands: int = 2,
        train_size: int = 5000,
        test_size: int = 500,
        seed: int = 1234,
        answer_format: Literal["plain", "hash", "reversed"] = "plain",
        pad_operands: bool = False,
    ) -> None:
        if digits < 1:
            raise TetherError(f"task.params.digits={digits}: must be >= 1")
        if num_operands < 2:
            raise TetherError(f"task.params.num_operands={num_operands}: must be >= 2")
        bad = sorted(set(operations) - set(_OPS))
        if not operations or bad:
            raise TetherError(
                f"task.params.operations={operations!r}: {'unsupported operator ' + repr(bad[0]) if bad else 'empty'}; "
                f"use a non-empty subset of {_OPS!r}"
            )
        if answer_format not in ("plain", "hash", "reversed"):
            raise TetherError(
                f"task.params.answer_format={answer_format!r}: choose 'plain', 'hash' or 'reversed'"
            )
        if train_size < 0 or test_size < 0:
            raise TetherError("task.params.train_size and task.params.test_size must be >= 0")
        self.digits = digits
        self.operations = "".join(sorted(set(operations), key=_OPS.index))
        self.num_operands = num_operands
        self.train_size = train_size
        self.test_size = test_size
        self.seed = seed
        self.answer_format = answer_format
        self.pad_operands = bool(pad_operands)
        space = (10**digits) ** num_operands * len(self.operations) ** (num_operands - 1)
        if train_size + test_size > space:
            raise TetherError(
                f"arithmetic with digits={digits}, operations={self.operations!r}, num_operands={num_operands} "
                f"has only {space} distinct problems, fewer than train_size + test_size = "
                f"{train_size + test_size}; lower task.params.train_size/task.params.test_size or raise task.params.digits"
            )
        self._splits: dict[str, list[Prompt]] | None = None

    def _generate(self) -> dict[str, list[Prompt]]:
        rng = random.Random(self.seed)
        high = 10**self.digits - 1
        seen: set[str] = set()
        texts: list[str] = []
        needed = self.test_size + self.train_size
        while len(texts) < needed:
            operands = [rng.randint(0, high) for _ in range(self.num_operands)]
            ops = [rng.choice(self.operations) for _ in range(self.num_operands - 1)]
            width = self.digits if self.pad_operands else 0
            written = [str(x).zfill(width) for x in operands]
            expr = written[0] + "".join(op + x for op, x in zip(ops, written[1:]))
            if expr not in seen:
                seen.add(expr)
                texts.append(expr)
        splits: dict[str, list[Prompt]] = {}
        for split, chunk in (("test", texts[: self.test_size]), ("train", texts[self.test_size :])):
            splits[split] = [
                Prompt(
                    id=f"{self.name}/{split}/{i}",
                    text=expr + "=",
                    answer=str(_evaluate(expr)),
                    meta={"expression": expr},
                )
                for i, expr in enumerate(chunk)
            ]
        return splits

    def all_prompts(self, split: Split) -> list[Prompt]:
        if self._splits is None:
            self._splits = self._generate()
        return self._splits[split]

    def reference(self, prompt: Prompt) -> str:
        if self.answer_format == "hash":
            return f"#### {prompt.answer}"
        if self.answer_format == "reversed":
            return _reverse_digits(prompt.answer)
        return prompt.answer

    def extract(self, completion: str) -> str | None:
        if self.answer_format == "hash":
            found = extract_hash_answer(completion)
            return normalize_number(found) if found is not None else None
        m = _INT.search(completion)
        if not m:
            return None
        return normalize_number(
            _reverse_digits(m.group(0)) if self.answer_format == "reversed" else m.group(0)
        )

    def score(self, prompt: Prompt, completion: str) -> Score:
        if self.answer_format == "hash":
            found = extract_hash_answer(completion)
            format_ok = found is not None and _INT.fullmatch(found) is not None
        else:
            found = completion.strip()
            format_ok = _INT.fullmatch(found) is not None
            if format_ok and self.answer_format == "reversed":
                found = _reverse_digits(found)
        # compared as canonical strings: int() of a 5000-digit completion would raise
        correct = (
            format_ok and found is not None and normalize_number(found) == normalize_number(prompt.answer)
        )
        return Score(reward=1.0 if correct else 0.0, correct=correct, format_ok=format_ok)


def _reverse_digits(number: str) -> str:
    """``"51"`` <-> ``"15"``, ``"-120"`` <-> ``"-021"``: the sign stays in front."""
    sign = "-" if number.startswith("-") else ""
    return sign + number[len(sign) :][::-1]


def _evaluate(expr: str) -> int:
    """Value of a ``+-*`` expression over non-negative integers, with the usual precedence."""
    tokens = re.findall(r"\d+|[+\-*]", expr)
    # Fold products first, then add/subtract the terms left to right.
    terms: list[int] = [int(tokens[0])]
    signs: list[int] = [1]
    for op, num in zip(tokens[1::2], tokens[2::2]):
        value = int(num)
        if op == "*":
            terms[-1] *= value
        else:
            terms.append(value)
            signs.append(1 if op == "+" else -1)
    return sum(s * t for s, t in zip(signs, terms))
