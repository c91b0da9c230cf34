"""File tasks: absolute paths for runs read from another directory, a held-out test file or a whole
file as the test split, worked solutions as SFT references, exact integers and no stale cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tether.errors import TetherError
from tether.lm.evaluate import check_test_split
from tether.lm.tasks import FileTask, get_task, resolve_task_params
from tether.userimports import absolute_spec, resolve_object


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


ROWS: list[dict[str, object]] = [{"prompt": f"q{i}", "answer": str(i)} for i in range(10)]

# ---------------------------------------------------------------- paths (item: relative paths in a run)


def test_relative_task_files_resolve_to_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run records its task's files absolute, so that it reads them from any working directory."""
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", ROWS)
    write_jsonl(data / "test.jsonl", [{"prompt": "t", "answer": "1"}])
    monkeypatch.chdir(tmp_path)
    given = {"path": "data/train.jsonl", "test_path": "./data/test.jsonl", "seed": 3}
    resolved = resolve_task_params("file", given)
    assert resolved == {"path": str(data / "train.jsonl"), "test_path": str(data / "test.jsonl"), "seed": 3}
    assert given["path"] == "data/train.jsonl"  # the caller's settings are left alone
    assert resolve_task_params("file", {"path": "~/x.jsonl"})["path"] == os.path.expanduser("~/x.jsonl")
    assert resolve_task_params("arithmetic", {"digits": 2}) == {"digits": 2}  # no file parameters
    assert resolve_task_params("no_such_task", {"path": "x"}) == {"path": "x"}  # get_task reports it

    task = get_task("file", path="data/train.jsonl", test_fraction=0.0)
    assert isinstance(task, FileTask) and task.path == data / "train.jsonl"
    assert {p.meta["source"] for p in task.prompts("train")} == {str(data / "train.jsonl")}

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the recorded (absolute) settings still build the same task
    again = get_task("file", **resolved)
    assert [p.text for p in again.prompts("train")] == [p.text for p in task.prompts("train")]
    with pytest.raises(TetherError, match=r"data/train\.jsonl.*does not exist.*working directory.*elsewhere"):
        get_task("file", path="data/train.jsonl")


def test_reward_and_import_files_resolve_to_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "rw.py").write_text("def short(completions, **kw):\n    return [1.0 for _ in completions]\n")
    monkeypatch.chdir(tmp_path)
    assert absolute_spec("rw.py:short") == f"{tmp_path / 'rw.py'}:short"
    assert absolute_spec("./rw.py") == str(tmp_path / "rw.py")
    for unchanged in (
        "verifier",
        "my_rewards:brevity",
        "my_pkg.rewards.brevity",
        "/abs/rw.py:fn",
        "my_pkg.rewards",
    ):
        assert absolute_spec(unchanged) == unchanged
    spec = absolute_spec("rw.py:short")
    monkeypatch.chdir(tmp_path.parent)  # found from another working directory
    assert resolve_object(spec, "task.rewards[0]")(completions=["a"]) == [1.0]


# ---------------------------------------------------------------- test file / whole file as test


