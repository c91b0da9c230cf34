"""Differential tests: tether's policy losses against TRL's ``GRPOTrainer._compute_loss``.

TRL is the peer implementation (pinned: ``trl==1.16.0``; ``_compute_loss`` and
``_get_per_token_logps_and_entropies`` are private interfaces that change between releases).
A real ``GRPOTrainer`` is built on CPU for each configuration, from a tiny Llama and a
word-level tokenizer written to a temporary directory and loaded back with
``from_pretrained`` (the real loading path), with the network blocked: nothing is downloaded.
Construction is cheap (tens of ms), so every configuration goes through ``GRPOConfig`` and the
trainer's own ``__init__``; no trainer attribute is mutated.

Two kinds of checks:

- loss math: the trainer's ``_get_per_token_logps_and_entropies`` is replaced (on the instance)
  by a function returning a float64 leaf ``lp`` [B, T]. ``_compute_loss`` then evaluates TRL's
  loss on our log-probs, and the value and d loss / d lp must agree with tether's entry to
  1e-10 (float64; both sides compute the same closed form, only the summation order differs).
- log-prob alignment: one GRPO case runs the model's real forward pass (TRL's fused LM head,
  logits divided by the temperature) and compares loss and parameter gradients with tether's
  loss on log_softmax(logits / temperature) gathered at the completion tokens. The model runs in
  float32 (TRL's kernel returns float32 log-probs): agreement to 1e-6 absolute.

Mapping (TRL loss_type -> tether entry):
  grpo     -> "ppo_clip", seq-mean-token-mean          (+ beta * "kl_k3", same aggregation)
  dr_grpo  -> "ppo_clip", seq-mean-token-sum-norm, L_norm = max_completion_length
  dapo     -> "clip_higher", token-mean over num_items_in_batch tokens
  cispo    -> "cispo", bound="absolute" (TRL: weight = min(r, epsilon_high)), token-mean
  grpo + importance_sampling_level="sequence" -> "gspo"
  sapo     -> "sapo", seq-mean-token-mean
  vespo    -> "vespo", token-mean over num_items_in_batch tokens
  luspo (importance_sampling_level="sequence") -> "gspo", seq-mean-token-sum (the luspo recipe)
TRL's k3 is compared without its default off-policy correction (``use_bias_correction_kl=False``,
the card's plain estimator) and with it (``kl_k3(..., old_logprobs=...)``). Empty rows: TRL's seq-mean divides by all B rows;
tether's by the non-empty ones unless ``Aggregation(num_sequences=B)`` is given (tested).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub.constants as hf_constants
import pytest
import torch
import trl
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from trl import GRPOConfig, GRPOTrainer

from tether.catalogue import get
from tether.catalogue.aggregate import Aggregation
from tether.recipes.loader import load_recipe

TRL_VERSION = "1.16.0"

ppo_clip = get("policy_loss", "ppo_clip").fn
clip_higher = get("policy_loss", "clip_higher").fn
cispo = get("policy_loss", "cispo").fn
gspo = get("policy_loss", "gspo").fn
sapo = get("policy_loss", "sapo").fn
vespo = get("policy_loss", "vespo").fn
kl_k3 = get("regularizer", "kl_k3").fn

G = 4  # num_generations
B = 8  # two prompts x G completions
P = 4  # padded prompt length
T = 7  # padded completion length
VOCAB = 64
MAX_COMPLETION = 10  # > T, so dr_grpo's constant L_norm differs from the padded length
TEMPERATURE = 0.7
SEEDS = (0, 1, 2, 3)
TOL = 1e-10  # float64 on both sides


def test_trl_version_is_the_pinned_one() -> None:
    assert trl.__version__ == TRL_VERSION


# --------------------------------------------------------------------------- trainer factory


def _no_network(*args: object, **kwargs: object) -> None:
    raise OSError("network access is disabled in the TRL differential tests")


def _write_tiny_model(directory: Path) -> None:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for i in range(VOCAB - len(vocab)):
        vocab[f"w{i}"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)


def _reward(completions: list[Any], **kwargs: Any) -> list[float]:
    return [0.0] * len(completions)


MakeTrainer = Callable[..., GRPOTrainer]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The tensors are tiny: intra-op threads only add contention (seconds on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def make_trainer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MakeTrainer]:
    """Builds (and caches) a real GRPOTrainer per configuration, offline and with no network."""
    root = tmp_path_factory.mktemp("trl_diff")
    model_dir = root / "tiny-llama"
    cache: dict[tuple[tuple[str, Any], ...], GRPOTrainer] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(hf_constants, "HF_HUB_OFFLINE", True)
        mp.setattr(socket.socket, "connect", _no_network)
        _write_tiny_model(model_dir)
        dataset = Dataset.from_dict({"prompt": ["w1 w2", "w3 w4 w5"] * 2})

        def build(**overrides: Any) -> GRPOTrainer:
            key = tuple(sorted(overrides.items()))
            if key not in cache:
                kwargs: dict[str, Any] = {
                    "output_dir": str(root / f"out{len(cache)}"),
                    "use_cpu": True,
                    "bf16": False,
                    "report_to": "none",
                    "activation_checkpointing": False,  # TRL defaults gradient checkpointing to True
                    "num_generations": G,
                    "per_device_train_batch_size": G,
                    "max_completion_length": MAX_COMPLETION,
                    "temperature": TEMPERATURE,
                    "use_bias_correction_kl": False,
                    "beta": 0.0,
                    "save_strategy": "no",
                }
                kwargs.update(overrides)
                trainer = GRPOTrainer(
                    model=AutoModelForCausalLM.from_pretrained(model_dir),
                    reward_funcs=_reward,
                    args=GRPOConfig(**kwargs),
                    train_dataset=dataset,
                    processing_class=AutoTokenizer.from_pretrained(model_dir),
                )
                # Set by Trainer's training loop; _compute_loss divides by it. One accumulation step.
                trainer.current_gradient_accumulation_steps = 1
                trainer.model.train()
                cache[key] = trainer
            return cache[key]

        yield build


def check_plain_setup(trainer: GRPOTrainer, bias_correction_kl: bool = False) -> None:
    """Preconditions under which _compute_loss is exactly the loss_type's formula."""
    assert trainer.model.training
    assert trainer.current_gradient_accumulation_steps == 1
    assert trainer.accelerator.num_processes == 1
    assert trainer.args.steps_per_generation == 1
    assert trainer.top_entropy_quantile == 1.0
    assert trainer.off_policy_mask_threshold is None
    assert not trainer.use_vllm
    assert not trainer._entropy_bonus_enabled
    assert not trainer.aux_loss_enabled
    assert trainer.args.delta is None
    assert trainer.args.use_bias_correction_kl == bias_correction_kl
    assert trainer.temperature == TEMPERATURE


