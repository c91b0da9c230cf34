"""Run directories: tether writes only into a new or empty directory or one of its own runs, and a
run whose model cannot be loaded leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.lm.test_trainer import ARITH, TINY
from tests.lm.test_trainer import tiny_cache as tiny_cache  # module-wide TETHER_CACHE, one thread
from tether.cli import main
from tether.errors import TetherError
from tether.runs.rundir import RUN_MARKER, RunDir


def settings(command: str) -> list[str]:
    """The tiny test settings that ``command`` takes (tether sft has no train.* section)."""
    return [*(a for a in TINY if command == "train" or not a.startswith("train.")), *ARITH]


def foreign_dir(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A project directory that happens to hold files with the names a run writes."""
    proj = tmp_path / "proj"
    (proj / "model").mkdir(parents=True)
    files = {"config.yaml": "mine: true\n", "summary.json": '{"mine": 1}\n', "model/config.json": "{}\n"}
    for name, text in files.items():
        (proj / name).write_text(text)
    return proj, files


def test_a_directory_that_is_not_a_run_is_refused_and_left_alone(tmp_path: Path) -> None:
    proj, files = foreign_dir(tmp_path)
    for resume in (False, True):
        with pytest.raises(TetherError, match=r"already exists and is not a tether run.*config\.yaml"):
            RunDir(proj).prepare(resume)
    with pytest.raises(TetherError, match="is not a tether run"):
        RunDir(proj).resumable()  # would delete summary.json of a run without checkpoints
    assert {name: (proj / name).read_text() for name in files} == files
    assert not (proj / RUN_MARKER).exists()


def test_a_file_is_refused_and_a_new_or_empty_directory_becomes_a_run(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("keep")
    with pytest.raises(TetherError, match="is a file, not a directory"):
        RunDir(target).prepare(False)
    assert target.read_text() == "keep"
    for path in (tmp_path / "new", tmp_path / "empty"):
        if path.name == "empty":
            path.mkdir()
        run = RunDir(path)
        run.prepare(False)
        assert (path / RUN_MARKER).is_file() and run.is_run()
        run.prepare(True)  # its own run: resuming it is fine (the marker stays)


@pytest.mark.parametrize("command", ["train", "sft"])
def test_cli_refuses_other_directories_and_files_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    proj, files = foreign_dir(tmp_path)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    for out, message in ((proj, "is not a tether run"), (a_file, "is a file")):
        rc = main([command, "--out", str(out), "--steps", "1", *settings(command)])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "Traceback" not in err, err
    assert {name: (proj / name).read_text() for name in files} == files
    assert a_file.read_text() == "keep"


@pytest.mark.parametrize("command", ["train", "sft"])
def test_a_model_that_cannot_load_leaves_no_run_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    out = tmp_path / "run"
    bad_model = f"model.name_or_path={tmp_path}/nowhere/model"
    rc = main([command, "--out", str(out), "--steps", "1", *settings(command), bad_model])
    err = capsys.readouterr().err
    assert rc == 2 and "does not exist" in err, err
    assert not out.exists()


def test_atomic_directory_swaps_whole_directories_and_keeps_the_old_one_on_failure(tmp_path: Path) -> None:
    from tether.runs.files import atomic_directory

    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("v1")
    assert (target / "weights").read_text() == "v1"
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "weights").write_text("v2 torn")
        raise RuntimeError("killed mid-write")
    assert (target / "weights").read_text() == "v1"
    (tmp_path / ".tmp-model-stale").mkdir()  # what a SIGKILL mid-write leaves
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("v3")
    assert (target / "weights").read_text() == "v3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_save_model_that_fails_leaves_the_previous_model_loadable(tmp_path: Path) -> None:
    from tether.lm.model import ModelConfig, build_tiny_model, load_policy, save_model

    source = build_tiny_model(tmp_path / "tiny", ModelConfig(tiny_hidden=32, tiny_layers=1, tiny_heads=2))
    cfg = ModelConfig(name_or_path=str(source), device="cpu")
    model, tok = load_policy(cfg)
    out = tmp_path / "run" / "model"
    save_model(model, tok, out)
    before = (out / "model.safetensors").read_bytes()

    def torn(directory: Path, *a: object, **k: object) -> None:
        Path(directory, "model.safetensors").write_bytes(b"torn")
        raise KeyboardInterrupt

    model.save_pretrained = torn  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        save_model(model, tok, out)
    assert (out / "model.safetensors").read_bytes() == before
    load_policy(ModelConfig(name_or_path=str(out), device="cpu"))  # still a whole model


def test_a_run_directory_in_use_by_another_process_is_refused(tmp_path: Path) -> None:
    """Two trainers in one directory (a comparison re-run beside a run still going) would interleave
    their logs: the second is refused; the same process may take its own lock again."""
    import subprocess
    import sys

    run = tmp_path / "run"
    RunDir(run).prepare(False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / RUN_MARKER).write_text("x\n")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from tether.runs.rundir import _lock; from pathlib import Path; "
            f"_lock(Path({str(tmp_path / 'other')!r})); print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(TetherError, match="in use by another tether process"):
            RunDir(tmp_path / "other").prepare(True)
        RunDir(run).prepare(True)  # this process's own run: fine
    finally:
        holder.kill()
        holder.wait()
    RunDir(tmp_path / "other").prepare(True)  # released with the process


