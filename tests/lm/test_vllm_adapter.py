"""The vLLM backend's own code on the CPU, against a stand-in ``vllm`` module that records what it
is given: engine settings (in-process, the policy's dtype, processed log-probs), the requests
built from a ``SamplingConfig``, the mapping of vLLM's outputs to a ``RolloutBatch``, weight
syncs, and the trainer's use of one engine, synced before every rollout.

The real engine runs in ``tests/lm/test_rollout.py::test_vllm_sampler_matches_trainer_logprobs``
(GPU machines with vLLM; skipped elsewhere).
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import os
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
from tether.errors import InvalidInputError, TetherError
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


@dataclasses.dataclass
class FakeEngineArgs:
    """vLLM's engine settings (the fields the adapter may pass), as in vLLM >= 0.10."""

    model: str = ""
    dtype: str = "auto"
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    seed: int = 0
    max_model_len: int | None = None
    logprobs_mode: str = "raw_logprobs"


# vLLM < 0.10: the same settings without logprobs_mode.
OldEngineArgs = dataclasses.make_dataclass(
    "OldEngineArgs",
    [(f.name, f.type, f) for f in dataclasses.fields(FakeEngineArgs) if f.name != "logprobs_mode"],
)


class FakeLLM:
    """Records its settings, requests and loaded weights. Request i gets the completion
    ``script[i % len(script)]``; token t has log-prob ``-0.1 * (t + 1)``. Like vLLM, it refuses a
    setting that its ``EngineArgs`` does not have."""

    instances: ClassVar[list[FakeLLM]] = []
    script: ClassVar[list[list[int]]] = [[5, 6]]

    def __init__(self, **kwargs: Any) -> None:
        known = {f.name for f in dataclasses.fields(sys.modules["vllm"].EngineArgs)}
        unknown = set(kwargs) - known
        if unknown:
            raise TypeError(
                f"EngineArgs.__init__() got an unexpected keyword argument {sorted(unknown)[0]!r}"
            )
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
    module.EngineArgs = FakeEngineArgs  # type: ignore[attr-defined]
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


def vllm_sft_config(**sampling: Any) -> Any:
    """test_sft's SFT settings on the CPU (the fake CUDA would draw the policy there), sampling with vLLM."""
    cfg = sft_config(steps=1)
    cfg.model = dataclasses.replace(cfg.model, device="cpu")
    cfg.sampling = dataclasses.replace(cfg.sampling, backend="vllm", **sampling)
    return cfg


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
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the user's own 0 is the same engine
    make_sampler(model, tok, vllm_config())
    assert fake_vllm.instances[-1].multiprocessing_env == "0"


def test_an_engine_in_another_process_is_refused_before_it_is_built(
    fake_vllm, policy, monkeypatch, tmp_path: Path
) -> None:
    """sync_weights loads the policy into the engine's model each step, which an engine-core
    process (VLLM_ENABLE_V1_MULTIPROCESSING=1) cannot take: refused with the fix, no engine built."""
    model, tok = policy
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.raises(TetherError, match=r"VLLM_ENABLE_V1_MULTIPROCESSING=1 .*another process.*=0"):
        make_sampler(model, tok, vllm_config())
    assert fake_vllm.instances == []
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"  # the user's setting is not rewritten
    out = tmp_path / "run"
    with pytest.raises(TetherError, match="VLLM_ENABLE_V1_MULTIPROCESSING=1"):  # before any work
        RLTrainer(make_config(out, "sampling.backend=vllm"))
    assert not out.exists()


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

    def counting(model: Any, tok: Any, config: SamplingConfig, **kw: Any) -> Any:
        built.append(config)
        return real(model, tok, config, **kw)

    monkeypatch.setattr(sft_module, "make_sampler", counting)
    monkeypatch.setattr(rollout_module, "make_sampler", counting)  # what sampler_for builds with
    summary = run_sft(sft_config(steps=6, check_every=2, stop_at_accuracy=1.0), out=str(tmp_path / "s"))
    assert summary["steps"] == 6 and len(built) == 1  # three checks and the final evaluation


# ------------------------------------------------------------------ audit fixes


