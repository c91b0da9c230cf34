"""The vLLM backend's own code on the CPU, against a stand-in ``vllm`` module that records what it
is given: engine settings (in-process, the policy's dtype, processed log-probs), the requests
built from a ``SamplingConfig``, the mapping of vLLM's outputs to a ``RolloutBatch``, weight
syncs, and the trainer's use of one engine, synced before every rollout.

The real engine runs in ``tests/lm/test_rollout.py::test_vllm_sampler_matches_trainer_logprobs``
(GPU machines with vLLM; skipped elsewhere).
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

import tether.lm.rollout as rollout_module
import tether.lm.sft as sft_module
from tests.lm.test_sft import sft_config
from tests.lm.test_trainer import make_config
from tether.config import ConfigError, from_dict
from tether.errors import InvalidInputError
from tether.lm.evaluate import evaluate
from tether.lm.model import ModelConfig, load_policy
from tether.lm.rollout import HFSampler, SamplingConfig, make_sampler
from tether.lm.sft import run_sft
from tether.lm.tasks import ArithmeticTask
from tether.lm.trainer import RLTrainer
from tether.lm.vllm_backend import VLLMSampler

TINY_MODEL = {"tiny_hidden": 32, "tiny_layers": 1, "tiny_heads": 2, "tiny_intermediate": 64, "device": "cpu"}


class FakeLogprob:
    def __init__(self, logprob: float) -> None:
        self.logprob = logprob


class FakeLLM:
    """Records its settings, requests and loaded weights. Request i gets the completion
    ``script[i % len(script)]``; token t has log-prob ``-0.1 * (t + 1)``."""

    instances: ClassVar[list[FakeLLM]] = []
    script: ClassVar[list[list[int]]] = [[5, 6]]

    def __init__(self, **kwargs: Any) -> None:
        import os

        self.kwargs = kwargs
        self.multiprocessing_env = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
        self.requests: list[tuple[list[dict[str, Any]], list[Any]]] = []
        self.loaded: list[dict[str, torch.Tensor]] = []
        self.prefix_resets = 0
        runner_model = types.SimpleNamespace(load_weights=self._load)
        worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(model=runner_model))
        self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(driver_worker=worker))
        FakeLLM.instances.append(self)

    def _load(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        self.loaded.append({k: v.detach().clone() for k, v in weights})

    def reset_prefix_cache(self) -> None:
        self.prefix_resets += 1

    def generate(self, requests: list[dict[str, Any]], params: list[Any], use_tqdm: bool = True) -> list[Any]:
        self.requests.append((requests, params))
        outs = []
        for i, p in enumerate(params):
            ids = self.script[i % len(self.script)][: p.max_tokens]
            logprobs = [{t: FakeLogprob(-0.1 * (t + 1))} for t in ids]
            outs.append(
                types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=ids, logprobs=logprobs)])
            )
        return outs


class FakeSamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)


@pytest.fixture(autouse=True)
def tiny_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> type[FakeLLM]:
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.LLM = FakeLLM  # type: ignore[attr-defined]
    module.SamplingParams = FakeSamplingParams  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    FakeLLM.instances = []
    FakeLLM.script = [[5, 6]]
    return FakeLLM


@pytest.fixture
def policy() -> tuple[Any, Any]:
    return load_policy(ModelConfig(**TINY_MODEL))  # type: ignore[arg-type]


def vllm_config(**kw: Any) -> SamplingConfig:
    return from_dict(SamplingConfig, {"backend": "vllm", "max_new_tokens": 4, **kw})


def test_engine_runs_in_process_in_the_policys_dtype(fake_vllm, policy, monkeypatch) -> None:
    model, tok = policy
    sampler = make_sampler(model, tok, vllm_config(vllm_gpu_memory_utilization=0.5))
    assert isinstance(sampler, VLLMSampler)
    engine = fake_vllm.instances[-1]
    assert engine.multiprocessing_env == "0"  # in-process: weights load without pickling
    assert engine.kwargs["dtype"] == "float32"  # not vLLM's auto (bf16 for a float32 policy)
    assert engine.kwargs["logprobs_mode"] == "processed_logprobs"
    assert engine.kwargs["gpu_memory_utilization"] == 0.5
    assert Path(engine.kwargs["model"], "config.json").exists()  # the policy, saved for the engine

    make_sampler(model.to(torch.bfloat16), tok, vllm_config())
    assert fake_vllm.instances[-1].kwargs["dtype"] == "bfloat16"
    make_sampler(model, tok, vllm_config(vllm_dtype="float16"))
    assert fake_vllm.instances[-1].kwargs["dtype"] == "float16"
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # the user's choice stands
    make_sampler(model, tok, vllm_config())
    assert fake_vllm.instances[-1].multiprocessing_env == "1"


def test_vllm_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="vllm_dtype"):
        vllm_config(vllm_dtype="int8")
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="vllm_gpu_memory_utilization"):
            vllm_config(vllm_gpu_memory_utilization=bad)


def test_requests_and_outputs_map_to_a_rollout_batch(fake_vllm, policy) -> None:
    model, tok = policy
    eos = tok.eos_token_id
    a, b = tok.convert_tokens_to_ids(["1", "2"])
    fake_vllm.script = [[a, b, eos], [b, b, a, a], [eos]]  # EOS, truncated at 4, empty answer
    sampler = VLLMSampler(model, tok, vllm_config(temperature=0.7, top_p=0.9))
    prompts = ["3+4=", "10+20=", "5+5="]
    batch = sampler.generate(prompts, generator=torch.Generator().manual_seed(0))

    requests, params = fake_vllm.instances[-1].requests[-1]
    for req, text in zip(requests, prompts):
        assert tok.decode(req["prompt_token_ids"]) == tok.decode(tok(text)["input_ids"])  # no padding
    assert [(p.temperature, p.top_p, p.top_k, p.max_tokens, p.logprobs) for p in params] == [
        (0.7, 0.9, -1, 4, 1)
    ] * 3
    assert all(p.stop_token_ids == [eos] and p.detokenize is False for p in params)
    seeds = [p.seed for p in params]
    assert len(set(seeds)) == 3
    sampler.generate(prompts, generator=torch.Generator().manual_seed(0))
    assert [p.seed for p in fake_vllm.instances[-1].requests[-1][1]] == seeds  # seeded by the generator

    pad = sampler.pad_id
    assert batch.completion_ids.tolist() == [[a, b, eos, pad], [b, b, a, a], [eos, pad, pad, pad]]
    assert batch.completion_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    expected = torch.tensor([[a, b, eos, -1], [b, b, a, a], [eos, -1, -1, -1]], dtype=torch.float32)
    expected = torch.where(batch.completion_mask, -0.1 * (expected + 1), torch.zeros(()))
    torch.testing.assert_close(batch.sampler_logprobs, expected)
    assert batch.truncated.tolist() == [False, True, False]
    assert batch.completion_texts == ["12", "2211", ""]
    assert batch.prompt_mask.sum(dim=1).tolist() == [len(tok(p)["input_ids"]) for p in prompts]


def test_with_config_reuses_the_engine(fake_vllm, policy) -> None:
    model, tok = policy
    sampler = VLLMSampler(model, tok, vllm_config())
    greedy = sampler.with_config(vllm_config(temperature=1.0, top_k=1))
    assert greedy.llm is sampler.llm and len(fake_vllm.instances) == 1
    greedy.generate(["1+1="])
    assert fake_vllm.instances[0].requests[-1][1][0].top_k == 1
    assert sampler.config.top_k == 0


def test_sync_weights_loads_the_policys_current_tensors(fake_vllm, policy) -> None:
    model, tok = policy
    sampler = VLLMSampler(model, tok, vllm_config())
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    sampler.sync_weights(model)
    engine = fake_vllm.instances[-1]
    state = model.state_dict()
    assert engine.loaded[-1].keys() == state.keys()
    assert all(torch.equal(engine.loaded[-1][k], v) for k, v in state.items())
    assert engine.prefix_resets == 1  # cached prefixes came from the old weights


def test_a_lora_policy_is_refused_before_an_engine_is_built(fake_vllm, policy) -> None:
    model, tok = policy
    model.peft_config = {"default": object()}
    with pytest.raises(InvalidInputError, match="LoRA"):
        VLLMSampler(model, tok, vllm_config())
    assert fake_vllm.instances == []


def test_trainer_builds_one_engine_and_syncs_it_before_every_rollout(fake_vllm, tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "run", "train.steps=3", "sampling.backend=vllm", "train.lr=0.05")
    trainer = RLTrainer(cfg)
    eos = trainer.tokenizer.eos_token_id
    fake_vllm.script = [trainer.tokenizer(t)["input_ids"] + [eos] for t in ("7", "3", "12", "5")]
    seen: list[dict[str, torch.Tensor]] = []
    trainer.on_step = lambda step, record: seen.append(
        {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    )
    trainer.train()
    trainer.evaluate()
    engine = fake_vllm.instances[0]
    assert len(fake_vllm.instances) == 1  # training and evaluation share the engine
    assert len(engine.loaded) == 4  # before each of the 3 rollouts, and before evaluation
    for synced, after_step in zip(engine.loaded[1:], seen):  # each sync carries the last update
        assert all(torch.equal(synced[k], v) for k, v in after_step.items())
    assert not all(torch.equal(engine.loaded[0][k], v) for k, v in seen[0].items())


def test_evaluate_with_the_trainers_sampler_equals_a_fresh_one(tmp_path: Path) -> None:
    model, tok = load_policy(ModelConfig(**TINY_MODEL))  # type: ignore[arg-type]
    task = ArithmeticTask(digits=1, train_size=60, test_size=10)
    cfg = make_config(tmp_path / "run")
    sampling = cfg.sampling
    fresh = evaluate(model, tok, task, cfg.eval, sampling, seed=3)
    reused = evaluate(model, tok, task, cfg.eval, sampling, seed=3, sampler=HFSampler(model, tok, sampling))
    assert reused == fresh


def test_sft_checks_reuse_one_sampler(tmp_path: Path, monkeypatch) -> None:
    built: list[SamplingConfig] = []
    real = sft_module.make_sampler

    def counting(model: Any, tok: Any, config: SamplingConfig) -> Any:
        built.append(config)
        return real(model, tok, config)

    monkeypatch.setattr(sft_module, "make_sampler", counting)
    monkeypatch.setattr(rollout_module, "make_sampler", counting)  # what sampler_for builds with
    summary = run_sft(sft_config(steps=6, check_every=2, stop_at_accuracy=1.0), out=str(tmp_path / "s"))
    assert summary["steps"] == 6 and len(built) == 1  # three checks and the final evaluation
