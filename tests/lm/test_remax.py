"""ReMax: the greedy-baseline loop plugin and the remax advantage, in a training run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from tests.lm.test_trainer import make_config, read_jsonl, record_advantages
from tests.lm.test_trainer import tiny_cache as tiny_cache  # module-wide TETHER_CACHE, one thread
from tether.lm.tasks.base import safe_score_batch
from tether.lm.trainer import RLTrainer


def _greedy_text(trainer: RLTrainer, text: str) -> str:
    """Argmax decoding written out: one full forward per token, no cache."""
    tok, model = trainer.tokenizer, trainer.model
    ids = list(tok([text], add_special_tokens=True)["input_ids"][0])
    out: list[int] = []
    eos = tok.eos_token_id
    with torch.no_grad():
        for _ in range(trainer.config.sampling.max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            nxt = int(logits.argmax())
            out.append(nxt)
            if nxt == eos:
                break
    return tok.decode(out, skip_special_tokens=True)


def test_the_baseline_is_the_reward_of_each_prompts_greedy_response(tmp_path: Path) -> None:
    trainer = RLTrainer(make_config(tmp_path / "run", "train.steps=1", "task.params.p=0.5", recipe="remax"))
    (plugin,) = trainer.plugins
    ro = trainer.rollout()
    inputs: dict[str, Any] = {}
    plugin.extra_inputs(trainer, ro, inputs)
    b = inputs["baseline_rewards"]
    assert b.shape == (len(ro),)
    for gid in ro.group_ids.unique().tolist():
        rows = (ro.group_ids == gid).nonzero().squeeze(-1).tolist()
        prompt = ro.prompts[rows[0]]
        (score,) = safe_score_batch(trainer.task, [prompt], [_greedy_text(trainer, prompt.text)])
        assert all(float(b[r]) == score.reward for r in rows), prompt.id


def test_remax_run_trains_on_reward_minus_greedy_reward(tmp_path: Path) -> None:
    trainer = RLTrainer(make_config(tmp_path / "run", "train.steps=2", recipe="remax"))
    seen = record_advantages(trainer)
    trainer.train()
    for inputs, adv in seen:
        want = (inputs["rewards"].double() - inputs["baseline_rewards"])[:, None] * inputs["response_mask"]
        torch.testing.assert_close(adv.double(), want)
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert all(math.isfinite(r["remax/greedy_reward"]) and r["remax/greedy_errors"] == 0 for r in records)
    assert records[0]["train/nan_skips"] == 0.0
