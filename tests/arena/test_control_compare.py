"""``tether compare --world control``: control runs planned, validated, run, reused, resumed and reported."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from tether.arena.compare import execute, plan_runs, run_comparison, run_state, safe_name
from tether.arena.executors import LocalExecutor, train_command
from tether.arena.runs import load_runs, series
from tether.arena.stats import lower_is_better, summarize_recipe
from tether.cli import main
from tether.config import ConfigError
from tether.errors import TetherError, UnknownNameError

ENV = "tether/PointHazard-v0"
# 4 updates of 2 envs x 100 steps; the 200-step episodes end at updates 2 and 4; checkpoints at 2 and 4
STEPS = 800
TINY = ["env.num_envs=2", "train.num_steps=100", "train.cost_limit=2", "run.checkpoint_every=2"]
RECIPES = ["ppo", "ppo_lag"]


@pytest.fixture(scope="module")
def control_cmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ppo and ppo_lag x 2 seeds on PointHazard, run by the local executor, with the report."""
    out = tmp_path_factory.mktemp("control") / "cmp"
    results = run_comparison(
        RECIPES, ENV, 2, STEPS, TINY, out, executor=LocalExecutor(2), world="control", progress=False
    )
    assert [r.status for r in results] == ["finished"] * 4, [r.error for r in results]
    return out


def _args(out: Path) -> list[str]:
    return [
        *f"--world control --env {ENV} --recipes ppo,ppo_lag --seeds 2 --steps {STEPS}".split(),
        "--out",
        str(out),
    ]


# ----------------------------------------------------------------------------------- planning
def test_plan_layout_commands_and_threads(tmp_path: Path) -> None:
    specs = plan_runs(RECIPES, [ENV, "CartPole-v1"], [0, 3], STEPS, TINY, tmp_path, world="control")
    assert [s.run_dir.relative_to(tmp_path).as_posix() for s in specs[:3]] == [
        "tether_PointHazard-v0/ppo/seed0",
        "tether_PointHazard-v0/ppo/seed3",
        "tether_PointHazard-v0/ppo_lag/seed0",
    ]
    assert specs[-1].run_dir == tmp_path / "CartPole-v1" / "ppo_lag" / "seed3"
    assert safe_name("tether/Point Hazard:v0") == "tether_Point_Hazard_v0"
    assert not any(tmp_path.iterdir()), "planning creates nothing"
    # control runs get train.torch_threads, never the LM-only run.progress / run.threads
    spec = specs[0]
    assert spec.overrides == [*TINY, "train.torch_threads=1"] and spec.threads == 1
    cmd = train_command(spec, resume=True)
    assert cmd[1:5] == ["-m", "tether.cli", "control", "train"]
    assert cmd[cmd.index("--env") + 1] == ENV and cmd[cmd.index("--recipe") + 1] == "ppo"
    assert cmd[cmd.index("--steps") + 1] == str(STEPS) and cmd[cmd.index("--seed") + 1] == "0"
    assert cmd[cmd.index("--out") + 1] == str(spec.run_dir) and "--resume" in cmd
    assert cmd[-len(spec.overrides) :] == spec.overrides

    (two,) = plan_runs(["ppo"], ENV, 1, STEPS, [*TINY, "train.torch_threads=2"], tmp_path, world="control")
    assert two.threads == 2 and two.overrides.count("train.torch_threads=2") == 1
    assert two.run_dir == tmp_path / "ppo" / "seed0"  # one environment: no environment level
    # the language-model path is untouched
    (lm,) = plan_runs(["grpo"], "arithmetic", 1, 2, [], tmp_path, validate=False)
    assert lm.overrides == ["run.threads=1", "run.progress=false"] and train_command(lm, False)[3] == "train"


