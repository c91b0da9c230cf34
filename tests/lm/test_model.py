"""Tokenizer, the embedded tiny model, placement, LoRA and gradient checkpointing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tether.config import ConfigError, from_dict
from tether.errors import TetherError
from tether.lm.model import (
    ModelConfig,
    build_tiny_model,
    count_parameters,
    default_model_dir,
    is_adapter_dir,
    is_checkpointing,
    load_policy,
    load_reference,
    resolve_device,
    resolve_dtype,
    save_model,
)
from tether.lm.precision import AUTO_MIN_PARAMETERS, resolve_autocast
from tether.lm.tasks import ArithmeticTask, CountdownTask
from tether.lm.tokenizer import CHARACTERS, SPECIAL_TOKENS, build_char_tokenizer

SMALL = {
    "tiny_hidden": 32,
    "tiny_layers": 2,
    "tiny_heads": 2,
    "tiny_intermediate": 64,
    "tiny_max_positions": 64,
}


def small_config(**overrides: object) -> ModelConfig:
    return ModelConfig(**{**SMALL, "device": "cpu", **overrides})  # type: ignore[arg-type]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_every_task_text() -> None:
    tok = build_char_tokenizer()
    assert len(tok) == len(SPECIAL_TOKENS) + len(CHARACTERS) == 101  # the module docstring's count
    texts = [p.text for p in ArithmeticTask(operations="+-*", train_size=50, test_size=10).prompts("train")]
    countdown = CountdownTask(train_size=50, test_size=10)
    for p in countdown.prompts("train"):
        texts += [p.text, countdown.reference(p)]
    texts += ["a  b\nc", "Q: 1,000.5? #### 42", r"\boxed{\frac{1}{2}}", "(3*5)/7=2", "", "  "]
    for text in texts:
        ids = tok(text).input_ids
        assert len(ids) == len(text)  # one token per character, nothing added
        assert tok.decode(ids) == text


def test_tokenizer_special_tokens() -> None:
    tok = build_char_tokenizer()
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == (
        "<pad>",
        "<bos>",
        "<eos>",
        "<unk>",
    )
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4
    ids = [*tok("46").input_ids, tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "46"
    assert tok("é").input_ids == [tok.unk_token_id]


# ---------------------------------------------------------------- tiny model


def test_tiny_model_builds_and_reloads_with_identical_logits(tmp_path: Path) -> None:
    config = small_config()
    directory = build_tiny_model(tmp_path / "tiny", config)
    assert (directory / "model.safetensors").is_file()
    assert (directory / "tokenizer.json").is_file()
    tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    assert model.config.tie_word_embeddings
    assert model.config.vocab_size == len(tok)
    assert (model.config.pad_token_id, model.config.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    ids = torch.tensor([tok("12+34=46").input_ids])
    again = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert tok.decode(tok("12+34=46").input_ids) == "12+34=46"


def test_tiny_build_is_deterministic_and_idempotent(tmp_path: Path) -> None:
    rng_before = torch.random.get_rng_state()
    a = build_tiny_model(tmp_path / "a", small_config(seed=3))
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the global RNG is untouched
    b = build_tiny_model(tmp_path / "b", small_config(seed=3))
    c = build_tiny_model(tmp_path / "c", small_config(seed=4))
    ma = AutoModelForCausalLM.from_pretrained(a, local_files_only=True).state_dict()
    mb = AutoModelForCausalLM.from_pretrained(b, local_files_only=True).state_dict()
    mc = AutoModelForCausalLM.from_pretrained(c, local_files_only=True).state_dict()
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert not all(torch.equal(ma[k], mc[k]) for k in ma)
    stamp = (a / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(a, small_config(seed=3)) == a
    assert (a / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
    build_tiny_model(a, small_config(seed=5))  # different spec: rebuilt in place
    md = AutoModelForCausalLM.from_pretrained(a, local_files_only=True).state_dict()
    assert not all(torch.equal(ma[k], md[k]) for k in ma)


def test_default_tiny_model_has_1_to_5_million_parameters(tmp_path: Path) -> None:
    directory = build_tiny_model(tmp_path / "default", ModelConfig())
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    assert 1_000_000 <= count_parameters(model) <= 5_000_000
    assert count_parameters(model, trainable_only=True) == count_parameters(model)


def test_default_model_dir_is_keyed_by_sizes_and_seed(cache: Path) -> None:
    assert default_model_dir().parent == cache
    assert default_model_dir(ModelConfig(seed=1)) != default_model_dir(ModelConfig(seed=0))
    assert default_model_dir(ModelConfig(tiny_layers=2)) != default_model_dir(ModelConfig())


def test_load_policy_tiny_builds_into_the_cache(cache: Path) -> None:
    config = small_config()
    model, tok = load_policy(config)
    assert (default_model_dir(config) / "config.json").is_file()
    assert model.device.type == "cpu" and model.dtype == torch.float32
    assert model.training
    assert tok.pad_token_id is not None
    assert count_parameters(model, trainable_only=True) == count_parameters(model)


def test_load_policy_from_local_directory(tmp_path: Path) -> None:
    directory = build_tiny_model(tmp_path / "m", small_config())
    model, tok = load_policy(small_config(name_or_path=str(directory)))
    reference = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    ids = torch.tensor([tok("7*8=").input_ids])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_load_policy_bad_names_raise_tether_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TetherError, match="does not exist"):
        load_policy(small_config(name_or_path=str(tmp_path / "missing" / "model")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TetherError, match=r"no config\.json"):
        load_policy(small_config(name_or_path=str(tmp_path / "empty")))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never touch the network
    hub_error = r"(?s)could not load the causal LM 'no-such-org/no-such-model'.*local directory"
    with pytest.raises(TetherError, match=hub_error):
        load_policy(small_config(name_or_path="no-such-org/no-such-model"))


# ---------------------------------------------------------------- placement


def test_resolve_device_and_dtype() -> None:
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
        assert resolve_dtype("auto", torch.device("cuda")) in (torch.bfloat16, torch.float32)
    else:
        assert resolve_device("auto") == cpu
    with pytest.raises(TetherError, match="not a device"):
        resolve_device("gpu0")


def test_auto_dtype_keeps_float32_master_weights_and_autocasts_on_cuda(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_dtype("auto", cuda) == torch.float32
    assert resolve_dtype("auto", cuda, lora=True) == torch.bfloat16  # a frozen LoRA base
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", cpu, lora=True) == torch.float32
    big, tiny = AUTO_MIN_PARAMETERS, AUTO_MIN_PARAMETERS - 1
    assert resolve_autocast("auto", cuda, big) == torch.bfloat16
    assert resolve_autocast("auto", cuda, tiny) is None  # tiny models stay float32
    assert resolve_autocast("auto", cpu, big) is None
    assert resolve_autocast(False, cuda, big) is None
    assert resolve_autocast("float16", cpu, tiny) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_autocast("auto", cuda, big) is None
    with pytest.raises(TetherError, match=r"model\.autocast"):
        resolve_autocast("fp8", cuda, big)
    # YAML reads off/false as a boolean: false is off, true is refused before any work
    assert from_dict(ModelConfig, {"autocast": "false"}).autocast is False
    assert from_dict(ModelConfig, {"autocast": False}).autocast is False
    with pytest.raises(TetherError, match="ambiguous"):
        from_dict(ModelConfig, {"autocast": True})
    with pytest.raises(ConfigError, match="autocast"):
        from_dict(ModelConfig, {"autocast": "fp8"})


@pytest.mark.parametrize("lora", [0, 4])
def test_autocast_reaches_every_forward_pass_of_policy_and_reference(cache: Path, lora: int) -> None:
    """model.autocast=bfloat16 (CPU autocast here): float32 weights, bf16 logits from the
    policy, from the reference (a LoRA reference is a new merged module) and in the sampler."""
    from tether.lm.logprobs import completion_logits
    from tether.lm.precision import autocast_context

    config = small_config(autocast="bfloat16", lora_rank=lora, lora_target_modules=("q_proj", "v_proj"))
    policy, tok = load_policy(config)
    reference = load_reference(config, policy)
    ids = torch.tensor([tok("12+3=")["input_ids"]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    for model in (policy, reference):
        assert all(p.dtype == torch.float32 for p in model.parameters())
        logits = completion_logits(model, ids, mask, ids[:, :3], mask[:, :3])
        assert logits.dtype == torch.bfloat16
        with autocast_context(model):
            assert torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")
    # the sampler (model calls under autocast; the float32 fast decoder stands aside)
    from tether.lm.logprobs import completion_logprobs
    from tether.lm.rollout import HFSampler, SamplingConfig

    batch = HFSampler(policy, tok, SamplingConfig(max_new_tokens=5)).generate(
        ["12+3=", "4+5="], generator=torch.Generator().manual_seed(0)
    )
    lp, _ = completion_logprobs(
        policy, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask
    )
    gap = (lp.detach() - batch.sampler_logprobs).abs()[batch.completion_mask]
    assert gap.max() < 0.05
    plain, _ = load_policy(small_config(autocast=False, lora_rank=lora))
    assert completion_logits(plain, ids, mask, ids[:, :3], mask[:, :3]).dtype == torch.float32


def test_cuda_requested_without_cuda_is_a_tether_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(TetherError, match="CUDA is not available"):
            resolve_device(spec)
    assert resolve_device("auto") == torch.device("cpu")


def test_model_config_validation_through_the_loader() -> None:
    assert from_dict(ModelConfig, {"lora_rank": 8, "dtype": "bfloat16"}).lora_rank == 8
    with pytest.raises(ConfigError, match="dtype"):
        from_dict(ModelConfig, {"dtype": "float64"})
    with pytest.raises(ConfigError, match="lora_rank"):
        from_dict(ModelConfig, {"lora_rank": -1})
    with pytest.raises(TetherError, match="device"):
        from_dict(ModelConfig, {"device": "tpu"})
    with pytest.raises(TetherError, match="divide"):
        from_dict(ModelConfig, {"tiny_hidden": 30, "tiny_heads": 4})


# ---------------------------------------------------------------- LoRA, checkpointing, reference


def test_lora_wraps_and_only_adapters_train(cache: Path) -> None:
    model, tok = load_policy(small_config(lora_rank=4))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert any("q_proj" in n for n in trainable) and any("v_proj" in n for n in trainable)
    assert 0 < count_parameters(model, trainable_only=True) < count_parameters(model)
    ids = torch.tensor([tok("1+2=3").input_ids])
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_lora_models_saved_adapters_load_as_merged_weights(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a LoRA run saves as its model (adapters only) loads everywhere a model does: merged
    onto its base, with the adapted model's outputs."""
    model, tok = load_policy(small_config(lora_rank=4))
    torch.manual_seed(0)
    with torch.no_grad():  # PEFT starts B at 0; move it so that the merge matters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    saved = tmp_path / "lora_run" / "model"
    save_model(model, tok, saved)
    assert is_adapter_dir(saved)
    merged, _ = load_policy(ModelConfig(name_or_path=str(saved), device="cpu"))
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = torch.tensor([tok("12+34=46").input_ids])
    model.eval()
    expected = model(input_ids=ids).logits
    assert not torch.allclose(expected, load_policy(small_config())[0](input_ids=ids).logits, atol=1e-3)
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)

    from tether.cli import main

    assert main(["eval", str(saved.parent), "--prompts", "2", "--k", "2"]) == 0
    assert '"accuracy"' in capsys.readouterr().out


