"""Shared-prompt forward passes (Prefix Grouper): the same logits and gradients as a plain pass."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tether.lm.logprobs import (
    completion_distribution,
    completion_logits,
    completion_logprobs,
    position_ids_from_mask,
    prompt_groups,
)
from tether.lm.model import _enable_checkpointing

VOCAB = 40


def tiny(
    config_cls: type,
    model_cls: type,
    seed: int = 0,
    hidden: int = 32,
    intermediate: int = 64,
    kv_heads: int = 2,
) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = config_cls(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return model_cls(cfg)


def llama(seed: int = 0) -> torch.nn.Module:
    return tiny(LlamaConfig, LlamaForCausalLM, seed)


def qwen2(seed: int = 0) -> torch.nn.Module:
    return tiny(Qwen2Config, Qwen2ForCausalLM, seed)


def grouped_batch(
    seed: int = 0, prompts: int = 3, group: int = 4, t: int = 6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompts of different lengths, each repeated ``group`` times in shuffled row
    order, and right-padded completions of different lengths (one of full length ``t``)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([2, 5, 3, 4, 1][:prompts])
    width = int(lengths.max())
    ids = torch.randint(1, VOCAB, (prompts, width), generator=g)
    mask = torch.arange(width)[None, :] >= (width - lengths)[:, None]
    ids = ids.masked_fill(~mask, 0)
    order = torch.randperm(prompts * group, generator=g)
    p_ids, p_mask = ids.repeat_interleave(group, 0)[order], mask.repeat_interleave(group, 0)[order]
    n = prompts * group
    c_ids = torch.randint(1, VOCAB, (n, t), generator=g)
    c_len = torch.randint(1, t + 1, (n,), generator=g)
    c_len[0] = t
    c_mask = torch.arange(t)[None, :] < c_len[:, None]
    return p_ids, p_mask, c_ids.masked_fill(~c_mask, 0), c_mask


def reference_logits(model, p_ids, p_mask, c_ids, c_mask) -> torch.Tensor:
    """The textbook computation: one pass over the whole of prompt + completion."""
    ids = torch.cat([p_ids, c_ids], 1)
    mask = torch.cat([p_mask, c_mask], 1).long()
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    t = c_ids.shape[1]
    return out.logits[:, -t - 1 : -1]


def test_prompt_groups_by_hand() -> None:
    ids = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 5, 6], [0, 5, 6], [7, 8, 9]])
    mask = ids != 0
    first, inverse = prompt_groups(ids, mask)
    assert len(first) == 2
    assert torch.equal(ids[first][inverse], ids)
    assert inverse[0] == inverse[2] == inverse[3] != inverse[1] == inverse[4]
    # same tokens but a different mask (a pad id used as a real token) is another prompt
    mask2 = mask.clone()
    mask2[2, 0] = True
    first2, _ = prompt_groups(ids, mask2)
    assert len(first2) == 3
    assert prompt_groups(ids[:2], mask[:2]) is None  # all rows differ
    assert prompt_groups(ids[:1], mask[:1]) is None


@pytest.mark.parametrize("make", [llama, qwen2], ids=["llama", "qwen2"])
def test_shared_prompt_logits_and_gradients_equal_the_plain_pass(make) -> None:
    model = make()
    model.train()
    batch = grouped_batch()
    c_mask = batch[3]
    results = []
    for share in (True, False, None):
        model.zero_grad()
        if share is None:
            logits = reference_logits(model, *batch)
        else:
            logits = completion_logits(model, *batch, share_prompts=share)
        lp = logits.float().log_softmax(-1).gather(-1, batch[2].unsqueeze(-1)).squeeze(-1)
        loss = (lp * c_mask).sum() + (logits.float().pow(2).mean(-1) * c_mask).sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((logits.detach(), grads))
    (shared, g_shared), (plain, g_plain), (ref, g_ref) = results
    assert shared.shape == ref.shape == (12, 6, VOCAB)
    m = c_mask.unsqueeze(-1).expand_as(ref)
    torch.testing.assert_close(shared[m], ref[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain[m], ref[m], atol=1e-5, rtol=1e-5)
    for name in g_ref:
        torch.testing.assert_close(g_shared[name], g_ref[name], atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(g_plain[name], g_ref[name], atol=1e-5, rtol=1e-4, msg=name)
    assert any(g.abs().sum() > 0 for g in g_shared.values())


def count_token_positions(model, fn) -> int:
    """Token positions fed through the embedding during ``fn()``."""
    seen: list[int] = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda _m, args, _o: seen.append(args[0].numel())
    )
    try:
        fn()
    finally:
        hook.remove()
    return sum(seen)


def test_shared_pass_feeds_each_prompt_once() -> None:
    model = llama()
    p_ids, p_mask, c_ids, c_mask = grouped_batch(prompts=3, group=4, t=6)
    n, width, t = p_ids.shape[0], p_ids.shape[1], c_ids.shape[1]
    with torch.no_grad():
        shared = count_token_positions(model, lambda: completion_logits(model, p_ids, p_mask, c_ids, c_mask))
        plain = count_token_positions(
            model, lambda: completion_logits(model, p_ids, p_mask, c_ids, c_mask, share_prompts=False)
        )
    assert shared == 3 * width + n * (t - 1)  # U prompts once, then N completions (last token not fed)
    assert plain == n * (width + t - 1)


def test_one_completion_token_and_logprob_helpers_agree() -> None:
    model = llama(seed=3)
    p_ids, p_mask, c_ids, c_mask = grouped_batch(seed=1, t=1)
    c_mask[:] = True
    with torch.no_grad():
        ref = reference_logits(model, p_ids, p_mask, c_ids, c_mask)
        torch.testing.assert_close(
            completion_logits(model, p_ids, p_mask, c_ids, c_mask), ref, atol=1e-5, rtol=1e-5
        )
        batch = grouped_batch(seed=2)
        kw = {"temperature": 0.7, "top_k": 9, "top_p": 0.9}
        lp, ent = completion_logprobs(model, *batch, **kw)
        lp_plain, ent_plain = completion_logprobs(model, *batch, share_prompts=False, **kw)
        lp_chunk, _ = completion_logprobs(model, *batch, logits_chunk=5, **kw)
        d_lp, d_ent, dist = completion_distribution(model, *batch, **kw)
        _, _, dist_plain = completion_distribution(model, *batch, share_prompts=False, **kw)
    assert ent is not None and ent_plain is not None
    for a, b in (
        (lp, lp_plain),
        (lp_chunk, lp_plain),
        (d_lp, lp_plain),
        (ent, ent_plain),
        (d_ent, ent_plain),
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dist, dist_plain, atol=1e-4, rtol=1e-5)


def test_activation_checkpointing_falls_back_to_the_plain_pass() -> None:
    model = llama(seed=4)
    batch = grouped_batch(seed=4)
    with torch.no_grad():
        expect = completion_logits(model, *batch, share_prompts=False)
    _enable_checkpointing(model)
    model.train()
    n, width, t = batch[0].shape[0], batch[0].shape[1], batch[2].shape[1]
    completion_logits(model, *batch).sum().backward()  # runs, and backpropagates
    with torch.no_grad():  # no recomputation: exactly the plain pass's positions are fed
        fed = count_token_positions(model, lambda: completion_logits(model, *batch))
        got = completion_logits(model, *batch)
    assert fed == n * (width + t - 1)
    m = batch[3].unsqueeze(-1).expand_as(expect)
    torch.testing.assert_close(got[m], expect[m], atol=1e-5, rtol=1e-5)


def test_shared_prompts_under_a_lora_adapter() -> None:
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():  # peft probes the deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = peft.get_peft_model(
            llama(seed=5), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        )
    with torch.no_grad():  # a trained-looking adapter: B is zero at initialisation
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    model.train()
    batch = grouped_batch(seed=5)
    grads = []
    for share in (True, False):
        model.zero_grad()
        logits = completion_logits(model, *batch, share_prompts=share)
        (logits.float().pow(2).mean(-1) * batch[3]).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0] and all("lora_" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad():
        fed = count_token_positions(model, lambda: completion_logits(model, *batch))
    assert fed == 3 * batch[0].shape[1] + batch[0].shape[0] * (batch[2].shape[1] - 1)


def test_shared_pass_gradients_are_bitwise_repeatable() -> None:
    """Re-indexing the prompt's keys/values to the group's rows must not race in the backward
    pass: advanced indexing (``x[rows]``) accumulates its CPU gradient in parallel in no fixed
    order, which changed RL runs from step 2 and broke exact resumes (index_select does not)."""
    model = tiny(LlamaConfig, LlamaForCausalLM, hidden=192, intermediate=256, kv_heads=4)
    batch = grouped_batch(seed=3, prompts=5, group=16, t=6)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the race needs at least two threads
    try:
        grads = set()
        for _ in range(6):
            model.zero_grad()
            lp, _ = completion_logprobs(model, *batch, share_prompts=True)
            (lp * torch.linspace(-1, 1, lp.numel()).view_as(lp)).sum().backward()
            grads.add(torch.cat([p.grad.flatten() for p in model.parameters()]).numpy().tobytes())
    finally:
        torch.set_num_threads(threads)
    assert len(grads) == 1
