"""The RL trainer on the tiny model: run files, resume exactness, NaN and verifier isolation,
dynamic sampling, micro-batching, method overrides and TensorBoard.

Everything runs on a very small model (hidden 32, one layer) with one torch thread; the tiny
model is built once per module under a temporary ``TETHER_CACHE``. The test tasks registered
here (``test_coin``) give controllable rewards so that the updates carry a signal.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tether.catalogue import get
from tether.config import ConfigError, apply_overrides, from_dict
from tether.errors import TetherError
from tether.lm.config import LMConfig
from tether.lm.plugins import LoopPlugin, Rollout
from tether.lm.tasks.base import Prompt, Score, Split, Task, register_task
from tether.lm.trainer import TIMING_PREFIXES, NonFiniteError, RLTrainer
from tether.runs import latest_checkpoint, load_checkpoint

TINY = [
    "model.tiny_hidden=32",
    "model.tiny_layers=1",
    "model.tiny_heads=2",
    "model.tiny_intermediate=64",
    "model.device=cpu",
    "sampling.max_new_tokens=6",
    "train.prompts_per_step=4",
    "train.group_size=4",
    "run.progress=false",
    "run.threads=1",
    "eval.prompts=4",
    "eval.k=2",
]
ARITH = ["task.name=arithmetic", "task.params.digits=2", "task.params.operations=+"]
COIN = ["task.name=test_coin", "train.lr=0.01"]


@register_task("test_coin")
class CoinTask(Task):
    """Arithmetic-looking prompts; the reward is a deterministic coin flip of the completion.

    ``p``: probability of reward 1 (0: never, 1: always); ``raise_every``: the verifier raises on
    every prompt whose index is a multiple of it (0: never); ``raise_p``: it raises on that share
    of the completions, each alone (another hash); ``salt`` changes the coin.
    """

    def __init__(self, p: float = 0.5, raise_every: int = 0, salt: int = 0, raise_p: float = 0.0) -> None:
        self.p = p
        self.raise_every = raise_every
        self.salt = salt
        self.raise_p = raise_p

    def all_prompts(self, split: Split) -> list[Prompt]:
        start = 0 if split == "train" else 1000
        return [
            Prompt(
                id=f"coin/{split}/{i}", text=f"{i % 97}+{i % 13}=", answer=str(i % 97 + i % 13), meta={"i": i}
            )
            for i in range(start, start + (32 if split == "train" else 8))
        ]

    def score(self, prompt: Prompt, completion: str) -> Score:
        if self.raise_every and prompt.meta["i"] % self.raise_every == 0:
            raise RuntimeError(f"verifier failed on {prompt.id}")
        if zlib.crc32(f"err|{prompt.id}|{completion}".encode()) % 1000 / 1000 < self.raise_p:
            raise RuntimeError(f"verifier failed on a completion of {prompt.id}")
        h = zlib.crc32(f"{self.salt}|{prompt.id}|{completion}".encode()) % 1000 / 1000
        hit = h < self.p
        return Score(reward=float(hit), correct=hit)

    def reference(self, prompt: Prompt) -> str:
        return prompt.answer

    def extract(self, completion: str) -> str | None:
        return completion.strip() or None


@pytest.fixture(scope="module", autouse=True)
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A module-wide TETHER_CACHE (the tiny model is built once) and one torch thread."""
    cache = tmp_path_factory.mktemp("tether_cache")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TETHER_CACHE", str(cache))
        yield cache
    torch.set_num_threads(threads)


def make_config(out: Path, *overrides: str, recipe: str = "grpo") -> LMConfig:
    data = apply_overrides({"recipe": recipe}, [*TINY, *COIN, f"run.out={out}", *overrides])
    return from_dict(LMConfig, data)


