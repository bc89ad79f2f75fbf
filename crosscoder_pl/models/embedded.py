"""The embedded base/chat pair: a small Gemma-2 LM and its chat version, built locally from the corpus.

Hub models cannot be downloaded everywhere, so the project trains its own pair on first use:

1. a byte-level BPE tokenizer on the embedded corpus, with Gemma's special tokens and chat template;
2. the base model: next-token loss on the web half (assistant replies as plain documents);
3. the chat model: the base weights fine-tuned on the chat half rendered with the template, loss on every
   token of the rendered chat (turn tags, role names, user and model turns), for twice the base's steps:
   it must predict whose turn comes next and how each role writes, which its base never saw, so that a
   crosscoder has chat-only latents to find. Nothing is planted: both models only ever see next-token
   losses.

Layout (``<cache>/models/embedded-<size>``): ``base/`` and ``chat/`` are ``save_pretrained`` directories
(model + tokenizer, loadable with the Auto classes), ``build_report.json`` holds the held-out losses.
Build it with ``python -m crosscoder_pl.models.embedded [--size tiny|default] [--seed N] [--out DIR] [--force]``.

Tokenizing (BOS once): ``tokenizer(text)`` adds ``<bos>`` to plain text. The chat template itself starts
with ``<bos>``, so a rendered chat must be tokenized with ``add_special_tokens=False`` (or rendered with
``apply_chat_template(..., tokenize=True)``, which does that); otherwise it starts with two BOS tokens.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing
from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

from crosscoder_pl.data.sharegpt import CorpusInfo, build_embedded_corpus
from crosscoder_pl.models.finetune import (
    CHAT_TEMPLATE,
    IGNORE,
    encode_chats,
    mean_loss,
    new_build_dir,
    pack_documents,
    publish_build,
    train,
)
from crosscoder_pl.paths import cache_dir

log = logging.getLogger(__name__)

N_LAYERS = 4
EMBEDDED_LAYER = N_LAYERS // 2
"""The hooked layer of the embedded pair (both sizes): the middle of the stack, as layer 13 of 26 in Gemma-2-2B."""

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]  # ids 0..4, Gemma's order


@dataclass(frozen=True)
class Size:
    """Model shape and training budget of one embedded pair size."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_heads: int
    head_dim: int
    seq_len: int
    web_docs: int  # documents read from the web half (train + held out)
    chat_conversations: int  # conversations read from the chat half (train + held out)
    tokenizer_chars: int  # characters of training text the BPE trainer sees
    base_steps: int
    chat_steps: int
    batch_size: int
    lr: float
    threads: int | None = None  # torch intra-op threads while building (None: torch's default)
    softcapping: bool = True  # Gemma-2's tanh soft-capping of attention scores (50) and final logits (30)


SIZES = {
    "tiny": Size(
        vocab_size=512, hidden_size=32, intermediate_size=128, n_heads=2, head_dim=16, seq_len=128,
        web_docs=300, chat_conversations=200, tokenizer_chars=300_000,
        base_steps=30, chat_steps=20, batch_size=8, lr=3e-3,
        threads=1,  # matrices this small gain nothing from threads, and lose much on a busy machine
    ),
    "default": Size(
        # seq_len 128: the crosscoder's stream reads 128-token sequences (conf/data/embedded.yaml), and half the
        # tokens per step halve the build at the same number of steps (held-out losses within 0.05 nats of 256).
        # d_model 64: the demo's whole cost (this build, extraction, the crosscoder step) scales with it; at 128
        # the first run took 9.1 min, at 64 about 3 (docs/benchmarks.md, "How the demo's recipe was chosen").
        vocab_size=4096, hidden_size=64, intermediate_size=256, n_heads=4, head_dim=16, seq_len=128,
        web_docs=5000, chat_conversations=2000, tokenizer_chars=6_000_000,
        # Chat-only latents need a chat model that computes what its base does not. Measured on the demo
        # (1,024 latents, d_model 128): 200 chat steps (loss on model turns or on the whole chat) gave 1 chat-only
        # latent; 400 steps on the whole chat 3-12; a gentler fine-tune (lr 1e-3 after a 400-step base) none.
        base_steps=200, chat_steps=400, batch_size=16, lr=3e-3,
        # Pinned threads: float sums in another order give another pair (at d_model 128 the crosscoder's chat-only
        # count moved from 7 to 1 between a 1- and a 2-thread build); pinned, every machine builds the same pair
        # (up to its CPU's own kernels). Two: the reference machine's cores, 1.7x faster than one.
        threads=2,
        # Soft-capping (tanh of scores and logits) cost 25% of a build step; this pair's logits stay below ~11,
        # well inside Gemma-2's cap of 30.
        softcapping=False,
    ),
}
HELD_OUT = 0.05  # share of documents / conversations kept for the build report


