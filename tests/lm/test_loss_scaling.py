"""Dynamic loss scaling for float16 forward passes (tether.lm.precision.make_grad_scaler): which
runs get it, that it recovers the gradients float16 flushes to zero, how its skipped updates are
told apart from non-finite ones, and that a resumed run continues with the saved loss scale.

CPU autocast runs float16 matmuls here, so everything below runs without a GPU; test_gpu.py runs
a float16 resume on CUDA."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import tether.lm.sft as sft_module
import tether.lm.trainer as trainer_module
from tests.lm.test_model import small_config
from tests.lm.test_sft import Killed, _kill_at_call, read_jsonl, sft_config
from tests.lm.test_sft import tiny_cache as tiny_cache  # module-wide TETHER_CACHE
from tests.lm.test_trainer import make_config, math_only, weights
from tether.errors import TetherError
from tether.lm.model import ModelConfig, load_policy
from tether.lm.precision import (
    autocast_context,
    clipped_step,
    computes_in_float16,
    make_grad_scaler,
)
from tether.lm.sft import run_sft
from tether.lm.trainer import RLTrainer
from tether.runs.checkpoint import load_latest_checkpoint

FLOAT16 = "model.autocast=float16"


def test_only_float16_forward_passes_get_a_scaler() -> None:
    for autocast, wanted in ((False, False), ("bfloat16", False), ("float16", True)):
        model, _ = load_policy(small_config(autocast=autocast))
        assert computes_in_float16(model) is wanted
        scaler = make_grad_scaler(model)
        assert (scaler is not None) is wanted
        if scaler is not None:
            assert scaler.is_enabled() and scaler.get_scale() == 2.0**16
    # no autocast, float16 weights (a frozen LoRA base): the passes compute in float16 too
    fp16 = torch.nn.Linear(3, 3).half()
    assert computes_in_float16(fp16) and not computes_in_float16(torch.nn.Linear(3, 3))


def _grads(
    model: Any, ids: torch.Tensor, factor: float, scaler: Any, autocast: bool
) -> dict[str, torch.Tensor]:
    """Gradients of ``factor`` x the LM loss, through float16 autocast when ``autocast``, scaled
    and unscaled by ``scaler`` when given."""
    model.zero_grad(set_to_none=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    if autocast:
        with autocast_context(model):
            loss = model(input_ids=ids, labels=ids).loss * factor
    else:
        loss = model(input_ids=ids, labels=ids).loss * factor
    (loss if scaler is None else scaler.scale(loss)).backward()
    if scaler is not None:
        scaler.unscale_(opt)
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_the_scaler_recovers_the_gradients_float16_flushes_to_zero() -> None:
    """A loss of size 1e-5 (a policy-gradient loss with small advantages): under float16 autocast
    most gradient entries flush to 0; scaled by the scaler and unscaled, every parameter's gradient
    is the float32 one to float16 precision (relative error below 1%)."""
    torch.manual_seed(0)
    model, tok = load_policy(small_config(autocast="float16"))
    ids = torch.tensor([tok("12+34=46")["input_ids"]] * 4)
    exact = _grads(model, ids, 1e-5, None, autocast=False)
    plain = _grads(model, ids, 1e-5, None, autocast=True)
    scaled = _grads(model, ids, 1e-5, make_grad_scaler(model), autocast=True)
    nonzero = sum(int((g != 0).sum()) for g in exact.values())
    flushed = sum(int(((plain[k] == 0) & (g != 0)).sum()) for k, g in exact.items())
    assert flushed > 0.5 * nonzero, (flushed, nonzero)
    for name, g in exact.items():
        rel = float((scaled[name] - g).norm() / g.norm())
        assert rel < 1e-2, (name, rel)


def _step_case(grad: float, scale: float, scaler: bool) -> tuple[float, str, float, bool]:
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    gs = torch.amp.GradScaler("cpu", init_scale=scale) if scaler else None
    loss = (p * torch.tensor([grad, 1.0])).sum()
    (loss if gs is None else gs.scale(loss)).backward()
    norm, outcome = clipped_step(opt, [p], 10.0, gs)
    moved = not torch.equal(p.detach(), torch.ones(2))
    return norm, outcome, (gs.get_scale() if gs is not None else 0.0), moved


def test_clipped_step_tells_the_scalers_overflows_from_non_finite_gradients() -> None:
    norm, outcome, scale, moved = _step_case(3.0, 1024.0, scaler=True)
    assert outcome == "stepped" and moved and norm == pytest.approx(10.0**0.5)  # unscaled: |(3, 1)|
    assert scale == 1024.0  # no overflow: unchanged until growth_interval clean steps
    _, outcome, scale, moved = _step_case(float("inf"), 1024.0, scaler=True)
    assert (outcome, scale, moved) == ("overflow", 512.0, False)  # skipped, scale halved
    _, outcome, scale, moved = _step_case(float("inf"), 1.0, scaler=True)
    assert (outcome, moved) == ("nonfinite", False)  # at scale 1 scaling is not to blame
    _, outcome, _, moved = _step_case(float("nan"), 0.0, scaler=False)
    assert (outcome, moved) == ("nonfinite", False)
    norm, outcome, _, moved = _step_case(3.0, 0.0, scaler=False)
    assert outcome == "stepped" and moved and norm == pytest.approx(10.0**0.5)


def _patch_scaler(monkeypatch: pytest.MonkeyPatch, module: Any, **kwargs: float) -> list[Any]:
    """Make ``module``'s trainers build their float16 scaler with ``kwargs``; returns the scalers."""
    made: list[Any] = []
    real: Callable[[Any], Any] = module.make_grad_scaler

    def make(model: Any) -> Any:
        if real(model) is None:
            return None
        made.append(torch.amp.GradScaler(next(model.parameters()).device.type, **kwargs))
        return made[-1]

    monkeypatch.setattr(module, "make_grad_scaler", make)
    return made


