"""The GPU path of the language-model world: CUDA placement, bf16, the fast sampler, the
shared-prompt passes and a whole RL run with its resume. Skipped where no CUDA device exists
(the CI machine); run on a GPU machine with ``pytest tests/lm/test_gpu.py``.

On the GPU each check compares against the same computation on the CPU in float32, with
tolerances for TF32-free float32 (1e-4) and for bf16 (a few 1e-2, bf16 keeps 8 bits of mantissa).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.lm.test_logprobs import grouped_batch, llama, qwen2, reference_logits
from tests.lm.test_otb import _independent_sum_pi_squared
from tests.lm.test_rollout import PROMPTS, CharTok, gen, tiny_model
from tests.lm.test_trainer import TINY, math_only, read_jsonl
from tests.lm.test_trainer import make_config as trainer_config
from tether.lm.config import LMConfig
from tether.lm.logprobs import completion_logits, completion_logprobs
from tether.lm.model import ModelConfig, load_policy, resolve_device, resolve_dtype
from tether.lm.trainer import RLTrainer

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

CUDA = torch.device("cuda")


@pytest.fixture(scope="module", autouse=True)
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    cache = tmp_path_factory.mktemp("tether_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TETHER_CACHE", str(cache))
        yield cache


def test_auto_device_and_precision_on_cuda() -> None:
    """auto: the GPU and float32 weights; bf16 autocast for models of 50 M parameters and more
    (float32 master weights), none for tiny ones."""
    assert resolve_device("auto").type == "cuda"
    assert resolve_dtype("auto", CUDA) == torch.float32
    tiny = {"tiny_heads": 2, "tiny_max_positions": 32}
    for hidden, layers, inner, autocast in ((64, 2, 128, torch.float32), (1024, 8, 4096, torch.bfloat16)):
        model, tok = load_policy(
            ModelConfig(tiny_hidden=hidden, tiny_layers=layers, tiny_intermediate=inner, **tiny)  # type: ignore[arg-type]
        )
        params = list(model.parameters())
        assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in params)
        ids = torch.tensor([tok("1+2=")["input_ids"]], device=CUDA)
        mask = torch.ones_like(ids, dtype=torch.bool)
        assert completion_logits(model, ids, mask, ids[:, :2], mask[:, :2]).dtype == autocast


@pytest.mark.parametrize("make", [llama, qwen2], ids=["llama", "qwen2"])
def test_shared_prompt_pass_on_cuda_equals_the_cpu_pass(make) -> None:
    cpu_model = make()
    gpu_model = make().to(CUDA)
    batch = grouped_batch()
    m = batch[3]
    ref = reference_logits(cpu_model, *batch).detach()
    for share in (True, False):
        out = completion_logits(gpu_model, *(t.to(CUDA) for t in batch), share_prompts=share).detach().cpu()
        torch.testing.assert_close(out[m], ref[m], atol=1e-4, rtol=1e-4)
    # gradients through the shared pass on the GPU equal the CPU's
    grads = []
    for model, device in ((cpu_model, "cpu"), (gpu_model, "cuda")):
        model.zero_grad()
        b = [t.to(device) for t in batch]
        lp, _ = completion_logprobs(model, *b)
        (lp * b[3]).sum().backward()
        grads.append({n: p.grad.detach().cpu() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("fast", [True, False], ids=["fast-decode", "model-call"])
def test_sampler_on_cuda_draws_the_cpu_samples(fast: bool) -> None:
    """Same weights and seed: the CUDA sampler draws the CPU sampler's tokens (the noise comes
    from the CPU generator) and its log-probs agree; the trainer's log-probs match the sampler's.
    The batch comes back on the CPU (the trainer moves each micro-batch to the model's device)."""
    tok = CharTok()
    cpu = gen(tiny_model(seed=1, scale=20.0), tok, seed=3, fast=fast, max_new_tokens=10, top_p=0.9)
    model = tiny_model(seed=1, scale=20.0).to(CUDA)
    b = gen(model, tok, seed=3, fast=fast, max_new_tokens=10, top_p=0.9)
    assert torch.equal(b.completion_ids, cpu.completion_ids)
    torch.testing.assert_close(b.sampler_logprobs, cpu.sampler_logprobs, atol=1e-4, rtol=0)
    g = b.to(CUDA)
    lp, _ = completion_logprobs(
        model, g.prompt_ids, g.prompt_mask, g.completion_ids, g.completion_mask, top_p=0.9
    )
    assert lp.device.type == "cuda"
    gap = (lp.detach().cpu() - b.sampler_logprobs).abs()[b.completion_mask]
    assert gap.max() < 1e-4


def test_bf16_sampler_and_trainer_log_probs_stay_close() -> None:
    """In bf16 the sampler (decode with a KV cache) and the trainer (one pass) round differently;
    the gap is what the monitor logs as sampler/trainer gap and must stay small."""
    tok = CharTok()
    model = tiny_model(seed=1, scale=5.0).to(CUDA, torch.bfloat16)
    b = gen(model, tok, seed=0, prompts=PROMPTS * 4, max_new_tokens=12)
    g = b.to(CUDA)
    lp, _ = completion_logprobs(model, g.prompt_ids, g.prompt_mask, g.completion_ids, g.completion_mask)
    gap = (lp.detach().float().cpu() - b.sampler_logprobs.float()).abs()[b.completion_mask]
    assert torch.isfinite(gap).all()
    assert gap.mean() < 0.05, f"mean bf16 sampler/trainer gap {gap.mean():.3g}"


GPU = [o for o in TINY if not o.startswith("model.device")] + ["model.device=auto"]


def make_config(out: Path, *overrides: str) -> LMConfig:
    """The trainer tests' tiny model on the coin task (random rewards: every step has a signal)."""
    return trainer_config(out, "model.device=auto", *overrides)


def test_rl_run_on_cuda_trains_and_writes_its_run(tmp_path: Path) -> None:
    trainer = RLTrainer(make_config(tmp_path / "run", "train.steps=3", "run.checkpoint_every=3"))
    assert trainer.device.type == "cuda"
    assert not trainer.share_prompts  # auto: plain passes on a GPU (see train.share_prompts)
    assert next(trainer.model.parameters()).dtype == torch.float32
    assert trainer.ref_model is not None and next(trainer.ref_model.parameters()).device.type == "cuda"
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    summary = trainer.train()
    assert summary is not None
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        for key in ("loss/total", "grad/norm", "policy/entropy", "rollout/logprob_gap_mean", "kl/ref_mean"):
            if key in r:
                assert r[key] == r[key] and abs(r[key]) != float("inf"), key
        # per-step GPU memory peaks: at least the policy and the reference (float32) are held
        weights_gb = 2 * 4 * sum(p.numel() for p in trainer.model.parameters()) / 2**30
        assert weights_gb <= r["perf/gpu_peak_allocated_gb"] <= r["perf/gpu_peak_reserved_gb"]
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the weights never moved"
    assert (tmp_path / "run" / "summary.json").exists()
    json.loads((tmp_path / "run" / "summary.json").read_text())


@pytest.mark.parametrize(
    "precision",
    ["model.autocast=false", "model.autocast=bfloat16", "model.autocast=float16", "model.dtype=bfloat16"],
)
def test_resume_on_cuda_gives_the_same_metrics(tmp_path: Path, precision: str) -> None:
    """A run stopped after 2 steps and resumed matches one that never stopped (deterministic
    CUDA kernels: the run sets them itself when ``run.deterministic`` is on)."""
    common = ["run.checkpoint_every=1", precision, "run.deterministic=true"]
    a = RLTrainer(make_config(tmp_path / "a", "train.steps=4", *common))
    a.train()
    b = RLTrainer(make_config(tmp_path / "b", "train.steps=2", *common))
    b.train()
    del b
    b2 = RLTrainer(make_config(tmp_path / "b", "train.steps=4", *common), resume=True)
    assert b2.step_idx == 2
    b2.train()
    ma: list[dict[str, Any]] = math_only(read_jsonl(tmp_path / "a" / "metrics.jsonl"))
    mb: list[dict[str, Any]] = math_only(read_jsonl(tmp_path / "b" / "metrics.jsonl"))
    assert ma == mb
    wa, wb = a.model.state_dict(), b2.model.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sft_then_train_then_eval_from_the_command_line_on_cuda(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The commands a GPU user runs: sft, train from the SFT model, eval; all on the GPU, the
    SFT learning (in bf16 the demo's SFT did not: see tether.lm.precision)."""
    from tether.cli import main

    arith = ["task.name=arithmetic", "task.params.digits=2", "task.params.operations=+"]
    tiny = [o for o in GPU if not o.startswith("train.")]
    sft = tmp_path / "sft"
    assert main(["sft", "--out", str(sft), "--steps", "60", *tiny, *arith, "sft.batch_size=32"]) == 0
    assert json.loads((sft / "summary.json").read_text())["steps"] == 60
    losses = [r["sft/loss"] for r in read_jsonl(sft / "metrics.jsonl")]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    run = tmp_path / "rl"
    model = f"model.name_or_path={sft / 'model'}"
    assert main(["train", "--out", str(run), "--steps", "2", *GPU, *arith, model]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert {"accuracy", "pass@2", "entropy"} <= set(summary["eval"])
    config = (run / "config.yaml").read_text()
    assert "device: auto" in config
    capsys.readouterr()
    assert main(["eval", str(run), "task.params.digits=2", "--prompts", "4", "--k", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0.0 <= result["accuracy"] <= result["pass@2"] <= 1.0


@pytest.mark.parametrize("precision", ["model.autocast=false", "model.autocast=bfloat16"])
def test_otb_sum_pi_squared_on_cuda_is_the_old_policys(tmp_path: Path, precision: str) -> None:
    """OTB's sum_v pi(v)^2, computed in the old-policy pass on the GPU (temperature and top-k
    applied), equals a float32 per-row forward of the same weights: to float32 rounding without
    autocast; with bf16 autocast, to bf16 rounding on average (bf16 logits can also move a
    token across the top-k boundary, which changes that position's value by up to ~20%: 0.037
    of 0.215 was seen on an H100)."""
    cfg = trainer_config(
        tmp_path / "run",
        "model.device=auto",
        precision,
        "train.steps=2",
        "sampling.temperature=0.8",
        "sampling.top_k=5",
        recipe="otb",
    )
    trainer = RLTrainer(cfg)
    assert trainer.device.type == "cuda" and trainer.needs_sum_pi_squared
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    compute = trainer.method.compute_advantages

    def recording(inputs: dict[str, Any]) -> Any:
        want = _independent_sum_pi_squared(trainer, 0.8, 5)
        seen.append((inputs["sum_pi_squared"].double().cpu(), want, inputs["response_mask"].cpu()))
        return compute(inputs)

    trainer.method.compute_advantages = recording  # type: ignore[method-assign]
    trainer.train()
    assert len(seen) == 2
    for got, want, mask in seen:
        diff = (got - want)[mask.bool()].abs()
        if precision == "model.autocast=false":
            assert diff.max() < 1e-5, diff.max()
        else:
            assert diff.mean() < 5e-3 and diff.max() < 0.1, (diff.mean(), diff.max())
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]["train/nan_skips"] == 0.0
