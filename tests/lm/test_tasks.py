"""Tasks: splits, verifiers, references, answer extraction, file loading, error isolation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tether.errors import TetherError, UnknownNameError
from tether.lm.tasks import (
    ArithmeticTask,
    CountdownTask,
    FileTask,
    Prompt,
    Score,
    Task,
    get_task,
    safe_score,
    task_names,
)
from tether.lm.tasks.countdown import ExpressionError, parse_expression, solve
from tether.lm.tasks.extract import (
    answers_match,
    extract_answer,
    extract_boxed,
    extract_hash_answer,
    normalize_number,
)

# ---------------------------------------------------------------- registry and interface


def test_registry() -> None:
    assert {"arithmetic", "countdown", "file"} <= set(task_names())
    assert isinstance(get_task("arithmetic", digits=1, train_size=50, test_size=10), ArithmeticTask)
    with pytest.raises(UnknownNameError, match=r"(?s)Did you mean 'arithmetic'.*countdown"):
        get_task("arithmetc")
    with pytest.raises(TetherError, match=r"no parameter 'digitz'.*Did you mean 'digits'"):
        get_task("arithmetic", digitz=3)


def test_prompt_and_score_are_frozen_and_hashable() -> None:
    p = Prompt(id="a", text="1+1=", answer="2", meta={"x": [1]})
    assert p == Prompt(id="a", text="1+1=", answer="2")
    assert len({p, Prompt(id="a", text="1+1=", answer="2")}) == 1
    with pytest.raises(AttributeError):
        p.text = "x"  # type: ignore[misc]
    assert Score(reward=1.0, correct=True).format_ok and Score(reward=0.0, correct=False).cost == 0.0


class _Exploding(Task):
    name = "exploding"

    def all_prompts(self, split: str) -> list[Prompt]:  # type: ignore[override]
        return [Prompt(id=f"{split}/0", text="q", answer="1")]

    def score(self, prompt: Prompt, completion: str) -> Score:
        if completion == "bad-reward":
            return Score(reward=2.0, correct=True)
        raise ZeroDivisionError("verifier bug")

    def reference(self, prompt: Prompt) -> str:
        return prompt.answer

    def extract(self, completion: str) -> str | None:
        return completion


def test_safe_score_isolates_a_verifier_that_raises() -> None:
    task = _Exploding()
    prompt = task.prompts("train")[0]
    score = safe_score(task, prompt, "anything")
    assert score == Score(reward=0.0, correct=False, format_ok=False, error="ZeroDivisionError: verifier bug")
    out_of_range = safe_score(task, prompt, "bad-reward")
    assert (
        out_of_range.reward == 0.0
        and out_of_range.error is not None
        and "outside [0, 1]" in out_of_range.error
    )
    arithmetic = ArithmeticTask(train_size=10, test_size=5)
    good = arithmetic.prompts("train")[0]
    assert safe_score(arithmetic, good, good.answer) == Score(reward=1.0, correct=True)


def test_prompts_subsets_are_seeded() -> None:
    task = ArithmeticTask(train_size=100, test_size=20)
    a, b = task.prompts("train", n=10, seed=1), task.prompts("train", n=10, seed=1)
    assert a == b and len(a) == 10 and len(set(a)) == 10
    assert task.prompts("train", n=10, seed=2) != a
    assert len(task.prompts("test")) == 20
    with pytest.raises(TetherError, match="has 20 test prompts"):
        task.prompts("test", n=21)
    with pytest.raises(TetherError, match="split"):
        task.prompts("valid")  # type: ignore[arg-type]


# ---------------------------------------------------------------- arithmetic


def test_arithmetic_splits_disjoint_and_deterministic() -> None:
    task = ArithmeticTask(digits=2, operations="+-*", train_size=2000, test_size=300, seed=7)
    train, test = task.prompts("train"), task.prompts("test")
    assert len(train) == 2000 and len(test) == 300
    assert not {p.text for p in train} & {p.text for p in test}
    assert len({p.text for p in train}) == 2000
    again = ArithmeticTask(digits=2, operations="+-*", train_size=2000, test_size=300, seed=7)
    assert [p.text for p in again.prompts("train")] == [p.text for p in train]
    assert [p.id for p in again.prompts("test")] == [p.id for p in test]
    other = ArithmeticTask(digits=2, operations="+-*", train_size=2000, test_size=300, seed=8)
    assert [p.text for p in other.prompts("test")] != [p.text for p in test]
    for p in train[:200] + test:
        assert p.text.endswith("=") and " " not in p.text
        expression = p.text[:-1]
        assert int(p.answer) == eval(expression)  # trusted, generated text: checks the task's own evaluator


def test_arithmetic_scores() -> None:
    task = ArithmeticTask(train_size=10, test_size=5)
    p = Prompt(id="x", text="12-34=", answer="-22")
    assert task.score(p, "-22") == Score(reward=1.0, correct=True, format_ok=True)
    assert task.score(p, " -22\n").correct  # surrounding white space is fine
    assert task.score(p, "-022").correct  # leading zeros are tolerated
    wrong = task.score(p, "22")
    assert (wrong.reward, wrong.correct, wrong.format_ok) == (0.0, False, True)
    junk = task.score(p, "-22abc")
    assert (junk.reward, junk.correct, junk.format_ok) == (0.0, False, False)
    garbage = task.score(p, "hello")
    assert (garbage.reward, garbage.correct, garbage.format_ok) == (0.0, False, False)
    assert not task.score(p, "").format_ok
    assert task.extract("-22abc") == "-22" and task.extract("none") is None
    for prompt in task.prompts("train") + task.prompts("test"):
        assert task.score(prompt, task.reference(prompt)).correct


def test_arithmetic_negative_answers_and_hash_format() -> None:
    task = ArithmeticTask(operations="-", train_size=300, test_size=50, answer_format="hash")
    negatives = [p for p in task.prompts("train") if p.answer.startswith("-")]
    assert negatives
    p = negatives[0]
    assert task.reference(p) == f"#### {p.answer}"
    assert task.score(p, f"some work\n#### {p.answer}").correct
    assert not task.score(p, p.answer).format_ok  # no #### in hash mode
    assert task.extract(f"#### {p.answer}") == p.answer


def test_arithmetic_zero_padded_operands() -> None:
    task = ArithmeticTask(digits=3, operations="+*", train_size=300, test_size=50, pad_operands=True)
    prompts = task.prompts("train") + task.prompts("test")
    for p in prompts:
        a, op, b = re.fullmatch(r"(\d+)([+*])(\d+)=", p.text).groups()  # type: ignore[union-attr]
        assert len(a) == len(b) == 3, p.text
        assert int(p.answer) == (int(a) + int(b) if op == "+" else int(a) * int(b))
        assert task.score(p, task.reference(p)).correct
    assert any(p.text.startswith("0") for p in prompts)  # small operands really are padded
    plain = ArithmeticTask(digits=3, operations="+*", train_size=300, test_size=50)
    # the same problems, only written differently
    assert [int(p.answer) for p in plain.prompts("test")] == [int(p.answer) for p in task.prompts("test")]


def test_arithmetic_bad_parameters() -> None:
    with pytest.raises(TetherError, match="operator '/'"):
        ArithmeticTask(operations="+/")
    with pytest.raises(TetherError, match="only 200 distinct problems"):
        ArithmeticTask(digits=1, operations="+-", train_size=500, test_size=50)


# ---------------------------------------------------------------- countdown


def test_countdown_safe_parsing() -> None:
    assert parse_expression("3*5+7").value == 22
    assert parse_expression("(3+5) * 7").numbers == (3, 5, 7)
    for bad in [
        "x",
        "__import__('os')",
        "abs(3)",
        "2**3",
        "2/1",
        "-3+5",
        "3.0+1",
        "1 if 1 else 2",
        "((",
        "3;4",
        "007",
    ]:
        with pytest.raises(ExpressionError):
            parse_expression(bad)
    with pytest.raises(ExpressionError):
        parse_expression("1+" * 200 + "1")


def test_countdown_scores() -> None:
    task = CountdownTask(train_size=10, test_size=5, format_reward=0.1)
    p = Prompt(id="x", text="nums:3,5,7 target:22 =", answer="22")  # no meta: parsed from the text
    assert task.score(p, "3*5+7") == Score(reward=1.0, correct=True, format_ok=True)
    assert task.score(p, " 7+5*3 \nbecause").correct
    assert task.score(p, "3*5+7=22").correct
    cases = {
        "3*5+7+7": 0.1,  # 7 used twice
        "3*5+6+1": 0.1,  # numbers not given
        "15+7": 0.1,  # 15 not given
        "3+5+7": 0.1,  # wrong value
        "3*5": 0.1,  # use_all: 7 unused
        "x*5+7": 0.0,  # names
        "3**2+13": 0.0,
        "": 0.0,
    }
    for completion, reward in cases.items():
        score = task.score(p, completion)
        assert score.reward == reward and not score.correct, completion
        assert score.format_ok == (reward > 0), completion
    at_most_once = CountdownTask(train_size=10, test_size=5, use_all=False)
    q = Prompt(id="y", text="nums:3,5,7 target:15 =", answer="15")
    assert at_most_once.score(q, "3*5").correct and not task.score(q, "3*5").correct
    assert not at_most_once.score(q, "3*5*1").correct


def test_countdown_references_solve_and_splits_are_disjoint() -> None:
    task = CountdownTask(num_numbers=3, train_size=400, test_size=100, seed=3)
    train, test = task.prompts("train"), task.prompts("test")
    key = lambda p: (tuple(sorted(p.meta["numbers"])), p.meta["target"])  # noqa: E731
    assert not {key(p) for p in train} & {key(p) for p in test}
    assert [
        p.text for p in CountdownTask(num_numbers=3, train_size=400, test_size=100, seed=3).prompts("test")
    ] == [p.text for p in test]
    for p in train + test:
        assert 1 <= int(p.answer) <= 100
        assert task.score(p, task.reference(p)).correct
    bare = Prompt(id="z", text="nums:2,3,4 target:14 =", answer="14")
    assert task.score(bare, task.reference(bare)).correct
    assert solve([2, 3, 4], 1000) is None


# ---------------------------------------------------------------- extraction


def test_extraction_conventions() -> None:
    assert extract_hash_answer("so 40+2\n#### 42") == "42"
    assert extract_hash_answer("#### 1 ####  1,234\nrest") == "1234"
    assert extract_hash_answer("no answer") is None
    assert extract_boxed(r"x \boxed{3} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{{a}} \boxed{unbalanced") == "{a}"
    assert extract_boxed("nothing") is None
    assert normalize_number("3.0") == normalize_number("3") == "3"
    assert normalize_number("-0") == "0" and normalize_number("0.50") == "0.5"
    assert normalize_number("1,000") == "1000" and normalize_number(" yes ") == "yes"
    assert extract_answer(r"#### 3 \boxed{4.0}") == "4"
    assert extract_answer("#### 3.0 and then 9", "hash") == "3"
    assert extract_answer("it is 1,000 or 7", "last_number") == "7"
    assert extract_answer("it is 12", "auto") == "12"
    assert extract_answer("nothing", "auto") is None
    assert answers_match("3.00", "3") and not answers_match(None, "3")


# ---------------------------------------------------------------- files


def _write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


ROWS: list[dict[str, object]] = [
    {"question": "Tom has 2 apples and buys 40. How many?", "answer": "2+40=42\n#### 42"},
    {"question": "Big?", "answer": "#### 1,000"},
    {"question": "Half of 7?", "answer": r"\boxed{3.5}"},
    {"question": "Three?", "answer": "3.0"},
    {"question": "Ten?", "answer": "10"},
]


def test_file_task_jsonl(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "gsm.jsonl", ROWS)
    task = get_task("file", path=str(path), prompt_column="question", test_fraction=0.2, seed=1)
    assert isinstance(task, FileTask)
    train, test = task.prompts("train"), task.prompts("test")
    assert len(train) == 4 and len(test) == 1
    assert not {p.id for p in train} & {p.id for p in test}
    answers = {p.text: p.answer for p in train + test}
    assert answers == {"Tom has 2 apples and buys 40. How many?": "42", "Big?": "1000", "Half of 7?": "3.5",
                       "Three?": "3", "Ten?": "10"}  # fmt: skip
    p = next(q for q in train + test if q.answer == "42")
    assert p.meta["raw_answer"] == ROWS[0]["answer"]
    assert task.reference(p) == ROWS[0]["answer"] and task.score(p, task.reference(p)).correct  # the solution
    assert task.score(p, "I think it is \\boxed{42}").correct
    assert task.score(p, "so 42.0").correct
    wrong = task.score(p, "#### 41")
    assert (wrong.reward, wrong.correct, wrong.format_ok) == (0.0, False, True)
    assert not task.score(p, "no idea").format_ok
    same = FileTask(str(path), prompt_column="question", test_fraction=0.2, seed=1)
    assert [q.text for q in same.prompts("test")] == [q.text for q in test]


def test_file_task_parquet_and_boxed_style(tmp_path: Path) -> None:
    import datasets

    path = tmp_path / "math.parquet"
    datasets.Dataset.from_dict(
        {"prompt": [str(r["question"]) for r in ROWS], "answer": [str(r["answer"]) for r in ROWS]}
    ).to_parquet(str(path))
    task = FileTask(str(path), answer_style="boxed", test_fraction=0.0)
    assert len(task.prompts("train")) == 5 and task.prompts("test") == []
    p = task.prompts("train")[2]
    assert p.answer == "3.5" and task.reference(p) == r"\boxed{3.5}"
    assert task.score(p, r"so \boxed{3.50}").correct
    assert not task.score(p, "#### 3.5").format_ok  # boxed style only reads \boxed{}


def test_file_task_errors(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "q.jsonl", ROWS)
    with pytest.raises(TetherError) as info:
        FileTask(str(path))  # the default prompt column "prompt" is absent
    message = str(info.value)
    assert "q.jsonl" in message and "'prompt'" in message and "question" in message
    assert "task.params.prompt_column=" in message
    with pytest.raises(TetherError, match=r"no column 'solution'.*task\.params\.answer_column="):
        FileTask(str(path), prompt_column="question", answer_column="solution")
    with pytest.raises(TetherError, match=r"missing\.jsonl.*does not exist"):
        FileTask(str(tmp_path / "missing.jsonl"))
    (tmp_path / "data.csv").write_text("prompt,answer\n1,2\n")
    with pytest.raises(TetherError, match=r"data\.csv.*\.jsonl"):
        FileTask(str(tmp_path / "data.csv"))
    empty_answer = _write_jsonl(
        tmp_path / "empty.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": ""}]
    )
    with pytest.raises(TetherError, match="row 1"):
        FileTask(str(empty_answer))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "answer": 1}\n{not json\n')
    with pytest.raises(TetherError, match=r"broken\.jsonl"):
        FileTask(str(broken))


# ---------------------------------------------------------------- numbers, fractions, lists


def test_equal_rationals_normalise_alike_and_lists_do_not_merge() -> None:
    half = {normalize_number(x) for x in ["0.5", ".5", "1/2", "2/4", r"\frac{1}{2}", r"\dfrac{1}{2}", "0.50"]}
    assert half == {"0.5"}
    assert normalize_number(r"-\frac{3}{4}") == normalize_number(r"\tfrac{-3}{4}") == "-0.75"
    assert normalize_number("2/6") == "1/3" and normalize_number("1e3") == "1000"
    assert normalize_number(r"\$18") == "18" and normalize_number("1{,}234") == "1234"
    assert normalize_number("12.5%") == "12.5" and normalize_number("1 000") == "1000"
    # Commas and spaces only count as thousands separators in their places.
    assert normalize_number("1, 2") == "1, 2" and not answers_match("12", "1, 2")
    assert not answers_match("12", "1 2") and normalize_number("1,23") == "1,23"
    assert normalize_number("1/0") == "1/0" and normalize_number("2:30") == "2:30"


def test_hash_answers_keep_fractions_lists_and_times() -> None:
    assert extract_answer("#### 1/2") == "0.5"
    assert not answers_match(extract_answer("#### 1/7"), "1/2")
    assert extract_answer("#### 2:30") == "2:30" and extract_answer("#### 1, 2") == "1, 2"
    assert extract_answer("#### 1e3") == "1000" and extract_answer("#### 1,234 apples") == "1234"
    assert extract_answer("the answer is 1/2", "last_number") == "0.5"


def test_huge_numbers_are_not_expanded() -> None:
    """A short completion must not cost a million-digit conversion (or raise on int()'s digit limit)."""
    assert normalize_number("1e1000000") == "1e1000000"
    assert normalize_number("1e-1000000") == "1e-1000000"
    assert normalize_number(".5e1000000") == "5e999999"
    big = "9" * 5000
    assert normalize_number(big) == normalize_number(big + ".0") != normalize_number("9" * 4999 + "8")
    task = FileTask.__new__(FileTask)
    task.answer_style = "auto"
    p = Prompt(id="x", text="q", answer="42")
    score = safe_score(task, p, r"\boxed{1e1000000}")
    assert score.error is None and score.reward == 0.0
    arithmetic = ArithmeticTask(digits=1, operations="+", train_size=20, test_size=5)
    q = arithmetic.prompts("test")[0]
    long_answer = safe_score(arithmetic, q, "9" * 5000)
    assert long_answer.error is None and long_answer.reward == 0.0


def test_file_task_duplicate_prompts_stay_in_one_split(tmp_path: Path) -> None:
    rows = [{"prompt": "q", "answer": str(i)} for i in range(4)]
    rows += [{"prompt": f"p{i}", "answer": str(i)} for i in range(6)]
    path = _write_jsonl(tmp_path / "dup.jsonl", rows)
    for seed in range(6):
        task = FileTask(str(path), test_fraction=0.4, seed=seed)
        train = {p.text for p in task.prompts("train")}
        test = {p.text for p in task.prompts("test")}
        assert not train & test
        assert len(task.prompts("train")) + len(task.prompts("test")) == 10
        assert len(test) == 3  # 40% of the 7 distinct prompts


def test_file_task_references_read_back_and_bad_answers_are_refused(tmp_path: Path) -> None:
    import datasets

    rows = [
        {"prompt": "a", "answer": "1/2"},
        {"prompt": "b", "answer": "2 apples"},
        {"prompt": "c", "answer": "3:30"},
    ]
    task = FileTask(str(_write_jsonl(tmp_path / "r.jsonl", rows)), test_fraction=0.0)
    for p in task.prompts("train"):
        assert task.score(p, task.reference(p)).correct, task.reference(p)
    assert task.reference(task.prompts("train")[1]) == r"\boxed{2 apples}"
    nan = tmp_path / "nan.parquet"
    datasets.Dataset.from_dict({"prompt": ["a", "b"], "answer": [1.0, float("nan")]}).to_parquet(str(nan))
    with pytest.raises(TetherError, match="row 1"):
        FileTask(str(nan))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(TetherError, match="has no rows"):
        FileTask(str(empty))
    empty_parquet = tmp_path / "empty.parquet"
    datasets.Dataset.from_dict({"prompt": [], "answer": []}).to_parquet(str(empty_parquet))
    with pytest.raises(TetherError, match="has no rows"):
        FileTask(str(empty_parquet))


def test_a_nonfinite_cost_is_a_verifier_error() -> None:
    class Costly(Task):
        name = "costly"

        def all_prompts(self, split: str) -> list[Prompt]:
            return [Prompt(id="c/0", text="q", answer="1")]

        def score(self, prompt: Prompt, completion: str) -> Score:
            return Score(reward=1.0, correct=True, cost=float("nan"))

        def reference(self, prompt: Prompt) -> str:
            return "1"

        def extract(self, completion: str) -> str | None:
            return completion

    score = safe_score(Costly(), Prompt(id="c/0", text="q", answer="1"), "1")
    assert score.error is not None and "cost" in score.error and score.reward == 0.0


def test_task_parameters_are_checked_against_the_constructor() -> None:
    with pytest.raises(TetherError, match=r"task 'file' needs task\.params\.path"):
        get_task("file")
    with pytest.raises(TetherError, match=r"task\.params\.digits: expected an integer, got 'abc'"):
        get_task("arithmetic", digits="abc")
    with pytest.raises(TetherError, match=r"task\.params\.test_fraction: expected a number"):
        get_task("file", path="x.jsonl", test_fraction="abc")
    assert get_task("arithmetic", digits="2").digits == 2  # YAML-style coercion, as config values
