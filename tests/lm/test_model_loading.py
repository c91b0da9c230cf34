"""Loading and saving policies: LoRA on a LoRA run's model, dropout, local paths, float16
weights, LoRA targets, relative bases and the saved config."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

from tests.lm.test_model import SMALL, small_config
from tether.config import from_dict
from tether.errors import TetherError
from tether.lm.config import LMConfig, SFTConfig
from tether.lm.model import (
    ModelConfig,
    build_tiny_model,
    check_model_source,
    is_adapter_dir,
    load_policy,
    load_reference,
    save_model,
)
from tether.lm.tokenizer import build_char_tokenizer


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "cache"


def move_adapters(model: torch.nn.Module, seed: int, std: float = 0.3) -> None:
    """PEFT starts lora_B at 0: move it, so that the adapters change what the model computes."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, std)


def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits  # type: ignore[no-any-return]


# ---------------------------------------------------------------- LoRA on a LoRA run's model


def test_lora_on_a_lora_runs_model_saves_the_policy_it_trained(tmp_path: Path) -> None:
    """SFT with LoRA saves adapters; RL with new LoRA adapters on that model must save a model that
    reloads (through tether and through plain from_pretrained) to the RL policy, first adapters
    included: adapter_config.json could only name the original base, which has neither."""
    sft, tok = load_policy(small_config(lora_rank=4))
    move_adapters(sft, 0)
    save_model(sft, tok, tmp_path / "sft" / "model")
    assert is_adapter_dir(tmp_path / "sft" / "model")

    rl, _ = load_policy(ModelConfig(name_or_path=str(tmp_path / "sft" / "model"), device="cpu", lora_rank=4))
    move_adapters(rl, 1)
    ids = torch.tensor([tok("12+34=46").input_ids])
    expected = logits(rl, ids)
    # both adapters matter: neither the base with the second adapters nor the SFT model is the policy
    assert not torch.allclose(expected, logits(sft, ids), atol=1e-2)
    save_model(rl, tok, tmp_path / "rl" / "model")
    torch.testing.assert_close(logits(rl, ids), expected, rtol=0, atol=0)  # the policy is untouched
    assert any("lora_B" in n for n, _ in rl.named_parameters())

    saved = tmp_path / "rl" / "model"
    mine, _ = load_policy(ModelConfig(name_or_path=str(saved), device="cpu"))
    plain = AutoModelForCausalLM.from_pretrained(saved, local_files_only=True)
    torch.testing.assert_close(logits(mine, ids), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(plain, ids), expected, atol=1e-5, rtol=1e-5)
    assert (saved / "config.json").is_file() and not (saved / "adapter_config.json").exists()  # merged


# ---------------------------------------------------------------- dropout


