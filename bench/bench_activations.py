"""Activation throughput of the truncated forward (`residual_at`) against a full forward with LM head.

Both models of a random Gemma-2 pair read the same token batch, as in the data pipeline. Prints tokens/s
for each path, their ratio, and the share of decoder layers the truncated forward skips.

    python -m bench.bench_activations [--hidden 256 --layers 8 --layer 3 --vocab 16384 --seq-len 128 --batch 8]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from crosscoder_pl.hooks import residual_at


def random_model(args: argparse.Namespace, seed: int) -> Gemma2ForCausalLM:
    config = Gemma2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 128), head_dim=64,
    )
    torch.manual_seed(seed)
    return Gemma2ForCausalLM(config).eval()


def tokens_per_second(step: Callable[[], object], n_tokens: int, iters: int) -> float:
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return n_tokens * iters / (time.perf_counter() - start)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--layer", type=int, default=3, help="hooked layer (output of block L)")
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    models = [random_model(args, seed) for seed in (0, 1)]  # base, chat
    inputs = {
        "input_ids": torch.randint(0, args.vocab, (args.batch, args.seq_len)),
        "attention_mask": torch.ones(args.batch, args.seq_len, dtype=torch.long),
    }
    n_tokens = args.batch * args.seq_len
    truncated = tokens_per_second(lambda: [residual_at(m, args.layer, **inputs) for m in models], n_tokens, args.iters)
    full = tokens_per_second(lambda: [m(**inputs).logits for m in models], n_tokens, args.iters)

    print(f"models: 2 x Gemma2 hidden={args.hidden} layers={args.layers} vocab={args.vocab}; "
          f"batch={args.batch} x seq_len={args.seq_len}; threads={torch.get_num_threads()}")
    print(f"truncated forward (blocks 0..{args.layer}, no LM head): {truncated:10.0f} tokens/s (both models)")
    print(f"full forward (all blocks + LM head):          {full:10.0f} tokens/s (both models)")
    print(f"speed-up: {truncated / full:.2f}x; layers skipped: {args.layers - args.layer - 1}/{args.layers} "
          f"({(args.layers - args.layer - 1) / args.layers:.0%}) plus the LM head")


if __name__ == "__main__":
    main()
