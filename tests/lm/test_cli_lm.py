"""``tether train | sft | eval | recipes`` on the tiny model: run files, bad configs, kill and resume."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from tests.lm.test_trainer import ARITH, COIN, TINY, math_only, read_jsonl
from tether.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    cache = tmp_path_factory.mktemp("tether_cache")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TETHER_CACHE", str(cache))
        yield cache
    torch.set_num_threads(threads)


def test_train_then_eval_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    rc = main(["train", "--out", str(out), "--steps", "2", *TINY, *ARITH])
    assert rc == 0
    for name in ("config.yaml", "metrics.jsonl", "samples.jsonl", "summary.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and {"accuracy", "pass@2", "entropy"} <= set(summary["eval"])
    assert len(read_jsonl(out / "metrics.jsonl")) == 2
    capsys.readouterr()

    rc = main(
        ["eval", str(out), "task.params.digits=2", "--prompts", "3", "sampling.max_new_tokens=6", "--k", "2"]
    )
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert {"accuracy", "pass@2", "entropy"} <= set(result)
    assert 0.0 <= result["accuracy"] <= result["pass@2"] <= 1.0
    assert result["entropy"] > 0 and result["prompts"] == 3.0


def test_eval_of_a_run_directory_uses_the_runs_own_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    countdown = ["task.name=countdown", "sampling.max_new_tokens=5", "eval.prompts=3", "eval.k=2"]
    # seed 1: the run's own seed picks its held-out prompts and samples, and eval must use it
    assert main(["train", "--out", str(out), "--steps", "1", "--seed", "1", *TINY, *countdown]) == 0
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0  # nothing repeated: task, sampling and eval settings are the run's
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "countdown" and result["prompts"] == 3.0 and result["k"] == 2.0
    for key in ("accuracy", "pass@2", "entropy", "format_rate", "length_mean"):
        assert result[key] == pytest.approx(summary["eval"][key], abs=1e-6), key  # the run's own final eval
    assert result["length_mean"] <= 5
    # another task drops the run's task settings; flags and overrides still win
    assert main(["eval", str(out), "--task", "arithmetic", "--prompts", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "arithmetic" and result["prompts"] == 2.0


def test_eval_refuses_a_directory_without_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(tmp_path)]) == 2
    assert "neither a run directory" in capsys.readouterr().err


def test_sft_writes_model_and_eval(tmp_path: Path) -> None:
    out = tmp_path / "sft"
    tiny = [o for o in TINY if not o.startswith("train.")]
    rc = main(
        ["sft", "--out", str(out), "--steps", "3", *tiny, *ARITH, "sft.batch_size=8", "sft.warmup_steps=1"]
    )
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and "accuracy" in summary["eval"]
    assert (out / "model" / "config.json").is_file()
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    # The SFT model is a starting point for RL.
    rl = tmp_path / "rl"
    assert (
        main(
            [
                "train",
                "--out",
                str(rl),
                "--steps",
                "1",
                "--no-eval",
                *TINY,
                *ARITH,
                f"model.name_or_path={out}/model",
            ]
        )
        == 0
    )


def test_recipes_command_lists_every_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    from tether.recipes import recipe_names

    assert main(["recipes", "--json"]) == 0
    listed = [r["name"] for r in json.loads(capsys.readouterr().out)]
    assert listed == recipe_names() and "grpo" in listed and "dapo" in listed


# ------------------------------------------------------------------------------- bad configs
def _bad_file(tmp_path: Path) -> str:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "1+1=", "answer": "2"}\n{"question": "2+2=", "answer": "4"}\n')
    return str(path)


BAD = [
    (["--recipe", "grpoo"], "unknown recipe 'grpoo'.*Did you mean 'grpo'"),
    (["train.lrr=1"], "unknown config key 'train.lrr'.*Did you mean 'train.lr'"),
    (["train.group_size=1"], "train.group_size.*>= 2"),
    (["train.lr=-0.1"], "train.lr.*> 0"),
    (["task.name=file", "task.params.path={bad}"], "prompt"),
    (["method.kl_k4.coef=0"], "no such component"),
    (["method.policy_loss.eps_hi=0.3"], "no parameter 'eps_hi'"),
    (["task.name=arithmetc"], "unknown task 'arithmetc'.*Did you mean 'arithmetic'"),
    (
        ["model.name_or_path=/nonexistent/tether-model"],
        "model directory '/nonexistent/tether-model' does not exist",
    ),
    (["train.lr=nan"], "train.lr: 'nan' is not a finite number"),
    (["task.params.digits=abc"], "task.params.digits: expected an integer, got 'abc'"),
    (["train.minibatches=3"], "train.minibatches=3 does not divide the 16 rows of a step"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[b[1].split(".")[0][:20] for b in BAD])
def test_bad_config_stops_before_any_work(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    message: str,
) -> None:
    import tether.lm.model as model_module
    import tether.lm.trainer as trainer_module

    def no_model(*a: object, **k: object) -> None:
        raise AssertionError("a model was built for a bad config")

    monkeypatch.setattr(trainer_module, "load_policy", no_model)
    monkeypatch.setattr(model_module, "load_policy", no_model)
    out = tmp_path / "run"
    args = [a.replace("{bad}", _bad_file(tmp_path)) for a in args]
    rc = main(["train", "--out", str(out), "--steps", "1", *TINY, *ARITH, *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("tether: error:") and "Traceback" not in err
    import re

    assert re.search(message, err, flags=re.S), err
    assert not out.exists()


# ------------------------------------------------------------------------------- kill and resume
SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import tests.lm.test_trainer  # registers the test_coin task
from tether.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def _wait_and_kill(proc: subprocess.Popen[bytes], out: Path, mode: str, delay: float) -> bool:
    """Kill ``proc`` once ``mode`` is reached: ``start`` (config written, no checkpoint yet),
    ``writing`` (a checkpoint is being written) or ``after`` (``delay`` s after a new checkpoint)."""
    ckpts = out / "checkpoints"
    pointer = ckpts / "latest"
    before = pointer.read_text() if pointer.exists() else ""
    deadline = time.monotonic() + 90
    while proc.poll() is None and time.monotonic() < deadline:
        if mode == "start" and (out / "config.yaml").exists():
            break
        if mode == "writing" and ckpts.is_dir() and any(ckpts.glob(".tmp-*")):
            break
        if mode == "after" and pointer.exists() and pointer.read_text() != before:
            time.sleep(delay)
            break
        time.sleep(0.001)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    return True


def _killed_and_resumed(tmp_path: Path, args: list[str]) -> Path:
    """Run ``tether ARGS`` in a subprocess, SIGKILL it before its first checkpoint, while one
    is being written and just after one, resuming each time; the run directory once it ends."""
    script = tmp_path / "cli.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    out = tmp_path / "killed"
    rng = random.Random(1234)
    plan = [("start", 0.0), ("writing", 0.0), ("after", rng.uniform(0.0, 0.05))]
    kills = 0
    for attempt in range(8):
        cmd = [sys.executable, str(script), *args, "--out", str(out)] + (["--resume"] if attempt else [])
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if attempt < len(plan):
            kills += _wait_and_kill(proc, out, *plan[attempt])
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err.decode()
    assert proc.returncode == 0
    assert kills >= 2
    assert not list((out / "checkpoints").glob(".tmp-*"))
    return out


def test_sigkill_at_random_times_then_resume_equals_unbroken_run(tmp_path: Path) -> None:
    args = ["train", "--no-eval", "--steps", "8", *TINY, *COIN, "run.checkpoint_every=1", "run.log_samples=2"]
    ref = tmp_path / "ref"
    assert main([*args, "--out", str(ref)]) == 0
    expected = read_jsonl(ref / "metrics.jsonl")
    out = _killed_and_resumed(tmp_path, args)
    got = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 9))  # nothing duplicated or missing
    assert math_only(got) == math_only(expected)
    assert read_jsonl(out / "samples.jsonl") == read_jsonl(ref / "samples.jsonl")


def test_sft_sigkill_then_resume_equals_unbroken_run(tmp_path: Path) -> None:
    tiny = [o for o in TINY if not o.startswith("train.")]
    args = ["sft", "--steps", "12", *tiny, *ARITH, "sft.batch_size=8", "sft.warmup_steps=1"]
    args += ["run.checkpoint_every=1", "sft.stop_at_accuracy=1", "sft.check_every=5", "sft.check_prompts=8"]
    ref = tmp_path / "ref"
    assert main([*args, "--out", str(ref)]) == 0
    out = _killed_and_resumed(tmp_path, args)
    got = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 13))
    assert got == read_jsonl(ref / "metrics.jsonl")  # SFT logs no timings: all of it must match
    assert [r["step"] for r in got if "sft/check_accuracy" in r] == [5, 10, 12]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"] == json.loads((ref / "summary.json").read_text())["eval"]


def test_resume_takes_the_runs_own_settings_and_refuses_others(tmp_path: Path) -> None:
    """`--out DIR --resume` alone continues a run as it was configured; `--steps` may extend it;
    a setting that would change the training math is refused before anything is touched."""
    settings = [*TINY, *COIN, "train.lr=0.03", "task.params.p=0.3", "run.checkpoint_every=1"]
    ref = tmp_path / "ref"
    assert main(["train", "--no-eval", "--steps", "3", "--out", str(ref), *settings]) == 0
    out = tmp_path / "run"
    assert main(["train", "--no-eval", "--steps", "2", "--out", str(out), *settings]) == 0
    assert main(["train", "--no-eval", "--out", str(out), "--resume", "--steps", "3"]) == 0
    assert math_only(read_jsonl(out / "metrics.jsonl")) == math_only(read_jsonl(ref / "metrics.jsonl"))

    before = (out / "metrics.jsonl").read_text()
    assert main(["train", "--out", str(out), "--resume", "train.lr=0.1", "task.params.p=0.5"]) == 2
    assert (out / "metrics.jsonl").read_text() == before  # nothing touched


def test_resume_refusal_names_each_changed_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["train", "--no-eval", "--steps", "1", "--out", str(out), *TINY, *COIN]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "train.lr=0.1", "model.tiny_hidden=64"]) == 2
    err = capsys.readouterr().err
    assert "train.lr: 0.01 in the run, 0.1 now" in err and "model.tiny_hidden: 32 in the run, 64 now" in err
    assert "A resume may change only: eval, monitor, run" in err


def test_sft_resume_alone_continues_with_the_runs_settings(tmp_path: Path) -> None:
    tiny = [o for o in TINY if not o.startswith("train.")]
    args = [*tiny, *ARITH, "sft.batch_size=8", "sft.warmup_steps=1", "sft.lr=0.003"]
    args += ["run.checkpoint_every=1", "run.keep_checkpoints=10"]
    out = tmp_path / "run"
    assert main(["sft", "--steps", "4", "--out", str(out), *args]) == 0
    expected = read_jsonl(out / "metrics.jsonl")
    for late in ("step_000000003", "step_000000004"):  # as if killed after step 2's checkpoint
        shutil.rmtree(out / "checkpoints" / late)
    (out / "summary.json").unlink()
    assert main(["sft", "--out", str(out), "--resume"]) == 0
    assert read_jsonl(out / "metrics.jsonl") == expected
    # the step budget shapes SFT's learning-rate schedule: it may not change on resume
    assert main(["sft", "--out", str(out), "--resume", "--steps", "6"]) == 2
    assert main(["sft", "--out", str(out), "--resume", "sft.lr=0.01"]) == 2


@pytest.mark.parametrize("command", ["train", "sft"])
def test_ctrl_c_stops_at_a_step_boundary_with_a_checkpoint_and_resumes_exactly(
    tmp_path: Path, command: str
) -> None:
    """The first Ctrl-C lets the step finish, saves its checkpoint (even between checkpoint steps)
    and exits with 130 and the command that continues the run; the continued run equals an unbroken one."""
    tiny = TINY if command == "train" else [o for o in TINY if not o.startswith("train.")]
    task = COIN if command == "train" else [*ARITH, "sft.batch_size=8", "sft.warmup_steps=1"]
    args = [command, "--steps", "30", *tiny, *task, "run.checkpoint_every=1000", "run.progress=false"]
    if command == "train":
        args.append("--no-eval")
    ref = tmp_path / "ref"
    assert main([*args, "--out", str(ref)]) == 0
    script = tmp_path / "cli.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), *args, "--out", str(out)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while proc.poll() is None and time.monotonic() < deadline:
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    steps = len(read_jsonl(out / "metrics.jsonl"))
    assert 2 <= steps < 30
    assert (out / "checkpoints" / f"step_{steps:09d}").is_dir()  # the interrupted step is saved
    assert f"interrupted after step {steps} of 30" in err.decode() and "--resume" in err.decode()
    assert main([command, "--out", str(out), "--resume"]) == 0
    got, expected = read_jsonl(out / "metrics.jsonl"), read_jsonl(ref / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 31))
    assert math_only(got) == math_only(expected)


def test_dry_run_prints_the_plan_and_touches_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    out = tmp_path / "run"
    assert main(["train", "--recipe", "grpo", "--out", str(out), "--dry-run", *TINY, *ARITH]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["recipe_resolved"]["name"] == "grpo" and printed["train"]["group_size"] == 4
    plan = printed["plan"]
    assert (
        plan["reference_model"] is True and plan["rollout_rows_per_step"] == 16 and plan["train_prompts"] > 0
    )
    assert "ref_logprobs" in plan["inputs_needed"] and plan["run_dir"] == str(out)
    assert not out.exists()
    assert main(["train", "--dry-run", *TINY, "method.kl_k3.coeff=1"]) == 2  # still checked
    assert "has no parameter 'coeff'" in capsys.readouterr().err
    # the same for SFT and for the control world
    tiny = [o for o in TINY if not o.startswith("train.")]
    assert main(["sft", "--out", str(out), "--dry-run", *tiny, *ARITH, "sft.examples=40"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["plan"] == {
        "run_dir": str(out),
        "examples": 40,
        "steps": 300,
    }
    control = [
        "control",
        "train",
        "--env",
        "tether/SafeCartPole-v0",
        "--recipe",
        "ppo_lag",
        "--out",
        str(out),
    ]
    assert main([*control, "--dry-run", "--steps", "4096", "env.num_envs=2", "train.num_steps=64"]) == 0
    plan = yaml.safe_load(capsys.readouterr().out)["plan"]
    assert plan["updates"] == 32 and plan["env_steps_per_update"] == 128 and plan["cost_limit"] == 25.0
    assert main([*control, "--dry-run", "--env", "CartPol-v1"]) == 2
    assert not out.exists()


def test_eval_checks_its_flags_and_settings_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tether.lm.model import ModelConfig, build_tiny_model

    model_dir = build_tiny_model(tmp_path / "tiny", ModelConfig(tiny_hidden=32, tiny_layers=1, tiny_heads=2))
    import tether.lm.model as model_module

    def no_model(*a: object, **k: object) -> None:
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(model_module, "load_policy", no_model)
    for args, message in (
        (["--k", "0"], "eval.k: 0 is out of range"),
        (["--prompts", "0"], "eval.prompts: 0 is out of range"),
        (["samplng.temperature=0.5"], "takes no 'samplng' settings. Did you mean 'sampling'"),
        (["sampling.top_p=0"], "sampling.top_p: 0.0 is out of range"),
        (["sampling.temperature=0.5"], "not used by tether eval: tether eval samples at eval.temperature"),
        (["model.name_or_path=x"], "not used by tether eval"),
        (["--k", "4", "eval.samples=2"], "eval.samples=2 is fewer than eval.k=4"),
        (["task.name=arithmetc"], "unknown task 'arithmetc'"),
        # the backend before the model: vllm missing here, or (where it runs) a LoRA policy
        (["sampling.backend=vllm", "model.lora_rank=4"], "sampling.backend=vllm"),
    ):
        rc = main(["eval", str(model_dir), *args])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "Traceback" not in err, (args, err)


def test_overrides_may_follow_options(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["train", "--dry-run", "train.lr=0.001", "--steps", "3", "train.epochs=2", "train.lr=0.002"])
    out = capsys.readouterr().out
    assert rc == 0
    plan = yaml.safe_load(out)
    assert (plan["train"]["steps"], plan["train"]["epochs"], plan["train"]["lr"]) == (3, 2, 0.002)
    with pytest.raises(SystemExit):
        main(["train", "--dry-run", "--steps", "3", "--bogus"])


def test_an_extended_run_keeps_its_budget_and_a_finished_run_keeps_its_final_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    base = ["--out", str(out), *TINY, *ARITH, "--no-eval"]
    assert main(["train", "--steps", "2", *base]) == 0
    first = json.loads((out / "summary.json").read_text())
    assert first["final"]["reward/mean"] == read_jsonl(out / "metrics.jsonl")[-1]["reward/mean"]
    # A resume with nothing left to train reports the run's final metrics, not {}.
    assert main(["train", "--out", str(out), "--resume", "--no-eval"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["steps"] == 2 and again["final"] == first["final"]
    # Extending the budget is written to config.yaml, so that a plain --resume keeps it.
    assert main(["train", "--out", str(out), "--resume", "--steps", "3", "--no-eval"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["steps"] == 3
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    # The thread count changes float rounding: a resume may not change it.
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--steps", "4", "run.threads=2"]) == 2
    assert "run.threads: 1 in the run, 2 now" in capsys.readouterr().err


def test_resume_refuses_a_run_without_settings_or_with_an_edited_recipe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Stopped while starting: marker, no config.yaml. --resume alone would train the defaults.
    started = tmp_path / "started"
    started.mkdir()
    (started / ".tether-run").write_text("a tether run directory\n")
    assert main(["train", "--out", str(started), "--resume", *TINY, *ARITH]) == 2
    assert "holds no config.yaml" in capsys.readouterr().err
    # A recipe file edited between the start and the resume is another method.
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(
        "advantage: {name: grpo}\npolicy_loss: {name: ppo_clip, params: {eps_low: 0.2, eps_high: 0.2}}\n"
    )
    out = tmp_path / "run"
    assert (
        main(
            ["train", "--recipe", str(recipe), "--out", str(out), "--steps", "2", "--no-eval", *TINY, *ARITH]
        )
        == 0
    )
    recipe.write_text(recipe.read_text().replace("eps_high: 0.2", "eps_high: 0.5"))
    capsys.readouterr()
    for extra in (["--dry-run"], []):
        assert main(["train", "--out", str(out), "--resume", "--steps", "3", *extra]) == 2
        assert "recipe_resolved.policy_loss" in capsys.readouterr().err


def test_dry_run_checks_the_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    for command in (["train"], ["sft"], ["control", "train"]):
        assert main([*command, "--dry-run", "--out", str(a_file)]) == 2
        assert "is a file" in capsys.readouterr().err
        assert main([*command, "--dry-run", "--out", str(a_file / "sub")]) == 2
        assert "which is a file" in capsys.readouterr().err
    assert main(["control", "train", "--dry-run", "train.seed=-1"]) == 2
    assert "train.seed: -1 is out of range" in capsys.readouterr().err


def test_eval_of_run_model_uses_the_runs_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``tether eval RUN/model`` (the path summary.json names) evaluates like ``tether eval RUN``:
    the run's task, sampling, eval settings and seed, not the defaults."""
    out = tmp_path / "run"
    countdown = ["task.name=countdown", "sampling.max_new_tokens=5", "eval.prompts=3", "eval.k=2"]
    assert (
        main(["train", "--out", str(out), "--steps", "1", "--seed", "1", "--no-eval", *TINY, *countdown]) == 0
    )
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert main(["eval", str(out / "model")]) == 0
    assert json.loads(capsys.readouterr().out) == whole and whole["task"] == "countdown"


