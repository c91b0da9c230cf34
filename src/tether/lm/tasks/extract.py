r"""Answer extraction for the common conventions, and number normalisation.

- ``"#### 42"`` (GSM8K): the text after the last ``####`` on its line; a number there loses its
  thousands separators (``"#### 1,000"`` -> ``"1000"``).
- ``\boxed{...}`` (MATH): the content of the last ``\boxed{`` whose braces balance.
- the last number in the text.

:func:`normalize_number` makes equal numbers compare equal as strings (``"3.0"`` -> ``"3"``,
``"-0"`` -> ``"0"``, ``"1,000"`` -> ``"1000"``); a non-number is returned stripped.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Literal

AnswerStyle = Literal["auto", "hash", "boxed", "last_number"]
ANSWER_STYLES: tuple[AnswerStyle, ...] = ("auto", "hash", "boxed", "last_number")

_NUMBER_STRICT = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_LEADING_NUMBER = re.compile(r"^\s*\$?\s*(-?\s*(?:\d{1,3}(?:[, ]\d{3})+|\d+)(?:\.\d+)?)")


def normalize_number(s: str) -> str:
    """Canonical string of a number (``"3.0"`` -> ``"3"``, ``"-0"`` -> ``"0"``, ``"0.50"`` -> ``"0.5"``).

    Commas, spaces, a leading ``$`` and a trailing ``.`` are dropped first. Text that is not a
    finite number is returned stripped and otherwise unchanged.
    """
    text = s.strip()
    cleaned = text.replace(",", "").replace(" ", "").removeprefix("$").rstrip(".")
    if not cleaned or not re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", cleaned):
        return text
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return text
    if not value.is_finite():
        return text
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_hash_answer(text: str) -> str | None:
    """The answer after the last ``####`` (GSM8K), or None when there is none.

    A number there is returned without commas or inner spaces (``"#### 1,000"`` -> ``"1000"``);
    other text is returned stripped (up to the end of its line).
    """
    at = text.rfind("####")
    if at < 0:
        return None
    rest = text[at + 4 :].split("\n", 1)[0]
    m = _LEADING_NUMBER.match(rest)
    if m:
        return m.group(1).replace(",", "").replace(" ", "")
    rest = rest.strip()
    return rest or None


def extract_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` with balanced braces (stripped), or None."""
    start = len(text)
    while True:
        start = text.rfind("\\boxed", 0, start)
        if start < 0:
            return None
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j].strip()
        # unbalanced or not followed by a brace: try an earlier \boxed


def extract_last_number(text: str) -> str | None:
    """The last number in ``text`` (commas removed), or None."""
    found = _NUMBER_STRICT.findall(text)
    return found[-1].replace(",", "") if found else None


def extract_answer(text: str, style: AnswerStyle = "auto") -> str | None:
    r"""Extract an answer with ``style`` and normalise it (:func:`normalize_number`).

    ``"auto"`` tries ``\boxed{}``, then ``####``, then the last number.
    """
    if style == "hash":
        raw = extract_hash_answer(text)
    elif style == "boxed":
        raw = extract_boxed(text)
    elif style == "last_number":
        raw = extract_last_number(text)
    elif style == "auto":
        raw = extract_boxed(text)
        if raw is None:
            raw = extract_hash_answer(text)
        if raw is None:
            raw = extract_last_number(text)
    else:
        raise ValueError(f"unknown answer style {style!r}; use one of {', '.join(ANSWER_STYLES)}")
    if raw is None:
        return None
    normalized = normalize_number(raw)
    return normalized or None


def answers_match(given: str | None, expected: str) -> bool:
    """Whether two answers are equal after :func:`normalize_number` (exact string match otherwise)."""
    if given is None:
        return False
    return normalize_number(given) == normalize_number(expected)
