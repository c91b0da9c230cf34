r"""Answer extraction of the MATH / GSM8K forms beyond the plain ones: ``\fbox{}`` and ``\boxed 5``,
LaTeX fractions read whole (never their denominator), text wrappers, units, LaTeX spacing and the
Unicode minus; file answers normalised the same way."""

from __future__ import annotations

import json
from pathlib import Path

from tether.lm.tasks import FileTask
from tether.lm.tasks.extract import (
    ANSWER_STYLES,
    answers_match,
    extract_answer,
    extract_boxed,
    normalize_number,
)


def test_fbox_and_boxed_token_are_read_as_boxes() -> None:
    """Hendrycks' last_boxed_only_string reads ``\fbox{..}`` and ``\boxed <token>``."""
    for style in ("boxed", "auto"):
        assert extract_answer(r"so \fbox{5}", style) == "5"
        assert extract_answer(r"so \boxed 5.", style) == "5"
        assert extract_answer(r"$\boxed 12$ done", style) == "12"
        assert extract_answer(r"\boxed{3} then \fbox{\frac{1}{2}}", style) == "0.5"  # the last box
    assert extract_boxed(r"\fboxsep{3}") is None  # another command, not a box
    assert extract_boxed(r"\boxed") is None and extract_boxed(r"\boxed{") is None


def test_latex_fractions_are_never_read_as_their_denominator() -> None:
    for style in ("auto", "last_number"):
        assert extract_answer(r"The answer is \frac{1}{2}", style) == "0.5"
        assert extract_answer(r"so \boxed{\frac{1}{2}", style) == "0.5"  # an unbalanced box
        assert extract_answer(r"we get \dfrac{3}{4}.", style) == "0.75"
        assert extract_answer(r"we get \tfrac{3}{4}", style) == "0.75"
        assert extract_answer(r"we get -\frac{3}{4}", style) == "-0.75"
        assert extract_answer(r"halve it: \frac12", style) == "0.5"
        assert extract_answer(r"so \frac{x}{2}", style) == r"\frac{x}{2}"  # not a number: text
        assert extract_answer(r"so \frac{\sqrt{3}}{2}", style) == r"\frac{\sqrt{3}}{2}"
    for half in (r"\frac12", r"\dfrac{1}{2}", r"\tfrac12", r"\boxed{\frac12}", "1/2", "0.5"):
        assert answers_match(extract_answer(half), "1/2") and answers_match(extract_answer(half), "0.5")


def test_text_wrappers_units_spacing_and_the_unicode_minus() -> None:
    for given, expected in [
        (r"\boxed{\text{5}}", "5"),
        (r"\boxed{\textbf{5}}", "5"),
        (r"\boxed{\mathbf{5}}", "5"),
        (r"\boxed{{3}}", "3"),
        (r"\boxed{72 \text{ dollars}}", "72"),
        (r"\boxed{5\text{ apples}}", "5"),
        (r"\boxed{30^\circ}", "30"),
        (r"\boxed{30^{\circ}}", "30"),
        (r"\boxed{1\,000}", "1000"),
        (r"\boxed{10,\!000}", "10000"),
        (r"\boxed{1\!000}", "1000"),
        (r"\boxed{\text{(A)}}", "(A)"),
        ("#### \u22123", "-3"),
        (r"#### 1\,000", "1000"),
        (r"It costs 1\,000 dollars", "1000"),
        (r"It costs 72 \text{ dollars}", "72"),
        ("so \u22123", "-3"),
    ]:
        assert extract_answer(given) == expected, given
    assert normalize_number("\u22123") == "-3" and normalize_number(r"\text{\textbf{5}}") == "5"
    assert normalize_number(r"72\ \text{dollars}") == "72"
    # left alone: text that LaTeX does not mark as a unit, or that is not a number
    assert normalize_number("2 apples") == "2 apples" and normalize_number("{1}{2}") == "{1}{2}"
    assert "dollars" in normalize_number(r"x \text{ dollars}") and normalize_number("1, 2") == "1, 2"
    assert not answers_match(r"\frac{1}{2}", "2") and not answers_match("12", r"1\,2")


def test_every_style_still_reads_the_plain_forms() -> None:
    for style in ANSWER_STYLES:
        assert extract_answer("nothing here", style) is None
    assert extract_answer(r"\boxed{1,000}") == "1000" and extract_answer("#### 2:30") == "2:30"
    assert extract_answer(r"\boxed{5} then #### 6") == "5" and extract_answer(r"#### 3 \boxed{4.0}") == "4"


def test_file_answers_are_normalised_like_completions(tmp_path: Path) -> None:
    rows = [
        {"prompt": "a", "answer": r"\boxed{\text{5}}"},
        {"prompt": "b", "answer": r"so \fbox{7}"},
        {"prompt": "c", "answer": "#### \u22123"},
        {"prompt": "d", "answer": r"\boxed{\dfrac12}"},
        {"prompt": "e", "answer": r"\boxed{1\,000 \text{ dollars}}"},
    ]
    path = tmp_path / "math.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = FileTask(str(path), test_fraction=0.0)
    prompts = task.prompts("train")
    assert [p.answer for p in prompts] == ["5", "7", "-3", "0.5", "1000"]
    for p, completion in zip(
        prompts, ["so 5", r"\boxed{7}", "#### -3", r"\boxed{\frac{1}{2}}", "#### 1,000"]
    ):
        assert task.score(p, completion).reward == 1.0, completion
        assert task.score(p, task.reference(p)).reward == 1.0, task.reference(p)


def test_deep_wrappers_and_braces_are_unwrapped_in_one_pass() -> None:
    """A completion nesting wrappers a thousand deep is read in one pass (not one per level)."""
    assert normalize_number(r"\text{" * 1400 + "5" + "}" * 1400) == "5"
    assert extract_answer(r"\boxed{" + r"\mathbf{" * 1000 + "5" + "}" * 1001) == "5"
    assert normalize_number("{" * 4000 + "7" + "}" * 4000) == "7"
    assert normalize_number(r"\text{5") == r"\text{5" and normalize_number(r"5}\text{") == r"5}\text{"
