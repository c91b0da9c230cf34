"""``tether compare``: planning, validation before any run, local and Ray executors, reuse, resume, failures."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether.arena.compare import RunSpec, execute, plan_runs, run_comparison, run_state
from tether.arena.executors import LocalExecutor, RayExecutor, train_command
from tether.cli import main
from tether.config import ConfigError
from tether.errors import TetherError, UnknownNameError

TINY = [
    "model.tiny_hidden=32",
    "model.tiny_layers=1",
    "model.tiny_heads=2",
    "model.tiny_intermediate=64",
    "train.prompts_per_step=2",
    "train.group_size=2",
    "sampling.max_new_tokens=4",
    "eval.prompts=4",
    "eval.k=2",
    "run.progress=false",
    "run.threads=1",
    # 1-digit additions: 100 distinct problems, 50 + 20 of them used
    "task.params.digits=1",
    "task.params.operations=+",
    "task.params.train_size=50",
    "task.params.test_size=20",
]
GRPO_LIKE = """description: "GRPO without the KL term (a recipe given by path)"
advantage: {name: grpo, params: {}}
policy_loss: {name: ppo_clip, params: {eps_low: 0.2, eps_high: 0.2}}
"""
BROKEN = """description: "a parameter ppo_clip does not take: the trainer raises when it builds the method"
advantage: {name: grpo, params: {}}
policy_loss: {name: ppo_clip, params: {no_such_parameter: 1}}
"""


@pytest.fixture(autouse=True)
def tiny_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # one model cache for the whole module: the tiny model is built once, by the first run
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path_factory.getbasetemp() / "tether_cache"))


@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 recipes x 2 seeds, finished by the local executor (2 runs at once)."""
    out = tmp_path_factory.mktemp("comparison")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TETHER_CACHE", str(tmp_path_factory.getbasetemp() / "tether_cache"))
        results = run_comparison(
            ["grpo", "rloo"],
            "arithmetic",
            2,
            2,
            TINY,
            out,
            executor=LocalExecutor(2),
            report=False,
            progress=False,
        )
    assert [r.status for r in results] == ["finished"] * 4, [r.error for r in results]
    return out


