r"""Answer extraction for the common conventions, and answer normalisation.

- ``"#### 42"`` (GSM8K): the answer after the last ``####`` on its line: a number (its thousands
  separators dropped, ``"#### 1,000"`` -> ``"1000"``), a fraction ``a/b``, or, when the number is
  followed by ``,`` / ``/`` / ``:`` and more digits (a list, a time), the rest of the line.
- ``\boxed{...}`` (MATH): the content of the last ``\boxed{`` or ``\fbox{`` whose braces balance,
  or the token after ``\boxed `` (``"\boxed 5"`` -> ``"5"``), as Hendrycks' ``last_boxed_only_string``
  reads them.
- the last number (or fraction ``a/b``, or LaTeX fraction ``\frac{a}{b}``, read whole) in the text.

Before any of these, LaTeX spacing is read as spacing (``1\,000`` is ``1 000``, ``10,\!000`` is
``10,000``) and the Unicode minus U+2212 as ``-``.

:func:`normalize_number` makes equal numbers compare equal as strings, exactly (no rounding):
``"3.0"`` -> ``"3"``, ``"-0"`` -> ``"0"``, ``"1,000"`` -> ``"1000"``, ``"1e3"`` -> ``"1000"``,
``"1/2"``, ``"\frac{1}{2}"``, ``"\dfrac12"`` and ``".5"`` -> ``"0.5"``, ``"2/6"`` -> ``"1/3"``; ``$``,
``\$``, ``%`` and a trailing ``.`` are dropped, text wrappers unwrapped (``\text{5}``, ``\textbf{5}``,
``\mathbf{5}``, an outer ``{5}``), and a unit after a number dropped when LaTeX marks it as one
(``72 \text{ dollars}`` -> ``"72"``, ``30^\circ`` -> ``"30"``). Anything else (a list ``"1, 2"``, a
time ``"2:30"``, text) is returned stripped (and unwrapped) and compared as a string. Huge numbers
stay cheap: beyond :data:`MAX_EXPANDED_DIGITS` digits a number is written in scientific notation
instead of expanded.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Literal

AnswerStyle = Literal["auto", "hash", "boxed", "last_number"]
ANSWER_STYLES: tuple[AnswerStyle, ...] = ("auto", "hash", "boxed", "last_number")

MAX_EXPANDED_DIGITS = 1000
"""Numbers needing more digits than this are canonicalised in scientific notation (``"1e1000000"``),
so that a completion like ``\boxed{1e1000000}`` costs microseconds, not minutes."""

# A number: thousands groups with "," (or a space) only in their proper places, or plain digits.
_NUM = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d{1,3}(?: \d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+(?:[eE][-+]?\d+)?"
_NUMBER = re.compile(_NUM)
_FRACTION = re.compile(r"([-+]?\d+)\s*/\s*([-+]?\d+)")
# \frac{a}{b} (also \dfrac, \tfrac), each argument braced or a single digit as in LaTeX (\frac12)
_LATEX_FRACTION = re.compile(
    r"(-?)\\[dt]?frac\s*(?:\{\s*([-+]?\d+)\s*\}|(\d))\s*(?:\{\s*([-+]?\d+)\s*\}|(\d))"
)
_LEADING = re.compile(rf"^\s*(?:\\?\$)?\s*(-?\s*\d+\s*/\s*\d+|{_NUM})")
_CONTINUES = re.compile(r"^\s*[,/:]\s*\d")
# A LaTeX fraction is one token (its arguments braced, one level of inner braces, or single
# digits), so that the last number of "\frac{1}{2}" is the fraction, never its denominator.
_FRAC_ARG = r"\{(?:[^{}]|\{[^{}]*\})*\}|\d"
_LAST = re.compile(rf"-?\\[dt]?frac\s*(?:{_FRAC_ARG})\s*(?:{_FRAC_ARG})|-?\d+/\d+|{_NUM}")
_BOX = re.compile(r"\\(boxed|fbox)(?![A-Za-z])")
_BOX_TOKEN = re.compile(r"[^\s$]+")
# LaTeX spacing: negative thin space (dropped), thin / medium / thick / control space (a space)
_NO_SPACE = re.compile(r"\\!")
_SPACE = re.compile(r"\\[,;:> ]")
# Wrappers whose content is the answer: \text{5}, \textbf{5}, \mathbf{5} ...
_WRAPPER_OPEN = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|mathbf|mathrm|mathit|mbox)\s*\{")
# A unit LaTeX marks as one after a number: "72 \text{ dollars}", "30^\circ", "30^{\circ}"
_UNIT = re.compile(
    r"(.*?\S)\s*(?:\\(?:text|textrm|textnormal|mathrm|mbox)\s*\{\s*[^\W\d_][^{}\d]*\}"
    r"|\^\s*\\circ|\^\s*\{\s*\\circ\s*\})",
    re.DOTALL,
)


def _spaced(text: str) -> str:
    r"""LaTeX spacing read as spacing (``\!`` dropped; ``\,`` ``\;`` ``\:`` ``\>`` ``\ `` a space) and
    the Unicode minus U+2212 as ``-``."""
    return _SPACE.sub(" ", _NO_SPACE.sub("", text.replace("\u2212", "-")))


def _outer_braces_removed(text: str) -> str:
    """``text`` without the braces that enclose all of it (``"{ {3} }"`` -> ``"3"``; ``"{1}{2}"`` and
    unbalanced braces are kept), in one pass."""
    match: dict[int, int] = {}
    opened: list[int] = []
    for i, char in enumerate(text):
        if char == "{":
            opened.append(i)
        elif char == "}" and opened:
            match[opened.pop()] = i
    lo, hi = 0, len(text) - 1
    while lo < hi and text[lo] == "{" and match.get(lo) == hi:
        lo, hi = lo + 1, hi - 1
        while lo <= hi and text[lo].isspace():
            lo += 1
        while hi >= lo and text[hi].isspace():
            hi -= 1
    return text[lo : hi + 1]


def _unwrapped(text: str) -> str:
    r"""``text`` with every text wrapper (``\text{..}``, ``\textbf{..}``, ``\mathbf{..}`` ...) replaced by
    its content, in one pass; ``text`` itself when its braces do not balance."""
    out: list[str] = []
    closes: list[bool] = []  # per open brace: whether its "}" is written (False: a wrapper's)
    i = 0
    while i < len(text):
        wrapper = _WRAPPER_OPEN.match(text, i) if text[i] == "\\" else None
        if wrapper:
            closes.append(False)
            i = wrapper.end()
            continue
        char = text[i]
        if char == "{":
            closes.append(True)
        elif char == "}":
            if not closes:
                return text
            if not closes.pop():
                i += 1
                continue
        out.append(char)
        i += 1
    return text if closes else "".join(out)


def _plain(text: str) -> str:
    r"""``text`` with its spacing read (:func:`_spaced`), its text wrappers (``\text{..}``,
    ``\textbf{..}``, ``\mathbf{..}`` ...) unwrapped and braces around all of it removed."""
    return _outer_braces_removed(_unwrapped(_spaced(text)).strip())


def _clean(text: str) -> str:
    r"""Drop the decorations a number may carry: LaTeX ``{,}``, ``$`` / ``\$``, ``%``, a final ``.``."""
    s = text.strip().replace("{,}", ",")
    s = s.removeprefix("\\$").removeprefix("$").removesuffix("$").strip()
    s = s.removesuffix("\\%").removesuffix("%").strip()
    return s.rstrip(".").strip()


def _scientific(negative: bool, digits: str, exponent: int) -> str:
    """``digits`` x 10^``exponent`` (no leading or trailing zeros in ``digits``) as ``d.ddde<n>``."""
    mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return f"{'-' if negative else ''}{mantissa}e{exponent + len(digits) - 1}"


def _canonical_decimal(value: Decimal) -> str:
    """The shortest exact positional form of a finite decimal, built from its digits (never int())."""
    sign, digit_tuple, exp = value.as_tuple()
    assert isinstance(exp, int)
    digits = "".join(map(str, digit_tuple)).lstrip("0")
    if not digits:
        return "0"
    stripped = digits.rstrip("0")
    exp += len(digits) - len(stripped)
    digits = stripped
    negative = bool(sign)
    if exp >= 0:
        if len(digits) + exp > MAX_EXPANDED_DIGITS:
            return _scientific(negative, digits, exp)
        out = digits + "0" * exp
    else:
        places = -exp
        if places > MAX_EXPANDED_DIGITS:
            return _scientific(negative, digits, exp)
        out = (
            digits[:-places] + "." + digits[-places:]
            if len(digits) > places
            else "0." + "0" * (places - len(digits)) + digits
        )
    return ("-" if negative else "") + out


def _canonical_fraction(value: Fraction) -> str:
    """A terminating fraction as its decimal (``1/2`` -> ``0.5``), others as ``p/q`` in lowest terms."""
    den = value.denominator
    if den == 1:
        return _canonical_decimal(Decimal(value.numerator))
    twos = fives = 0
    while den % 2 == 0:
        den //= 2
        twos += 1
    while den % 5 == 0:
        den //= 5
        fives += 1
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    places = max(twos, fives)
    scaled = value.numerator * (10**places // value.denominator)
    return _canonical_decimal(Decimal(scaled).scaleb(-places))


def normalize_number(s: str) -> str:
    r"""Canonical string of a number or fraction; other text is returned stripped (see module doc).

    Exact: two answers normalise to the same string exactly when they are the same rational
    number (``"0.5"``, ``"1/2"``, ``"\frac{1}{2}"``, ``"2/4"``), whatever their size.
    """
    text = s.strip()
    if len(text) > 10 * MAX_EXPANDED_DIGITS:
        return text
    plain = _plain(text)
    number = _number(plain)
    if number is None:  # a number with a unit LaTeX marks as one: "72 \text{ dollars}", "30^\circ"
        unit = _UNIT.fullmatch(_spaced(text))
        number = _number(_plain(unit.group(1))) if unit else None
    return plain if number is None else number


def _number(text: str) -> str | None:
    """The canonical string of ``text`` when it is a number or a fraction (see module doc), else None."""
    cleaned = _clean(text)
    if not cleaned or len(cleaned) > 10 * MAX_EXPANDED_DIGITS:
        return None
    latex = _LATEX_FRACTION.fullmatch(cleaned)
    fraction = _FRACTION.fullmatch(cleaned)
    if latex or fraction:
        if latex:
            num = int(latex.group(2) or latex.group(3))
            den = int(latex.group(4) or latex.group(5))
            num = -num if latex.group(1) else num
        else:
            assert fraction is not None
            num, den = int(fraction.group(1)), int(fraction.group(2))
        if den == 0 or len(cleaned) > MAX_EXPANDED_DIGITS:
            return None
        return _canonical_fraction(Fraction(num, den))
    if not _NUMBER.fullmatch(cleaned):
        return None
    try:
        value = Decimal(cleaned.replace(",", "").replace(" ", ""))
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    return _canonical_decimal(value)


def extract_hash_answer(text: str) -> str | None:
    """The answer after the last ``####`` (GSM8K), or None when there is none.

    A number there is returned without commas or inner spaces (``"#### 1,000"`` -> ``"1000"``), a
    fraction as ``a/b``; a number followed by ``,`` / ``/`` / ``:`` and more digits (a list or a
    time) keeps the rest of the line; other text is returned stripped (up to the end of its line).
    """
    text = _spaced(text)
    at = text.rfind("####")
    if at < 0:
        return None
    rest = text[at + 4 :].split("\n", 1)[0]
    m = _LEADING.match(rest)
    if m and not _CONTINUES.match(rest[m.end() :]):
        return m.group(1).replace(",", "").replace(" ", "")
    rest = rest.strip().rstrip(".").strip()
    return rest or None


def extract_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` or ``\fbox{...}`` with balanced braces, or the token after
    the last ``\boxed `` (``"\boxed 5."`` -> ``"5"``), stripped; None when there is none."""
    text = _spaced(text)
    for box in reversed(list(_BOX.finditer(text))):
        i = box.end()
        while i < len(text) and text[i].isspace():
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
        elif box.group(1) == "boxed" and i > box.end():  # "\boxed 5": the token after the space
            token = _BOX_TOKEN.match(text, i)
            if token and token.group().rstrip(".,;:"):
                return token.group().rstrip(".,;:")
        # unbalanced or not followed by a brace or a token: try an earlier box
    return None


def extract_last_number(text: str) -> str | None:
    r"""The last number (or fraction ``a/b`` or ``\frac{a}{b}``) in ``text``, thousands separators
    removed, or None. A LaTeX fraction is read whole, also when it is not a number (``\frac{x}{2}``)."""
    found = _LAST.findall(_spaced(text))
    if not found:
        return None
    last: str = found[-1]
    return last if "frac" in last else last.replace(",", "").replace(" ", "")


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