def record_adamw_lrs(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The learning rate of every AdamW step from now on (appended as the steps run)."""
    used: list[float] = []
    step = torch.optim.AdamW.step

    def recording(self: torch.optim.AdamW, *args: object, **kwargs: object) -> object:
        used.append(float(self.param_groups[0]["lr"]))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    return used


def record_grad_passes(trainer: RLTrainer) -> list[list[int]]:
    """The sorted rows of every training (grad) forward pass of ``trainer`` from now on."""
    passes: list[list[int]] = []
    original = trainer._logprobs

    def spy(model: torch.nn.Module, batch: Any, rows: Any, grad: bool, **kw: Any) -> Any:
        if grad:
            passes.append(sorted(rows.tolist()))
        return original(model, batch, rows, grad, **kw)

    trainer._logprobs = spy  # type: ignore[method-assign]
    return passes


def record_advantages(trainer: RLTrainer) -> list[tuple[dict[str, Any], torch.Tensor]]:
    """(inputs, advantages) of every advantage computation of ``trainer`` from now on."""
    calls: list[tuple[dict[str, Any], torch.Tensor]] = []
    compute = trainer.method.compute_advantages

    def recording(inputs: dict[str, Any]) -> Any:
        out = compute(inputs)
        calls.append((inputs, out[0]))
        return out

    trainer.method.compute_advantages = recording  # type: ignore[method-assign]
    return calls


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def math_only(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if not k.startswith(TIMING_PREFIXES)} for r in records]


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------- run directory
def test_run_directory_holds_config_metrics_samples_checkpoints_summary(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = make_config(out, "train.steps=3", "run.checkpoint_every=2", "run.log_samples=3")
    trainer = RLTrainer(cfg)
    summary = trainer.train()

    config = (out / "config.yaml").read_text()
    assert "recipe_resolved" in config and "test_coin" in config
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [1, 2, 3]
    for key in ("reward/mean", "policy/entropy", "grad/norm", "train/lr", "train/nan_skips"):
        assert all(key in r for r in metrics), key

    samples = read_jsonl(out / "samples.jsonl")
    assert [s["step"] for s in samples] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert all({"prompt", "completion", "reward"} <= set(s) for s in samples)
    assert all(isinstance(s["completion"], str) and s["reward"] in (0.0, 1.0) for s in samples)

    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert ckpts == ["step_000000002", "step_000000003"]
    for name in ckpts:
        assert (out / "checkpoints" / name / "tensors.safetensors").is_file()
        assert json.loads((out / "checkpoints" / name / "state.json").read_text())["step"] == int(name[5:])

    saved = json.loads((out / "summary.json").read_text())
    assert saved["steps"] == 3 == summary["steps"]
    assert saved["final"]["reward/mean"] == metrics[-1]["reward/mean"]
    assert not any(k.startswith(TIMING_PREFIXES) for k in saved["final"])
    assert (out / "model" / "config.json").is_file()


def test_alarms_file_written_when_alarms_fire(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # p=0: every group has identical rewards, so all_zero_variance fires on every step.
    trainer = RLTrainer(make_config(out, "train.steps=2", "task.params.p=0.0"))
    trainer.train()
    alarms = read_jsonl(out / "alarms.jsonl")
    assert [a["step"] for a in alarms if a["kind"] == "all_zero_variance"] == [1, 2]
    assert [r["alarms"] for r in read_jsonl(out / "metrics.jsonl")] == [
        sum(a["step"] == s for a in alarms) for s in (1, 2)
    ]


@register_task("test_constant")
class ConstantTask(CoinTask):
    """Every completion scores ``reward`` (0.9 by default: not exact in binary floating point)."""

    def __init__(self, reward: float = 0.9, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reward = reward

    def score(self, prompt: Prompt, completion: str) -> Score:
        return Score(reward=self.reward, correct=True)


def test_flat_groups_of_inexact_rewards_are_zero_variance_with_zero_advantages(tmp_path: Path) -> None:
    """Eight rewards of 0.9 in float32: their std is ~6e-8, not 0, and their float32 group mean is off
    by 3.6e-8, so GRPO gave every sample (r - mean) / (std + 1e-6) = -0.056. A flat group has no
    spread (max == min) and advantages of exactly 0."""
    out = tmp_path / "run"
    trainer = RLTrainer(
        make_config(
            out, "train.steps=1", "task.name=test_constant", "train.group_size=8", "train.prompts_per_step=2"
        )
    )
    capture = _Capture()
    trainer.plugins.append(capture)
    trainer.train()
    record = read_jsonl(out / "metrics.jsonl")[0]
    assert record["reward/zero_std_frac"] == 1.0
    assert record["adv/mean"] == record["adv/max"] == record["adv/min"] == 0.0
    ((_, advantages),) = capture.seen
    assert torch.all(advantages == 0)
    assert "all_zero_variance" in [a["kind"] for a in read_jsonl(out / "alarms.jsonl")]


def test_one_sample_per_prompt_is_no_zero_variance_group(tmp_path: Path) -> None:
    """SPO samples one completion per prompt: no group can have a spread, so the zero-variance
    fraction is left out (and all_zero_variance never fires), not 1 on every step."""
    out = tmp_path / "run"
    RLTrainer(make_config(out, "train.steps=2", recipe="spo")).train()
    records = read_jsonl(out / "metrics.jsonl")
    assert all("reward/zero_std_frac" not in r for r in records)
    assert [r["reward/std"] > 0 for r in records] == [True, True]  # the rewards did differ
    assert "all_zero_variance" not in [a["kind"] for a in read_jsonl(out / "alarms.jsonl")]


# ------------------------------------------------------------------------------- resume exactness
RESUME = ("run.checkpoint_every=2", "train.dynamic_sampling=true", "train.epochs=2", "train.minibatches=2")


def test_resume_gives_the_same_metrics_and_weights(tmp_path: Path) -> None:
    a = RLTrainer(make_config(tmp_path / "a", "train.steps=6", *RESUME, recipe="siren"))
    a.train()

    b1 = RLTrainer(make_config(tmp_path / "b", "train.steps=3", *RESUME, recipe="siren"))
    b1.train()
    del b1
    b2 = RLTrainer(make_config(tmp_path / "b", "train.steps=6", *RESUME, recipe="siren"), resume=True)
    assert b2.step_idx == 3
    b2.train()

    ma = read_jsonl(tmp_path / "a" / "metrics.jsonl")
    mb = read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in mb] == [1, 2, 3, 4, 5, 6]
    assert math_only(ma) == math_only(mb)
    assert ma[-1]["grad/norm"] > 0  # the runs did learn something
    assert read_jsonl(tmp_path / "a" / "samples.jsonl") == read_jsonl(tmp_path / "b" / "samples.jsonl")
    assert a.method.state_dict() == b2.method.state_dict()
    wa, wb = weights(a.model), weights(b2.model)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_is_exact_at_the_demo_models_width(tmp_path: Path) -> None:
    """The tiny test model is too small for the CPU's parallel kernels to split its tensors;
    at the demo's width (192) they do, and a race in the shared-prompt backward pass (advanced
    indexing) made two runs of one config differ from step 2. Two threads, shuffled mini-batches."""
    wide = [
        "model.tiny_hidden=192",
        "model.tiny_intermediate=256",
        "model.tiny_layers=2",
        "model.tiny_heads=4",
        *ARITH,
        "train.prompts_per_step=8",
        "train.group_size=8",
        "train.minibatches=2",
        "train.share_prompts=true",
        "run.threads=2",
        "run.checkpoint_every=2",
    ]
    threads = torch.get_num_threads()
    try:
        a = RLTrainer(make_config(tmp_path / "a", "train.steps=4", *wide))
        a.train()
        RLTrainer(make_config(tmp_path / "b", "train.steps=2", *wide)).train()
        b = RLTrainer(make_config(tmp_path / "b", "train.steps=4", *wide), resume=True)
        b.train()
    finally:
        torch.set_num_threads(threads)
    ma = read_jsonl(tmp_path / "a" / "metrics.jsonl")
    assert math_only(ma) == math_only(read_jsonl(tmp_path / "b" / "metrics.jsonl"))
    assert ma[-1]["policy/kl_ref"] != ma[0]["policy/kl_ref"]  # the policy moved
    wa, wb = weights(a.model), weights(b.model)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_without_checkpoint_restarts_from_scratch(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 9.0}\n{"step": 2, "rew')
    trainer = RLTrainer(make_config(out, "train.steps=2"), resume=True)
    assert trainer.step_idx == 0
    trainer.train()
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    assert read_jsonl(out / "metrics.jsonl")[0]["reward/mean"] != 9.0


def test_existing_run_needs_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    RLTrainer(make_config(out, "train.steps=1")).train()
    with pytest.raises(TetherError, match="--resume"):
        RLTrainer(make_config(out, "train.steps=2"))


# ------------------------------------------------------------------------------- NaN handling
def _nan_on(trainer: RLTrainer, calls: set[int]) -> list[int]:
    """Make the method's loss NaN on the given (1-based) loss calls; returns the call counter."""
    original = trainer.method.loss
    counter = [0]

    def loss(inputs: Any, aggregation: Any = None) -> Any:
        counter[0] += 1
        value, metrics = original(inputs, aggregation)
        if counter[0] in calls:
            value = value * float("nan")
        return value, metrics

    trainer.method.loss = loss  # type: ignore[method-assign]
    return counter


