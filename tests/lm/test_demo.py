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
    # Another seed neither reuses nor overwrites seed 0's stages.
    capsys.readouterr()
    assert main(["demo", "--quick", "--seed", "1", "--out", str(out)]) == 2
    assert "holds the demo of seed 0, not 1" in capsys.readouterr().err
    assert (out / "grpo" / "summary.json").stat().st_mtime == mtime