def test_a_prompt_past_the_context_is_refused_before_the_engine_is_asked(fake_vllm, policy) -> None:
    """The HF sampler's context check, in the vLLM sampler too."""
    model, tok = policy
    limit = model.config.max_position_embeddings
    prompt = "1+" * ((limit - 4) // 2)  # fits alone, not with 16 new tokens
    cfg = vllm_config(max_new_tokens=16)
    with pytest.raises(InvalidInputError, match=r"past the model's context"):
        HFSampler(model, tok, cfg).generate([prompt])
    sampler = VLLMSampler(model, tok, cfg)
    with pytest.raises(InvalidInputError, match=r"past the vLLM engine's max_model_len of \d+"):
        sampler.generate([prompt])
    assert fake_vllm.instances[-1].requests == []
    sampler.generate(["1+1="])  # a prompt that fits is sampled
    assert len(fake_vllm.instances[-1].requests) == 1


def test_the_engine_is_sized_for_the_runs_prompts(fake_vllm, policy, tmp_path: Path) -> None:
    """max_model_len: the model's context without a budget; twice the longest planned prompt plus
    max_new_tokens (at most the context) with one; sampling.vllm_max_model_len when set, refused
    past the context or short of the run's prompts before any work."""
    model, tok = policy
    context = model.config.max_position_embeddings
    VLLMSampler(model, tok, vllm_config())
    assert fake_vllm.instances[-1].kwargs["max_model_len"] == context
    VLLMSampler(model, tok, vllm_config(), max_prompt_tokens=10)
    assert fake_vllm.instances[-1].kwargs["max_model_len"] == 2 * (10 + 4)
    VLLMSampler(model, tok, vllm_config(), max_prompt_tokens=context)
    assert fake_vllm.instances[-1].kwargs["max_model_len"] == context
    VLLMSampler(model, tok, vllm_config(vllm_max_model_len=20), max_prompt_tokens=10)
    assert fake_vllm.instances[-1].kwargs["max_model_len"] == 20
    with pytest.raises(InvalidInputError, match=r"vllm_max_model_len=\d+ is past the model's context"):
        VLLMSampler(model, tok, vllm_config(vllm_max_model_len=context + 1))
    with pytest.raises(ConfigError, match="vllm_max_model_len"):
        vllm_config(vllm_max_model_len=-1)

    trainer = RLTrainer(make_config(tmp_path / "run", "sampling.backend=vllm"))
    train = max(len(tok(p.text)["input_ids"]) for p in trainer.task.prompts("train"))
    assert trainer.prompt_budget is not None and trainer.prompt_budget >= train
    assert fake_vllm.instances[-1].kwargs["max_model_len"] == min(context, 2 * (trainer.prompt_budget + 6))
    task = ArithmeticTask(digits=1, train_size=20, test_size=6)
    evaluate(model, tok, task, trainer.config.eval, vllm_config(), seed=0)  # a fresh engine, for its prompts
    from tether.lm.evaluate import eval_prompts

    longest = max(len(tok(p.text)["input_ids"]) for p in eval_prompts(task, trainer.config.eval, 0))
    assert fake_vllm.instances[-1].kwargs["max_model_len"] == 2 * (longest + 4)
    out = tmp_path / "short"
    with pytest.raises(
        InvalidInputError, match=r"vllm_max_model_len=8 is shorter than the run's longest prompt"
    ):
        RLTrainer(make_config(out, "sampling.backend=vllm", "sampling.vllm_max_model_len=8"))
    sft = vllm_sft_config(vllm_max_model_len=4)  # prompts of 4-5 tokens, 3 new tokens
    with pytest.raises(InvalidInputError, match=r"vllm_max_model_len=4 is shorter"):
        run_sft(sft, out=str(out))
    assert not out.exists()


def test_a_temperature_vllm_would_raise_is_refused_before_any_work(
    fake_vllm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM samples any temperature in (0, 0.01) at 0.01: RL, SFT and tether eval refuse it, naming
    the setting, before a model loads or a run directory exists."""
    out = tmp_path / "run"
    for setting in ("sampling.temperature", "eval.temperature"):
        with pytest.raises(InvalidInputError, match=rf"{setting}=0.005 is below 0.01.*{setting}=0.01"):
            RLTrainer(make_config(out, "sampling.backend=vllm", f"{setting}=0.005"))
    RLTrainer(make_config(out, "sampling.backend=vllm", "sampling.temperature=0.01"))  # the floor is allowed
    RLTrainer(make_config(tmp_path / "hf", "sampling.temperature=0.005"))  # the HF sampler keeps any
    sft = vllm_sft_config()
    sft.eval = dataclasses.replace(sft.eval, temperature=0.005)
    with pytest.raises(InvalidInputError, match=r"eval.temperature=0.005 is below 0.01"):
        run_sft(sft, out=str(tmp_path / "sft"))
    assert not (tmp_path / "sft").exists()

    from tether.cli import main
    from tether.lm.model import ModelConfig, build_tiny_model

    model_dir = build_tiny_model(tmp_path / "tiny", ModelConfig(**TINY_MODEL))  # type: ignore[arg-type]
    import tether.lm.model as model_module

    def no_model(*a: object, **k: object) -> None:
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(model_module, "load_policy", no_model)
    assert main(["eval", str(model_dir), "sampling.backend=vllm", "eval.temperature=0.005"]) == 2


def test_raw_logprobs_of_an_old_vllm_refuse_a_sampler_correction_of_processed_sampling(
    fake_vllm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM < 0.10 reports raw log-probs: train.sampler_correction with temperature, top-k or top-p
    would weight by exp(processed - raw); refused before any work. Raw sampling, or no correction,
    runs (with the warning)."""
    monkeypatch.setattr(sys.modules["vllm"], "EngineArgs", OldEngineArgs)
    out = tmp_path / "run"
    for processed in ("sampling.temperature=0.7", "sampling.top_k=5", "sampling.top_p=0.9"):
        with pytest.raises(InvalidInputError, match=r"sampler_correction=token_truncate.*vllm>=0.10"):
            RLTrainer(
                make_config(
                    out, "sampling.backend=vllm", processed, "train.sampler_correction=token_truncate"
                )
            )
    assert not out.exists() and fake_vllm.instances == []
    with pytest.warns(UserWarning, match="logprobs_mode"):
        raw = RLTrainer(make_config(out, "sampling.backend=vllm", "train.sampler_correction=token_truncate"))
    assert raw.sampler.processed_logprobs is False  # type: ignore[attr-defined]
    with pytest.warns(UserWarning, match="logprobs_mode"):
        RLTrainer(make_config(tmp_path / "b", "sampling.backend=vllm", "sampling.temperature=0.7"))
    monkeypatch.setattr(sys.modules["vllm"], "EngineArgs", FakeEngineArgs)  # a vLLM with processed log-probs
    RLTrainer(
        make_config(
            tmp_path / "c",
            "sampling.backend=vllm",
            "sampling.temperature=0.7",
            "train.sampler_correction=token_truncate",
        )
    )


def test_the_log_probs_mode_is_read_from_the_engine_settings_and_other_errors_propagate(
    fake_vllm, policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One engine, built with processed log-probs where EngineArgs has logprobs_mode and without
    it (and a warning) where it has not; a TypeError from inside the engine is not taken for an
    old vLLM."""
    model, tok = policy
    new = VLLMSampler(model, tok, vllm_config())
    assert new.processed_logprobs and fake_vllm.instances[-1].kwargs["logprobs_mode"] == "processed_logprobs"
    monkeypatch.setattr(sys.modules["vllm"], "EngineArgs", OldEngineArgs)
    with pytest.warns(UserWarning, match="no logprobs_mode"):
        old = VLLMSampler(model, tok, vllm_config())
    assert not old.processed_logprobs and "logprobs_mode" not in fake_vllm.instances[-1].kwargs
    monkeypatch.setattr(sys.modules["vllm"], "EngineArgs", FakeEngineArgs)
    built = len(fake_vllm.instances)

    build = FakeLLM.__init__

    def broken(self: FakeLLM, **kwargs: Any) -> None:  # a bug inside a new vLLM, not a missing option
        if "logprobs_mode" in kwargs:
            raise TypeError("unsupported operand type(s) for +: 'NoneType' and 'int'")
        build(self, **kwargs)

    monkeypatch.setattr(FakeLLM, "__init__", broken)
    with pytest.raises(TypeError, match="unsupported operand"):
        VLLMSampler(model, tok, vllm_config())
    assert len(fake_vllm.instances) == built


def test_an_error_inside_the_weight_loader_is_not_reported_as_a_version_problem(fake_vllm, policy) -> None:
    model, tok = policy
    sampler = VLLMSampler(model, tok, vllm_config())

    def failing(weights: Any) -> None:
        raise AttributeError("'NoneType' object has no attribute 'weight_loader'")

    runner = fake_vllm.instances[-1].llm_engine.model_executor.driver_worker.model_runner
    runner.model.load_weights = failing
    with pytest.raises(AttributeError, match="weight_loader"):
        sampler.sync_weights(model)
    # no runner to reach and no apply_model: the version problem, with the lookup's error as cause
    fake_vllm.instances[-1].llm_engine = types.SimpleNamespace()
    with pytest.raises(TetherError, match=r"LLM\.apply_model") as err:
        sampler.sync_weights(model)
    assert isinstance(err.value.__cause__, AttributeError)  # chained, not hidden
    applied: list[Any] = []
    fake_vllm.instances[-1].apply_model = lambda fn: applied.append(
        fn(types.SimpleNamespace(load_weights=len))
    )
    sampler.sync_weights(model)  # vLLM V1 in-process: through LLM.apply_model
    assert applied == [len(model.state_dict())]


def test_a_final_stop_token_is_left_out_of_the_completion_text(fake_vllm, policy) -> None:
    """An end-of-turn stop id that is not a special token (a generation-config EOS) is not decoded
    into the text the verifier reads; the ids keep it (it is trained on)."""
    from tokenizers import AddedToken

    model, tok = policy
    tok.add_tokens([AddedToken("<|end|>", special=False)])
    end = tok.convert_tokens_to_ids("<|end|>")
    model.generation_config.eos_token_id = [tok.eos_token_id, end]
    four, two = tok.convert_tokens_to_ids(["4", "2"])
    fake_vllm.script = [[four, two, end], [four, two, four, two]]
    batch = VLLMSampler(model, tok, vllm_config()).generate(["40+2=", "40+2="])
    assert batch.completion_texts == ["42", "4242"]
    assert batch.completion_ids[0].tolist()[:3] == [four, two, end] and batch.completion_mask[0, :3].all()
    assert batch.truncated.tolist() == [False, True]


def test_sft_resume_may_change_the_engines_memory_share(tmp_path: Path) -> None:
    """As in RL: the vLLM engine's memory share and length change no number of the run."""
    from tether.lm.sft import check_sft_run_dir

    out = tmp_path / "sft"
    run_sft(sft_config(steps=1, stop_at_accuracy=0.0), out=str(out))
    again = sft_config(steps=1, stop_at_accuracy=0.0)
    again.sampling = dataclasses.replace(
        again.sampling, vllm_gpu_memory_utilization=0.5, vllm_max_model_len=64
    )
    check_sft_run_dir(again, out, resume=True)
    again.sampling = dataclasses.replace(again.sampling, top_k=3)
    with pytest.raises(TetherError, match=r"sampling\.top_k"):
        check_sft_run_dir(again, out, resume=True)


def test_vllm_dtype_auto_is_the_compute_dtype_as_its_help_says(fake_vllm, policy) -> None:
    """A float32 policy with bf16 autocast runs a bf16 engine: the compute dtype, which the help names."""
    from tether.lm.precision import set_autocast

    model, tok = policy
    set_autocast(model, torch.device("cpu"), torch.bfloat16)
    assert VLLMSampler(model, tok, vllm_config()).dtype == "bfloat16"
    assert next(model.parameters()).dtype == torch.float32
    help_text = {f.name: f for f in dataclasses.fields(SamplingConfig)}["vllm_dtype"].metadata["help"]
    assert "compute dtype" in help_text and "autocast" in help_text
