"""Seconds per step of the chat fine-tune candidates for `crosscoder_pl.models.chat_tune`, one per process.

    python -m bench.bench_chat_tune CANDIDATE [--steps 3] [--threads 1] [--batch-size 8] [--eval-rows 0]

Loads Gemma-3-270M (converted once into the cache, `chat_tune.converted_base`) and the embedded corpus's
training chats, trains ``--steps`` steps of the candidate's recipe (`CANDIDATES`) and prints one JSON line:
the median step time after the first step (warm-up), labelled tokens per step, and with ``--eval-rows N`` the
held-out whole-chat loss (nats/token, float32, N held-out chats) before and after. One candidate per run keeps
each run short on a shared machine and its memory apart from the others'.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import replace

import torch
from transformers import AutoModelForCausalLM

from crosscoder_pl.data.sharegpt import build_embedded_corpus
from crosscoder_pl.models.chat_tune import (
    RECIPE,
    ChatData,
    Recipe,
    chat_tokenizer,
    converted_base,
    prepare_data,
    tune,
)
from crosscoder_pl.models.finetune import IGNORE, causal_lm_loss, mean_losses

CANDIDATES: dict[str, dict] = {
    # Everything trained in float32, the tied 262k x 640 embedding/head included: the naive full fine-tune.
    "full_all_fp32": {"method": "full", "train_embeddings": True, "autocast": "float32"},
    "full_fp32": {"method": "full", "train_embeddings": False, "autocast": "float32"},
    "full_all_bf16": {"method": "full", "train_embeddings": True, "autocast": "bfloat16"},
    "full_bf16": {"method": "full", "train_embeddings": False, "autocast": "bfloat16"},
    # The same with the model's own loss (the full [tokens, 262144] logits) instead of chat_tune.FrozenHeadLoss.
    "full_bf16_own_loss": {"method": "full", "train_embeddings": False, "autocast": "bfloat16"},
    "lora_bf16": {"method": "lora", "train_embeddings": False, "autocast": "bfloat16", "lr": 5e-4},
    "lora_fp32": {"method": "lora", "train_embeddings": False, "autocast": "float32", "lr": 5e-4},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("candidate", choices=sorted(CANDIDATES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=RECIPE.batch_size)
    parser.add_argument("--lr", type=float, help="default: the candidate's, else the recipe's")
    parser.add_argument("--eval-rows", type=int, default=0, help="held-out chats to measure the loss on (0: none)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = {**CANDIDATES[args.candidate], **({"lr": args.lr} if args.lr else {})}
    recipe = replace(RECIPE, steps=args.steps, batch_size=args.batch_size, threads=args.threads,
                     eval_rows=max(args.eval_rows, 1), **settings)
    print(json.dumps(measure(args.candidate, recipe, args.eval_rows > 0)), flush=True)


def measure(candidate: str, recipe: Recipe, with_eval: bool) -> dict:
    torch.manual_seed(recipe.seed)
    base = converted_base()
    tokenizer = chat_tokenizer(base)
    data = prepare_data(build_embedded_corpus(), tokenizer, recipe)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    before = chat_loss(model, data) if with_eval else None
    start = time.perf_counter()
    own_loss = causal_lm_loss if candidate.endswith("_own_loss") else None
    stats = tune(model, data.train, recipe, desc=candidate, loss_fn=own_loss)
    result = {
        "candidate": candidate, "recipe": {k: v for k, v in recipe.as_json().items() if k in CHANGED},
        "threads": recipe.threads, "cpu": platform.processor() or platform.machine(),
        "median_step_s": round(statistics.median(stats.step_seconds[1:] or stats.step_seconds), 2),
        "step_s": stats.step_seconds, "tokens_per_step": stats.tokens / stats.steps,
        "tune_s": round(time.perf_counter() - start, 1),
    }
    if with_eval:
        after = chat_loss(model, data)
        result.update(heldout_chat_loss_before=round(before, 4), heldout_chat_loss_after=round(after, 4),
                      eval_tokens=int((data.heldout_labels["whole_chat"][:, 1:] != IGNORE).sum()))
    return result


def chat_loss(model: torch.nn.Module, data: ChatData) -> float:
    """Held-out whole-chat loss (nats/token) alone: the web half of `chat_tune.evaluate` is not compared here."""
    return mean_losses(model, data.heldout_chats, {"chat": data.heldout_labels["whole_chat"]}, batch_size=4)["chat"]


CHANGED = ("steps", "lr", "batch_size", "method", "train_embeddings", "trainable_layers", "autocast")

if __name__ == "__main__":
    main()
