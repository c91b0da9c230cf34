"""Rollout sampler, processed log-probs and the vLLM backend's guard."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tether.config import ConfigError, from_dict
from tether.errors import InvalidInputError, TetherError
from tether.lm.logprobs import (
    completion_logprobs,
    entropy_from_logprobs,
    processed_logprobs,
    truncation_mask,
)
from tether.lm.rollout import HFSampler, RolloutBatch, SamplingConfig, make_sampler

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 "
PAD, BOS, EOS = 0, 1, 2


class CharTok:
    """A character tokenizer with the few methods the sampler uses: 0 pad, 1 bos, 2 eos."""

    pad_token_id = PAD
    bos_token_id = BOS
    eos_token_id = EOS

    def __init__(self) -> None:
        self.stoi = {c: i + 3 for i, c in enumerate(CHARS)}
        self.itos = {i: c for c, i in self.stoi.items()}

    def __len__(self) -> int:
        return len(CHARS) + 3

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, list[list[int]]]:
        bos = [BOS] if add_special_tokens else []
        return {"input_ids": [bos + [self.stoi[c] for c in t] for t in texts]}

    def batch_decode(self, rows: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        return ["".join(self.itos.get(int(i), "") for i in row) for row in rows]


def tiny_model(seed: int = 0, kv_heads: int = 2, scale: float = 1.0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(CHARS) + 3,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger logits than the 0.02-std init, so that sampling is not ~uniform
        model.lm_head.weight.mul_(scale)
    return model


PROMPTS = ["a", "hello world", "xyz 12", "the quick brown fox"]


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_model(scale=40.0)


@pytest.fixture(scope="module")
def tok() -> CharTok:
    return CharTok()


def gen(model, tok, seed=0, prompts=PROMPTS, fast=True, **cfg) -> RolloutBatch:
    sampler = HFSampler(model, tok, SamplingConfig(**cfg), fast_decode=fast)
    return sampler.generate(list(prompts), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ processed_logprobs


def test_temperature_only_is_scaled_log_softmax() -> None:
    logits = torch.randn(3, 5, 11)
    got = processed_logprobs(logits, temperature=0.7, top_k=0, top_p=1.0)
    torch.testing.assert_close(got, torch.log_softmax(logits / 0.7, dim=-1))


def test_top_k_keeps_k_and_renormalises() -> None:
    logits = torch.randn(4, 20)
    lp = processed_logprobs(logits, temperature=1.0, top_k=5, top_p=1.0)
    kept = torch.isfinite(lp)
    assert (kept.sum(-1) == 5).all()
    assert torch.equal(kept, logits >= logits.topk(5, dim=-1).values[:, -1:])
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(4))


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.7, 0.95])
def test_top_p_is_the_smallest_set_reaching_the_mass(top_p: float) -> None:
    logits = torch.randn(8, 30) * 2
    probs = torch.softmax(logits / 0.9, dim=-1)
    lp = processed_logprobs(logits, temperature=0.9, top_k=0, top_p=top_p)
    kept = torch.isfinite(lp)
    for row in range(8):
        mass = probs[row][kept[row]].sum()
        assert mass >= top_p - 1e-6
        assert kept[row][probs[row].argmax()]  # the argmax is always kept
        smallest_kept = probs[row][kept[row]].min()
        assert mass - smallest_kept < top_p  # minimal: dropping the least likely falls short
        # every kept token is at least as likely as every dropped one
        if (~kept[row]).any():
            assert smallest_kept >= probs[row][~kept[row]].max()
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(8))


def test_top_k_then_top_p() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    lp = processed_logprobs(logits, temperature=1.0, top_k=3, top_p=0.7)
    # top-3 renormalised: [0.665, 0.245, 0.090]; the first alone is < 0.7, two reach it
    assert torch.isfinite(lp).tolist() == [[True, True, False, False, False]]


def test_processed_logprobs_is_differentiable() -> None:
    logits = torch.randn(2, 3, 17, requires_grad=True)
    lp = processed_logprobs(logits, temperature=0.8, top_k=6, top_p=0.8)
    ent = entropy_from_logprobs(lp)
    tokens = lp.detach().argmax(-1)
    (lp.gather(-1, tokens[..., None]).sum() + ent.sum()).backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0
    truncated = ~torch.isfinite(lp.detach())
    assert (logits.grad[truncated] == 0).all()


def test_entropy_of_uniform_logits_is_log_v() -> None:
    lp = processed_logprobs(torch.zeros(3, 40), temperature=0.5)
    torch.testing.assert_close(entropy_from_logprobs(lp), torch.full((3,), math.log(40)))
    # ties at the k-th value are kept (as Hugging Face's top-k); 8 equal leaders, then top-k=8
    lp = processed_logprobs(torch.cat([torch.zeros(1, 8), -torch.ones(1, 32)], 1), temperature=1.0, top_k=8)
    torch.testing.assert_close(entropy_from_logprobs(lp), torch.tensor([math.log(8)]))


# ------------------------------------------------------------------ sampler


def test_shapes_masks_eos_and_truncation(model, tok) -> None:
    prompts = PROMPTS * 4
    b = gen(model, tok, seed=3, prompts=prompts, max_new_tokens=12, temperature=1.5)
    n, t = b.completion_ids.shape
    assert len(b) == n == len(prompts) and t <= 12
    assert b.prompt_ids.shape == b.prompt_mask.shape and b.prompt_mask.dtype == torch.bool
    assert b.completion_mask.dtype == torch.bool and b.truncated.dtype == torch.bool
    assert b.sampler_logprobs.dtype == torch.float32
    assert b.prompt_texts == prompts and len(b.completion_texts) == n
    # prompts left-padded: padding only before the first real token
    assert (b.prompt_mask.long().diff(dim=1) >= 0).all()
    assert (b.prompt_ids[~b.prompt_mask] == PAD).all()
    # completion mask is a prefix; padding after it
    assert (b.completion_mask.long().diff(dim=1) <= 0).all()
    assert (b.completion_ids[~b.completion_mask] == PAD).all()
    assert (b.sampler_logprobs[~b.completion_mask] == 0).all()
    assert (b.sampler_logprobs[b.completion_mask] <= 0).all()
    lengths = b.completion_mask.sum(1)
    assert b.truncated.any() and (~b.truncated).any(), "the fixture should produce both kinds of rows"
    for i in range(n):
        ids = b.completion_ids[i, : lengths[i]].tolist()
        if b.truncated[i]:
            assert EOS not in ids and lengths[i] == 12
        else:
            assert ids[-1] == EOS and EOS not in ids[:-1]  # EOS included, nothing after it
        assert b.completion_texts[i] == tok.batch_decode([[x for x in ids if x > EOS]])[0]


def test_same_seed_same_samples_and_other_seed_differs(model, tok) -> None:
    a = gen(model, tok, seed=7, max_new_tokens=10)
    b = gen(model, tok, seed=7, max_new_tokens=10)
    c = gen(model, tok, seed=8, max_new_tokens=10)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.sampler_logprobs, b.sampler_logprobs)
    assert not torch.equal(a.completion_ids, c.completion_ids)


def greedy_reference(model, tok, prompt: str, steps: int) -> list[int]:
    ids = torch.tensor(tok([prompt])["input_ids"])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == EOS:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


@pytest.mark.parametrize("settings", [{"top_k": 1}, {"temperature": 1e-4}])
def test_greedy_limits_equal_argmax_decoding(model, tok, settings) -> None:
    b = gen(model, tok, seed=0, max_new_tokens=8, **settings)
    for i, prompt in enumerate(PROMPTS):
        got = b.completion_ids[i, : b.completion_mask[i].sum()].tolist()
        assert got == greedy_reference(model, tok, prompt, 8)
    if settings.get("top_k") == 1:
        assert (b.sampler_logprobs == 0).all()


def test_left_padding_batch_equals_single_prompt(model, tok) -> None:
    batch = gen(model, tok, seed=0, max_new_tokens=10, top_k=1)
    for i, prompt in enumerate(PROMPTS):
        single = gen(model, tok, seed=0, prompts=[prompt], max_new_tokens=10, top_k=1)
        n = int(single.completion_mask.sum())
        assert batch.completion_ids[i, :n].tolist() == single.completion_ids[0, :n].tolist()
        assert int(batch.completion_mask[i].sum()) == n
        torch.testing.assert_close(batch.sampler_logprobs[i, :n], single.sampler_logprobs[0, :n])


SETTINGS = [
    {"temperature": 1.0},
    {"temperature": 0.7},
    {"temperature": 1.6, "top_k": 5},
    {"temperature": 0.9, "top_p": 0.8},
    {"temperature": 1.3, "top_k": 10, "top_p": 0.9},
]


@pytest.mark.parametrize("fast", [True, False], ids=["fast-decode", "model-call"])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_sampler_logprobs_equal_trainer_logprobs(tok, settings, fast) -> None:
    model = tiny_model(seed=1, scale=20.0)
    b = gen(model, tok, seed=5, prompts=PROMPTS * 2, fast=fast, max_new_tokens=14, **settings)
    lp, ent = completion_logprobs(
        model, b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask, **settings
    )
    assert ent is not None
    gap = (lp.detach() - b.sampler_logprobs).abs()
    assert gap.max() < 1e-5, f"sampler/trainer log-prob gap {gap.max():.2e}"
    assert (ent[~b.completion_mask] == 0).all() and (ent[b.completion_mask] >= 0).all()


def test_fast_decode_matches_model_calls(tok) -> None:
    model = tiny_model(seed=2, kv_heads=4, scale=20.0)
    a = gen(model, tok, seed=1, fast=True, max_new_tokens=12, top_p=0.9)
    b = gen(model, tok, seed=1, fast=False, max_new_tokens=12, top_p=0.9)
    assert torch.equal(a.completion_ids, b.completion_ids)
    torch.testing.assert_close(a.sampler_logprobs, b.sampler_logprobs, atol=1e-5, rtol=0)


def test_completion_logprobs_grad_chunks_and_entropy(model, tok) -> None:
    b = gen(model, tok, seed=2, max_new_tokens=9, temperature=1.2, top_k=7)
    args = (b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask)
    kw = {"temperature": 1.2, "top_k": 7}
    lp, ent = completion_logprobs(model, *args, **kw)
    lp2, ent2 = completion_logprobs(model, *args, logits_chunk=3, **kw)
    assert ent is not None and ent2 is not None
    torch.testing.assert_close(lp, lp2)
    torch.testing.assert_close(ent, ent2)
    # the batch's tensors (made under inference_mode) can be used in a backward pass
    model.zero_grad()
    (lp2.sum() + ent2.sum()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # entropy against a direct computation from the full logits
    ids = torch.cat([b.prompt_ids, b.completion_ids], 1)
    mask = torch.cat([b.prompt_mask, b.completion_mask], 1).long()
    with torch.no_grad():
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)
        ).logits
    t = b.completion_ids.shape[1]
    full = processed_logprobs(logits[:, -t - 1 : -1], **kw)
    expect = torch.where(b.completion_mask, entropy_from_logprobs(full), 0.0)
    torch.testing.assert_close(ent.detach(), expect, atol=1e-5, rtol=1e-5)
    _, none = completion_logprobs(model, *args, compute_entropy=False, **kw)
    assert none is None


def test_training_mode_restored_and_no_grad_leak(tok) -> None:
    model = tiny_model()
    model.train()
    b = gen(model, tok, max_new_tokens=4)
    assert model.training
    assert not b.sampler_logprobs.requires_grad
    model.eval()
    gen(model, tok, max_new_tokens=4)
    assert not model.training


def test_stops_early_when_all_rows_end(model, tok) -> None:
    sampler = HFSampler(model, tok, SamplingConfig(max_new_tokens=16))
    sampler.eos_ids = list(range(len(tok)))  # every token ends a row: all rows end at step 1
    b = sampler.generate(PROMPTS, generator=torch.Generator().manual_seed(0))
    assert b.completion_ids.shape == (len(PROMPTS), 1)
    assert b.completion_mask.all() and not b.truncated.any()


def test_sampling_config_validation() -> None:
    assert from_dict(SamplingConfig, {"temperature": 0.5, "top_k": 3}).top_k == 3
    for bad in ({"temperature": 0.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}, {"max_new_tokens": 0}):
        with pytest.raises(ConfigError):
            from_dict(SamplingConfig, bad)
    with pytest.raises(ConfigError):
        from_dict(SamplingConfig, {"backend": "sglang"})


def test_make_sampler_picks_backend(model, tok) -> None:
    assert isinstance(make_sampler(model, tok, SamplingConfig()), HFSampler)


# ------------------------------------------------------------------ vLLM backend


def test_vllm_backend_without_vllm_or_gpu_says_what_to_install(model, tok) -> None:
    from tether.lm.vllm_backend import vllm_unavailable_reason

    if vllm_unavailable_reason() is None:
        pytest.skip("vllm and a GPU are available here")
    with pytest.raises(TetherError, match=r"pip install 'tether\[vllm\]'"):
        make_sampler(model, tok, SamplingConfig(backend="vllm"))


def _vllm_test_policy() -> tuple[Any, LlamaForCausalLM]:
    """The character tokenizer and a small random Llama (seed 0) for the vLLM GPU tests."""
    from tether.lm.tokenizer import build_char_tokenizer

    hf_tok = build_char_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(hf_tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            pad_token_id=hf_tok.pad_token_id,
            bos_token_id=hf_tok.bos_token_id,
            eos_token_id=hf_tok.eos_token_id,
        )
    )
    return hf_tok, model


def test_vllm_sampler_matches_trainer_logprobs() -> None:  # pragma: no cover - GPU machines only
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("the vLLM backend needs a CUDA GPU")
    from tether.lm.vllm_backend import VLLMSampler

    hf_tok, model = _vllm_test_policy()
    settings = {"temperature": 0.9, "top_k": 10, "top_p": 0.9}
    sampler = VLLMSampler(model, hf_tok, SamplingConfig(max_new_tokens=12, backend="vllm", **settings))
    assert sampler.dtype == "float32"  # the policy's dtype, not vLLM's auto (bf16)
    b = sampler.generate(PROMPTS, generator=torch.Generator().manual_seed(0))
    assert b.completion_ids.shape[0] == len(PROMPTS)
    assert (b.completion_mask.long().diff(dim=1) <= 0).all()
    model = model.cuda()
    tensors = (b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask)
    lp, _ = completion_logprobs(model, *(x.cuda() for x in tensors), **settings)
    if sampler.processed_logprobs:
        gap = (lp.detach().cpu() - b.sampler_logprobs)[b.completion_mask].abs()
        assert gap.max() < 1e-2
    sampler.sync_weights(model)
    again = sampler.generate(PROMPTS, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.completion_ids, b.completion_ids)


def test_vllm_sampler_follows_the_synced_weights() -> None:  # pragma: no cover - GPU machines only
    """After an update (lm_head x2) and sync_weights, the engine samples from the new policy: its
    log-probs are the updated trainer's (gap < 1e-2), far from the old policy's (CPU, HF sampler:
    0.16 mean at temperature 0.9)."""
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("the vLLM backend needs a CUDA GPU")
    import copy

    from tether.lm.vllm_backend import VLLMSampler

    hf_tok, model = _vllm_test_policy()
    settings = {"temperature": 0.9}
    sampler = VLLMSampler(model, hf_tok, SamplingConfig(max_new_tokens=12, backend="vllm", **settings))
    assert sampler.processed_logprobs  # vLLM >= 0.10: the log-probs of the distribution it drew from
    before = copy.deepcopy(model).cuda()
    model = model.cuda()
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    sampler.sync_weights(model)
    b = sampler.generate(PROMPTS, generator=torch.Generator().manual_seed(0))
    tensors = [x.cuda() for x in (b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask)]
    new, _ = completion_logprobs(model, *tensors, **settings)
    old, _ = completion_logprobs(before, *tensors, **settings)
    mask = b.completion_mask
    near = (new.detach().cpu() - b.sampler_logprobs)[mask].abs()
    far = (old.detach().cpu() - b.sampler_logprobs)[mask].abs()
    assert near.max() < 1e-2
    assert far.mean() > 0.1


TEMPLATE_PROMPTS = ["what is 1 2", "what is 13 27", "what is 1 2", "what is 7 5", "what is 1 2"]


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_fast_prefill_shared_prefix_and_repeated_prompts(tok, kv_heads) -> None:
    """The fast prefill computes repeated prompts and a common prefix once; same samples."""
    model = tiny_model(seed=3, kv_heads=kv_heads, scale=20.0)
    settings = {"temperature": 0.9, "top_k": 12, "top_p": 0.9}
    a = gen(model, tok, seed=4, prompts=TEMPLATE_PROMPTS, fast=True, max_new_tokens=10, **settings)
    b = gen(model, tok, seed=4, prompts=TEMPLATE_PROMPTS, fast=False, max_new_tokens=10, **settings)
    assert torch.equal(a.completion_ids, b.completion_ids)
    torch.testing.assert_close(a.sampler_logprobs, b.sampler_logprobs, atol=1e-5, rtol=0)
    lp, _ = completion_logprobs(
        model, a.prompt_ids, a.prompt_mask, a.completion_ids, a.completion_mask, **settings
    )
    assert (lp - a.sampler_logprobs).abs().max() < 1e-5


def _reference_truncation(x: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
    keep = x >= kth
    x = x.masked_fill(~keep, float("-inf"))
    sorted_logits, _ = torch.sort(x, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    keep_sorted = (probs.cumsum(dim=-1) - probs) < top_p
    keep_sorted[..., 0] = True
    # every token tied with the least probable kept one is kept too
    least = sorted_logits.masked_fill(~keep_sorted, float("inf")).amin(dim=-1, keepdim=True)
    return keep & (x >= least)


@pytest.mark.parametrize("top_k,top_p", [(5, 0.9), (20, 0.95), (3, 0.5), (1, 0.3)])
def test_top_k_then_top_p_shortcut_equals_full_sort(top_k: int, top_p: float) -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 7, 40) * 3
    assert torch.equal(truncation_mask(x, top_k, top_p), _reference_truncation(x, top_k, top_p))
    tied = x.clone()
    tied[..., :4] = tied.amax(dim=-1, keepdim=True) + 1.0  # ties at the k-th logit: the full sort
    got = truncation_mask(tied, 2, top_p)
    assert got is not None and (got.sum(dim=-1) >= 1).all()
    assert torch.equal(got, _reference_truncation(tied, 2, top_p))
    assert bool(got[..., :4].all())  # the four tied tokens are kept or dropped together


@pytest.mark.parametrize("top_k,top_p", [(0, 0.7935), (4, 1.0), (4, 0.9), (3, 0.6)])
def test_truncation_depends_on_the_values_only(top_k: int, top_p: float) -> None:
    """Tied logits at the top-k or nucleus boundary: the kept set does not change when the tied
    tokens swap places in the vocabulary or when other rows (with or without ties) join the batch,
    so the sampler's [N, V] steps and the trainer's [N, T, V] pass keep the same tokens."""
    row = torch.tensor([3.0, 1.0, 1.0, 0.0, -1.0, -2.0])
    swapped = row[[0, 2, 1, 3, 4, 5]]
    alone = truncation_mask(row[None], top_k, top_p)
    assert alone is not None
    assert torch.equal(truncation_mask(swapped[None], top_k, top_p), alone[:, [0, 2, 1, 3, 4, 5]])
    assert bool(alone[0, 1]) == bool(alone[0, 2])
    other = torch.tensor([[2.0, 2.0, 2.0, 2.0, 2.0, 1.0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    in_batch = truncation_mask(torch.cat([row[None], other]), top_k, top_p)
    assert torch.equal(in_batch[:1], alone)
    gen = torch.Generator().manual_seed(0)
    bf16 = (torch.randn(200, 40, generator=gen) * 2).bfloat16().float()  # many ties
    whole = truncation_mask(bf16, top_k, top_p)
    for i in range(0, 200, 37):
        assert torch.equal(truncation_mask(bf16[i : i + 1], top_k, top_p), whole[i : i + 1])


def test_a_sampled_token_outside_the_support_keeps_a_finite_logprob() -> None:
    """The trainer scores a token that its (moved) policy or the reference would truncate: it
    stays in the support with its probability among the kept tokens and itself, not -inf."""
    logits = torch.tensor([[[4.0, 3.0, 0.0, -1.0]]])
    sampled = torch.tensor([[2]])
    plain = processed_logprobs(logits, 1.0, top_k=2)
    assert plain[0, 0, 2] == float("-inf")
    kept = processed_logprobs(logits, 1.0, top_k=2, sampled_ids=sampled)
    want = logits[0, 0, 2] - torch.logsumexp(logits[0, 0, :3], dim=0)
    torch.testing.assert_close(kept[0, 0, 2], want)
    assert kept[0, 0, 3] == float("-inf")
    inside = processed_logprobs(logits, 1.0, top_k=2, sampled_ids=torch.tensor([[0]]))
    torch.testing.assert_close(inside, plain)  # a token kept anyway: nothing changes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fast_decode_under_autocast_stays_finite_and_near_the_trainer(tok, dtype) -> None:
    """Under autocast (float32 weights, half-precision matmuls) the fast decoder's masked scores
    must not overflow: left-padding rows attend to nothing and once gave NaN in bf16."""
    from tether.lm.precision import set_autocast

    model = tiny_model(seed=1, scale=5.0)
    set_autocast(model, torch.device("cpu"), dtype)
    fast = gen(model, tok, seed=0, prompts=PROMPTS * 2, fast=True, max_new_tokens=10)
    calls = gen(model, tok, seed=0, prompts=PROMPTS * 2, fast=False, max_new_tokens=10)
    assert torch.isfinite(fast.sampler_logprobs).all()
    lp, _ = completion_logprobs(
        model, fast.prompt_ids, fast.prompt_mask, fast.completion_ids, fast.completion_mask
    )
    gap = (lp.detach() - fast.sampler_logprobs).abs()[fast.completion_mask]
    assert gap.mean() < 0.01 and gap.max() < 0.05, (gap.mean(), gap.max())
    agree = (fast.completion_ids == calls.completion_ids).float().mean()
    assert agree > 0.9  # the same draws up to half-precision rounding of the logits


def test_a_prompt_past_the_models_context_is_a_clear_error(tok) -> None:
    """Prompt + max_new_tokens beyond the positions the model has: a clear error naming the
    numbers and the settings, not GPT-2's bare IndexError (learned positions) or silent running
    past the context (rotary positions)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(CHARS) + 3,
            n_positions=16,
            n_embd=16,
            n_layer=1,
            n_head=2,
            bos_token_id=BOS,
            eos_token_id=EOS,
        )
    )
    prompt = "hello world1"  # 12 characters + BOS = 13 tokens
    with pytest.raises(
        InvalidInputError, match=r"13 tokens plus 10 new tokens is 23, past the model's context of 16"
    ):
        gen(gpt2, tok, prompts=[prompt], max_new_tokens=10)
    assert gen(gpt2, tok, prompts=[prompt], max_new_tokens=3).completion_ids.shape[1] <= 3  # 16 fits
    with pytest.raises(InvalidInputError, match=r"sampling\.max_new_tokens"):
        gen(tiny_model(), tok, prompts=["x" * 130], max_new_tokens=2)  # rotary: 128 positions