# --------------------------------------------------------------------------- inputs


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    lp: torch.Tensor  # [B, T] float64, values of the current policy's log-probs
    mask: torch.Tensor  # [B, T] bool completion mask
    old: torch.Tensor
    ref: torch.Tensor
    adv: torch.Tensor


def make_batch(seed: int, noise: float = 0.3, empty_row: bool = False) -> Batch:
    """Random batch with left-padded prompts and right-padded completions of random lengths >= 1."""
    gen = torch.Generator().manual_seed(seed)
    prompt_len = torch.randint(1, P + 1, (B,), generator=gen)
    prompt_mask = (torch.arange(P)[None] >= (P - prompt_len)[:, None]).long()
    prompt_ids = torch.randint(3, VOCAB, (B, P), generator=gen) * prompt_mask
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[0] = T  # one full-length completion
    if empty_row:
        lengths[-1] = 0
    mask = torch.arange(T)[None] < lengths[:, None]
    completion_ids = torch.randint(3, VOCAB, (B, T), generator=gen) * mask.long()
    lp = -3.0 * torch.rand(B, T, generator=gen, dtype=torch.float64) - 0.05
    old = lp + noise * torch.randn(B, T, generator=gen, dtype=torch.float64)
    ref = lp + noise * torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": mask.long(),
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    return Batch(inputs=inputs, lp=lp, mask=mask, old=old, ref=ref, adv=adv)