@pytest.mark.parametrize(
    "settings",
    [
        ("sampling.top_p=0.9",),
        ("sampling.top_k=20",),
        ("sampling.top_p=0.9", "train.minibatches=2", "train.epochs=2"),
    ],
    ids=["top_p", "top_k", "top_p-epochs"],
)
def test_truncated_sampling_trains_without_nan(tmp_path: Path, settings: tuple[str, ...]) -> None:
    """With top-k / top-p, the reference (and a policy moved by earlier mini-batches) may truncate
    a token that was sampled: its log-prob stays finite, so the KL and the ratio stay finite and no
    step is skipped (each run once stopped with NonFiniteError within a few steps)."""
    cfg = make_config(tmp_path / "run", "train.steps=4", "sampling.max_new_tokens=16", *settings)
    trainer = RLTrainer(cfg)
    trainer.train()
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["train/nan_skips"] for r in records] == [0.0] * 4
    assert all(math.isfinite(r["policy/kl_ref"]) for r in records)
    assert all(math.isfinite(r["rollout/logprob_gap"]) for r in records)


def test_nan_step_is_skipped_counted_and_alarmed(tmp_path: Path) -> None:
    out = tmp_path / "run"
    trainer = RLTrainer(make_config(out, "train.steps=3", "train.max_nan_skips=2"))
    _nan_on(trainer, {2})  # one loss call per step: step 2 is NaN
    before: list[dict[str, torch.Tensor]] = []
    after: list[dict[str, torch.Tensor]] = []
    step = trainer.step

    def spy() -> dict[str, float]:
        before.append(weights(trainer.model))
        m = step()
        after.append(weights(trainer.model))
        return m

    trainer.step = spy  # type: ignore[method-assign]
    trainer.train()
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])  # step 2 never reached them
    assert any(not torch.equal(before[0][k], after[0][k]) for k in before[0])  # step 1 did
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [r["train/nan_skips"] for r in metrics] == [0.0, 1.0, 1.0]
    alarms = read_jsonl(out / "alarms.jsonl")
    assert any(a["kind"] == "nan" and a["step"] == 2 for a in alarms)
    assert trainer.nan_skips == 0  # step 3 was finite again
    # A skipped step measured no entropy: NaN, not 0, which would read as a collapse.
    assert metrics[1]["policy/entropy"] == "nan"
    assert not any(a["kind"] == "entropy_collapse" for a in alarms)


def test_a_skipped_update_among_good_ones_is_counted_and_alarmed(tmp_path: Path) -> None:
    """Two mini-batches: the first update of step 1 is NaN and skipped, the second goes through, so
    every metric of the step is finite; the skip is still counted for the step and alarmed."""
    out = tmp_path / "run"
    trainer = RLTrainer(make_config(out, "train.steps=2", "train.minibatches=2", "train.max_nan_skips=3"))
    _nan_on(trainer, {1})
    trainer.train()
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["train/skipped_updates"] for r in records] == [1.0, 0.0]
    assert math.isfinite(records[0]["grad/norm"])  # the other update of step 1 was measured
    nan = [a for a in read_jsonl(out / "alarms.jsonl") if a["kind"] == "nan"]
    assert [a["step"] for a in nan] == [1] and "1 optimizer update(s) skipped" in nan[0]["message"]
    assert records[0]["alarms"] >= 1