def test_a_float16_run_skips_the_scalers_overflows_without_a_nan_alarm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loss scale of 2^40 overflows float16 at once: the first update is skipped and the scale
    drops (by 2^-20 here); the run then trains. The skipped update is counted as an overflow, not
    as a non-finite step: no nan alarm, no nan skip, and its weights are untouched."""
    _patch_scaler(monkeypatch, trainer_module, init_scale=2.0**40, backoff_factor=2.0**-20)
    trainer = RLTrainer(make_config(tmp_path / "run", "train.steps=3", FLOAT16))
    assert trainer.grad_scaler is not None
    before = weights(trainer.model)
    trainer.step_idx = 1
    first = trainer.step()
    assert first["train/overflow_skips"] == 1.0 and first["train/loss_scale"] == 2.0**20
    assert first["train/skipped_updates"] == 0.0 and "grad/norm" not in first
    after = weights(trainer.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    trainer.step_idx = 0
    trainer.train()
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["train/overflow_skips"] for r in records] == [1.0, 0.0, 0.0]
    assert records[-1]["train/nan_skips"] == 0.0 and records[-1]["grad/norm"] > 0
    alarms = tmp_path / "run" / "alarms.jsonl"
    kinds = [a["kind"] for a in read_jsonl(alarms)] if alarms.exists() else []
    assert "nan" not in kinds
    moved = weights(trainer.model)
    assert any(not torch.equal(before[k], moved[k]) for k in before)


def test_a_resumed_float16_run_continues_with_the_saved_loss_scale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With growth_interval 1 the scale doubles after every clean update, so a resume that started
    again from the initial scale would log other scales (and, after an overflow, other weights)."""
    made = _patch_scaler(monkeypatch, trainer_module, init_scale=2.0**14, growth_interval=1)
    common = ("run.checkpoint_every=1", FLOAT16)
    a = RLTrainer(make_config(tmp_path / "a", "train.steps=4", *common))
    a.train()
    b = RLTrainer(make_config(tmp_path / "b", "train.steps=2", *common))
    b.train()
    b2 = RLTrainer(make_config(tmp_path / "b", "train.steps=4", *common), resume=True)
    b2.train()
    ma, mb = read_jsonl(tmp_path / "a" / "metrics.jsonl"), read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert math_only(ma) == math_only(mb)
    assert [r["train/loss_scale"] for r in ma] == [2.0**15, 2.0**16, 2.0**17, 2.0**18]
    assert made[-1].state_dict() == made[0].state_dict()
    wa, wb = weights(a.model), weights(b2.model)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_float16_sft_killed_and_resumed_matches_the_unbroken_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SFT in float16 with growth_interval 1: the scale moves every step, an overflow skips one
    update, and a run killed after its checkpoint resumes to the same metrics and weights."""
    made = _patch_scaler(monkeypatch, sft_module, init_scale=2.0**14, growth_interval=1)
    real_batch = sft_module.sft_batch
    cfg = sft_config(steps=5)
    cfg.model.autocast = "float16"
    cfg.run.checkpoint_every = 2
    run_sft(cfg, out=str(tmp_path / "ref"))
    expected = read_jsonl(tmp_path / "ref" / "metrics.jsonl")
    # the scale doubles after each clean update and is halved by a real overflow (at 2^17 here)
    scales = [r["train/loss_scale"] for r in expected]
    assert scales[:3] == [2.0**15, 2.0**16, 2.0**17] and scales[3] == 2.0**16
    assert expected[3]["sft/overflow_skips"] == 1.0 and "grad/norm" not in expected[3]
    _kill_at_call(monkeypatch, 5)  # killed before step 5: checkpoint at 4
    with pytest.raises(Killed):
        run_sft(cfg, out=str(tmp_path / "b"))
    monkeypatch.setattr(sft_module, "sft_batch", real_batch)
    run_sft(cfg, out=str(tmp_path / "b"), resume=True)
    assert read_jsonl(tmp_path / "b" / "metrics.jsonl") == expected
    assert made[-1].state_dict() == made[0].state_dict()
    a = load_policy(ModelConfig(name_or_path=str(tmp_path / "ref" / "model")))[0]
    b = load_policy(ModelConfig(name_or_path=str(tmp_path / "b" / "model")))[0]
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


def test_sft_stops_on_non_finite_gradients_before_they_reach_the_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finite loss whose gradients are NaN (here from step 3 on, by a hook): SFT refuses to step
    and stops with a clear message; the checkpoint of step 2 holds finite weights."""
    real = sft_module.load_policy
    calls = {"n": 0}

    def load(config: Any) -> Any:
        model, tok = real(config)

        def poison(grad: torch.Tensor) -> torch.Tensor:
            calls["n"] += 1
            return grad * float("nan") if calls["n"] > 2 else grad

        next(p for p in model.parameters() if p.requires_grad).register_hook(poison)
        return model, tok

    monkeypatch.setattr(sft_module, "load_policy", load)
    cfg = sft_config(steps=5)
    cfg.run.checkpoint_every = 2
    with pytest.raises(TetherError, match=r"SFT gradients became nan at step 3; lower sft\.lr"):
        run_sft(cfg, out=str(tmp_path / "run"))
    ck = load_latest_checkpoint(tmp_path / "run")
    assert ck.step == 2 and ck.tensors
    assert all(bool(torch.isfinite(t).all()) for t in ck.tensors.values() if t.is_floating_point())