def test_config_file_reaches_every_run_and_is_validated(tmp_path: Path) -> None:
    good = tmp_path / "small.yaml"
    good.write_text(yaml.safe_dump({"env": {"num_envs": 2}, "train": {"num_steps": 100}}))
    (spec,) = plan_runs(["ppo"], ENV, 1, STEPS, [], tmp_path / "cmp", world="control", config=good)
    cmd = train_command(spec, resume=False)
    assert cmd[cmd.index("--config") + 1] == str(good.resolve())
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"no_such_key": 1}}))
    with pytest.raises(ConfigError, match="no_such_key"):
        plan_runs(["ppo"], ENV, 1, STEPS, [], tmp_path / "cmp", world="control", config=bad)
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize(
    ("recipes", "env", "overrides", "error", "message"),
    [
        (["ppo", "ppx"], ENV, [], UnknownNameError, "unknown control recipe 'ppx'"),
        (["ppo"], "tether/PointHazzard-v0", [], TetherError, "unknown environment id"),
        (["ppo"], ENV, ["env.id=CartPole-v1"], ConfigError, "--env"),
        (["ppo"], ENV, ["recipe=ppo_lag"], ConfigError, "--recipes"),
        (["ppo"], ENV, ["train.seed=3"], ConfigError, "--seeds"),
        (["ppo"], ENV, ["train.total_steps=64"], ConfigError, "--steps"),
        (["ppo"], ENV, ["run.out=/tmp/x"], ConfigError, "--out"),
        (["ppo"], ENV, ["train.nope=1"], ConfigError, "train.nope"),
        (["ppo"], ENV, ["run.progress=false"], ConfigError, "run.progress"),  # an LM key
        (["ppo"], ENV, ["train.minibatches=1000"], ConfigError, "minibatches"),
        (["ppo", "ppo"], ENV, [], ConfigError, "repeat"),
    ],
)
def test_bad_control_plans_fail_before_any_run_dir_exists(
    tmp_path: Path, recipes: list[str], env: str, overrides: list[str], error: type[Exception], message: str
) -> None:
    out = tmp_path / "cmp"
    with pytest.raises(error, match=message):
        run_comparison(recipes, env, 2, STEPS, [*TINY, *overrides], out, world="control", progress=False)
    assert not out.exists()