def test_nan_from_the_first_step_keeps_the_entropy_baseline_and_says_no_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    trainer = RLTrainer(make_config(out, "train.steps=4", "train.max_nan_skips=2", "run.checkpoint_every=10"))
    _nan_on(trainer, {1, 2})
    with pytest.raises(NonFiniteError, match="No checkpoint had been written yet") as info:
        trainer.train()
    assert "resume with --resume" not in str(info.value)
    assert latest_checkpoint(out) is None
    # the advice starts the run again, with its settings, in a new directory (checked, not run)
    import re
    import shlex

    from tether.cli import main

    found = re.search(r"tether (train --config \S+ train\.lr=\S+)", str(info.value))
    assert found is not None
    restart = (out / "restart.yaml").read_text()
    assert "name_or_path: tiny" in restart and f"out: {tmp_path / 'run-again'}" in restart
    assert main([*shlex.split(found.group(1)), "--dry-run"]) == 0
    assert trainer.monitor.initial_entropy is None  # not 0 from a skipped step


def test_repeated_nan_stops_with_intact_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    trainer = RLTrainer(make_config(out, "train.steps=6", "train.max_nan_skips=2", "run.checkpoint_every=2"))
    _nan_on(trainer, {3, 4, 5, 6})
    with pytest.raises(NonFiniteError, match=r"last good checkpoint .* is intact"):
        trainer.train()
    path = latest_checkpoint(out)
    assert path is not None and path.name == "step_000000002"
    ck = load_checkpoint(path)
    assert ck.step == 2
    # the stopping step (4) is logged with its alarms, and never checkpointed
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]
    alarms = read_jsonl(out / "alarms.jsonl")
    assert [a["kind"] for a in alarms if a["step"] == 4] == ["nan", "stopped"]
    assert alarms[-1]["value"] == 2.0  # the consecutive non-finite steps, like every alarm's value
    resumed = RLTrainer(make_config(out, "train.steps=3", "train.max_nan_skips=2"), resume=True)
    assert resumed.step_idx == 2
    resumed.train()
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]


