"""The main job in its quick form: every stage runs and summary.json has the promised fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tether.cli import main


def test_quick_demo_writes_the_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    # What a demo killed early in SFT leaves behind (config and log, no checkpoint): it starts again.
    (out / "sft").mkdir(parents=True)
    (out / "sft" / "config.yaml").write_text("sft:\n  seed: 0\n")
    (out / "sft" / "metrics.jsonl").write_text('{"step": 1, "sft/loss": 9.0}\n{"step": 2, "sft/lo')
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["sft"]["accuracy"] <= 1.0 and summary["seed"] == 0
    sft = json.loads((out / "sft" / "summary.json").read_text())
    # SFT checked its accuracy (every 20 steps in the quick form) against the demo's target
    assert sft["stop_at_accuracy"] == summary["settings"]["sft_target"] > 0
    checks = [
        r["step"]
        for r in map(json.loads, (out / "sft" / "metrics.jsonl").open())
        if "sft/check_accuracy" in r
    ]
    assert checks == list(range(20, sft["steps"] + 1, 20)) and summary["sft"]["steps"] == sft["steps"]
    assert set(summary["recipes"]) == {"grpo", "mhpo"}
    for row in summary["recipes"].values():
        for key in ("accuracy", "pass@8", "entropy", "alarm_count", "accuracy_gain_over_sft"):
            assert key in row
        assert row["accuracy_gain_over_sft"] == pytest.approx(row["accuracy"] - summary["sft"]["accuracy"])
    # A second call reuses the finished stages instead of overwriting them.
    mtime = (out / "grpo" / "summary.json").stat().st_mtime
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    assert (out / "grpo" / "summary.json").stat().st_mtime == mtime
    # Killed after GRPO's last checkpoint, before its evaluation: the stage resumes there, with
    # no step trained again, and is evaluated.
    (out / "grpo" / "summary.json").unlink()
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    assert [r["step"] for r in map(json.loads, (out / "grpo" / "metrics.jsonl").open())] == [1, 2, 3, 4]
    assert "eval" in json.loads((out / "grpo" / "summary.json").read_text())
    assert json.loads((out / "summary.json").read_text())["recipes"]["grpo"] == summary["recipes"]["grpo"]
    # Another seed neither reuses nor overwrites seed 0's stages.
    mtime = (out / "grpo" / "summary.json").stat().st_mtime
    capsys.readouterr()
    assert main(["demo", "--quick", "--seed", "1", "--out", str(out)]) == 2
    assert "holds the demo of seed 0, not 1" in capsys.readouterr().err
    assert (out / "grpo" / "summary.json").stat().st_mtime == mtime
