"""Loading a base/chat model pair and checking that a crosscoder can be trained on it.

A model name is one of:

- a local directory holding a ``save_pretrained`` model and tokenizer;
- ``embedded:base`` / ``embedded:chat`` (the embedded default pair) or ``embedded-tiny:base`` /
  ``embedded-tiny:chat``, built locally on first use by :func:`ensure_embedded_pair`;
- a Hugging Face hub id such as ``google/gemma-2-2b``: read from the local cache when it is there, else
  downloaded. When that is impossible (hub unreachable, gated repo, no token) loading fails within
  seconds with a RuntimeError saying what to do, instead of retrying for minutes.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from crosscoder_pl.hooks import check_layer
from crosscoder_pl.models.embedded import ensure_embedded_pair

log = logging.getLogger(__name__)

_EMBEDDED = re.compile(r"embedded(?:-(?P<size>tiny|default))?:(?P<role>base|chat)")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelPair:
    """Base and chat model in eval mode with frozen weights, and the chat model's tokenizer."""

    base: PreTrainedModel
    chat: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase  # the chat model's: it renders the chat template
    layer: int
    base_id: str
    chat_id: str

    @property
    def d_model(self) -> int:
        return _hidden_size(self.base)


def load_model_pair(
    base: str, chat: str, layer: int, dtype: str = "float32", device: str = "cpu", token: str | None = None
) -> ModelPair:
    """Load both models and tokenizers, check them with :func:`check_pair`, freeze and move them."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {DTYPES}")
    paths = {name: resolve_model_name(name) for name in (base, chat)}
    tokenizers = [_from_pretrained(AutoTokenizer, paths[name], token) for name in (base, chat)]
    models = [
        _from_pretrained(AutoModelForCausalLM, paths[name], token, dtype=getattr(torch, dtype)) for name in (base, chat)
    ]
    check_pair(*models, *tokenizers, layer)
    for model in models:
        model.eval().requires_grad_(False).to(device)
    return ModelPair(models[0], models[1], tokenizers[1], layer, base, chat)


def check_pair(
    base: PreTrainedModel,
    chat: PreTrainedModel,
    base_tokenizer: PreTrainedTokenizerBase,
    chat_tokenizer: PreTrainedTokenizerBase,
    layer: int,
) -> None:
    """Raise a ValueError naming both values unless the two models read the same token ids into residual
    streams of the same width and both have block ``layer``."""
    _check_vocab(base_tokenizer.get_vocab(), chat_tokenizer.get_vocab())
    if _hidden_size(base) != _hidden_size(chat):
        raise ValueError(
            f"hidden sizes differ: base model {_hidden_size(base)}, chat model {_hidden_size(chat)}; "
            "a crosscoder needs a base model and its own chat fine-tune"
        )
    check_layer(base, layer, name="base model")
    check_layer(chat, layer, name="chat model")


def resolve_model_name(name: str) -> str:
    """A local directory for local and embedded names; hub ids are returned unchanged."""
    match = _EMBEDDED.fullmatch(name)
    if match is None:
        return name
    base_dir, chat_dir = ensure_embedded_pair(match["size"] or "default")
    return str(base_dir if match["role"] == "base" else chat_dir)


def _check_vocab(base: dict[str, int], chat: dict[str, int]) -> None:
    if base == chat:
        return
    base_tokens = {i: token for token, i in base.items()}
    chat_tokens = {i: token for token, i in chat.items()}
    first = min(i for i in base_tokens.keys() | chat_tokens.keys() if base_tokens.get(i) != chat_tokens.get(i))
    raise ValueError(
        f"tokenizer vocabularies differ: base has {len(base)} tokens, chat has {len(chat)}; first difference at "
        f"id {first}: base {base_tokens.get(first)!r} vs chat {chat_tokens.get(first)!r}. Both models must read "
        "the same token ids: pair a base model with its own chat fine-tune"
    )


def _hidden_size(model: PreTrainedModel) -> int:
    return model.config.get_text_config().hidden_size


def _from_pretrained(loader: type, name: str, token: str | None, **kwargs) -> PreTrainedModel | PreTrainedTokenizerBase:
    """``loader.from_pretrained(name)``: local directory, else hub cache, else a download that fails fast."""
    if Path(name).is_dir():
        return loader.from_pretrained(name, **kwargs)
    try:
        return loader.from_pretrained(name, token=token, local_files_only=True, **kwargs)
    except OSError:
        log.info("%s is not in the local Hugging Face cache; downloading it", name)
    if _offline():
        raise RuntimeError(_hub_failure(name, "offline mode is on (HF_HUB_OFFLINE) and it is not in the local cache"))
    _probe_hub(name, token)
    try:
        return loader.from_pretrained(name, token=token, **kwargs)
    except OSError as err:  # transformers reports hub and cache failures (gated, missing, network) as OSError
        raise RuntimeError(_hub_failure(name, str(err))) from err


def _probe_hub(name: str, token: str | None) -> None:
    """One request without retries: from_pretrained retries each file for ~25 s when the hub is unreachable."""
    try:
        huggingface_hub.model_info(name, token=token, timeout=huggingface_hub.constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as err:  # the transport's error types depend on the huggingface_hub version
        raise RuntimeError(_hub_failure(name, f"{type(err).__name__}: {err}")) from err


def _offline() -> bool:
    # Read at call time: huggingface_hub reads these variables only once, at import.
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return huggingface_hub.constants.HF_HUB_OFFLINE or any(
        flag and flag.upper() in {"1", "ON", "YES", "TRUE"} for flag in flags
    )


def _hub_failure(name: str, reason: str) -> str:
    return (
        f"could not load {name!r}: it is not a local directory, so it was looked up as a Hugging Face hub id "
        f"and could not be downloaded from https://huggingface.co/{name} ({reason}). The hub may be unreachable "
        "from this machine, or the model gated: accept its licence on the model page, then log in with "
        "`hf auth login` (formerly `huggingface-cli login`) or set HF_TOKEN (or pass token=...). "
        "Without network, use a local directory or the embedded pair (embedded:base / embedded:chat)."
    )