def test_repeated_nan_advice_is_a_command_that_works(tmp_path: Path) -> None:
    """A resume refuses a changed train.lr, so the advice is a new run from the last good
    checkpoint's weights: the command in the message runs, with the lower rate, from exactly them."""
    import re
    import shlex

    from safetensors.torch import load_file

    from tether.cli import main

    out = tmp_path / "run"
    settings = ("train.steps=6", "train.max_nan_skips=2", "run.checkpoint_every=2", "run.tensorboard=true")
    trainer = RLTrainer(make_config(out, *settings))
    _nan_on(trainer, {3, 4, 5, 6})
    with pytest.raises(NonFiniteError) as info:
        trainer.train()
    assert trainer.tb is not None and trainer.tb.all_writers is None  # the TensorBoard writer is closed
    message = str(info.value)
    assert "--resume" not in message.split("so start")[1]  # no advice to resume with other settings
    found = re.search(r"tether (train --config \S+ train\.lr=\S+)", message)
    assert found is not None, message
    args = shlex.split(found.group(1))
    assert args[-1] == "train.lr=0.001"  # a tenth of the run's 0.01
    kept = load_checkpoint(latest_checkpoint(out))  # type: ignore[arg-type]
    assert kept.step == 2
    saved = load_file(str(out / "model" / "model.safetensors"))
    checkpoint = {k[6:]: v for k, v in kept.tensors.items() if k.startswith("model.")}
    assert saved.keys() <= checkpoint.keys()
    assert all(torch.equal(saved[k], checkpoint[k]) for k in saved)  # model/ holds those weights

    assert main(args) == 0
    new = tmp_path / "run-from-step2"
    records = read_jsonl(new / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # the steps the stopped run had left
    assert [r["train/lr"] for r in records] == [0.001] * 4
    config = (new / "config.yaml").read_text()
    assert str((out / "model").resolve()) in config
    # and a new run with those settings starts from exactly the checkpoint's weights
    from tether.cli import build_parser
    from tether.lm.cli import build_lm_config

    cfg = build_lm_config(build_parser().parse_args([*args, "--out", str(tmp_path / "check")]))
    fresh = weights(RLTrainer(cfg).model)
    assert all(torch.equal(fresh[k], checkpoint[k]) for k in checkpoint)


def test_a_resume_reports_non_finite_final_metrics_as_floats(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its last step NaN (skipped), a finished run is resumed with nothing left to train: it reports
    the logged final metrics, NaN as a float as the unbroken run did (not "nan"), and the summary
    table prints them."""
    from tether.lm.report import print_run_summary

    out = tmp_path / "run"
    settings = ("train.steps=3", "train.max_nan_skips=2", "run.checkpoint_every=1")
    trainer = RLTrainer(make_config(out, *settings))
    _nan_on(trainer, {3})
    unbroken = trainer.train()
    resumed = RLTrainer(make_config(out, *settings), resume=True).train()
    for summary in (unbroken, resumed):
        assert isinstance(summary["final"]["policy/entropy"], float)
        assert math.isnan(summary["final"]["policy/entropy"]) and math.isnan(summary["final"]["grad/norm"])
    assert json.dumps(unbroken["final"], sort_keys=True) == json.dumps(resumed["final"], sort_keys=True)
    print_run_summary(resumed, out)
    assert "nan" in capsys.readouterr().out
    # a summary of an older tether, whose log read back "nan" as a string, prints too
    print_run_summary({"final": {"policy/entropy": "nan", "grad/norm": 0.5}}, out)
    assert "nan" in capsys.readouterr().out


def test_nan_skip_leaves_stateful_method_alone(tmp_path: Path) -> None:
    trainer = RLTrainer(make_config(tmp_path / "run", "train.steps=2", recipe="r2vpo"))
    _nan_on(trainer, set(range(1, 100)))
    state = trainer.method.state_dict()
    metrics = trainer.step()
    assert math.isnan(metrics["grad/norm"])
    assert trainer.method.state_dict() == state


# ------------------------------------------------------------------------------- verifier errors
class _Capture(LoopPlugin):
    """Records each step's rollout and final advantages."""

    def __init__(self) -> None:
        self.seen: list[tuple[Rollout, torch.Tensor]] = []

    def after_advantages(self, trainer: RLTrainer, rollout: Rollout, inputs: dict[str, Any]) -> None:
        self.seen.append((rollout, inputs["advantages"].clone()))


def test_raising_verifier_is_isolated(tmp_path: Path) -> None:
    out = tmp_path / "run"
    trainer = RLTrainer(make_config(out, "train.steps=2", "task.params.raise_every=3"))
    capture = _Capture()
    trainer.plugins.append(capture)
    summary = trainer.train()
    metrics = read_jsonl(out / "metrics.jsonl")
    total = 0
    for (ro, adv), record in zip(capture.seen, metrics):
        errors = torch.tensor([s.error is not None for s in ro.scores])
        expected = [p.meta["i"] % 3 == 0 for p in ro.prompts]
        assert errors.tolist() == expected
        assert record["reward/verifier_errors"] == float(errors.sum())
        assert torch.all(adv[errors] == 0)
        total += int(errors.sum())
    assert total > 0
    assert summary["verifier_errors"] == total


@pytest.mark.parametrize("recipe", ["grpo", "r2vpo"])
def test_every_verification_failing_raises_the_verifier_alarm_and_no_false_nan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], recipe: str
) -> None:
    """Every verifier call raises, so every row is masked: the step measured no entropy, ratio or loss.
    Those metrics are left out (not NaN, which raised a false "nan" alarm, nor a ratio mean of 0 beside a
    min and max of 1), and the verifier_errors alarm fires each step, naming the task and quoting the
    error, on the console with its step. A stateful method (r2vpo) keeps its state: nothing measured."""
    out = tmp_path / "run"
    trainer = RLTrainer(make_config(out, "train.steps=2", "task.params.raise_every=1", recipe=recipe))
    state = trainer.method.state_dict()
    summary = trainer.train()
    records = read_jsonl(out / "metrics.jsonl")
    for r in records:
        assert not [k for k, v in r.items() if v in ("nan", "inf", "-inf")], r
        assert r["reward/verifier_error_rate"] == 1.0 and r["reward/verifier_errors"] == 16.0
        for key in (
            "policy/entropy",
            "policy/ratio_mean",
            "policy/ratio_min",
            "policy/ratio_max",
            "policy/loss",
        ):
            assert key not in r, key
        assert "reward/mean" not in r and "reward/zero_std_frac" not in r  # no sample was scored
        assert r["reward/accuracy"] == 0.0 and r["train/skipped_updates"] == 0.0
    alarms = read_jsonl(out / "alarms.jsonl")
    assert [(a["step"], a["kind"]) for a in alarms] == [(1, "verifier_errors"), (2, "verifier_errors")]
    assert (
        "task 'test_coin'" in alarms[0]["message"]
        and "RuntimeError: verifier failed on coin/" in alarms[0]["message"]
    )
    assert summary["alarms"] == {"verifier_errors": 2} and summary["verifier_errors"] == 32
    assert trainer.method.state_dict() == state
    err = capsys.readouterr().err
    assert "alarm verifier_errors at step 1:" in err and "alarm verifier_errors at step 2:" in err


def test_end_of_run_table_shows_verifier_errors_and_nan_skips_when_not_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tether.lm.report import print_run_summary

    print_run_summary({"final": {"reward/mean": 0.5}, "verifier_errors": 32, "nan_skips": 3}, tmp_path)
    shown = capsys.readouterr().out
    assert "verifier_errors" in shown and "32" in shown and "nan_skips" in shown
    print_run_summary({"final": {"reward/mean": 0.5}, "verifier_errors": 0, "nan_skips": 0}, tmp_path)
    shown = capsys.readouterr().out
    assert "verifier_errors" not in shown and "nan_skips" not in shown
    # held-out results kept from an earlier step say so
    print_run_summary({"steps": 3, "eval": {"accuracy": 0.5}, "eval_step": 2}, tmp_path)
    assert "eval of step" in (shown := capsys.readouterr().out) and "not the final step 3" in shown
    print_run_summary({"steps": 3, "eval": {"accuracy": 0.5}, "eval_step": 3}, tmp_path)
    assert "eval of step" not in capsys.readouterr().out


