"""OTB in a training run: the trainer's sum_pi_squared is the old policy's, from its own logits."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.lm.test_trainer import make_config, read_jsonl
from tests.lm.test_trainer import tiny_cache as tiny_cache  # module-wide TETHER_CACHE, one thread
from tether.lm.trainer import RLTrainer


def _independent_sum_pi_squared(trainer: RLTrainer, temperature: float, top_k: int) -> torch.Tensor:
    """sum_v pi(v)^2 at every completion position, one full forward per row (no padding, no cache),
    over the processed distribution: logits / temperature, top-k kept plus the sampled token."""
    batch = trainer.last_rollout.batch  # type: ignore[union-attr]
    out = torch.zeros(batch.completion_ids.shape, dtype=torch.float64)
    trainer.model.eval()
    with torch.no_grad():
        for i in range(len(batch)):
            prompt = batch.prompt_ids[i][batch.prompt_mask[i].bool()]
            comp = batch.completion_ids[i][batch.completion_mask[i].bool()]
            ids = torch.cat([prompt, comp])[None].to(trainer.device)
            logits = trainer.model(input_ids=ids).logits[0].double().cpu()
            z = logits[len(prompt) - 1 : len(prompt) - 1 + len(comp)] / temperature
            kth = z.topk(top_k, dim=-1).values[:, -1:]
            keep = (z >= kth).scatter(-1, comp[:, None], True)
            p = torch.softmax(z.masked_fill(~keep, float("-inf")), -1)
            out[i, : len(comp)] = (p**2).sum(-1)
    trainer.model.train()
    return out


# OTB with a regularizer that reads the full distribution: sum_pi_squared then comes from it.
OTB_SIREN = """\
description: OTB with SIREN's entropy term
advantage: {name: otb}
policy_loss: {name: ppo_clip, params: {eps_low: 0.2, eps_high: 0.2, aggregation: token-mean}}
regularizers:
  - name: siren
    params: {coef: 0.005, top_p: 0.8}
    state: {param: anchor_entropy, init: null, inputs: {selective_entropy: siren/selective_entropy}}
"""


@pytest.mark.parametrize("with_distribution", [False, True], ids=["token-stats", "full-distribution"])
def test_otb_run_uses_the_old_policys_sum_pi_squared(tmp_path: Path, with_distribution: bool) -> None:
    temperature, top_k = 0.8, 5
    recipe = "otb"
    if with_distribution:
        recipe = str(tmp_path / "otb_siren.yaml")
        Path(recipe).write_text(OTB_SIREN)
    trainer = RLTrainer(
        make_config(
            tmp_path / "run",
            "train.steps=2",
            f"sampling.temperature={temperature}",
            f"sampling.top_k={top_k}",
            recipe=recipe,
        )
    )
    assert trainer.needs_sum_pi_squared and trainer.needs_distribution == with_distribution
    seen: list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]] = []
    compute = trainer.method.compute_advantages

    def recording(inputs: dict[str, Any]) -> Any:
        out = compute(inputs)
        want = _independent_sum_pi_squared(trainer, temperature, top_k)
        seen.append((inputs, out[0], want))
        return out

    trainer.method.compute_advantages = recording  # type: ignore[method-assign]
    trainer.train()
    assert len(seen) == 2
    for inputs, adv, want in seen:
        mask = inputs["response_mask"]
        got = inputs["sum_pi_squared"].double()
        torch.testing.assert_close(got * mask, want * mask, rtol=1e-5, atol=1e-6)
        assert bool((got[mask] > 0).all()) and bool((got[mask] <= 1 + 1e-6).all())
        assert adv.shape == mask.shape and bool((adv[~mask] == 0).all())
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert all(math.isfinite(r["otb/energy_mean"]) and r["otb/energy_mean"] > 0 for r in records)
    assert records[-1]["train/nan_skips"] == 0.0
