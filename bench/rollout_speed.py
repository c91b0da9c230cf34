"""Time tether's HFSampler against ``model.generate`` on a tiny Llama on CPU (and, on a GPU
machine with vLLM, against tether's vLLM backend).

    .venv/bin/python bench/rollout_speed.py --batch 16 --max-new-tokens 64 --repeats 5
    python bench/rollout_speed.py --device cuda --vllm --batch 256 --group-size 8 --max-new-tokens 64

Both sample with the same temperature / top-k / top-p, the same ``max_new_tokens`` and the
same pad and EOS ids, on a model of the shape of tether's default tiny model (1.8M
parameters, the 101-symbol character tokenizer). The model is untrained and would stop at
random, so both are given an EOS id outside the vocabulary and generate exactly
``max_new_tokens`` tokens per row: equal work. Runs are interleaved and the best of
``--repeats`` is kept (other processes on the machine only ever slow a run down). Prints
generated tokens per second and the speed ratio.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tether.lm.rollout import HFSampler, SamplingConfig, _encode_left_padded
from tether.lm.tokenizer import build_char_tokenizer


def tiny_llama(
    vocab: int,
    pad: int,
    bos: int,
    eos: int,
    seed: int = 0,
    hidden: int = 192,
    layers: int = 4,
    heads: int = 4,
    intermediate: int = 512,
) -> LlamaForCausalLM:
    """By default the shape of tether's default tiny model (``tether.lm.model.ModelConfig``)."""
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument(
        "--group-size",
        type=int,
        default=1,
        help="G: rows per distinct prompt, as in a GRPO rollout (batch // G distinct prompts)",
    )
    parser.add_argument("--prefix", default="", help="text put before every prompt (an instruction)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument(
        "--vllm",
        action="store_true",
        help="also time tether's vLLM backend (needs vllm and --device cuda); it stops at the "
        "tokenizer's EOS, so its rows may be shorter: compare tokens/s",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tok = build_char_tokenizer(model_max_length=512)
    model = tiny_llama(
        len(tok),
        tok.pad_token_id,
        tok.bos_token_id,
        tok.eos_token_id,
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        intermediate=args.intermediate,
    ).to(device=args.device, dtype=getattr(torch, args.dtype))
    # An EOS id outside the vocabulary is never sampled: both runs generate exactly
    # max_new_tokens tokens per row (an untrained model would otherwise stop at random).
    never = len(tok) + 7
    model.generation_config.eos_token_id = None
    n_params = sum(p.numel() for p in model.parameters())
    if args.group_size < 1 or args.batch % args.group_size:
        parser.error(f"--group-size {args.group_size} must be >= 1 and divide --batch {args.batch}")
    distinct = [f"{args.prefix}what is {i} + {2 * i + 1}? " for i in range(args.batch // args.group_size)]
    prompts = [p for p in distinct for _ in range(args.group_size)]

    cfg = SamplingConfig(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, max_new_tokens=args.max_new_tokens
    )
    sampler = HFSampler(model, tok, cfg)
    sampler.eos_ids = [never]

    enc_ids, enc_mask = _encode_left_padded(tok, prompts, int(tok.pad_token_id))
    enc_ids, enc_mask = enc_ids.to(args.device), enc_mask.to(args.device)
    contestants: dict[str, Callable[[], int]] = {}

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    def run_ours() -> int:
        batch = sampler.generate(prompts, generator=torch.Generator().manual_seed(0))
        return int(batch.completion_mask.sum())

    def run_hf() -> int:
        with torch.inference_mode():
            out = model.generate(
                input_ids=enc_ids,
                attention_mask=enc_mask.long(),
                do_sample=True,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                max_new_tokens=args.max_new_tokens,
                min_new_tokens=args.max_new_tokens,
                pad_token_id=tok.pad_token_id,
                eos_token_id=never,
            )
        return int(out.shape[0] * (out.shape[1] - enc_ids.shape[1]))

    contestants["HFSampler.generate"] = run_ours
    contestants["model.generate"] = run_hf
    if args.vllm:
        from tether.lm.vllm_backend import VLLMSampler

        engine = VLLMSampler(model, tok, cfg)

        def run_vllm() -> int:
            batch = engine.generate(prompts, generator=torch.Generator().manual_seed(0))
            return int(batch.completion_mask.sum())

        contestants["VLLMSampler.generate"] = run_vllm

    # interleaved repeats, best time of each: robust to other processes loading the machine
    for run in contestants.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in contestants}
    tokens: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, run in contestants.items():
            sync()
            start = time.perf_counter()
            tokens[name] = run()
            sync()
            times[name].append(time.perf_counter() - start)
    best = {name: min(t) for name, t in times.items()}
    gpu = f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""
    print(
        f"Llama {n_params / 1e6:.2f}M params, vocab {len(tok)}, {args.device}{gpu} {args.dtype}, batch {args.batch} "
        f"({len(distinct)} distinct prompts of {enc_ids.shape[1]} tokens at most), "
        f"max_new_tokens {args.max_new_tokens}, threads {torch.get_num_threads()}, "
        f"T={args.temperature} top_k={args.top_k} top_p={args.top_p}"
    )
    for name, t in best.items():
        print(f"{name:21s}: {t * 1e3:8.1f} ms  {tokens[name] / t:10.0f} tokens/s (best of {args.repeats})")
    ours = tokens["HFSampler.generate"] / best["HFSampler.generate"]
    print(f"speed-up over model.generate: {best['model.generate'] / best['HFSampler.generate']:.2f}x")
    if args.vllm:
        rate = tokens["VLLMSampler.generate"] / best["VLLMSampler.generate"]
        print(f"vLLM tokens/s over HFSampler tokens/s: {rate / ours:.2f}x")


if __name__ == "__main__":
    main()