def test_metrics_at_gives_non_finite_metrics_back_as_floats_and_leaves_text_alone(tmp_path: Path) -> None:
    """What a resumed run with nothing left to train reports as its final metrics (both trainers):
    NaN and infinities as floats, as the run that logged them had them, not the strings JSON holds."""
    import math

    run = RunDir(tmp_path / "run")
    run.metrics.append(
        {"step": 1, "grad/norm": float("nan"), "kl": float("inf"), "low": float("-inf"), "ok": 0.5}
    )
    final = run.metrics_at(1)
    assert math.isnan(final["grad/norm"]) and final["kl"] == math.inf and final["low"] == -math.inf
    assert final["ok"] == 0.5
    # the alarm kind "nan" and a completion that reads "nan" stay text
    run.alarms.append({"step": 1, "kind": "nan", "message": "m", "value": float("nan")})
    run.samples.append({"step": 1, "completion": "nan", "reward": float("nan")})
    (alarm,) = run.alarms.read()
    assert alarm["kind"] == "nan" and math.isnan(alarm["value"])
    (sample,) = run.samples.read()
    assert sample["completion"] == "nan" and math.isnan(sample["reward"])
    run.truncate_logs(1)  # rewritten as valid JSON
    assert run.alarms.read()[0]["kind"] == "nan" and '"value": "nan"' in run.alarms.path.read_text()


def test_free_run_dir_names_a_directory_beside_the_run(tmp_path: Path) -> None:
    from tether.runs.rundir import free_run_dir

    assert free_run_dir(tmp_path / "run", "again") == tmp_path / "run-again"
    (tmp_path / "run-again").mkdir()
    assert free_run_dir(tmp_path / "run", "again") == tmp_path / "run-again-2"


def test_summary_json_is_strict_json_with_non_finite_numbers_as_strings(tmp_path: Path) -> None:
    """summary.json holds no bare NaN / Infinity (not JSON): non-finite numbers are written as the
    strings metrics.jsonl uses, and read back as floats in its final metrics and eval results."""
    import json
    import math

    from tether.arena.runs import load_run

    run = RunDir(tmp_path / "run")
    summary = {
        "task": "nan",  # text stays text
        "steps": 2,
        "final": {"policy/entropy": float("nan"), "policy/ratio_max": float("inf"), "reward/mean": 0.5},
        "eval": {"entropy": float("-inf"), "accuracy": 0.25, "per_prompt_success": [0.5, float("nan")]},
    }
    run.write_summary(summary)

    def no_constants(name: str) -> float:
        raise AssertionError(f"summary.json holds the non-JSON literal {name}")

    strict = json.loads(run.summary_path.read_text(), parse_constant=no_constants)
    assert strict["final"]["policy/entropy"] == "nan" and strict["final"]["policy/ratio_max"] == "inf"
    assert strict["eval"]["entropy"] == "-inf" and strict["eval"]["per_prompt_success"] == [0.5, "nan"]
    back = run.read_summary()
    assert back is not None and back["task"] == "nan" and back["steps"] == 2
    assert math.isnan(back["final"]["policy/entropy"]) and back["final"]["policy/ratio_max"] == math.inf
    assert back["eval"]["entropy"] == -math.inf and math.isnan(back["eval"]["per_prompt_success"][1])
    assert back["final"]["reward/mean"] == 0.5 and back["eval"]["accuracy"] == 0.25
    # the arena reads them as numbers too
    (tmp_path / "run" / "config.yaml").write_text("recipe: grpo\ntask: {name: arithmetic}\n")
    record = load_run(tmp_path / "run")
    assert math.isnan(record.final("policy/entropy")) and record.final("eval/entropy") == -math.inf
    # a summary an older tether wrote with bare NaN still reads
    run.summary_path.write_text('{"final": {"grad/norm": NaN}}')
    old = run.read_summary()
    assert old is not None and math.isnan(old["final"]["grad/norm"])


def test_model_step_is_recorded_beside_the_weights(tmp_path: Path) -> None:
    from tether.runs.rundir import MODEL_STEP, mark_model_step, model_step

    model = tmp_path / "model"
    assert model_step(model) is None  # nothing recorded (an older run, or a kill before the record)
    model.mkdir()
    mark_model_step(model, 7)
    assert model_step(model) == 7
    (model / MODEL_STEP).write_text("{torn")
    assert model_step(model) is None


@pytest.mark.parametrize("command", ["train", "sft"])
def test_resume_in_a_directory_that_is_not_a_run_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """--resume in another program's directory (with or without a config.yaml of its own) says it is
    not a tether run, not that a run was stopped while starting or that 'mine' is an unknown key."""
    proj, files = foreign_dir(tmp_path)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep")
    for out in (proj, notes):
        rc = main([command, "--out", str(out), "--resume", *settings(command)])
        err = capsys.readouterr().err
        assert rc == 2 and "is not a tether run directory" in err and "Traceback" not in err, err
        assert "while it was starting" not in err and "unknown config key" not in err
    assert {name: (proj / name).read_text() for name in files} == files
    assert (notes / "todo.txt").read_text() == "keep" and sorted(p.name for p in notes.iterdir()) == [
        "todo.txt"
    ]
    # a run stopped while it was starting (its marker, no config.yaml) is still told apart
    started = tmp_path / "started"
    started.mkdir()
    (started / RUN_MARKER).write_text("a tether run directory\n")
    assert main([command, "--out", str(started), "--resume", *settings(command)]) == 2
    assert "holds no config.yaml" in capsys.readouterr().err