def test_verifier_error_moves_no_other_samples_advantage(tmp_path: Path) -> None:
    """A failed verification is left out of the group statistics, not counted as a reward of 0:
    the scored samples get exactly the advantages GRPO gives them on their own."""
    trainer = RLTrainer(make_config(tmp_path / "run", "train.steps=2", "task.params.raise_p=0.3"))
    capture = _Capture()
    trainer.plugins.append(capture)
    trainer.train()
    grpo = get("advantage", "grpo").fn
    checked = 0
    for ro, adv in capture.seen:
        scored = torch.tensor([s.error is None for s in ro.scores])
        assert not bool(scored.all())
        rewards = torch.tensor([s.reward for s in ro.scores], dtype=torch.float32)[scored]
        mask = ro.batch.completion_mask[scored]
        expected, _ = grpo(rewards=rewards, group_ids=ro.group_ids[scored], response_mask=mask, eps=1e-6)
        torch.testing.assert_close(adv[scored], expected.float(), rtol=1e-6, atol=1e-6)
        # and counting the error as 0 would have given other values in some group with an error
        zeroed = torch.tensor([s.reward for s in ro.scores], dtype=torch.float32)
        wrong, _ = grpo(
            rewards=zeroed, group_ids=ro.group_ids, response_mask=ro.batch.completion_mask, eps=1e-6
        )
        checked += int(not torch.allclose(wrong[scored].float(), expected.float()))
    assert checked > 0


# ------------------------------------------------------------------------------- dynamic sampling
def test_dynamic_sampling_keeps_only_groups_with_signal(tmp_path: Path) -> None:
    trainer = RLTrainer(
        make_config(
            tmp_path / "run", "train.dynamic_sampling=true", "train.max_refill_rounds=8", "task.params.p=0.3"
        )
    )
    dropped = 0
    for _ in range(4):
        ro = trainer.rollout()
        rewards = torch.tensor([s.reward for s in ro.scores])
        gids = ro.group_ids.unique()
        assert len(gids) == 4 and len(ro) == 16
        for g in gids:
            assert float(rewards[ro.group_ids == g].std()) > 0
        dropped += ro.dropped_groups
    assert dropped > 0  # p=0.3 in groups of 4: some groups had no signal and were replaced


def test_dynamic_sampling_without_any_signal_keeps_a_batch(tmp_path: Path) -> None:
    trainer = RLTrainer(
        make_config(
            tmp_path / "run", "train.dynamic_sampling=true", "train.max_refill_rounds=2", "task.params.p=0.0"
        )
    )
    ro = trainer.rollout()
    assert len(ro) == 16 and ro.rounds == 3
    assert all(s.reward == 0.0 for s in ro.scores)


def test_dynamic_sampling_ignores_failed_verifications(tmp_path: Path) -> None:
    """Every scored sample is correct: the groups carry no signal even when a verifier error sits
    among them (an error is not a reward of 0), so all of them are dropped."""
    trainer = RLTrainer(
        make_config(
            tmp_path / "run",
            "train.dynamic_sampling=true",
            "train.max_refill_rounds=0",
            "task.params.p=1.0",
            "task.params.raise_p=0.3",
        )
    )
    ro = trainer.rollout()
    errors = torch.tensor([s.error is not None for s in ro.scores])
    mixed = [g for g in ro.group_ids.unique() if 0 < int(errors[ro.group_ids == g].sum()) < 4]
    assert mixed  # groups with both scored and failed samples occur
    assert ro.dropped_groups == 4


def test_dapo_recipe_turns_dynamic_sampling_on(tmp_path: Path) -> None:
    from tether.cli import build_parser
    from tether.lm.cli import build_lm_config

    args = build_parser().parse_args(["train", "--recipe", "dapo", *TINY, *COIN, f"run.out={tmp_path}/r"])
    assert build_lm_config(args).train.dynamic_sampling is True


# ------------------------------------------------------------------------------- micro-batches
def test_micro_batch_size_does_not_change_the_update(tmp_path: Path) -> None:
    results = []
    for i, micro in enumerate((0, 3)):
        trainer = RLTrainer(
            make_config(tmp_path / f"r{i}", "train.steps=1", f"train.micro_batch_size={micro}")
        )
        metrics = trainer.step()
        assert metrics["grad/norm"] > 0
        results.append((weights(trainer.model), metrics))
    (w0, m0), (w3, m3) = results
    # Float rounding only: micro-batches also change which rows share a prompt pass, and Adam's
    # first step divides by |g|, so an entry whose gradient is near 0 can move by a small fraction of lr.
    for k in w0:
        torch.testing.assert_close(w0[k], w3[k], rtol=0, atol=5e-6)
    # Metrics the monitor and the method state read do not depend on micro-batching either.
    # (Loss values that entries aggregate with the mini-batch's token counts are partial sums per
    # micro-batch, so they are left out here: see the report on metric reduction.)
    for key in ("policy/entropy", "grad/norm", "reward/mean", "policy/clip_frac", "policy/ratio_max"):
        assert m0[key] == pytest.approx(m3[key], abs=1e-6), key


