"""The GRPO throughput benchmark (bench/lm_throughput.py) stays runnable: one tiny step per side.

Nothing here depends on timing: it checks that both trainers are built, step, and report
tokens and non-negative phase times.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "lm_throughput.py"

pytest.importorskip("trl")


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lm_throughput", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("long_prompt", [False, True], ids=["bare", "instruction"])
def test_one_step_of_each_side(monkeypatch: pytest.MonkeyPatch, long_prompt: bool) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bench = _load()
    instruction = bench.INSTRUCTION if long_prompt else ""
    args = bench.BenchArgs(
        steps=1, warmup=0, prompts=2, group_size=2, max_new_tokens=4, threads=1, instruction=instruction
    )
    prompts = bench.train_prompts(args)
    assert all(re.fullmatch(r"\d{1,2}\+\d{1,2}=", p.text.removeprefix(instruction)) for p in prompts)
    assert all(p.text.startswith(instruction) for p in prompts)
    ours, theirs = bench.bench(args)
    for side in (ours, theirs):
        assert len(side.steps) == 1
        step = side.steps[0]
        assert 0 < step.tokens <= args.prompts * args.group_size * args.max_new_tokens
        assert step.rollout_s >= 0 and step.update_s >= 0 and step.step_s >= step.rollout_s
    table = bench.format_table(ours.summary(), theirs.summary())
    assert "rollout tokens/s" in table and "seconds / step" in table
