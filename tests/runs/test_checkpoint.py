from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

from tether.runs import Checkpoint, MetricsLog, latest_checkpoint, load_checkpoint, save_checkpoint
from tether.runs.checkpoint import capture_rng, optimizer_from_flat, optimizer_to_flat, restore_rng


def test_roundtrip_model_optimizer_rng(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    o_tensors, o_meta = optimizer_to_flat(opt.state_dict())
    r_tensors, r_state = capture_rng()
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()} | o_tensors | r_tensors
    save_checkpoint(tmp_path, Checkpoint(step=7, tensors=tensors, state={"optim": o_meta, **r_state}))
    expected = (torch.rand(3), np.random.rand(), random.random())

    ck = load_checkpoint(latest_checkpoint(tmp_path))  # type: ignore[arg-type]
    assert ck.step == 7
    model2 = torch.nn.Linear(3, 2)
    model2.load_state_dict({k[6:]: v for k, v in ck.tensors.items() if k.startswith("model.")})
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(optimizer_from_flat(ck.tensors, ck.state["optim"]))
    restore_rng(ck.tensors, ck.state)
    assert torch.equal(torch.rand(3), expected[0])
    assert (np.random.rand(), random.random()) == expected[1:]
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    # the same update from both optimizers
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(torch.ones(1, 3)).sum().backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_rng_restore_replays_the_same_numbers() -> None:
    tensors, state = capture_rng()
    a = (torch.rand(3).tolist(), float(np.random.rand()), random.random())
    restore_rng(tensors, state)
    b = (torch.rand(3).tolist(), float(np.random.rand()), random.random())
    assert a == b


def test_keep_prunes_old_checkpoints(tmp_path: Path) -> None:
    for step in range(5):
        save_checkpoint(tmp_path, Checkpoint(step=step, tensors={"x": torch.tensor([step])}), keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert names == ["step_000000003", "step_000000004"]
    assert load_checkpoint(latest_checkpoint(tmp_path)).step == 4  # type: ignore[arg-type]


WRITER = textwrap.dedent(
    """
    import sys, torch
    from tether.runs import Checkpoint, save_checkpoint
    run = sys.argv[1]
    open(sys.argv[2], "w").close()  # imports done: the test's kill lands among checkpoint writes
    step = 0
    while True:
        step += 1
        big = torch.full((400_000,), float(step))
        save_checkpoint(run, Checkpoint(step=step, tensors={"w": big}, state={"marker": step}), keep=2)
    """
)


def test_kill_during_checkpoint_writes_leaves_latest_intact(tmp_path: Path) -> None:
    """SIGKILL a process that writes checkpoints in a loop, many times; `latest` always loads."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    run = tmp_path / "run"
    rng = random.Random(0)
    started = tmp_path / "started"
    for _ in range(6):
        started.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, str(script), str(run), str(started)], env={**os.environ})
        # Wait for the writer's imports (seconds on a loaded machine), then kill it at a random
        # moment of its write loop.
        deadline = time.monotonic() + 120
        while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert started.exists(), "the checkpoint writer did not start"
        time.sleep(0.05 + rng.random() * 0.45)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        path = latest_checkpoint(run)
        if path is None:
            continue
        ck = load_checkpoint(path)
        assert ck.state["marker"] == ck.step
        assert torch.all(ck.tensors["w"] == float(ck.step))
    assert latest_checkpoint(run) is not None


def test_metrics_log_ignores_torn_line_and_truncates(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(1, 6):
        log.append({"step": step, "loss": float(step), "bad": float("nan")})
    with open(log.path, "a") as fh:
        fh.write('{"step": 6, "lo')  # torn write
    assert [r["step"] for r in log.read()] == [1, 2, 3, 4, 5]
    assert '"bad": "nan"' in log.path.read_text()  # JSON has no NaN literal: a string on disk
    assert math.isnan(log.read()[0]["bad"])  # and a float again when read
    log.truncate_after(3)
    assert [r["step"] for r in log.read()] == [1, 2, 3]
    assert '"bad": "nan"' in log.path.read_text()  # rewritten as valid JSON, not NaN
    assert all(math.isnan(r["bad"]) for r in log.read())


def test_load_model_weights_reads_the_checkpoints_model_and_refuses_another(tmp_path: Path) -> None:
    import pytest

    from tether.errors import TetherError
    from tether.runs.checkpoint import load_model_weights

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()} | {"optim.0.exp_avg": torch.ones(2, 3)}
    save_checkpoint(tmp_path, Checkpoint(step=4, tensors=tensors, state={}))
    path = latest_checkpoint(tmp_path)
    other = torch.nn.Linear(3, 2)
    assert load_model_weights(path, other) == 4  # type: ignore[arg-type]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters()))
    with pytest.raises(TetherError, match=r"do not fit the model built for them.*missing"):
        load_model_weights(path, torch.nn.Sequential(torch.nn.Linear(3, 2)))  # type: ignore[arg-type]
    with pytest.raises(TetherError, match="do not fit the model built for them"):
        load_model_weights(path, torch.nn.Linear(4, 2))  # type: ignore[arg-type]