def test_bad_lora_targets_raise_tether_error(cache: Path) -> None:
    with pytest.raises(TetherError, match="lora_target_modules"):
        load_policy(small_config(lora_rank=2, lora_target_modules=("no_such_proj",)))


def test_gradient_checkpointing_flag(cache: Path) -> None:
    plain, _ = load_policy(small_config())
    assert not is_checkpointing(plain)
    model, tok = load_policy(small_config(gradient_checkpointing=True))
    assert is_checkpointing(model)
    assert model.config.use_cache is False
    ids = torch.tensor([tok("1+2=3").input_ids])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    lora, _ = load_policy(small_config(gradient_checkpointing=True, lora_rank=2))
    assert is_checkpointing(lora)
    lora(input_ids=ids, labels=ids).loss.backward()


def test_reference_is_a_frozen_copy(cache: Path) -> None:
    config = small_config(lora_rank=2, gradient_checkpointing=True)
    policy, tok = load_policy(config)
    with torch.no_grad():  # move the adapters away from zero so the copy has something to merge
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    reference = load_reference(config, policy)
    assert not reference.training
    assert not any(p.requires_grad for p in reference.parameters())
    assert not is_checkpointing(reference)
    ids = torch.tensor([tok("12+30=42").input_ids])
    policy.eval()
    with torch.no_grad():
        torch.testing.assert_close(reference(ids).logits, policy(ids).logits, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the copy does not follow later updates of the policy
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(1.0)
        assert not torch.allclose(reference(ids).logits, policy(ids).logits)
    assert any(p.requires_grad for p in policy.parameters())


def test_attention_implementation_is_configurable(tmp_path: Path) -> None:
    from tether.lm.model import ModelConfig, build_tiny_model, load_policy

    directory = build_tiny_model(tmp_path / "tiny", ModelConfig())
    loaded = {}
    for name in ("auto", "eager", "sdpa"):
        model, _ = load_policy(
            ModelConfig(name_or_path=str(directory), device="cpu", attn_implementation=name)
        )
        loaded[name] = model
    assert loaded["eager"].config._attn_implementation == "eager"
    assert loaded["sdpa"].config._attn_implementation == "sdpa"
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        logits = {k: m(input_ids=ids).logits for k, m in loaded.items()}
    torch.testing.assert_close(logits["eager"], logits["sdpa"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits["auto"], logits["sdpa"], atol=1e-5, rtol=1e-5)


def test_flash_attention_refused_on_cpu_before_loading() -> None:
    from tether.lm.config import LMConfig

    with pytest.raises((TetherError, ConfigError), match="flash_attention_2 needs a CUDA device"):
        from_dict(LMConfig, {"model": {"device": "cpu", "attn_implementation": "flash_attention_2"}})
    with pytest.raises(ConfigError, match="attn_implementation"):
        from_dict(LMConfig, {"model": {"attn_implementation": "flashy"}})