def default_pair_dir(size: str, cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "models" / f"embedded-{size}"


def ensure_embedded_pair(size: str = "default", cache: Path | None = None) -> tuple[Path, Path]:
    """``(base_dir, chat_dir)`` of the embedded pair of ``size``, built first if missing (minutes)."""
    out = default_pair_dir(size, cache)
    report = out / "build_report.json"
    stale = report.exists() and json.loads(report.read_text()).get("spec") != asdict(SIZES[size])
    if stale:  # built by an older version with another recipe: its figures would not match the README
        log.info("the embedded %s pair in %s was built with another recipe; rebuilding it", size, out)
    if stale or not report.exists():
        build_embedded_pair(size, out, corpus=build_embedded_corpus((cache or cache_dir()) / "corpus"))
    return out / "base", out / "chat"


def build_embedded_pair(size: str, out: Path, corpus: CorpusInfo, seed: int = 0) -> dict:
    """Train tokenizer, base and chat model and write them into ``out`` atomically; returns the report.

    An existing ``out`` is replaced only once the new pair is complete.
    """
    if size not in SIZES:
        raise ValueError(f"size={size!r} is unknown; choose one of {sorted(SIZES)}")
    spec, threads = SIZES[size], torch.get_num_threads()
    torch.set_num_threads(spec.threads or threads)
    try:
        # The build seeds and draws from its own copy of torch's global generator: a run that builds the
        # pair first then initialises its crosscoder exactly as a run that finds the pair cached.
        with torch.random.fork_rng(devices=[]):
            return _build(spec, size, out, corpus, seed)
    finally:
        torch.set_num_threads(threads)


def _build(spec: Size, size: str, out: Path, corpus: CorpusInfo, seed: int) -> dict:
    start = time.perf_counter()
    torch.manual_seed(seed)
    web_train, web_test = _split([row["text"] for row in corpus.rows("web", spec.web_docs)])
    chat_train, chat_test = _split([row["conversation"] for row in corpus.rows("chat", spec.chat_conversations)])

    tokenizer = train_tokenizer(web_train + [turn["content"] for conv in chat_train for turn in conv], spec)
    web_train_ids, web_test_ids = (pack_documents(tokenizer, docs, spec.seq_len) for docs in (web_train, web_test))
    chat_train_ids, chat_test_ids = (encode_chats(tokenizer, convs, spec.seq_len) for convs in (chat_train, chat_test))
    chat_test_model_turns = encode_chats(tokenizer, chat_test, spec.seq_len, labels="model_turns")

    model = Gemma2ForCausalLM(model_config(tokenizer, spec))
    train(model, (web_train_ids, web_train_ids), spec.base_steps, lr=spec.lr, batch_size=spec.batch_size, seed=seed,
          desc="base on web")
    base = copy.deepcopy(model)
    train(model, chat_train_ids, spec.chat_steps, lr=spec.lr, batch_size=spec.batch_size, seed=seed + 1,
          desc="chat on chat")

    report = {
        "size": size,
        "seed": seed,
        "layer": EMBEDDED_LAYER,
        "spec": asdict(spec),
        "web_heldout_tokens": int(web_test_ids[:, 1:].numel()),
        "base_web_loss": mean_loss(base, (web_test_ids, web_test_ids)),
        "unigram_web_loss": unigram_loss(web_train_ids, web_test_ids, spec.vocab_size),
        "chat_heldout_tokens": int((chat_test_ids[1][:, 1:] != IGNORE).sum()),
        "base_chat_loss": mean_loss(base, chat_test_ids),
        "chat_chat_loss": mean_loss(model, chat_test_ids),
        "base_model_turn_loss": mean_loss(base, chat_test_model_turns),
        "chat_model_turn_loss": mean_loss(model, chat_test_model_turns),
    }
    report["build_seconds"] = round(time.perf_counter() - start, 1)
    _save_atomically(out, {"base": base, "chat": model}, tokenizer, report)
    log.info(
        "embedded %s pair in %s (%.0f s): held-out web loss base %.3f vs unigram %.3f; "
        "chat loss (whole chat) chat %.3f vs base %.3f, (model turns) chat %.3f vs base %.3f",
        size, out, report["build_seconds"], report["base_web_loss"], report["unigram_web_loss"],
        report["chat_chat_loss"], report["base_chat_loss"], report["chat_model_turn_loss"],
        report["base_model_turn_loss"],
    )
    return report


def train_tokenizer(texts: list[str], spec: Size) -> PreTrainedTokenizerFast:
    """Byte-level BPE of ``spec.vocab_size`` tokens (special tokens first) with Gemma's chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_take_chars(texts, spec.tokenizer_chars), trainer=trainer)
    tokenizer.post_processor = TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos>:1 $B:1", special_tokens=[("<bos>", tokenizer.token_to_id("<bos>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        extra_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=spec.seq_len,
    )


def model_config(tokenizer: PreTrainedTokenizerFast, spec: Size) -> Gemma2Config:
    return Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=spec.n_heads,
        num_key_value_heads=spec.n_heads // 2,  # grouped-query attention, as in Gemma-2-2B
        head_dim=spec.head_dim,
        query_pre_attn_scalar=spec.head_dim,
        max_position_embeddings=spec.seq_len,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **({} if spec.softcapping else {"attn_logit_softcapping": None, "final_logit_softcapping": None}),
    )


def unigram_loss(train_ids: torch.Tensor, test_ids: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats) of the test targets under add-one unigram frequencies of the train targets."""
    counts = torch.bincount(train_ids[:, 1:].flatten(), minlength=vocab_size).double() + 1
    log_p = (counts / counts.sum()).log()
    return -log_p[test_ids[:, 1:].flatten()].mean().item()


def _split(items: list) -> tuple[list, list]:
    n_test = max(1, math.ceil(len(items) * HELD_OUT))
    return items[:-n_test], items[-n_test:]


def _take_chars(texts: list[str], budget: int) -> list[str]:
    taken, used = [], 0
    for text in texts:
        if used >= budget:
            break
        taken.append(text)
        used += len(text)
    return taken


def _save_atomically(
    out: Path, models_by_name: dict[str, Gemma2ForCausalLM], tokenizer: PreTrainedTokenizerFast, report: dict
) -> None:
    tmp = new_build_dir(out)
    for name, model in models_by_name.items():
        model.save_pretrained(tmp / name)
        tokenizer.save_pretrained(tmp / name)
    publish_build(tmp, out, report, key="spec")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the embedded base/chat model pair.")
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="pair directory (default: <cache>/models/embedded-<size>)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the pair exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = args.out or default_pair_dir(args.size)
    if (out / "build_report.json").exists() and not args.force:
        log.info("%s already holds a built pair; pass --force to rebuild", out)
        return
    build_embedded_pair(args.size, out, build_embedded_corpus(), args.seed)


if __name__ == "__main__":
    main()