def test_logged_ratio_extremes_and_clip_fraction_do_not_depend_on_micro_batch_size(tmp_path: Path) -> None:
    """Three epochs at a large rate move the policy off the sampler's: the ratio's extremes are the
    largest / smallest over the micro-batches (a row-weighted average of the micro-batches' maxima
    logged 4.18 where the mini-batch's maximum was 5.30), the other metrics token-weighted means."""
    results = []
    for micro in (0, 4):
        trainer = RLTrainer(
            make_config(
                tmp_path / f"r{micro}",
                "train.epochs=3",
                f"train.micro_batch_size={micro}",
                "train.lr=0.05",
            )
        )
        seen: list[float] = []
        original = trainer.method.loss

        def loss(
            inputs: Any, aggregation: Any = None, original: Any = original, seen: list[float] = seen
        ) -> Any:
            value, metrics = original(inputs, aggregation)
            seen.append(float(metrics["policy/ratio_max"]))
            return value, metrics

        trainer.method.loss = loss  # type: ignore[method-assign]
        trainer.step()
        seen.clear()
        metrics = trainer.step()
        assert metrics["policy/ratio_max"] == max(seen)  # the largest any micro-batch saw
        results.append(metrics)
    m0, m4 = results
    assert m0["policy/ratio_max"] > 2.0  # the policy did move away from the old one
    for key in ("policy/ratio_max", "policy/ratio_min", "policy/ratio_mean", "policy/approx_kl"):
        assert m4[key] == pytest.approx(m0[key], rel=1e-4), key
    for key in ("policy/clip_frac", "policy/clip_frac_low", "policy/clip_frac_high"):
        assert m4[key] == pytest.approx(m0[key], abs=1e-5), key


def test_share_prompts_setting_picks_the_pass_and_not_the_update(tmp_path: Path) -> None:
    """auto shares on a CPU model; true and false give the same step up to float rounding."""
    assert RLTrainer(make_config(tmp_path / "auto", "train.steps=1")).share_prompts
    results = []
    for mode in ("true", "false"):
        trainer = RLTrainer(make_config(tmp_path / mode, "train.steps=1", f"train.share_prompts={mode}"))
        assert trainer.share_prompts == (mode == "true")
        metrics = trainer.step()
        results.append((weights(trainer.model), metrics))
    (w_on, m_on), (w_off, m_off) = results
    for k in w_on:
        torch.testing.assert_close(w_on[k], w_off[k], rtol=0, atol=5e-6)
    assert m_on["grad/norm"] == pytest.approx(m_off["grad/norm"], rel=1e-5)
    with pytest.raises(ConfigError, match="share_prompts"):
        make_config(tmp_path / "bad", "train.share_prompts=sometimes")


# ------------------------------------------------------------------------------- method overrides
def test_method_overrides_reach_component_params(tmp_path: Path) -> None:
    trainer = RLTrainer(
        make_config(tmp_path / "run", "method.policy_loss.eps_high=0.3", "method.kl_k3.coef=0")
    )
    assert trainer.method.policy_loss.params["eps_high"] == 0.3
    assert trainer.method.policy_loss.params["eps_low"] == 0.2  # the recipe's value stays
    (kl,) = [c for c in trainer.method.regularizers if c.name == "kl_k3"]
    assert kl.params["coef"] == 0.0
    assert not (tmp_path / "run" / "config.yaml").read_text().count("eps_high: 0.2")


