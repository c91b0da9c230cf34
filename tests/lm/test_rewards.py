"""The user's own code in a run: reward functions (``task.rewards``, weighted mean, isolation of
failures, the keywords passed) and ``imports`` (a .py file or a module registering a task),
through the library and through ``tether train``."""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.lm.test_trainer import TINY, make_config, read_jsonl, record_advantages
from tests.lm.test_trainer import tiny_cache as tiny_cache  # module-wide TETHER_CACHE, one thread
from tether.catalogue import get
from tether.cli import main
from tether.config import ConfigError, apply_overrides, from_dict
from tether.lm.config import LMConfig
from tether.lm.tasks import Prompt, Score, Split, Task, build_task, get_task, safe_score_batch
from tether.lm.tasks.rewards import RewardedTask, build_reward_functions, reward_parts
from tether.lm.trainer import RLTrainer
from tether.userimports import import_user_code, resolve_object

REWARDS = """
CALLS = []

def first(prompts, completions, **kwargs):
    CALLS.append(("first", len(completions)))
    return [{"a": 1.0, "b": 0.0, "c": 0.5}[c] for c in completions]

def second(completions, answer):
    CALLS.append(("second", len(completions), tuple(answer)))
    return [{"a": 0.0, "b": 1.0, "c": None}[c] for c in completions]

def poison(completions, **kwargs):
    CALLS.append(("poison", len(completions)))
    if "bad" in completions:
        raise ValueError("cannot score bad")
    return [0.25] * len(completions)

def too_big(completions, **kwargs):
    return [1.5 if c == "a" else float("nan") if c == "b" else 0.0 for c in completions]

def wrong_length(completions, **kwargs):
    return [1.0]

def never(completions, **kwargs):
    return [None] * len(completions)

def no_completions(prompts):
    return [1.0] * len(prompts)

def needs_more(completions, tests):
    return [1.0] * len(completions)

def columns(completions, **kwargs):
    CALLS.append(("columns", {k: v for k, v in kwargs.items() if k not in ("meta",)}))
    return [float(d == "easy") for d in kwargs["difficulty"]]

def tensor_out(completions, **kwargs):
    import torch
    return torch.tensor([0.5] * len(completions))

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def rewards_file(tmp_path: Path) -> Iterator[tuple[Path, Any]]:
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS)
    module = import_user_code([str(path)])[0]
    module.CALLS.clear()
    yield path, module


class Fixed(Task):
    """Three prompts; the verifier says 'a' is right, and refuses 'boom'."""

    name = "fixed"

    def all_prompts(self, split: Split) -> list[Prompt]:
        return [Prompt(id=f"fixed/{split}/{i}", text=f"q{i}", answer=str(i)) for i in range(3)]

    def score(self, prompt: Prompt, completion: str) -> Score:
        if completion == "boom":
            raise RuntimeError("verifier exploded")
        return Score(reward=float(completion == "a"), correct=completion == "a", format_ok=completion != "c")

    def reference(self, prompt: Prompt) -> str:
        return "a"

    def extract(self, completion: str) -> str | None:
        return completion


def rewarded(path: Path, names: Sequence[str], weights: Sequence[float] = ()) -> RewardedTask:
    specs = [n if ":" not in n and n in ("verifier", "correct", "format") else f"{path}:{n}" for n in names]
    return RewardedTask(Fixed(), build_reward_functions(specs, weights))


def score(task: Task, completions: Sequence[str]) -> list[Score]:
    prompts = Fixed().all_prompts("train")
    return safe_score_batch(task, [prompts[i % 3] for i in range(len(completions))], completions)


# ------------------------------------------------------------------------------- the weighted mean
def test_reward_is_the_weighted_mean_of_the_functions_that_score(rewards_file: tuple[Path, Any]) -> None:
    path, module = rewards_file
    task = rewarded(path, ["first", "second"], [3.0, 1.0])
    scores = score(task, ["a", "b", "c"])
    # a: (3*1 + 1*0) / 4; b: (3*0 + 1*1) / 4; c: second says None, so first alone: 0.5
    assert [s.reward for s in scores] == [0.75, 0.25, 0.5]
    assert [s.parts for s in scores] == [
        {"first": 1.0, "second": 0.0},
        {"first": 0.0, "second": 1.0},
        {"first": 0.5},
    ]
    # accuracy and format still come from the task's verifier
    assert [s.correct for s in scores] == [True, False, False]
    assert [s.format_ok for s in scores] == [True, True, False]
    assert all(s.error is None for s in scores)
    # one call per function for the whole batch, with only the keywords `second` takes
    assert module.CALLS == [("first", 3), ("second", 3, ("0", "1", "2"))]


def test_builtin_rewards_come_from_the_verifier(rewards_file: tuple[Path, Any]) -> None:
    path, _ = rewards_file
    scores = score(rewarded(path, ["verifier", "format"], [1.0, 1.0]), ["a", "b", "c"])
    assert [s.reward for s in scores] == [1.0, 0.5, 0.0]
    scores = score(rewarded(path, ["correct", "first"], [0.0, 1.0]), ["a", "c"])
    assert [s.reward for s in scores] == [1.0, 0.5]  # weight 0: logged, not counted
    assert [s.parts["correct"] for s in scores] == [1.0, 0.0]


def test_an_out_of_range_verifier_reward_is_an_error_under_rewards_too() -> None:
    """A batch verifier returning 1.5 is a verifier error with or without ``task.rewards=[verifier]``
    (not a reward silently clamped to 1)."""

    class Overshoots(Fixed):
        def score_batch(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[Score]:
            return [Score(reward=1.5 if c == "a" else 0.0, correct=c == "a") for c in completions]

    prompts = Fixed().all_prompts("train")
    plain = safe_score_batch(Overshoots(), prompts[:2], ["a", "b"])
    task = RewardedTask(Overshoots(), build_reward_functions(["verifier"], []))
    wrapped = safe_score_batch(task, prompts[:2], ["a", "b"])
    for scores in (plain, wrapped):
        assert scores[0].error is not None and "outside [0, 1]" in scores[0].error and scores[0].reward == 0.0
        assert scores[1].error is None and scores[1].reward == 0.0


def test_without_rewards_the_task_is_unchanged() -> None:
    task = build_task("arithmetic", {"digits": 2})
    assert type(task) is type(get_task("arithmetic", digits=2))


# ------------------------------------------------------------------------------- failures, isolated
def test_a_function_that_raises_loses_only_the_completions_it_fails_on(
    rewards_file: tuple[Path, Any],
) -> None:
    path, module = rewards_file
    scores = score(rewarded(path, ["poison"]), ["a", "bad", "b"])
    assert [s.reward for s in scores] == [0.25, 0.0, 0.25]
    assert [s.error is None for s in scores] == [True, False, True]
    assert "reward function 'poison' raised ValueError: cannot score bad" in (scores[1].error or "")
    # the batch call, then each completion alone
    assert module.CALLS == [("poison", 3), ("poison", 1), ("poison", 1), ("poison", 1)]


def test_bad_values_and_unscorable_completions_are_errors(rewards_file: tuple[Path, Any]) -> None:
    path, _ = rewards_file
    scores = score(rewarded(path, ["too_big"]), ["a", "b", "c"])
    assert [s.error is None for s in scores] == [False, False, True]
    assert "returned 1.5" in (scores[0].error or "") and "returned nan" in (scores[1].error or "")
    assert all(s.reward == 0.0 for s in scores)

    scores = score(rewarded(path, ["wrong_length"]), ["a", "b"])
    assert scores[0].error is None and scores[0].reward == 1.0  # alone, one value is the right count
    scores = score(rewarded(path, ["wrong_length", "first"]), ["a", "b"])
    assert scores[0].error is None  # one completion at a time after the batch failed
    scores = score(rewarded(path, ["never"]), ["a"])
    assert scores[0].reward == 0.0 and "unscorable" in (scores[0].error or "")

    scores = score(rewarded(path, ["first"]), ["boom"])  # the verifier raised: the sample is out
    assert scores[0].reward == 0.0 and "verifier exploded" in (scores[0].error or "")


def test_a_tensor_of_rewards_is_accepted(rewards_file: tuple[Path, Any]) -> None:
    path, _ = rewards_file
    assert [s.reward for s in score(rewarded(path, ["tensor_out"]), ["a", "b"])] == [0.5, 0.5]


def test_safe_score_batch_isolates_a_batch_scorer(rewards_file: tuple[Path, Any]) -> None:
    class Broken(Fixed):
        def __init__(self, out: Any) -> None:
            self.out = out

        def score_batch(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[Score]:
            if isinstance(self.out, Exception):
                raise self.out
            return self.out  # type: ignore[no-any-return]

    assert all("ValueError: no" in (s.error or "") for s in score(Broken(ValueError("no")), ["a", "b"]))
    assert all("1 scores for 2" in (s.error or "") for s in score(Broken([Score(1.0, True)]), ["a", "b"]))
    out = score(Broken([Score(1.0, True), Score(2.0, True)]), ["a", "b"])
    assert out[0].error is None and out[0].reward == 1.0
    assert out[1].reward == 0.0 and "outside [0, 1]" in (out[1].error or "")


# ------------------------------------------------------------------------------- refused when built
@pytest.mark.parametrize(
    "name,message",
    [
        ("no_completions", "does not take completions="),
        ("needs_more", "requires tests, which tether does not pass"),
        ("NOT_A_FUNCTION", "is a int, not a function"),
        ("missing", "has no attribute 'missing'"),
    ],
)
def test_unusable_functions_are_refused_when_the_task_is_built(
    rewards_file: tuple[Path, Any], name: str, message: str
) -> None:
    path, _ = rewards_file
    with pytest.raises(ConfigError, match=message):
        build_task("arithmetic", {}, [f"{path}:{name}"])


def test_unknown_reward_names_and_modules_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="neither a built-in reward"):
        build_task("arithmetic", {}, ["verifer"])
    with pytest.raises(ConfigError, match="no module named 'nowhere_at_all'"):
        build_task("arithmetic", {}, ["nowhere_at_all:f"])
    with pytest.raises(ConfigError, match="is not a file"):
        build_task("arithmetic", {}, ["./absent.py:f"])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["task.rewards=[verifier, format]", "task.reward_weights=[1.0]"], "1 weights for 2"),
        (["task.rewards=[verifier]", "task.reward_weights=[-1.0]"], "must be >= 0"),
        (["task.rewards=[verifier, format]", "task.reward_weights=[0, 0]"], "all 0"),
    ],
)
def test_bad_reward_weights_stop_at_config_load(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(LMConfig, apply_overrides({}, overrides))


def test_a_module_beside_the_command_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "beside_rewards.py").write_text(
        "def short(completions, **kw):\n    return [0.5] * len(completions)\n"
    )
    monkeypatch.chdir(tmp_path)
    fn = resolve_object("beside_rewards:short", "task.rewards[0]")
    assert fn(completions=["x", "y"]) == [0.5, 0.5]
    assert resolve_object("beside_rewards.short", "task.rewards[0]") is fn


# ------------------------------------------------------------------------------- file columns
def test_a_file_tasks_other_columns_reach_the_reward_function(
    tmp_path: Path, rewards_file: tuple[Path, Any]
) -> None:
    path, module = rewards_file
    data = tmp_path / "data.jsonl"
    rows = [
        {"prompt": f"{i}+1=", "answer": str(i + 1), "difficulty": "easy" if i % 2 else "hard"}
        for i in range(6)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = build_task("file", {"path": str(data), "test_fraction": 0.0}, [f"{path}:columns"])
    prompts = task.prompts("train")
    scores = task.score_batch(prompts, ["#### 0"] * len(prompts))
    assert [s.reward for s in scores] == [float(p.meta["columns"]["difficulty"] == "easy") for p in prompts]
    ((_, kwargs),) = module.CALLS
    assert kwargs["difficulty"] == [p.meta["columns"]["difficulty"] for p in prompts]
    assert kwargs["answer"] == [p.answer for p in prompts] and kwargs["prompts"] == [p.text for p in prompts]


# ------------------------------------------------------------------------------- in a training run
def test_trainer_logs_each_function_and_drops_the_failures(tmp_path: Path) -> None:
    fn = tmp_path / "train_rewards.py"
    fn.write_text(
        textwrap.dedent(
            """
            def longish(completions, **kwargs):
                if any(c[:1].isupper() for c in completions):
                    raise RuntimeError("no capitals first")
                return [min(len(c), 6) / 6 for c in completions]
            """
        )
    )
    out = tmp_path / "run"
    cfg = make_config(
        out, "train.steps=2", f"task.rewards=[verifier, {fn}:longish]", "task.reward_weights=[1, 1]"
    )
    trainer = RLTrainer(cfg)
    seen: list[Any] = []
    trainer.on_step = lambda step, metrics: seen.append(trainer.last_rollout)
    trainer.train()
    metrics = read_jsonl(out / "metrics.jsonl")
    errors = 0
    for ro, record in zip(seen, metrics):
        ok = [s for s in ro.scores if s.error is None]
        errors += len(ro.scores) - len(ok)
        assert record["reward/verifier_errors"] == len(ro.scores) - len(ok)
        # each function's mean over the completions it scored (the verifier scored them all)
        assert record["reward_fn/longish"] == pytest.approx(sum(s.parts["longish"] for s in ok) / len(ok))
        verifier = [s.parts["verifier"] for s in ro.scores]
        assert len(verifier) == len(ro.scores) and record["reward_fn/verifier"] == pytest.approx(
            sum(verifier) / len(verifier)
        )
        for s, c in zip(ro.scores, ro.batch.completion_texts):
            assert (s.error is not None) == c[:1].isupper()
            if s.error is None:
                assert s.reward == pytest.approx((s.parts["verifier"] + min(len(c), 6) / 6) / 2)
        assert record["perf/cpu_peak_rss_gb"] > 0
    assert 0 < errors < sum(len(ro.scores) for ro in seen)  # some completions failed, not all


def test_imports_register_a_task_for_tether_train(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "my_task.py").write_text(
        textwrap.dedent(
            """
            from tether.lm.tasks import Prompt, Score, Task, register_task

            @register_task("user_echo")
            class Echo(Task):
                def all_prompts(self, split):
                    base = 0 if split == "train" else 100
                    return [Prompt(id=f"echo/{split}/{i}", text=f"{i}=", answer=str(i)) for i in range(base, base + 20)]

                def score(self, prompt, completion):
                    ok = completion.strip() == prompt.answer
                    return Score(reward=float(ok), correct=ok)

                def reference(self, prompt):
                    return prompt.answer

                def extract(self, completion):
                    return completion.strip() or None
            """
        )
    )
    (tmp_path / "user_rewards.py").write_text(
        "def digits(completions, **kw):\n    return [float(c.isdigit()) for c in completions]\n"
    )
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    args = ["train", "--task", "user_echo", "--out", str(out), "--steps", "2", "--no-eval", *TINY]
    assert main([*args, "imports=[my_task.py]", "task.rewards=[user_rewards:digits]"]) == 0
    metrics = read_jsonl(out / "metrics.jsonl")
    assert len(metrics) == 2 and all("reward_fn/digits" in m for m in metrics)
    assert all(m["reward/mean"] == pytest.approx(m["reward_fn/digits"]) for m in metrics)
    config = (out / "config.yaml").read_text()
    assert "my_task.py" in config and "user_rewards:digits" in config
    # tether eval imports it too; a test split smaller than --prompts is used whole
    capsys.readouterr()
    evalargs = [str(out), "imports=[my_task.py]", "sampling.max_new_tokens=6", "--task", "user_echo"]
    assert main(["eval", *evalargs, "--prompts", "50", "--k", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["prompts"] == 20.0
    # without the import, the task is unknown: refused before any run directory is made
    assert main(["train", "--task", "user_echo_x", "--out", str(tmp_path / "r2"), *TINY]) == 2
    assert not (tmp_path / "r2").exists()


def test_an_import_that_fails_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.py"
    bad.write_text("raise RuntimeError('half-written')\n")
    with pytest.raises(ConfigError, match=r"broken\.py.*RuntimeError: half-written"):
        import_user_code([str(bad)])
    with pytest.raises(ConfigError, match="no module named 'not_a_real_module_x'"):
        import_user_code("not_a_real_module_x")


def test_trainer_hands_each_function_to_gdpo(tmp_path: Path) -> None:
    """``reward_parts`` / ``reward_weights``: one column per task.rewards function (NaN where it gave
    None), in order, with its weight; GDPO's advantages in the run are those of these columns."""
    fn = tmp_path / "parts_rewards.py"
    fn.write_text(
        textwrap.dedent(
            """
            def longish(completions, **kwargs):
                return [None if len(c) == 0 else min(len(c), 6) / 6 for c in completions]
            """
        )
    )
    cfg = make_config(
        tmp_path / "run",
        "train.steps=2",
        f"task.rewards=[verifier, {fn}:longish]",
        "task.reward_weights=[1, 0.5]",
        recipe="gdpo",
    )
    trainer = RLTrainer(cfg)
    calls = record_advantages(trainer)
    rollouts: list[Any] = []
    trainer.on_step = lambda step, metrics: rollouts.append(trainer.last_rollout)
    trainer.train()
    assert len(calls) == 2
    gdpo = get("advantage", "gdpo").fn
    for (inputs, adv), ro in zip(calls, rollouts):
        assert inputs["reward_weights"] == (1.0, 0.5)
        want = torch.tensor(
            [[s.parts.get("verifier", math.nan), s.parts.get("longish", math.nan)] for s in ro.scores],
            dtype=torch.float64,
        )
        torch.testing.assert_close(inputs["reward_parts"], want, equal_nan=True)
        assert float(want[:, 1].std()) > 0  # the second function varies: its column matters
        again = gdpo(
            inputs["rewards"], inputs["response_mask"], inputs["group_ids"], want, (1.0, 0.5), eps=1e-4
        )[0]
        torch.testing.assert_close(adv, again.to(adv.dtype))


def test_reward_parts_without_task_rewards_is_the_verifier_reward() -> None:
    scores = [Score(reward=r, correct=r > 0) for r in (1.0, 0.0, 0.25)]
    parts, weights = reward_parts(Fixed(), scores)
    assert weights == (1.0,)
    torch.testing.assert_close(parts, torch.tensor([[1.0], [0.0], [0.25]], dtype=torch.float64))