def test_a_test_file_is_the_test_split(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    held = write_jsonl(
        tmp_path / "test.jsonl", [{"prompt": "t0", "answer": "#### 7"}, {"prompt": "t1", "answer": "8"}]
    )
    task = get_task("file", path=str(train), test_path=str(held))
    assert [p.text for p in task.prompts("train")] == [f"q{i}" for i in range(10)]  # every row trains
    test = task.prompts("test")
    assert [(p.id, p.text, p.answer) for p in test] == [
        ("file/test/0", "t0", "7"),
        ("file/test/1", "t1", "8"),
    ]
    assert {p.meta["source"] for p in test} == {str(held)} and check_test_split(task) == 2
    assert len(get_task("file", path=str(train), test_path=str(held), test_fraction=0).prompts("test")) == 2

    with pytest.raises(TetherError, match=r"test_fraction=0\.2 and task\.params\.test_path=.* both set"):
        get_task("file", path=str(train), test_path=str(held), test_fraction=0.2)
    with pytest.raises(TetherError, match=r"missing\.jsonl.*does not exist; set task\.params\.test_path"):
        get_task("file", path=str(train), test_path=str(tmp_path / "missing.jsonl"))
    other = write_jsonl(tmp_path / "other.jsonl", [{"question": "t", "answer": "1"}])
    with pytest.raises(TetherError, match=r"other\.jsonl.* has no column 'prompt'"):
        get_task("file", path=str(train), test_path=str(other))
    leaky = write_jsonl(
        tmp_path / "leaky.jsonl", [{"prompt": "t", "answer": "1"}, {"prompt": "q3", "answer": "3"}]
    )
    with pytest.raises(TetherError, match=r"repeats 1 prompt\(s\) of task\.params\.path .*'q3'.*not share"):
        get_task("file", path=str(train), test_path=str(leaky))


def test_test_fraction_one_holds_out_the_whole_file(tmp_path: Path) -> None:
    """``tether eval MODEL --task file task.params.path=test.jsonl task.params.test_fraction=1``."""
    path = write_jsonl(tmp_path / "gsm8k_test.jsonl", ROWS)
    task = get_task("file", path=str(path), test_fraction=1)
    assert task.prompts("train") == [] and check_test_split(task) == 10
    assert sorted(p.text for p in task.prompts("test")) == sorted(str(r["prompt"]) for r in ROWS)
    assert len(get_task("file", path=str(path)).prompts("test")) == 1  # unset: 0.1, as before
    for bad in (1.5, -0.1):
        with pytest.raises(TetherError, match=r"test_fraction=.*must be in \[0, 1\]"):
            get_task("file", path=str(path), test_fraction=bad)
    with pytest.raises(TetherError, match=r"task\.params\.test_fraction: nan is not a finite number"):
        get_task("file", path=str(path), test_fraction=float("nan"))


# ---------------------------------------------------------------- SFT references


GSM8K = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
MATH = r"We have $x = \frac{6}{12}$, so the answer is $\boxed{\frac{1}{2}}$."


def test_the_sft_reference_is_the_worked_solution(tmp_path: Path) -> None:
    rows = [
        {"prompt": "clips?", "answer": GSM8K},
        {"prompt": "x?", "answer": MATH},
        {"prompt": "plain?", "answer": "42"},
        {"prompt": "number?", "answer": 5},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    for style in ("auto", "hash", "last_number"):
        task = FileTask(str(path), answer_style=style, test_fraction=0.0)
        gsm, _, plain, number = task.prompts("train")
        assert task.reference(gsm) == GSM8K and task.score(gsm, task.reference(gsm)).reward == 1.0
        assert task.reference(plain) == "#### 42" and task.reference(number) == "#### 5"  # no solution
    task = FileTask(str(path), answer_style="auto", test_fraction=0.0)
    math = task.prompts("train")[1]
    assert math.answer == "0.5" and task.reference(math) == MATH
    assert task.score(math, task.reference(math)).reward == 1.0
    boxed = FileTask(str(path), answer_style="boxed", test_fraction=0.0)
    gsm, math, plain, _ = boxed.prompts("train")
    assert boxed.reference(math) == MATH
    # a solution that the style cannot read back: the answer alone, in the style's form
    assert boxed.reference(gsm) == r"\boxed{72}" and boxed.score(gsm, boxed.reference(gsm)).reward == 1.0
    for p in boxed.prompts("train"):
        assert boxed.score(p, boxed.reference(p)).reward == 1.0


# ---------------------------------------------------------------- reading: exact integers, no stale cache


def test_integers_stay_exact_beside_decimals(tmp_path: Path) -> None:
    path = tmp_path / "prec.jsonl"
    path.write_text(
        '{"prompt":"a","answer":12345678901234567}\n{"prompt":"b","answer":0.5}\n{"prompt":"c","answer":3}\n'
    )
    task = FileTask(str(path), test_fraction=0.0)
    assert [p.answer for p in task.prompts("train")] == ["12345678901234567", "0.5", "3"]
    assert task.prompts("train")[0].meta["raw_answer"] == 12345678901234567


def test_a_file_rewritten_in_place_is_read_anew(tmp_path: Path) -> None:
    """Even with its old modification time (a cache keyed on it would serve the old answers)."""
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}])
    stamp = path.stat()
    assert [p.answer for p in FileTask(str(path), test_fraction=0.0).prompts("train")] == ["1", "2"]
    write_jsonl(path, [{"prompt": "a", "answer": "7"}, {"prompt": "b", "answer": "8"}])
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert [p.answer for p in FileTask(str(path), test_fraction=0.0).prompts("train")] == ["7", "8"]