def test_eval_pass_at_k_from_more_samples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """eval.samples = n > k: pass@k is the unbiased estimate 1 - C(n-c, k) / C(n, k) per prompt."""
    from tether.lm.evaluate import pass_at_k

    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--steps", "1", "--no-eval", *TINY, *ARITH]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--prompts", "4", "--k", "2", "eval.samples=6", "eval.temperature=3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["k"] == 2.0 and result["samples"] == 6.0
    counts = [round(s * 6) for s in result["per_prompt_success"]]
    assert result["pass@2"] == pytest.approx(sum(pass_at_k(6, c, 2) for c in counts) / len(counts))
    assert result["accuracy"] == pytest.approx(sum(counts) / 24)


def test_pass_at_k_hand_values() -> None:
    from tether.lm.evaluate import pass_at_k

    assert pass_at_k(10, 3, 4) == pytest.approx(1 - (7 * 6 * 5 * 4) / (10 * 9 * 8 * 7))  # 1 - C(7,4)/C(10,4)
    assert pass_at_k(5, 0, 2) == 0.0 and pass_at_k(5, 4, 2) == 1.0 and pass_at_k(4, 1, 1) == 0.25
    assert pass_at_k(3, 1, 3) == 1.0  # n = k: "any of the k correct"
    for n, c, k in ((2, 0, 5), (3, 1, 5), (4, 5, 2), (4, 0, 0)):
        with pytest.raises(ValueError, match="pass@k needs"):
            pass_at_k(n, c, k)