def test_a_zero_exponential_draw_never_picks_a_truncated_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exp(1) can return exactly 0 (probability ~2^-24 per draw in float32): -inf - log 0 is NaN,
    and argmax would pick the truncated token."""
    from tether.lm.rollout import sample_from_logprobs

    monkeypatch.setattr(torch.Tensor, "exponential_", lambda self, *a, **k: self.zero_())
    logprobs = torch.tensor([[float("-inf"), 0.0, float("-inf")], [-0.1, float("-inf"), -2.4]])
    assert sample_from_logprobs(logprobs).tolist() == [1, 0]


def test_a_final_stop_token_is_left_out_of_the_completion_text() -> None:
    """A chat model's end-of-turn id in its generation config but not flagged special (as Phi-3's
    <|end|> shipped) ends the sample; the text the verifier reads leaves it out, the ids keep it."""
    import types

    from tokenizers import AddedToken

    from tether.lm.tasks import get_task
    from tether.lm.tokenizer import build_char_tokenizer

    hf_tok = build_char_tokenizer()
    hf_tok.add_tokens([AddedToken("<|end|>", special=False)])
    end = hf_tok.convert_tokens_to_ids("<|end|>")
    script = [*hf_tok("42", add_special_tokens=False)["input_ids"], end]

    class Scripted(torch.nn.Module):
        """Emits '4', '2', <|end|> whatever the input."""

        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.generation_config = types.SimpleNamespace(eos_token_id=[hf_tok.eos_token_id, end])
            self.calls = 0

        def forward(self, input_ids: torch.Tensor, **kw: object) -> types.SimpleNamespace:
            logits = torch.full((input_ids.shape[0], input_ids.shape[1], len(hf_tok)), -1e9)
            logits[:, -1, script[min(self.calls, len(script) - 1)]] = 0.0
            self.calls += 1
            return types.SimpleNamespace(logits=logits)

    sampler = HFSampler(Scripted(), hf_tok, SamplingConfig(max_new_tokens=8), fast_decode=False)
    out = sampler.generate(["40+2="])
    assert out.completion_texts == ["42"] and not out.truncated[0]
    assert out.completion_ids[0].tolist() == script and out.completion_mask[0].all()  # trained on
    task = get_task("arithmetic", digits=2, operations="+")
    prompt = next(p for p in task.prompts("train") if p.answer == "42")
    assert task.score(prompt, out.completion_texts[0]).correct