def test_json_forms_and_row_errors(tmp_path: Path) -> None:
    listed = tmp_path / "list.json"
    listed.write_text(
        json.dumps([{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2", "level": 3}])
    )
    task = FileTask(str(listed), test_fraction=0.0)
    assert [(p.text, p.answer, p.meta["columns"]) for p in task.prompts("train")] == [
        ("a", "1", {"level": None}),
        ("b", "2", {"level": 3}),
    ]
    lines = tmp_path / "lines.json"  # JSON Lines in a .json file, as datasets reads them
    lines.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": "2"}\n')
    assert len(FileTask(str(lines), test_fraction=0.0).prompts("train")) == 2
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "answer": 1}\n\n{not json\n')
    with pytest.raises(TetherError, match=r"broken\.jsonl', line 3: not valid JSON"):
        FileTask(str(broken))
    scalar = tmp_path / "scalar.jsonl"
    scalar.write_text('{"prompt": "a", "answer": 1}\n[1, 2]\n')
    with pytest.raises(TetherError, match=r"row 1 is a JSON list, not an object"):
        FileTask(str(scalar))
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(TetherError, match=r"bad\.json': not valid JSON"):
        FileTask(str(bad))
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"junk!")
    with pytest.raises(TetherError, match=r"junk\.parquet' could not be read as Parquet"):
        FileTask(str(junk))


def test_a_run_config_records_every_user_path_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The configs a run saves (LM RL, SFT, control) hold absolute paths for the task file, reward
    and import files and a recipe file, so `--resume` and `tether eval RUN` work from any directory."""
    from tether.config import from_dict
    from tether.control.config import ControlConfig
    from tether.lm.config import LMConfig, SFTConfig

    write_jsonl(tmp_path / "train.jsonl", ROWS)
    (tmp_path / "rw.py").write_text("def short(completions, **kw):\n    return [1.0 for _ in completions]\n")
    (tmp_path / "mine.py").write_text("X = 1\n")
    (tmp_path / "my_grpo.yaml").write_text("advantage: {name: grpo}\npolicy_loss: {name: ppo_clip}\n")
    monkeypatch.chdir(tmp_path)
    task = {"name": "file", "params": {"path": "train.jsonl"}, "rewards": ["rw.py:short", "verifier"]}
    lm = from_dict(LMConfig, {"recipe": "my_grpo.yaml", "imports": ["mine.py", "json"], "task": task})
    assert lm.recipe == str(tmp_path / "my_grpo.yaml")
    assert lm.imports == [str(tmp_path / "mine.py"), "json"]
    assert lm.task.params["path"] == str(tmp_path / "train.jsonl")
    assert lm.task.rewards == [f"{tmp_path / 'rw.py'}:short", "verifier"]
    assert from_dict(LMConfig, {"recipe": "grpo"}).recipe == "grpo"  # a name stays a name
    sft = from_dict(SFTConfig, {"imports": ["./mine.py"], "task": task})
    assert sft.imports == [str(tmp_path / "mine.py")]
    assert sft.task.params["path"] == str(tmp_path / "train.jsonl")
    control = from_dict(ControlConfig, {"recipe": "my_grpo.yaml", "imports": ["mine.py"]})
    assert (control.recipe, control.imports) == (str(tmp_path / "my_grpo.yaml"), [str(tmp_path / "mine.py")])


def test_a_whole_held_out_file_cannot_train(tmp_path: Path) -> None:
    """test_fraction=1 leaves no train split: RL and SFT refuse it before any work, naming the fix."""
    from tether.config import from_dict
    from tether.lm.config import LMConfig, SFTConfig
    from tether.lm.sft import plan_sft
    from tether.lm.trainer import plan_run

    path = write_jsonl(tmp_path / "all.jsonl", ROWS)
    task = {"name": "file", "params": {"path": str(path), "test_fraction": 1.0}}
    with pytest.raises(TetherError, match=r"no train prompts.*test_fraction below 1.*test_path"):
        plan_run(from_dict(LMConfig, {"task": task}))
    with pytest.raises(TetherError, match=r"no train prompts for SFT.*test_fraction below 1.*test_path"):
        plan_sft(from_dict(SFTConfig, {"task": task}))