def trl_loss_and_grad(
    trainer: GRPOTrainer, batch: Batch, monkeypatch: pytest.MonkeyPatch, bias_correction_kl: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's _compute_loss on our log-probs (patched scorer); returns (loss, d loss / d lp)."""
    check_plain_setup(trainer, bias_correction_kl)
    leaf = batch.lp.clone().requires_grad_(True)
    entropy = torch.rand(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(7))

    def scorer(
        model: object, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int, **kw: Any
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        assert input_ids.shape == (B, P + T) and attention_mask.shape == (B, P + T)
        assert logits_to_keep == T
        return leaf, entropy, None

    monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies", scorer)
    loss = trainer._compute_loss(trainer.model, batch.inputs)
    (grad,) = torch.autograd.grad(loss, leaf)
    monkeypatch.undo()
    return loss.detach(), grad


def tether_loss_and_grad(
    fn: Callable[[torch.Tensor], torch.Tensor], batch: Batch
) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = batch.lp.clone().requires_grad_(True)
    loss = fn(leaf)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


def assert_agree(
    trl_out: tuple[torch.Tensor, torch.Tensor], ours: tuple[torch.Tensor, torch.Tensor], tol: float = TOL
) -> None:
    (trl_value, trl_grad), (value, grad) = trl_out, ours
    assert trl_value.dtype == torch.float64
    torch.testing.assert_close(value, trl_value, rtol=tol, atol=tol)
    torch.testing.assert_close(grad, trl_grad, rtol=tol, atol=tol)
    assert bool(grad.abs().sum() > 0)


def token_clip_counts(batch: Batch, eps_low: float, eps_high: float) -> tuple[int, int]:
    """(# valid tokens in PPO's zero-gradient region, # valid tokens outside it)."""
    r = torch.exp(batch.lp - batch.old)
    a = batch.adv[:, None]
    clipped = ((a > 0) & (r > 1 + eps_high)) | ((a < 0) & (r < 1 - eps_low))
    return int((clipped & batch.mask).sum()), int((~clipped & batch.mask).sum())


# --------------------------------------------------------------------------- loss math


@pytest.mark.parametrize("seed", SEEDS)
def test_grpo_equals_ppo_clip_seq_mean_token_mean(
    make_trainer: MakeTrainer, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    batch = make_batch(seed)
    n_clipped, n_free = token_clip_counts(batch, 0.2, 0.2)
    assert n_clipped > 0 and n_free > 0  # both regions of the surrogate are exercised
    trainer = make_trainer(loss_type="grpo", epsilon=0.2)
    assert trainer.epsilon_low == trainer.epsilon_high == 0.2 and trainer.beta == 0.0
    trl_out = trl_loss_and_grad(trainer, batch, monkeypatch)
    ours = tether_loss_and_grad(
        lambda lp: ppo_clip(lp, batch.old, batch.adv, batch.mask, 0.2, 0.2, "seq-mean-token-mean")[0], batch
    )
    assert_agree(trl_out, ours)


@pytest.mark.parametrize("seed", SEEDS)
def test_grpo_with_beta_equals_ppo_clip_plus_kl_k3(
    make_trainer: MakeTrainer, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """TRL adds beta * k3 per token before aggregating; aggregation is linear, so the sum agrees."""
    beta = 0.04
    batch = make_batch(seed)
    trainer = make_trainer(loss_type="grpo", epsilon=0.2, beta=beta)
    assert trainer.beta == beta and trainer.ref_model is not None
    trl_out = trl_loss_and_grad(trainer, batch, monkeypatch)

    def ours(lp: torch.Tensor) -> torch.Tensor:
        pg, _ = ppo_clip(lp, batch.old, batch.adv, batch.mask, 0.2, 0.2, "seq-mean-token-mean")
        kl, _ = kl_k3(lp, batch.ref, batch.mask, coef=beta, aggregation="seq-mean-token-mean")
        return pg + kl

    assert_agree(trl_out, tether_loss_and_grad(ours, batch))


@pytest.mark.parametrize("seed", SEEDS)
def test_beta_term_alone_equals_kl_k3(
    make_trainer: MakeTrainer, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """TRL(beta) - TRL(beta=0) isolates beta * agg(k3); compare it with "kl_k3" alone."""
    beta = 0.04
    batch = make_batch(seed)
    with_kl = trl_loss_and_grad(make_trainer(loss_type="grpo", epsilon=0.2, beta=beta), batch, monkeypatch)
    without = trl_loss_and_grad(make_trainer(loss_type="grpo", epsilon=0.2), batch, monkeypatch)
    trl_kl = (with_kl[0] - without[0], with_kl[1] - without[1])
    assert bool(trl_kl[0] > 0)  # k3 >= 0, and lp != ref here
    ours = tether_loss_and_grad(
        lambda lp: kl_k3(lp, batch.ref, batch.mask, coef=beta, aggregation="seq-mean-token-mean")[0], batch
    )
    assert_agree(trl_kl, ours)


@pytest.mark.parametrize("seed", SEEDS)
def test_bias_corrected_kl_equals_kl_k3_with_old_logprobs(
    make_trainer: MakeTrainer, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """TRL use_bias_correction_kl=True (its default) multiplies k3 by r = pi / pi_old, with gradient."""
    beta = 0.04
    batch = make_batch(seed)
    trainer = make_trainer(loss_type="grpo", epsilon=0.2, beta=beta, use_bias_correction_kl=True)
    trl_out = trl_loss_and_grad(trainer, batch, monkeypatch, bias_correction_kl=True)

    def ours(lp: torch.Tensor) -> torch.Tensor:
        pg, _ = ppo_clip(lp, batch.old, batch.adv, batch.mask, 0.2, 0.2, "seq-mean-token-mean")
        kl, _ = kl_k3(
            lp, batch.ref, batch.mask, coef=beta, aggregation="seq-mean-token-mean", old_logprobs=batch.old
        )
        return pg + kl

    assert_agree(trl_out, tether_loss_and_grad(ours, batch))
    # The correction matters here: without old_logprobs the KL term differs.
    plain = (
        ppo_clip(batch.lp, batch.old, batch.adv, batch.mask, 0.2, 0.2, "seq-mean-token-mean")[0]
        + kl_k3(batch.lp, batch.ref, batch.mask, coef=beta)[0]
    )
    assert abs(float(plain - trl_out[0])) > 1e3 * TOL


@pytest.mark.parametrize("seed", SEEDS)
def test_dr_grpo_equals_ppo_clip_seq_mean_token_sum_norm(
    make_trainer: MakeTrainer, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    batch = make_batch(seed)
    trainer = make_trainer(loss_type="dr_grpo", epsilon=0.2)
    assert trainer.max_completion_length == MAX_COMPLETION
    trl_out = trl_loss_and_grad(trainer, batch, monkeypatch)
    agg = Aggregation("seq-mean-token-sum-norm", norm_length=float(MAX_COMPLETION))
    ours = tether_loss_and_grad(
        lambda lp: ppo_clip(lp, batch.old, batch.adv, batch.mask, 0.2, 0.2, agg)[0], batch
    )
    assert_agree(trl_out, ours)
    # The padded length T is not TRL's normaliser: the default norm_length would differ by T / L_max.
    default = ppo_clip(batch.lp, batch.old, batch.adv, batch.mask, 0.2, 0.2, "seq-mean-token-sum-norm")[0]
    torch.testing.assert_close(default * T / MAX_COMPLETION, trl_out[0], rtol=TOL, atol=TOL)


@pytest.mark.parametrize("seed", SEEDS)
def test_dapo_equals_clip_higher_token_mean(
    make_trainer: MakeTrainer, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    batch = make_batch(seed)
    n_clipped, n_free = token_clip_counts(batch, 0.2, 0.28)
    assert n_clipped > 0 and n_free > 0
    trainer = make_trainer(loss_type="dapo", epsilon=0.2, epsilon_high=0.28)
    assert (trainer.epsilon_low, trainer.epsilon_high) == (0.2, 0.28)
    # TRL's normaliser is num_items_in_batch / num_processes * grad_accum / steps_per_generation;
    # with the plain setup (checked in trl_loss_and_grad) it is exactly the number of valid tokens.
    n_tokens = float(batch.mask.sum())
    normaliser = (
        float(batch.inputs["num_items_in_batch"])
        / trainer.accelerator.num_processes
        * trainer.current_gradient_accumulation_steps
        / trainer.args.steps_per_generation
    )
    assert normaliser == n_tokens
    trl_out = trl_loss_and_grad(trainer, batch, monkeypatch)
    agg = Aggregation("token-mean", num_tokens=n_tokens)
    ours = tether_loss_and_grad(
        lambda lp: clip_higher(lp, batch.old, batch.adv, batch.mask, 0.2, 0.28, agg)[0], batch
    )
    assert_agree(trl_out, ours)
    # ... and the default token-mean (local count) is the same number here.
    local = clip_higher(batch.lp, batch.old, batch.adv, batch.mask)[0]
    torch.testing.assert_close(local, trl_out[0], rtol=TOL, atol=TOL)


@pytest.mark.parametrize("seed", SEEDS)
def test_cispo_absolute_bound_equals_trl_cispo(
    make_trainer: MakeTrainer, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    batch = make_batch(seed, noise=0.5)
    batch.old[0, 0] = batch.lp[0, 0] - 2.5  # r = e^2.5 > 5: at least one token hits TRL's cap
    r = torch.exp(batch.lp - batch.old)[batch.mask]
    assert bool((r > 5.0).any()) and bool((r < 5.0).any())
    trainer = make_trainer(loss_type="cispo", epsilon_high=5.0)
    assert trainer.epsilon_high == 5.0
    assert float(batch.inputs["num_items_in_batch"]) == float(batch.mask.sum())
    trl_out = trl_loss_and_grad(trainer, batch, monkeypatch)
    ours = tether_loss_and_grad(
        lambda lp: cispo(lp, batch.old, batch.adv, batch.mask, eps_high=5.0, bound="absolute")[0], batch
    )
    assert_agree(trl_out, ours)
    # Every valid token keeps a gradient -A w / N (never zeroed by clipping), none leaks into padding.
    grad = ours[1]
    assert bool((grad[batch.mask] != 0).all()) and bool((grad[~batch.mask] == 0).all())


@pytest.mark.parametrize("eps", [(0.2, 0.2), (3e-4, 4e-4)])
@pytest.mark.parametrize("seed", SEEDS)
def test_sequence_level_grpo_equals_gspo(
    make_trainer: MakeTrainer, monkeypatch: pytest.MonkeyPatch, seed: int, eps: tuple[float, float]
) -> None:
    eps_low, eps_high = eps
    batch = make_batch(seed)
    batch.old[1] = batch.lp[1] - 0.5  # s_1 = e^0.5: clipped for A_1 > 0 at both eps
    batch.adv[1] = batch.adv[1].abs() + 0.1
    trainer = make_trainer(
        loss_type="grpo", epsilon=eps_low, epsilon_high=eps_high, importance_sampling_level="sequence"
    )
    assert trainer.importance_sampling_level == "sequence"
    assert (trainer.epsilon_low, trainer.epsilon_high) == (eps_low, eps_high)
    trl_out = trl_loss_and_grad(trainer, batch, monkeypatch)
    ours = tether_loss_and_grad(
        lambda lp: gspo(lp, batch.old, batch.adv, batch.mask, eps_low, eps_high, "seq-mean-token-mean")[0],
        batch,
    )
    assert_agree(trl_out, ours)
    # Sequences whose clip is active (zero gradient) and sequences still free both occur.
    free = ours[1].abs().sum(-1) > 0
    assert not bool(free[1]) and bool(free.any())


@pytest.mark.parametrize("seed", SEEDS)
def test_sapo_equals_trl_sapo(make_trainer: MakeTrainer, monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    batch = make_batch(seed, noise=0.5)
    trainer = make_trainer(loss_type="sapo")
    assert (trainer.args.sapo_temperature_pos, trainer.args.sapo_temperature_neg) == (1.0, 1.05)
    trl_out = trl_loss_and_grad(trainer, batch, monkeypatch)
    # TRL picks the temperature with torch.where(A > 0, 1.0, 1.05), which makes it a float32
    # tensor: its tau_neg is 1.05 rounded to float32. With that value the two agree to 1e-10;
    # tether keeps the paper's 1.05 in the input's dtype (a ~1e-6 relative difference).
    tau_neg_trl = float(torch.tensor(1.05, dtype=torch.float32))
    assert tau_neg_trl != 1.05
    ours = tether_loss_and_grad(
        lambda lp: sapo(lp, batch.old, batch.adv, batch.mask, tau_neg=tau_neg_trl)[0], batch
    )
    assert_agree(trl_out, ours)
    exact = tether_loss_and_grad(lambda lp: sapo(lp, batch.old, batch.adv, batch.mask)[0], batch)
    assert_agree(trl_out, exact, tol=1e-5)
    # Both temperatures are exercised, and no valid token loses its gradient (a soft gate, no cliff).
    assert bool((batch.adv > 0).any()) and bool((batch.adv < 0).any())
    assert bool((ours[1][batch.mask] != 0).all())


@pytest.mark.parametrize("seed", SEEDS)
def test_vespo_equals_trl_vespo(
    make_trainer: MakeTrainer, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    batch = make_batch(seed, noise=0.2)
    trainer = make_trainer(loss_type="vespo")
    args = trainer.args
    assert (args.vespo_k_pos, args.vespo_lambda_pos, args.vespo_k_neg, args.vespo_lambda_neg) == (
        2.0,
        3.0,
        3.0,
        2.0,
    )
    assert float(batch.inputs["num_items_in_batch"]) == float(batch.mask.sum())
    trl_out = trl_loss_and_grad(trainer, batch, monkeypatch)
    ours = tether_loss_and_grad(lambda lp: vespo(lp, batch.old, batch.adv, batch.mask)[0], batch)
    assert_agree(trl_out, ours)
    # The sequence weights spread over the kernel: phi differs between rows.
    phi_rows = (ours[1] / batch.adv[:, None])[batch.mask]
    assert float(phi_rows.max() - phi_rows.min()) > 1e-3


@pytest.mark.parametrize("seed", SEEDS)
def test_luspo_equals_gspo_with_seq_mean_token_sum(
    make_trainer: MakeTrainer, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """TRL's luspo: the sequence-level clipped ratio, each sequence's loss summed over its tokens."""
    batch = make_batch(seed)
    batch.old[1] = batch.lp[1] - 0.5  # one sequence clipped
    batch.adv[1] = batch.adv[1].abs() + 0.1
    # the recipe's parameters: the LUSPO paper's clip range (section 5.1, per TRL's paper index)
    recipe = load_recipe("luspo")
    assert recipe.policy_loss["name"] == "gspo"
    params = recipe.policy_loss["params"]
    assert params == {"eps_low": 2e-3, "eps_high": 2.5e-3, "aggregation": "seq-mean-token-sum"}
    trainer = make_trainer(
        loss_type="luspo", epsilon=2e-3, epsilon_high=2.5e-3, importance_sampling_level="sequence"
    )
    trl_out = trl_loss_and_grad(trainer, batch, monkeypatch)
    ours = tether_loss_and_grad(lambda lp: gspo(lp, batch.old, batch.adv, batch.mask, **params)[0], batch)
    assert_agree(trl_out, ours)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
def test_empty_row_needs_the_global_sequence_count(
    make_trainer: MakeTrainer, monkeypatch: pytest.MonkeyPatch, loss_type: str
) -> None:
    """TRL's seq-mean counts an all-padding row; tether does with Aggregation(num_sequences=B)."""
    batch = make_batch(11, empty_row=True)
    trl_out = trl_loss_and_grad(make_trainer(loss_type=loss_type, epsilon=0.2), batch, monkeypatch)
    mode = "seq-mean-token-mean" if loss_type == "grpo" else "seq-mean-token-sum-norm"
    agg = Aggregation(mode, num_sequences=float(B), norm_length=float(MAX_COMPLETION))
    ours = tether_loss_and_grad(
        lambda lp: ppo_clip(lp, batch.old, batch.adv, batch.mask, 0.2, 0.2, agg)[0], batch
    )
    assert_agree(trl_out, ours)
    local = Aggregation(mode, norm_length=float(MAX_COMPLETION))  # counts the B - 1 non-empty rows
    value = ppo_clip(batch.lp, batch.old, batch.adv, batch.mask, 0.2, 0.2, local)[0]
    torch.testing.assert_close(value * (B - 1) / B, trl_out[0], rtol=TOL, atol=TOL)


# --------------------------------------------------------------------------- real forward pass


def completion_logprobs(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """tether's side: log_softmax(logits / temperature) of the completion tokens, [B, T]."""
    ids = torch.cat([batch.inputs["prompt_ids"], batch.inputs["completion_ids"]], dim=1)
    attention = torch.cat([batch.inputs["prompt_mask"], batch.inputs["completion_mask"]], dim=1)
    logits = model(input_ids=ids, attention_mask=attention).logits  # plain forward: full logits
    # position P - 1 + t predicts completion token t
    scores = torch.log_softmax(logits[:, P - 1 : -1].double() / TEMPERATURE, dim=-1)
    return scores.gather(-1, batch.inputs["completion_ids"][..., None]).squeeze(-1)


@pytest.mark.parametrize("seed", [0, 1])
def test_real_forward_grpo_matches_tether_on_model_logits(make_trainer: MakeTrainer, seed: int) -> None:
    trainer = make_trainer(loss_type="grpo", epsilon=0.2)
    check_plain_setup(trainer)
    model = trainer.model
    batch = make_batch(seed)
    with torch.no_grad():
        lp_now = completion_logprobs(model, batch)
    gen = torch.Generator().manual_seed(100 + seed)
    old = (lp_now + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)).float()
    batch.inputs["old_per_token_logps"] = old
    params = [p for p in model.parameters() if p.requires_grad]

    # TRL's own scorer (fused LM head, logits / temperature), zero where the completion is padded.
    ids = torch.cat([batch.inputs["prompt_ids"], batch.inputs["completion_ids"]], dim=1)
    attention = torch.cat([batch.inputs["prompt_mask"], batch.inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        trl_lp, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, attention, T)
    torch.testing.assert_close(trl_lp.double()[batch.mask], lp_now[batch.mask], rtol=0, atol=2e-6)
    assert bool((trl_lp[~batch.mask] == 0).all())

    trl_loss = trainer._compute_loss(model, batch.inputs)
    trl_grads = torch.autograd.grad(trl_loss, params)

    lp = completion_logprobs(model, batch)
    loss, _ = ppo_clip(lp, old.double(), batch.adv, batch.mask, 0.2, 0.2, "seq-mean-token-mean")
    grads = torch.autograd.grad(loss, params)

    torch.testing.assert_close(loss.float(), trl_loss.float(), rtol=0, atol=1e-6)
    for g, tg in zip(grads, trl_grads, strict=True):
        torch.testing.assert_close(g.float(), tg.float(), rtol=0, atol=1e-6)  # |g| up to ~0.3
    assert sum(float(g.abs().sum()) for g in trl_grads) > 0
