"""GDPO: hand-computed values, its reductions, and agreement with TRL's normalize_then_sum."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import huggingface_hub.constants as hf_constants
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from tests.catalogue.test_trl_differential import _no_network, _write_tiny_model
from tether.catalogue import get
from tether.errors import InvalidInputError

gdpo = get("advantage", "gdpo").fn
grpo = get("advantage", "grpo").fn


def _ustd(x: list[float]) -> float:
    m = sum(x) / len(x)
    return (sum((v - m) ** 2 for v in x) / (len(x) - 1)) ** 0.5


def test_gdpo_hand_computed_two_rewards() -> None:
    # One group of 3: correctness (1, 0, 0) and format (1, 1, 0), weights 1 and 0.5.
    eps = 1e-4
    acc = [1.0, 0.0, 0.0]
    fmt = [1.0, 1.0, 0.0]
    norm_acc = [(v - 1 / 3) / (_ustd(acc) + eps) for v in acc]
    norm_fmt = [(v - 2 / 3) / (_ustd(fmt) + eps) for v in fmt]
    s = [a + 0.5 * f for a, f in zip(norm_acc, norm_fmt)]
    expected = [(v - sum(s) / 3) / (_ustd(s) + eps) for v in s]
    parts = torch.tensor([acc, fmt], dtype=torch.float64).T
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]], dtype=torch.bool)
    combined = (parts[:, 0] + 0.5 * parts[:, 1]) / 1.5
    adv, metrics = gdpo(combined, mask, torch.tensor([5, 5, 5]), parts, (1.0, 0.5))
    want = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(adv, torch.where(mask, want[:, None], 0.0), rtol=1e-12, atol=1e-12)
    assert float(metrics["adv/reward_mean"]) == pytest.approx(float(combined.mean()))


def test_gdpo_keeps_reward_combinations_apart_where_grpo_collapses_them() -> None:
    """The paper's example: two rollouts, two binary rewards. Group A scores (0, 0) and (0, 1),
    group B (0, 0) and (1, 1): GRPO gives both groups the same advantages (totals 0/1 and 0/2
    standardise alike); GDPO gives the sample that satisfied both rewards the larger one."""
    parts = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    combined = parts.sum(-1)
    ids = torch.tensor([0, 0, 1, 1])
    mask = torch.ones(4, 1, dtype=torch.bool)
    a_gdpo = gdpo(combined, mask, ids, parts, (1.0, 1.0))[0][:, 0]
    a_grpo = grpo(combined, mask, ids)[0][:, 0]
    torch.testing.assert_close(a_grpo[:2], a_grpo[2:], rtol=0, atol=1e-5)  # equal up to eps
    assert float(a_gdpo[3]) > float(a_gdpo[1]) > 0.0
    assert float(a_gdpo[2]) < float(a_gdpo[0]) < 0.0
    # Before the batch step: A -> +-1/sqrt(2), B -> +-sqrt(2) (eps aside); whitening keeps the ratio 2.
    assert float(a_gdpo[3] / a_gdpo[1]) == pytest.approx(2.0, rel=1e-3)


def test_gdpo_single_reward_is_grpo_whitened_over_the_batch() -> None:
    gen = torch.Generator().manual_seed(3)
    rewards = torch.rand(12, generator=gen, dtype=torch.float64)
    ids = torch.arange(3).repeat_interleave(4)
    mask = torch.ones(12, 2, dtype=torch.bool)
    adv = gdpo(rewards, mask, ids, rewards[:, None], (1.0,), eps=1e-6)[0][:, 0]
    g = grpo(rewards, mask, ids, eps=1e-6)[0][:, 0]
    torch.testing.assert_close(adv, (g - g.mean()) / (g.std() + 1e-6), rtol=1e-12, atol=1e-12)


def test_gdpo_invariances_scale_of_a_reward_and_the_batch_scale() -> None:
    gen = torch.Generator().manual_seed(4)
    parts = torch.rand(8, 2, generator=gen, dtype=torch.float64)
    ids = torch.arange(2).repeat_interleave(4)
    mask = torch.ones(8, 3, dtype=torch.bool)
    base = gdpo(parts.mean(-1), mask, ids, parts, (1.0, 2.0), eps=1e-12)[0]
    rescaled = parts * torch.tensor([10.0, 1.0], dtype=torch.float64) + 3.0
    # A reward's affine rescaling does not change its group-normalised part.
    torch.testing.assert_close(gdpo(parts.mean(-1), mask, ids, rescaled, (1.0, 2.0), eps=1e-12)[0], base)
    # Scaling every weight by c leaves the batch-whitened advantage unchanged.
    torch.testing.assert_close(gdpo(parts.mean(-1), mask, ids, parts, (3.0, 6.0), eps=1e-12)[0], base)
    assert float(base[:, 0].mean()) == pytest.approx(0.0, abs=1e-12)
    assert float(base[:, 0].std()) == pytest.approx(1.0, abs=1e-9)


def test_gdpo_none_parts_are_left_out_of_their_function_only() -> None:
    """A function that gave None for a sample: that sample's other rewards still count; its own
    column's group statistics use the remaining samples (TRL's nanmean / nanstd / nansum)."""
    parts = torch.tensor([[1.0, 0.0], [0.0, float("nan")], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    ids = torch.zeros(4, dtype=torch.long)
    mask = torch.ones(4, 1, dtype=torch.bool)
    adv = gdpo(torch.zeros(4), mask, ids, parts, (1.0, 1.0))[0][:, 0]
    assert bool(torch.isfinite(adv).all())
    eps = 1e-4
    acc = [(v - 0.5) / (_ustd([1.0, 0.0, 0.0, 1.0]) + eps) for v in (1.0, 0.0, 0.0, 1.0)]
    fmt_vals = [0.0, 1.0, 1.0]
    fm = sum(fmt_vals) / 3
    fmt = [(0.0 - fm) / (_ustd(fmt_vals) + eps), 0.0, (1.0 - fm) / (_ustd(fmt_vals) + eps)]
    fmt.append(fmt[2])
    s = [a + f for a, f in zip(acc, fmt)]
    want = [(v - sum(s) / 4) / (_ustd(s) + eps) for v in s]
    torch.testing.assert_close(adv, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_gdpo_rejects_mismatched_weights_and_shapes() -> None:
    mask = torch.ones(4, 1, dtype=torch.bool)
    ids = torch.zeros(4, dtype=torch.long)
    with pytest.raises(InvalidInputError, match="reward_weights"):
        gdpo(torch.zeros(4), mask, ids, torch.zeros(4, 2), (1.0,))
    with pytest.raises(InvalidInputError, match="reward_parts"):
        gdpo(torch.zeros(4), mask, ids, torch.zeros(3, 2), (1.0, 1.0))
    with pytest.raises(InvalidInputError, match="finite"):
        gdpo(torch.zeros(4), mask, ids, torch.zeros(4, 1), (float("nan"),))


# --------------------------------------------------------------------------- against TRL

G = 4


def _correct(completions: list[Any], **kwargs: Any) -> list[float]:
    return [float(len(c.split()) % 2) for c in completions]


def _format(completions: list[Any], **kwargs: Any) -> list[float | None]:
    # None (unscorable by this function) on every third completion, as TRL allows.
    return [None if i % 3 == 2 else float(sum(map(ord, c)) % 3) / 2 for i, c in enumerate(completions)]


@pytest.mark.parametrize("seed", [0, 1])
def test_gdpo_equals_trl_normalize_then_sum(tmp_path: Path, seed: int) -> None:
    """TRL 1.16's GRPOTrainer computes its advantages from real sampled completions with two reward
    functions (one returning None at times); gdpo on the same per-function rewards agrees."""
    model_dir = tmp_path / "tiny-llama"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(hf_constants, "HF_HUB_OFFLINE", True)
        mp.setattr(socket.socket, "connect", _no_network)
        _write_tiny_model(model_dir)
        prompts = ["w1 w2", "w3 w4 w5", "w6", "w7 w8"]
        trainer = GRPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(model_dir),
            reward_funcs=[_correct, _format],
            args=GRPOConfig(
                output_dir=str(tmp_path / "out"),
                use_cpu=True,
                bf16=False,
                report_to="none",
                activation_checkpointing=False,
                num_generations=G,
                per_device_train_batch_size=G * len(prompts),
                max_completion_length=6,
                reward_weights=[1.0, 0.5],
                multi_objective_aggregation="normalize_then_sum",
                beta=0.0,
                save_strategy="no",
                seed=seed,
            ),
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            processing_class=AutoTokenizer.from_pretrained(model_dir),
        )
        seen: dict[str, torch.Tensor] = {}
        calculate = trainer._calculate_rewards

        def recording(*args: Any, **kwargs: Any) -> torch.Tensor:
            seen["per_func"] = calculate(*args, **kwargs)
            return seen["per_func"]

        mp.setattr(trainer, "_calculate_rewards", recording)
        torch.manual_seed(seed)
        out = trainer._generate_and_score_completions([{"prompt": p} for p in prompts for _ in range(G)])
    per_func = seen["per_func"].double()
    assert bool(torch.isnan(per_func[:, 1]).any()) and bool(torch.isfinite(per_func[:, 0]).all())
    ids = torch.arange(len(prompts)).repeat_interleave(G)
    mask = torch.ones(len(ids), 1, dtype=torch.bool)
    combined = torch.nan_to_num(per_func, nan=0.0) @ torch.tensor([1.0, 0.5], dtype=torch.float64)
    ours = gdpo(combined, mask, ids, per_func, (1.0, 0.5))[0][:, 0]
    torch.testing.assert_close(ours, out["advantages"].double(), rtol=1e-5, atol=1e-5)