def test_cli_gives_the_errors_of_tether_control_train(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", "--env", ENV, "--recipes", "ppo,ppx", "--out", str(out)]) == 2
    compare_err = capsys.readouterr().err
    assert main(["control", "train", "--env", ENV, "--recipe", "ppx", "--out", str(tmp_path / "t")]) == 2
    assert compare_err == capsys.readouterr().err and "Did you mean 'ppo'" in compare_err
    assert main(["compare", "--world", "control", "--recipes", "ppo", "--out", str(out)]) == 2
    assert "--env" in capsys.readouterr().err
    assert main(["compare", "--env", ENV, "--task", "arithmetic", "--recipes", "ppo", "--out", str(out)]) == 2
    assert main(["compare", "--world", "lm", "--env", ENV, "--recipes", "grpo", "--out", str(out)]) == 2
    assert not out.exists() and not (tmp_path / "t").exists()


def test_costs_are_lower_is_better() -> None:
    assert lower_is_better("episode/cost_last10") and lower_is_better("safety/violation_rate")
    assert not lower_is_better("episode/return_last10") and not lower_is_better("eval/accuracy")
    assert lower_is_better("my/regret", extra=["my/regret"])


# ------------------------------------------------------------------------- running and report
def test_control_comparison_finishes_and_reports(control_cmp: Path) -> None:
    for recipe in RECIPES:
        for seed in (0, 1):
            run_dir = control_cmp / recipe / f"seed{seed}"
            summary = json.loads((run_dir / "summary.json").read_text())
            assert summary["seed"] == seed and summary["total_env_steps"] == STEPS and "eval" not in summary
            assert run_state(run_dir, "control") == "finished" and not (run_dir / "error.txt").exists()
            config = yaml.safe_load((run_dir / "config.yaml").read_text())
            assert config["train"]["torch_threads"] == 1 and config["env"]["id"] == ENV
    manifest = json.loads((control_cmp / "comparison.json").read_text())
    assert manifest["world"] == "control" and manifest["envs"] == [ENV]
    assert {r["status"] for r in manifest["runs"]} == {"finished"} and manifest["runs"][0]["env"] == ENV

    records = load_runs(control_cmp)
    assert {(r.world, r.task) for r in records} == {("control", ENV)}
    # learning curves over environment steps (200 per update), from the first episode's end
    steps, _ = series(records, "env_steps", x="env_steps")
    assert steps.tolist() == [200, 400, 600, 800]
    steps, values = series(records, "episode/return_last10", x="env_steps")
    assert (
        set(steps.tolist()) <= {200, 400, 600, 800}
        and steps[-1] == STEPS
        and np.isfinite(values[:, -1]).all()
    )

    md = (control_cmp / "report.md").read_text()
    assert "Comparison: ppo, ppo_lag on tether/PointHazard-v0" in md
    for text in (
        "`episode/return_last10` IQM [95% CI]",
        "`episode/cost_last10` mean [95% CI]",
        "lower is better",
    ):
        assert text in md
    assert "seeds within the cost limit" in md and "/2 (d = 2)" in md and "P(< ppo)" in md
    for recipe in RECIPES:  # the table's mean is the mean over seeds of the summaries' final returns
        recs = [r for r in records if r.recipe == recipe]
        mean = summarize_recipe(recs, "episode/return_last10")["mean"]
        finals = [json.loads((r.path / "summary.json").read_text())["final_return_last10"] for r in recs]
        assert mean == pytest.approx(np.mean(finals))
        assert f"| {recipe} | 2/2 | " in md and f"{mean:.3f}" in md
    plots = {p.name for p in (control_cmp / "plots").iterdir()}
    assert {"final_scores.png", "curve_episode_return_last10.png", "curve_episode_cost_last10.png"} <= plots
    assert "curve_lagrange_multiplier.png" in plots  # ppo_lag logs its multiplier
    assert (control_cmp / "report.html").read_text().count("data:image/png;base64,") == len(plots)


def test_report_metric_options(control_cmp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    shutil.copytree(control_cmp, out)
    args = ["report", str(out), "--metric", "episode/return", "--metric", "lagrange/multiplier"]
    assert main([*args, "--lower-is-better", "lagrange/multiplier", "--baseline", "ppo_lag"]) == 0
    md = (out / "report.md").read_text()
    assert "`episode/return` IQM [95% CI]" in md and "`lagrange/multiplier` IQM [95% CI]" in md
    assert "P(< ppo_lag) [95% CI]" in md and "P(> ppo_lag) [95% CI]" in md
    assert "`episode/cost_last10` IQM" not in md


def test_rerun_reuses_finished_runs_without_launching(
    control_cmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_launch(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a finished run was launched again: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_launch)
    before = {p: p.stat().st_mtime_ns for p in control_cmp.glob("*/seed*/*") if p.is_file()}
    assert main(["compare", *_args(control_cmp), "--no-report", *TINY]) == 0
    assert "4 reused" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in control_cmp.glob("*/seed*/*") if p.is_file()} == before


def test_interrupted_control_run_is_resumed(control_cmp: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    shutil.copytree(control_cmp, out)
    run = out / "ppo_lag" / "seed1"
    # interrupted after update 2: no summary, the checkpoint of update 4 gone, logs of updates 1-4 left
    (run / "summary.json").unlink()
    ckpts = run / "checkpoints"
    first, last = sorted(p.name for p in ckpts.glob("step_*"))
    shutil.rmtree(ckpts / last)
    (ckpts / "latest").write_text(first)
    assert run_state(run, "control") == "interrupted"

    launched: list[list[str]] = []
    real_popen = subprocess.Popen

    def spy(cmd: list[str], *args: object, **kwargs: object) -> object:
        launched.append(cmd)
        return real_popen(cmd, *args, **kwargs)  # type: ignore[call-overload]

    specs = plan_runs(RECIPES, ENV, 2, STEPS, TINY, out, world="control")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subprocess, "Popen", spy)
        results = execute(specs, LocalExecutor(1), progress=False)
    assert [r.status for r in results] == ["reused", "reused", "reused", "resumed"], [
        r.error for r in results
    ]
    assert len(launched) == 1 and "--resume" in launched[0] and str(run) in launched[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["updates"] == 4 and summary["total_env_steps"] == STEPS
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # continued from update 2, not started again