def _summary(run_dir: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((run_dir / "summary.json").read_text())
    return data


# ----------------------------------------------------------------------------------- planning
def test_plan_layout_one_task_and_several(tmp_path: Path) -> None:
    specs = plan_runs(["grpo", "rloo"], "arithmetic", 3, 5, TINY, tmp_path)
    assert [(s.recipe, s.seed) for s in specs] == [(r, k) for r in ("grpo", "rloo") for k in range(3)]
    assert specs[4].run_dir == tmp_path / "rloo" / "seed1"
    assert all(s.task == "arithmetic" and s.steps == 5 for s in specs)
    assert not any(tmp_path.iterdir()), "planning creates nothing"

    specs = plan_runs(["grpo"], ["arithmetic", "countdown"], [3, 7], None, ["run.progress=false"], tmp_path)
    assert [s.run_dir.relative_to(tmp_path).as_posix() for s in specs] == [
        "arithmetic/grpo/seed3",
        "arithmetic/grpo/seed7",
        "countdown/grpo/seed3",
        "countdown/grpo/seed7",
    ]
    # one thread per run unless the overrides say otherwise, so that runs share the cores
    assert "run.threads=1" in specs[0].overrides and specs[0].threads == 1
    cmd = train_command(specs[0], resume=True)
    assert cmd[1:4] == ["-m", "tether.cli", "train"]
    assert cmd[cmd.index("--out") + 1] == str(tmp_path / "arithmetic" / "grpo" / "seed3")
    assert "--resume" in cmd and cmd[-2:] == ["run.progress=false", "run.threads=1"]
    assert "--steps" not in cmd  # the recipe's own budget


def test_plan_recipe_path_is_named_by_its_stem(tmp_path: Path) -> None:
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(GRPO_LIKE)
    (spec,) = plan_runs([str(recipe)], "arithmetic", 1, 2, TINY, tmp_path / "cmp")
    assert spec.run_dir == tmp_path / "cmp" / "mine" / "seed0" and spec.label == "arithmetic/mine/seed0"


@pytest.mark.parametrize(
    ("recipes", "overrides", "error", "message"),
    [
        (["grpo", "grpx"], [], UnknownNameError, "unknown recipe 'grpx'"),
        (["grpo"], ["train.nope=1"], ConfigError, "train.nope"),
        (["grpo"], ["train.lr=fast"], ConfigError, "train.lr"),
        (["grpo"], ["task.params.digits=0"], TetherError, "digits"),
        (["grpo"], ["method.ppo_clip.no_such_parameter=1"], TetherError, "no_such_parameter"),
        (["grpo"], ["train.seed=3"], ConfigError, "--seeds"),
        (["grpo", "grpo"], [], ConfigError, "repeat"),
    ],
)
def test_bad_plans_fail_before_any_run_dir_exists(
    tmp_path: Path, recipes: list[str], overrides: list[str], error: type[Exception], message: str
) -> None:
    out = tmp_path / "cmp"
    with pytest.raises(error, match=message):
        run_comparison(recipes, "arithmetic", 2, 2, [*TINY, *overrides], out, progress=False)
    assert not out.exists()


def test_unknown_recipe_gives_the_error_of_tether_train(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", "--recipes", "grpo,dapoo", "--seeds", "2", "--out", str(out)]) == 2
    compare_err = capsys.readouterr().err
    assert main(["train", "--recipe", "dapoo", "--out", str(tmp_path / "t")]) == 2
    assert compare_err == capsys.readouterr().err
    assert "unknown recipe 'dapoo'" in compare_err and "Did you mean 'dapo'" in compare_err
    assert not out.exists() and not (tmp_path / "t").exists()


def test_compare_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--recipes", "--seeds", "--set", "--ray", "--workers", "--baseline"))


# ---------------------------------------------------------------------------- local executor
def test_local_comparison_finishes_every_run(comparison: Path) -> None:
    for recipe in ("grpo", "rloo"):
        for seed in (0, 1):
            run_dir = comparison / recipe / f"seed{seed}"
            summary = _summary(run_dir)
            assert summary["recipe"] == recipe and summary["seed"] == seed and summary["steps"] == 2
            assert "accuracy" in summary["eval"]  # type: ignore[operator]
            assert run_state(run_dir) == "finished" and not (run_dir / "error.txt").exists()
    manifest = json.loads((comparison / "comparison.json").read_text())
    assert manifest["recipes"] == ["grpo", "rloo"] and manifest["seeds"] == [0, 1]
    assert {r["status"] for r in manifest["runs"]} == {"finished"}


def test_rerun_reuses_finished_runs_without_launching(
    comparison: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_launch(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a finished run was launched again: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_launch)
    before = {p: p.stat().st_mtime_ns for p in comparison.glob("*/seed*/summary.json")}
    args = ["--recipes", "grpo,rloo", "--seeds", "2", "--steps", "2", "--out", str(comparison), "--no-report"]
    assert main(["compare", *args, *TINY]) == 0
    assert "4 reused" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in comparison.glob("*/seed*/summary.json")} == before


def test_a_finished_run_with_other_settings_is_refused_not_reused(
    comparison: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another learning rate or budget into the same --out: its runs are not this comparison's."""
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a run was launched"))
    stale = tmp_path / "stale"
    shutil.copytree(comparison, stale)
    with pytest.raises(
        ConfigError, match=r"holds a run with other settings.*train\.lr: 1e-05 in the run, 0\.05 now"
    ):
        plan_runs(["grpo", "rloo"], "arithmetic", 2, 2, [*TINY, "train.lr=0.05"], stale)
    with pytest.raises(ConfigError, match=r"train\.steps: 2 in the run, 3 now"):
        plan_runs(["grpo", "rloo"], "arithmetic", 2, 3, TINY, stale)
    # logging and threads may differ: the runs are reused
    specs = plan_runs(["grpo", "rloo"], "arithmetic", 2, 2, [*TINY, "run.threads=2"], stale)
    assert [r.status for r in execute(specs, progress=False)] == ["reused"] * 4


def test_runs_of_several_tasks_and_of_a_recipe_file_are_loaded_by_name(
    comparison: Path, tmp_path: Path
) -> None:
    from tether.arena.runs import load_runs

    out = tmp_path / "multi"
    for task in ("arithmetic", "countdown"):
        shutil.copytree(comparison / "grpo", out / task / "grpo")
    assert len(load_runs(out)) == 4  # <task>/<recipe>/seed<k>: three levels down
    config = out / "arithmetic" / "grpo" / "seed0" / "config.yaml"
    config.write_text(config.read_text().replace("recipe: grpo", "recipe: /somewhere/mygrpo.yaml"))
    assert {r.recipe for r in load_runs(out)} == {"grpo", "mygrpo"}  # the stem, as compare names it


def test_report_is_built_after_the_runs(comparison: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Path, str | None]] = []
    monkeypatch.setattr(
        "tether.arena.compare._report_builder",
        lambda: lambda out, baseline=None: calls.append((Path(out), baseline)),
    )
    results = run_comparison(
        ["grpo", "rloo"], "arithmetic", 2, 2, TINY, comparison, baseline="grpo", progress=False
    )
    assert {r.status for r in results} == {"reused"}
    assert calls == [(comparison, "grpo")]
    with pytest.raises(ConfigError, match="--baseline"):
        run_comparison(["grpo", "rloo"], "arithmetic", 2, 2, TINY, comparison, baseline="dapo")


def test_interrupted_run_resumes_and_a_failing_run_does_not_stop_the_others(
    comparison: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cmp"
    recipe = tmp_path / "breaks.yaml"
    recipe.write_text(GRPO_LIKE)
    specs = plan_runs(["grpo", str(recipe)], "arithmetic", [0], 2, TINY, out)  # valid when planned
    recipe.write_text(BROKEN)  # ... but the file changes before its run starts
    # an interrupted run: its checkpoint and logs, no summary
    shutil.copytree(comparison / "grpo" / "seed0", out / "grpo" / "seed0")
    (out / "grpo" / "seed0" / "summary.json").unlink()
    assert run_state(out / "grpo" / "seed0") == "interrupted"

    launched: list[list[str]] = []
    real_popen = subprocess.Popen

    def spy(cmd: list[str], *args: object, **kwargs: object) -> object:
        launched.append(cmd)
        return real_popen(cmd, *args, **kwargs)  # type: ignore[call-overload]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subprocess, "Popen", spy)
        seen: list[tuple[str, str]] = []
        results = execute(specs, LocalExecutor(2), listener=lambda s, st, e: seen.append((s.label, st)))

    assert [r.status for r in results] == ["resumed", "failed"]
    assert ("arithmetic/grpo/seed0", "resumed") in seen and ("arithmetic/breaks/seed0", "failed") in seen
    assert any("--resume" in c and str(out / "grpo" / "seed0") in c for c in launched)
    resumed = out / "grpo" / "seed0"
    assert _summary(resumed)["steps"] == 2 and "eval" in _summary(resumed)
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # continued, not started again

    failed = results[1]
    assert failed.error and "no_such_parameter" in failed.error
    error_txt = (out / "breaks" / "seed0" / "error.txt").read_text()
    assert "no_such_parameter" in error_txt and "--recipe" in error_txt
    assert run_state(out / "breaks" / "seed0") != "finished"


# ------------------------------------------------------------------------------ Ray executor
@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_ray_executor_runs_on_a_local_instance(local_ray: None, tmp_path: Path) -> None:
    recipe = tmp_path / "breaks.yaml"
    recipe.write_text(GRPO_LIKE)
    specs = plan_runs(["rloo", str(recipe)], "arithmetic", [0], 2, TINY, tmp_path / "shared")
    recipe.write_text(BROKEN)
    results = execute(specs, RayExecutor("local"), progress=False)
    assert [r.status for r in results] == ["finished", "failed"]
    shared = specs[0].run_dir
    assert (shared / "summary.json").is_file() and (shared / "checkpoints").is_dir()  # written in place
    assert "no_such_parameter" in (specs[1].run_dir / "error.txt").read_text()

    # the path of a remote cluster: the run trains elsewhere and its small files come back
    (spec,) = plan_runs(["grpo"], "arithmetic", [1], 2, TINY, tmp_path / "returned")
    (result,) = execute([spec], RayExecutor("local", return_files=True), progress=False)
    assert result.status == "finished", result.error
    names = {p.name for p in spec.run_dir.iterdir()}
    assert {"summary.json", "metrics.jsonl", "config.yaml", "samples.jsonl"} <= names
    assert "checkpoints" not in names and "model" not in names
    summary = _summary(spec.run_dir)
    assert summary["seed"] == 1 and "eval" in summary
    assert run_state(spec.run_dir) == "finished"


def test_run_spec_threads_override(tmp_path: Path) -> None:
    specs = plan_runs(["grpo"], "arithmetic", 1, 2, ["run.threads=2"], tmp_path, threads=1)
    assert specs[0].threads == 2 and specs[0].overrides.count("run.threads=2") == 1
    assert isinstance(specs[0], RunSpec)


# ------------------------------------------------------------------------------ stopping runs
CHILD = """
import signal, sys, time, pathlib
def stop(sig, frame):
    pathlib.Path(sys.argv[1]).write_text(signal.Signals(sig).name)
    sys.exit(130)
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(60)
"""


def _child(tmp_path: Path, name: str, **kwargs: object) -> subprocess.Popen[str]:
    import sys

    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / name)], stdout=subprocess.PIPE, text=True, **kwargs
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_interrupted_runs_are_stopped_with_sigint_first(tmp_path: Path) -> None:
    """SIGINT lets a run finish its step and save it; SIGTERM at once (as before) cut that short."""
    from tether.arena.executors import stop_runs

    proc = _child(tmp_path, "got")
    stop_runs([proc], grace_seconds=10)  # type: ignore[list-item]
    assert proc.returncode == 130 and (tmp_path / "got").read_text() == "SIGINT"


def test_a_run_is_stopped_when_the_comparison_process_is_killed(tmp_path: Path) -> None:
    """SIGKILL of the comparison: its runs get SIGINT (Linux PR_SET_PDEATHSIG) instead of running on."""
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("parent-death signals are Linux-only")
    parent = tmp_path / "parent.py"
    parent.write_text(
        "import subprocess, sys, time\n"
        "from tether.arena.executors import _stop_with_parent\n"
        f"p = subprocess.Popen([sys.executable, {str(tmp_path / 'child.py')!r}, {str(tmp_path / 'got')!r}],"
        " preexec_fn=_stop_with_parent, stdout=subprocess.PIPE, text=True)\n"
        "print(p.stdout.readline().strip(), p.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    (tmp_path / "child.py").write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(parent)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    ready, _pid = proc.stdout.readline().split()
    assert ready == "ready"
    proc.kill()
    proc.wait()
    import time

    got = tmp_path / "got"
    for _ in range(600):  # the file can exist before the child has written to it: wait for its text
        if got.exists() and got.read_text():
            break
        time.sleep(0.05)
    assert got.read_text() == "SIGINT"