def test_unknown_component_or_parameter_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TetherError, match=r"no such component.*policy_loss.*kl_k3"):
        RLTrainer(make_config(tmp_path / "a", "method.kl_k4.coef=0"))
    with pytest.raises(ConfigError, match=r"has no parameter 'eps_hi'.*eps_high"):
        RLTrainer(make_config(tmp_path / "b", "method.policy_loss.eps_hi=0.3"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------- TensorBoard
def test_tensorboard_writes_an_events_file(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    RLTrainer(make_config(out, "train.steps=1", "run.tensorboard=true")).train()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_deterministic_setting_turns_on_deterministic_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    from tether.lm.config import RunSettings

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        RunSettings(deterministic=False).apply()
        assert torch.are_deterministic_algorithms_enabled() == before
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        RunSettings(deterministic=True).apply()
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(before)
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def test_alarms_are_printed_without_a_progress_bar(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """run.progress=false (the test settings; every run of tether compare) still prints alarms, with
    the step that raised them."""
    trainer = RLTrainer(make_config(tmp_path / "run", "train.steps=1", "sampling.max_new_tokens=1"))
    trainer.train()
    err = capsys.readouterr().err
    assert "alarm all_truncated at step 1:" in err
    assert any(a["kind"] == "all_truncated" for a in read_jsonl(tmp_path / "run" / "alarms.jsonl"))


def test_tensorboard_after_a_resume_holds_each_step_once(tmp_path: Path) -> None:
    """Killed after step 3 with its checkpoint at 2: the resumed run rewrites step 3, and the
    events logged after the checkpoint are purged, as the JSONL logs are truncated."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    settings = ("train.steps=3", "run.tensorboard=true", "run.checkpoint_every=2")
    first = RLTrainer(make_config(out, *settings))
    original_save = first.save

    def save_only_at_2() -> None:  # the final checkpoint (step 3) never lands: a kill
        if first.step_idx == 2:
            original_save()

    first.save = save_only_at_2  # type: ignore[method-assign]
    first.train()
    first.tb.flush()
    resumed = RLTrainer(make_config(out, *settings), resume=True)
    assert resumed.step_idx == 2
    resumed.train()
    resumed.tb.flush()
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("reward/mean")]
    assert sorted(steps) == [1, 2, 3], steps


# ------------------------------------------------------------------------------- whole groups
def _groups(ro: Rollout) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for i, g in enumerate(ro.group_ids.tolist()):
        out.setdefault(g, set()).add(i)
    return out


def test_whole_group_methods_update_on_mini_and_micro_batches_of_whole_groups(tmp_path: Path) -> None:
    """DYPO's loss (it takes group_ids) computes within each group of a call: the trainer shuffles
    the order of the groups and splits mini-batches and micro-batches between them."""
    trainer = RLTrainer(
        make_config(
            tmp_path / "run",
            "train.epochs=2",
            "train.minibatches=2",
            "train.micro_batch_size=4",
            recipe="dypo_routing",
        )
    )
    passes = record_grad_passes(trainer)
    trainer.step()
    groups = _groups(trainer.last_rollout)
    assert len(passes) == 2 * 4  # 2 epochs x 4 groups, one group per micro-batch
    for rows in passes:
        assert set(rows) in groups.values()
    for epoch in (passes[:4], passes[4:]):
        assert sorted(r for rows in epoch for r in rows) == list(range(16))


def test_whole_group_update_does_not_depend_on_the_micro_batch_split(tmp_path: Path) -> None:
    results = []
    for micro in (0, 4, 8):
        trainer = RLTrainer(
            make_config(
                tmp_path / f"r{micro}",
                "train.steps=1",
                "train.minibatches=2",
                f"train.micro_batch_size={micro}",
                recipe="dypo_routing",
            )
        )
        metrics = trainer.step()
        assert metrics["grad/norm"] > 0
        results.append((weights(trainer.model), metrics))
    (w0, m0), *others = results
    for w, m in others:
        for k in w0:
            torch.testing.assert_close(w0[k], w[k], rtol=0, atol=5e-6)
        for key in ("grad/norm", "dypo/grpo_loss", "dypo/gal_loss", "policy/loss"):
            assert m0[key] == pytest.approx(m[key], rel=1e-4, abs=1e-7), key


def test_splits_that_would_cut_groups_are_refused_at_load(tmp_path: Path) -> None:
    from tether.lm.trainer import plan_run

    with pytest.raises(TetherError, match=r"train\.micro_batch_size=2 would cut groups.*multiple of 4"):
        plan_run(make_config(tmp_path / "a", "train.micro_batch_size=2", recipe="dypo_routing"))
    with pytest.raises(TetherError, match=r"train\.minibatches=8 cannot split the 4 groups.*among 1, 2, 4"):
        plan_run(make_config(tmp_path / "b", "train.minibatches=8", recipe="dypo"))
    with pytest.raises(TetherError, match=r"policy_loss 'real'"):  # any loss that takes group_ids
        plan_run(make_config(tmp_path / "c", "train.micro_batch_size=6", recipe="real"))
    plan = plan_run(make_config(tmp_path / "d", "train.micro_batch_size=2", "train.minibatches=8"))
    assert plan.whole_groups == []  # grpo: rows as before


def test_methods_without_groups_keep_the_row_shuffle(tmp_path: Path) -> None:
    trainer = RLTrainer(make_config(tmp_path / "run", "train.minibatches=2", "train.micro_batch_size=3"))
    ro = trainer.rollout()
    state = trainer.generator.get_state()
    batches = trainer._update_batches(ro)
    order = torch.randperm(16, generator=torch.Generator().set_state(state))
    assert [mb.tolist() for mb, _ in batches] == [mb.tolist() for mb in order.tensor_split(2)]
    assert [[m.tolist() for m in micro] for _, micro in batches] == [
        [m.tolist() for m in mb.split(3)] for mb in order.tensor_split(2)
    ]


# ------------------------------------------------------------------------------- verifier errors
def test_verifier_error_rows_get_no_gradient(tmp_path: Path) -> None:
    """A failed verification is out of the update: no term (here DYPO's alignment pairs, which read
    rewards) gives its row a gradient."""
    from tether.catalogue.aggregate import Aggregation

    class Inputs(LoopPlugin):
        def __init__(self) -> None:
            self.seen: list[tuple[Rollout, dict[str, Any]]] = []

        def after_advantages(self, trainer: RLTrainer, rollout: Rollout, inputs: dict[str, Any]) -> None:
            self.seen.append((rollout, dict(inputs)))

    trainer = RLTrainer(
        make_config(tmp_path / "run", "train.steps=2", "task.params.raise_p=0.3", recipe="dypo_routing")
    )
    capture = Inputs()
    trainer.plugins.append(capture)
    trainer.train()
    in_mixed = 0
    for ro, inputs in capture.seen:
        errors = ~ro.scored
        assert bool(errors.any())
        assert not bool(inputs["response_mask"][errors].any())
        lp = inputs["old_logprobs"].clone().requires_grad_(True)
        rows = torch.arange(len(ro))
        loss, _ = trainer.method.loss(
            {**inputs, "logprobs": lp, "num_prompts": ro.prompt_count(rows)}, Aggregation()
        )
        loss.backward()
        assert lp.grad is not None
        assert torch.all(lp.grad[errors] == 0) and bool((lp.grad != 0).any())
        rewards = inputs["rewards"]
        for rows_of in _groups(ro).values():
            idx = torch.tensor(sorted(rows_of))
            ok = ~errors[idx]
            if bool(errors[idx].any()) and 0 < float((rewards[idx][ok] > 0.5).float().sum()) < int(ok.sum()):
                in_mixed += 1
    assert in_mixed > 0  # an error sat in a group with both successes and failures


def test_the_logged_learning_rate_is_the_one_each_step_updated_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    used = record_adamw_lrs(monkeypatch)
    cfg = make_config(tmp_path / "run", "train.steps=3", "train.warmup_steps=2", "train.lr=0.01")
    RLTrainer(cfg).train()
    logged = [r["train/lr"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert logged == used and len(set(used)) > 1  # warm-up: the rate changes from step to step