def tiny_gpt2(directory: Path) -> Path:
    """A tiny GPT-2 with GPT-2's default dropout (0.1 on embeddings, attention and residuals)."""
    tok = build_char_tokenizer(model_max_length=64)
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    assert config.attn_pdrop == config.resid_pdrop == config.embd_pdrop == 0.1
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def tiny_llama_with_attention_dropout(directory: Path) -> Path:
    """Llama keeps its attention dropout as a number on each attention module, no nn.Dropout."""
    tok = build_char_tokenizer(model_max_length=64)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        attention_dropout=0.3,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def train_mode_logits_twice(model: Any, tok: Any) -> tuple[torch.Tensor, torch.Tensor]:
    model.train()
    ids = torch.tensor([tok("12+34=46").input_ids])
    with torch.no_grad():
        return model(input_ids=ids).logits, model(input_ids=ids).logits


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama_with_attention_dropout])
def test_the_models_own_dropout_is_off_for_training_by_default(tmp_path: Path, build: Any) -> None:
    directory = build(tmp_path / "m")
    model, tok = load_policy(ModelConfig(name_or_path=str(directory), device="cpu"))
    assert model.training
    first, second = train_mode_logits_twice(model, tok)
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # no dropout left in the training pass

    kept, _ = load_policy(ModelConfig(name_or_path=str(directory), device="cpu", disable_dropout=False))
    first, second = train_mode_logits_twice(kept, tok)
    assert not torch.allclose(first, second)  # model.disable_dropout=false: the model's dropout runs

    # the saved config.json is the model's own, dropout included (only the loaded copy has it off)
    save_model(model, tok, tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    original = json.loads((directory / "config.json").read_text())
    drop_keys = [k for k in original if "drop" in k]
    assert drop_keys and {k: saved[k] for k in drop_keys} == {k: original[k] for k in drop_keys}


def test_lora_dropout_is_kept_when_the_models_dropout_is_off(tmp_path: Path) -> None:
    directory = tiny_gpt2(tmp_path / "gpt2")
    model, _ = load_policy(
        ModelConfig(
            name_or_path=str(directory),
            device="cpu",
            lora_rank=2,
            lora_dropout=0.25,
            lora_target_modules=("c_attn",),
        )
    )
    drops = {n: m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    lora = {n: p for n, p in drops.items() if "lora_dropout" in n}
    assert lora and set(lora.values()) == {0.25}
    own = {n: p for n, p in drops.items() if n not in lora}
    assert own and set(own.values()) == {0.0}


def test_disable_dropout_is_a_setting_with_a_true_default() -> None:
    assert ModelConfig().disable_dropout is True
    assert from_dict(ModelConfig, {"disable_dropout": "false"}).disable_dropout is False
    assert from_dict(LMConfig, {"model": {"disable_dropout": False}}).model.disable_dropout is False
    assert from_dict(SFTConfig, {"model": {"disable_dropout": True}}).model.disable_dropout is True


# ---------------------------------------------------------------- local paths


def no_hub(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Record every from_pretrained call (and fail it), so that a test sees whether one was made."""
    calls: list[tuple[str, Any]] = []

    def fake(name: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append((str(name), kwargs.get("local_files_only")))
        raise OSError("no network in this test")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fake)
    return calls


def test_a_missing_local_path_is_refused_at_once_and_a_hub_name_still_goes_to_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "sft-arithmetic-s0").mkdir(parents=True)
    calls = no_hub(monkeypatch)
    for name in (
        "runs/sft",
        "runs/sft-arithmetic-s1",
        "./model",
        "../model",
        "~/no-such-tether-model",
        "a/b/c",
    ):
        with pytest.raises(TetherError, match=r"does not exist") as err:
            load_policy(small_config(name_or_path=name))
        assert repr(name) in str(err.value)
        with pytest.raises(TetherError, match=r"does not exist"):
            check_model_source(small_config(name_or_path=name))
    assert calls == []  # refused before anything could reach for the hub
    with pytest.raises(TetherError, match="'runs/' is a local directory") as err:
        load_policy(small_config(name_or_path="runs/sft-arithmetic-s1"))
    assert "Did you mean 'runs/sft-arithmetic-s0'" in str(err.value)  # the close local names

    # a hub name (no local 'org/' directory here) is still asked of the hub
    with pytest.raises(TetherError, match="could not load"):
        load_policy(small_config(name_or_path="org/model"))
    assert calls and all(c == ("org/model", False) for c in calls)


# ---------------------------------------------------------------- float16 weights


def test_float16_weights_that_would_train_are_refused_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tether.lm.sft as sft_module
    from tether.lm.trainer import RLTrainer, plan_run

    def no_load(*a: Any, **k: Any) -> Any:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(sft_module, "load_policy", no_load)
    fp16 = {"model": {**SMALL, "device": "cpu", "dtype": "float16"}}
    hint = r"model\.dtype=float16 would train float16 weights.*bfloat16.*model\.autocast=float16"
    with pytest.raises(TetherError, match=hint):
        sft_module.run_sft(from_dict(SFTConfig, fp16), out=str(tmp_path / "sft"))
    assert not (tmp_path / "sft").exists()
    cfg = from_dict(LMConfig, {**fp16, "run": {"out": str(tmp_path / "rl")}})
    with pytest.raises(TetherError, match=hint):
        plan_run(cfg)
    with pytest.raises(TetherError, match=hint):
        RLTrainer(cfg)
    assert not (tmp_path / "rl").exists()


def test_float16_is_allowed_as_a_frozen_lora_base_whose_adapters_train_in_float32() -> None:
    config = small_config(dtype="float16", lora_rank=4)
    check_model_source(config)  # accepted
    model, tok = load_policy(config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.float16 for p in model.parameters() if not p.requires_grad)
    ids = torch.tensor([tok("1+2=3").input_ids])
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # evaluation (tether eval) may still load float16 weights: nothing trains them there
    plain, _ = load_policy(small_config(dtype="float16"))
    assert next(plain.parameters()).dtype == torch.float16


# ---------------------------------------------------------------- LoRA targets


def adapted(model: torch.nn.Module) -> set[str]:
    return {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}


def test_a_lora_target_that_names_no_module_is_refused_even_beside_good_ones() -> None:
    with pytest.raises(TetherError, match=r"'vproj_typo' names no module") as err:
        load_policy(small_config(lora_rank=4, lora_target_modules=("q_proj", "vproj_typo")))
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in str(err.value)
    model, _ = load_policy(small_config(lora_rank=4, lora_target_modules=("q_proj", "self_attn.v_proj")))
    assert adapted(model) == {"q_proj", "v_proj"}  # PEFT's suffix match is accepted


def test_all_linear_is_passed_to_peft_as_its_shorthand() -> None:
    config = from_dict(
        ModelConfig, {**SMALL, "device": "cpu", "lora_rank": 2, "lora_target_modules": "all-linear"}
    )
    assert config.lora_target_modules == ("all-linear",)
    model, _ = load_policy(config)
    assert adapted(model) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with pytest.raises(TetherError, match="all-linear alone"):
        from_dict(ModelConfig, {"lora_rank": 2, "lora_target_modules": "all-linear,q_proj"})


# ---------------------------------------------------------------- relative bases, saved config


def test_a_relative_base_is_saved_as_an_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    build_tiny_model(Path("models/base"), small_config())
    model, tok = load_policy(small_config(name_or_path="models/base", lora_rank=4))
    move_adapters(model, 0)
    save_model(model, tok, Path("run/model"))
    base = json.loads(Path("run/model/adapter_config.json").read_text())["base_model_name_or_path"]
    assert os.path.isabs(base) and Path(base) == tmp_path / "work" / "models" / "base"
    ids = torch.tensor([tok("7*8=56").input_ids])
    expected = logits(model, ids)
    monkeypatch.chdir(tmp_path)  # another working directory
    again, _ = load_policy(ModelConfig(name_or_path=str(tmp_path / "work" / "run" / "model"), device="cpu"))
    torch.testing.assert_close(logits(again, ids), expected, atol=1e-5, rtol=1e-5)


def test_checkpointing_does_not_leak_use_cache_into_the_saved_config(tmp_path: Path) -> None:
    config = small_config(gradient_checkpointing=True)
    model, tok = load_policy(config)
    assert model.config.use_cache is False  # off while training
    reference = load_reference(config, model)
    assert reference.config.use_cache is True and model.config.use_cache is False
    save_model(model, tok, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["use_cache"] is True
    assert model.config.use_cache is False  # the policy still trains with it off
    reloaded, _ = load_policy(ModelConfig(name_or_path=str(tmp_path / "m"), device="cpu"))
    assert reloaded.config.use_cache is True