def test_evaluate_runs_in_eval_mode_and_restores_the_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The entropy pass must not run with dropout on: evaluate puts the model in eval mode and
    back in the mode it came in."""
    import tether.lm.evaluate as evaluate_module
    from tether.lm.config import EvalSettings
    from tether.lm.model import ModelConfig, build_tiny_model, load_policy
    from tether.lm.rollout import SamplingConfig
    from tether.lm.tasks import get_task

    model_dir = build_tiny_model(tmp_path / "tiny", ModelConfig(tiny_hidden=32, tiny_layers=1, tiny_heads=2))
    model, tok = load_policy(ModelConfig(name_or_path=str(model_dir)))
    model.train()
    modes: list[bool] = []
    logprobs = evaluate_module.completion_logprobs

    def spy(m: torch.nn.Module, *args: object, **kwargs: object) -> object:
        modes.append(m.training)
        return logprobs(m, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "completion_logprobs", spy)
    task = get_task("arithmetic", digits=1, train_size=20, test_size=4)
    evaluate_module.evaluate(model, tok, task, EvalSettings(prompts=2, k=2), SamplingConfig(max_new_tokens=3))
    assert modes == [False] and model.training


def test_eval_entropy_pass_bounds_its_logits_and_keeps_the_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The eval entropy pass holds at most ENTROPY_LOGITS_BUDGET logits at once (a 150k vocabulary
    would not fit otherwise) and the mean entropy does not depend on the chunking."""
    import tether.lm.evaluate as evaluate_module
    from tether.lm.config import EvalSettings
    from tether.lm.model import ModelConfig, build_tiny_model, load_policy
    from tether.lm.rollout import SamplingConfig
    from tether.lm.tasks import get_task

    assert evaluate_module.entropy_rows(1024, 151_936) == 1
    assert evaluate_module.entropy_rows(8, 100, budget=8 * 100 * 3 + 5) == 3
    model_dir = build_tiny_model(tmp_path / "tiny", ModelConfig(tiny_hidden=32, tiny_layers=1, tiny_heads=2))
    model, tok = load_policy(ModelConfig(name_or_path=str(model_dir)))
    task = get_task("arithmetic", digits=1, train_size=20, test_size=4)
    args = (model, tok, task, EvalSettings(prompts=4, k=2), SamplingConfig(max_new_tokens=3))
    whole = evaluate_module.evaluate(*args)
    vocab = model.config.vocab_size
    chunks: list[tuple[object, int]] = []
    logprobs = evaluate_module.completion_logprobs
    budget = 3 * vocab * 3  # 3 rows of 3 tokens

    def spy(m: torch.nn.Module, *a: torch.Tensor, **kw: object) -> object:
        rows, tokens = a[2].shape
        chunks.append((kw["logits_chunk"], max(1, budget // (tokens * vocab))))
        assert rows > 3  # the batch is split
        return logprobs(m, *a, **kw)

    monkeypatch.setattr(evaluate_module, "ENTROPY_LOGITS_BUDGET", budget)
    monkeypatch.setattr(evaluate_module, "completion_logprobs", spy)
    chunked = evaluate_module.evaluate(*args)
    assert chunks and all(got == want for got, want in chunks)
    assert chunked["entropy"] == pytest.approx(whole["entropy"], rel=1e-5)
    assert chunked["accuracy"] == whole["accuracy"]


def test_train_refuses_a_task_without_a_test_split_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    no_test = [*TINY, *ARITH, "task.params.test_size=0"]
    assert main(["train", "--out", str(out), "--steps", "1", *no_test]) == 2
    assert "no test prompts" in capsys.readouterr().err and not out.exists()
    assert (
        main(["train", "--out", str(out), "--steps", "1", "--no-eval", *no_test]) == 0
    )  # nothing to evaluate


def test_train_refuses_prompts_past_the_context_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--steps", "1", *TINY, *ARITH, "model.tiny_max_positions=16"]
    assert main([*args, "sampling.max_new_tokens=12"]) == 2  # "95+76=" (6) + 12 > 16
    err = capsys.readouterr().err
    assert "the train prompts: a prompt of 6 tokens plus 12 new tokens is 18" in err and not out.exists()


def test_train_refuses_test_prompts_past_the_context_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The final evaluation's test prompts are checked with the train prompts, not at the end."""
    from tether.lm.tasks.files import FileTask

    rows = [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(8)]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    for p in FileTask(str(path), test_fraction=0.25).prompts("test"):
        rows[p.meta["row"]]["prompt"] = "x" * 140 + rows[p.meta["row"]]["prompt"]  # past 128 positions
    path.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "run"
    task = ["task.name=file", f"task.params.path={path}", "task.params.test_fraction=0.25"]
    args = ["train", "--out", str(out), "--steps", "1", *TINY, *task, "train.prompts_per_step=2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "the test prompts of the final eval" in err and not out.exists()
    assert main([*args, "--no-eval"]) == 0  # the train prompts fit: without the final eval it trains


def test_a_vllm_backend_that_cannot_run_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import tether.lm.vllm_backend as vllm_backend

    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--steps", "1", *TINY, *ARITH, "sampling.backend=vllm"]
    monkeypatch.setattr(vllm_backend, "vllm_unavailable_reason", lambda: "sampling.backend=vllm needs X")
    assert main(args) == 2
    assert "sampling.backend=vllm needs X" in capsys.readouterr().err and not out.exists()
    monkeypatch.setattr(vllm_backend, "vllm_unavailable_reason", lambda: None)  # as on a GPU machine
    sft_tiny = [k for k in TINY if not k.startswith("train.")]
    for command in (args, ["sft", *args[1:3], "--steps", "1", *sft_tiny, *ARITH, "sampling.backend=vllm"]):
        assert main([*command, "model.lora_rank=4"]) == 2
        assert "does not take a LoRA (PEFT) policy" in capsys.readouterr().err and not out.exists()


# ------------------------------------------------------------------------------- audit fixes
def test_a_summary_keeps_its_held_out_results_unless_a_new_eval_replaces_them(tmp_path: Path) -> None:
    """A resume that trains nothing more (--no-eval) rewrote summary.json without its eval. It is
    kept, with the step it scored (eval_step); a run extended without an eval keeps it too, marked
    as of an earlier step; an eval of a later step replaces it."""
    from tether.cli import build_parser
    from tether.lm.cli import build_lm_config
    from tether.lm.trainer import RLTrainer

    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--steps", "2", *TINY, *ARITH]) == 0
    first = json.loads((out / "summary.json").read_text())
    assert main(["train", "--out", str(out), "--resume", "--no-eval"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again.get("eval") == first["eval"] and again["final"] == first["final"]
    assert first["eval_step"] == again["eval_step"] == 2 and "accuracy" in first["eval"]
    assert main(["train", "--out", str(out), "--resume", "--steps", "3", "--no-eval"]) == 0
    extended = json.loads((out / "summary.json").read_text())
    assert extended["steps"] == 3 and extended["eval"] == first["eval"] and extended["eval_step"] == 2
    # a trainer that trains further and evaluates next leaves the older eval out for the new one:
    # until that is written the summary has none (tether compare then sees an unfinished run)
    cfg = build_lm_config(build_parser().parse_args(["train", "--out", str(out), "--resume", "--steps", "4"]))
    trainer = RLTrainer(cfg, resume=True, evaluates=True)
    summary = trainer.train()
    assert "eval" not in summary and "eval" not in json.loads((out / "summary.json").read_text())
    final = trainer.add_eval(summary)
    assert final["eval_step"] == 4 and json.loads((out / "summary.json").read_text())["eval_step"] == 4


def test_eval_of_a_checkpoint_reports_its_step_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``tether eval RUN/checkpoints/step_N`` evaluates that step's weights (the run's model/ gives the
    architecture and tokenizer): the last one gives the run's own final eval; nothing is written."""
    out = tmp_path / "run"
    args = [
        "--steps",
        "2",
        *TINY,
        *ARITH,
        "train.lr=0.01",
        "run.checkpoint_every=1",
        "run.keep_checkpoints=5",
    ]
    assert main(["train", "--out", str(out), *args]) == 0
    summary_text = (out / "summary.json").read_text()
    summary = json.loads(summary_text)
    capsys.readouterr()
    results = {}
    for name in ("step_000000001", "step_000000002", "latest"):
        assert main(["eval", str(out / "checkpoints" / name)]) == 0
        captured = capsys.readouterr()
        results[name] = json.loads(captured.out)
        assert captured.err == ""
    assert results["step_000000001"]["step"] == 1 and results["step_000000002"]["step"] == 2
    assert results["latest"] == results["step_000000002"]
    assert results["step_000000002"]["checkpoint"] == str(out / "checkpoints" / "step_000000002")
    for key in ("accuracy", "pass@2", "entropy", "format_rate", "length_mean"):
        assert results["step_000000002"][key] == pytest.approx(summary["eval"][key], abs=1e-6), key
    assert results["step_000000001"]["entropy"] != results["step_000000002"]["entropy"]  # other weights
    assert main(["eval", str(out)]) == 0  # the run's model/: the step it holds
    assert json.loads(capsys.readouterr().out)["step"] == 2
    assert (out / "summary.json").read_text() == summary_text  # the run's own final eval untouched
    # a checkpoint taken out of its run has no settings to build its model from
    loose = tmp_path / "loose"
    shutil.copytree(out / "checkpoints" / "step_000000002", loose)
    assert main(["eval", str(loose)]) == 2
    assert "checkpoint outside a run directory" in capsys.readouterr().err


def test_eval_of_a_lora_checkpoint_builds_the_adapters_on_their_base(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A LoRA run's checkpoint holds the base weights and the adapters (PEFT keys): it is evaluated
    as the run trained it, its last step giving the run's own final eval."""
    pytest.importorskip("peft")
    out = tmp_path / "run"
    args = ["--steps", "2", *TINY, *ARITH, "model.lora_rank=4", "train.lr=0.05", "run.checkpoint_every=1"]
    assert main(["train", "--out", str(out), *args]) == 0
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(out / "checkpoints" / "step_000000002")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 2
    for key in ("accuracy", "entropy", "length_mean"):
        assert result[key] == pytest.approx(summary["eval"][key], abs=1e-6), key


def test_eval_of_a_run_in_progress_says_which_step_its_model_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.lm.test_trainer import make_config
    from tether.lm.trainer import RLTrainer

    out = tmp_path / "run"
    trainer = RLTrainer(make_config(out, "train.steps=4", "run.checkpoint_every=2", "eval.prompts=2"))

    def stop(step: int, metrics: dict[str, float]) -> None:
        if step == 3:
            raise KeyboardInterrupt  # killed during step 3's bookkeeping: checkpoint and model/ of step 2

    trainer.on_step = stop
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert main(["eval", str(out)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["step"] == 2
    assert "has not finished" in captured.err and "the weights of step 2 of 4" in captured.err


def test_eval_of_an_sft_run_before_its_model_exists_points_to_its_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An SFT run writes model/ when it ends: until then tether eval RUN names its latest checkpoint,
    which evaluates from the run's own model settings (model.name_or_path)."""
    out = tmp_path / "sft"
    tiny = [o for o in TINY if not o.startswith("train.")]
    args = ["--steps", "2", *tiny, *ARITH, "sft.batch_size=8", "sft.warmup_steps=1", "run.checkpoint_every=1"]
    assert main(["sft", "--out", str(out), *args]) == 0
    summary = json.loads((out / "summary.json").read_text())
    shutil.rmtree(out / "model")  # as while it trains
    (out / "summary.json").unlink()
    capsys.readouterr()
    assert main(["eval", str(out)]) == 2
    err = capsys.readouterr().err
    assert "has no model/ yet" in err and str(out / "checkpoints" / "step_000000002") in err
    assert main(["eval", str(out / "checkpoints" / "step_000000002")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 2
    for key in ("accuracy", "entropy", "length_mean"):
        assert result[key] == pytest.approx(summary["eval"][key], abs=1e-6), key


def test_dry_run_refuses_what_the_real_run_refuses_without_a_test_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    no_test = ["--out", str(out), *TINY, *ARITH, "task.params.test_size=0"]
    assert main(["train", "--dry-run", *no_test]) == 2
    assert "no test prompts" in capsys.readouterr().err
    assert main(["train", "--dry-run", "--no-eval", *no_test]) == 0  # nothing to evaluate
    assert not out.exists()


def test_resume_with_the_other_command_names_the_right_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tether train --resume` on an SFT run (and `tether sft --resume` on an RL run) says what the run
    is and the command that continues it, not "unknown config key 'sft'"."""
    from tether.config import to_dict
    from tether.lm.config import LMConfig, SFTConfig
    from tether.runs.rundir import RUN_MARKER

    for kind, config in (("sft", SFTConfig()), ("rl", LMConfig())):
        run = tmp_path / kind
        run.mkdir()
        (run / RUN_MARKER).write_text("a tether run directory\n")
        (run / "config.yaml").write_text(yaml.safe_dump(to_dict(config)))
    assert main(["train", "--out", str(tmp_path / "sft"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "is an SFT run" in err and f"tether sft --out {tmp_path / 'sft'} --resume" in err
    assert "unknown config key" not in err
    assert main(["train", "--out", str(tmp_path / "sft"), "--resume", "--dry-run"]) == 2
    assert "is an SFT run" in capsys.readouterr().err
    assert main(["sft", "--out", str(tmp_path / "rl"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "is an RL run" in err and f"tether train --out {tmp_path / 'rl'} --resume" in err
