"""Sampler/trainer mismatch: the importance weights of each mode, by hand, and their effect on a
training step (the policy gradient scales by the weight; masked sequences carry none)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.lm.test_trainer import make_config
from tether.catalogue.mismatch import importance_stats, sampler_importance_weights
from tether.config import ConfigError
from tether.lm.rollout import HFSampler, RolloutBatch
from tether.lm.trainer import RLTrainer


@pytest.fixture(scope="module", autouse=True)
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TETHER_CACHE", str(tmp_path_factory.mktemp("tether_cache")))
        yield


# trainer log-probs minus sampler log-probs: log 3, log 1/2, 0 | 0, log 4, (padding)
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.0, -7.0]])
MU = torch.tensor([[-1.0 - math.log(3), -2.0 + math.log(2), -0.5], [-0.3, -1.0 - math.log(4), 0.0]])
MASK = torch.tensor([[True, True, True], [True, True, False]])


@pytest.mark.parametrize(
    "mode,lo,hi,expected",
    [
        ("none", 0.0, 2.0, [[1, 1, 1], [1, 1, 0]]),
        ("token_truncate", 0.0, 2.0, [[2, 0.5, 1], [1, 2, 0]]),  # TIS: min(rho, 2)
        ("token_truncate", 0.6, 3.5, [[3, 0.6, 1], [1, 3.5, 0]]),
        ("token_mask", 0.6, 3.5, [[3, 0, 1], [1, 0, 0]]),
        # sequence ratios: 3 * 1/2 * 1 = 1.5 and 1 * 4 = 4
        ("sequence_truncate", 0.0, 2.0, [[1.5, 1.5, 1.5], [2, 2, 0]]),
        ("sequence_mask", 0.0, 2.0, [[1.5, 1.5, 1.5], [0, 0, 0]]),
        ("sequence_mask", 2.0, 5.0, [[0, 0, 0], [4, 4, 0]]),
    ],
)
def test_weights_by_hand(mode: Any, lo: float, hi: float, expected: list[list[float]]) -> None:
    w = sampler_importance_weights(OLD, MU, MASK, mode, lo, hi)
    torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float32), atol=1e-5, rtol=0)


def test_a_missing_sampler_logprob_is_not_corrected() -> None:
    mu = MU.clone()
    mu[0, 0] = float("nan")
    w = sampler_importance_weights(OLD, mu, MASK, "token_truncate", 0.0, 2.0)
    assert float(w[0, 0]) == 1.0 and torch.isfinite(w).all()


def test_stats_by_hand() -> None:
    same = importance_stats(OLD, OLD, MASK)
    assert same == {"rollout/is_ratio_min": 1.0, "rollout/is_ratio_max": 1.0, "rollout/is_ess": 1.0}
    s = importance_stats(OLD, MU, MASK)  # ratios 3, 1/2, 1, 1, 4
    assert s["rollout/is_ratio_min"] == pytest.approx(0.5)
    assert s["rollout/is_ratio_max"] == pytest.approx(4.0)
    assert s["rollout/is_ess"] == pytest.approx(9.5**2 / (5 * (9 + 0.25 + 1 + 1 + 16)))


class ShiftedSampler(HFSampler):
    """The policy's own samples, reported with log-probs off by ``shift``: a sampler whose
    distribution is ``exp(-shift)`` times the trainer's on every sampled token."""

    shift = 0.0

    def generate(self, prompts: list[str], generator: torch.Generator | None = None) -> RolloutBatch:
        b = super().generate(prompts, generator)
        b.sampler_logprobs = torch.where(
            b.completion_mask, b.sampler_logprobs + self.shift, b.sampler_logprobs
        )
        return b


def first_step(tmp_path: Path, name: str, shift: float, *overrides: str) -> dict[str, float]:
    cfg = make_config(tmp_path / name, "train.steps=1", "train.old_logprobs=recompute", *overrides)
    trainer = RLTrainer(cfg)
    sampler = ShiftedSampler(trainer.model, trainer.tokenizer, cfg.sampling)
    sampler.shift = shift
    trainer.sampler = sampler
    records: list[dict[str, float]] = []
    trainer.on_step = lambda step, m: records.append(m)
    trainer.train()
    return records[0]


def test_the_correction_scales_the_policy_gradient_by_the_weight(tmp_path: Path) -> None:
    """First step: the policy equals the reference (the KL term has no gradient), so the gradient
    is the policy-gradient term's alone and scales with the importance weight."""
    base = first_step(tmp_path, "base", 0.0)
    assert base["grad/norm"] > 0 and base["rollout/is_ess"] == pytest.approx(1.0, abs=1e-6)

    quarter = first_step(tmp_path, "quarter", math.log(4), "train.sampler_correction=token_truncate")
    assert quarter["rollout/is_weight_mean"] == pytest.approx(0.25, rel=1e-4)
    assert quarter["rollout/is_ratio_max"] == pytest.approx(0.25, rel=1e-4)
    assert quarter["grad/norm"] == pytest.approx(0.25 * base["grad/norm"], rel=1e-3)

    capped = first_step(tmp_path, "capped", -math.log(4), "train.sampler_correction=token_truncate")
    assert capped["rollout/is_weight_mean"] == pytest.approx(2.0, rel=1e-4)  # rho = 4, capped at C = 2
    assert capped["grad/norm"] == pytest.approx(2.0 * base["grad/norm"], rel=1e-3)

    masked = first_step(
        tmp_path,
        "masked",
        math.log(4),
        "train.sampler_correction=sequence_mask",
        "train.sampler_correction_min=0.5",
    )
    assert masked["rollout/is_zeroed_frac"] == 1.0
    assert masked["grad/norm"] < 1e-6 * base["grad/norm"]  # float-level KL gradient only

    uncorrected = first_step(tmp_path, "uncorrected", math.log(4))  # the mismatch is only reported
    assert uncorrected["grad/norm"] == pytest.approx(base["grad/norm"], rel=1e-6)
    assert uncorrected["rollout/is_ratio_max"] == pytest.approx(0.25, rel=1e-4)
    assert uncorrected["rollout/is_ess"] == pytest.approx(1.0, abs=1e-6)  # a constant ratio loses nothing


def test_bad_correction_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="old_logprobs=reuse"):
        make_config(tmp_path / "a", "train.sampler_correction=token_mask", "train.old_logprobs=reuse")
    with pytest.raises(ConfigError, match="sampler_correction_min"):
        make_config(tmp_path / "b", "train.sampler_correction_min=3", "train.sampler_correction_max=2")
    with pytest.raises(ConfigError, match="sampler_correction"):
        make_config(tmp_path / "c", "train.sampler_correction=tis")
