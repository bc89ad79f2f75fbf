"""Text sources: web documents and chat conversations streamed with `datasets`, mixed with a seed.

One code path for Hub datasets and local files: every source is
``load_dataset(path, name=..., data_files=..., split=..., streaming=True)``. Papergrade reads
``HuggingFaceFW/fineweb-edu`` (name ``sample-10BT``, field ``text``) and ``lmsys/lmsys-chat-1m`` (field
``conversation``); the embedded corpus is ``path="json"`` with a ``data_files`` glob (`embedded_source`).

Rows become model input strings. A web row is its text field. A chat row is rendered with the chat model's
chat template, without the template's leading BOS: tokenisation adds one BOS to every sequence, web or
chat, so both kinds are tokenised the same way. Rows that cannot be rendered faithfully (missing or null
field, wrong type, empty, unknown role, template error) are skipped and counted by reason in `StreamStats`.

Held-out split: a document is held out iff a hash of its rendered text falls in the first
``heldout_fraction`` of the hash range. Training streams drop held-out documents and the validation stream
keeps only them, so the two are disjoint under any split across ranks and workers, whatever the world
size, and duplicated documents land on the same side.

Splitting: ranks read disjoint parts through `split_dataset_by_node` (by file when the file count is a
multiple of the world size, else every ``world_size``-th row). Inside a DataLoader worker, `datasets`
itself gives each worker a disjoint subset of the files (workers beyond the file count get none).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

from datasets import IterableDataset, interleave_datasets, load_dataset
from datasets.distributed import split_dataset_by_node
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from crosscoder_pl.data.sharegpt import build_embedded_corpus

log = logging.getLogger(__name__)

SourceName = Literal["web", "chat"]
SOURCES: tuple[SourceName, SourceName] = ("web", "chat")
ROLES = frozenset({"system", "user", "assistant"})
COLUMNS = ["text", "source", "skip"]


@dataclass(frozen=True)
class SourceConfig:
    """Where one source's rows come from, as arguments of `datasets.load_dataset`.

    Hub: ``SourceConfig("HuggingFaceFW/fineweb-edu", "text", name="sample-10BT")``.
    Local JSONL: ``SourceConfig("json", "text", data_files="/data/web/shard-*.jsonl")``.
    """

    path: str
    field: str
    name: str | None = None
    split: str = "train"
    data_files: str | list[str] | None = None


def embedded_source(source: SourceName) -> SourceConfig:
    """The embedded corpus half ``source`` under ``<cache>/corpus``, built from the packaged ShareGPT file on
    first use (`crosscoder_pl.data.sharegpt`)."""
    if source not in SOURCES:
        raise ValueError(f"source={source!r} must be one of {SOURCES}")
    root = build_embedded_corpus().root
    field_name = "text" if source == "web" else "conversation"
    files = str(root / source / "shard-*.jsonl")
    return SourceConfig("json", field_name, data_files=files)


class SourceUnavailableError(RuntimeError):
    """A source could not be opened (missing files, no network, gated dataset without login)."""


def load_rows(source: SourceConfig) -> IterableDataset:
    """The raw rows of ``source``, streamed."""
    try:
        return load_dataset(
            source.path, name=source.name, data_files=source.data_files, split=source.split, streaming=True
        )
    except OSError as error:  # datasets and huggingface_hub report auth, gating and network failures as OSError
        tried = f"path={source.path!r}, name={source.name!r}, split={source.split!r}, data_files={source.data_files!r}"
        if source.data_files is None:
            fix = (
                f"If it is gated (as lmsys/lmsys-chat-1m is), accept its terms on https://huggingface.co/datasets/"
                f"{source.path} and log in with `huggingface-cli login` or set HF_TOKEN; check the network "
                "connection; or train on the embedded corpus instead (data=embedded)."
            )
        else:
            fix = "Check that the files exist; the embedded corpus is built by crosscoder_pl.data.sharegpt."
        raise SourceUnavailableError(f"Could not load the text source ({tried}): {error}. {fix}") from error


def web_text(value: object) -> tuple[str | None, str | None]:
    """``(text, None)`` for a usable document, ``(None, skip reason)`` otherwise."""
    if value is None:
        return None, "missing_field"
    if not isinstance(value, str):
        return None, "wrong_type"
    if not value.strip():
        return None, "empty"
    return value, None


def chat_text(value: object, tokenizer: PreTrainedTokenizerBase) -> tuple[str | None, str | None]:
    """A conversation ``[{role, content}, ...]`` rendered with the chat template, or ``(None, skip reason)``."""
    if value is None:
        return None, "missing_field"
    if not isinstance(value, list):
        return None, "wrong_type"
    if not all(isinstance(m, dict) and all(isinstance(m.get(k), str) for k in ("role", "content")) for m in value):
        return None, "wrong_type"
    if not any(m["content"].strip() for m in value):
        return None, "empty"
    if any(m["role"] not in ROLES for m in value):
        return None, "unknown_role"
    # Only role and content: Arrow gives every message the union of keys seen, filled with None.
    messages = [{"role": m["role"], "content": m["content"]} for m in value]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except TemplateError:  # e.g. Gemma's template rejects non-alternating roles and system turns
        return None, "template_error"
    return text.removeprefix(tokenizer.bos_token or ""), None


def is_heldout(text: str, fraction: float) -> bool:
    """Whether a document belongs to the held-out split (stable across runs, machines and shardings)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


def _render(row: dict, source: SourceName, field_name: str, tokenizer: PreTrainedTokenizerBase) -> dict:
    value = row.get(field_name)
    text, skip = web_text(value) if source == "web" else chat_text(value, tokenizer)
    return {"text": text, "source": source, "skip": skip}


def _on_side(row: dict, heldout: bool, fraction: float) -> bool:
    if row["skip"] is not None:
        return not heldout  # malformed rows stay in the training stream, where they are counted
    return is_heldout(row["text"], fraction) == heldout


def source_rows(
    source: SourceName,
    config: SourceConfig,
    tokenizer: PreTrainedTokenizerBase,
    heldout: bool = False,
    heldout_fraction: float = 0.01,
) -> IterableDataset:
    """One source's rows ``{"text": str | None, "source": str, "skip": reason | None}``, one side of the split."""
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction={heldout_fraction} must be in [0, 1)")
    rows = load_rows(config).map(partial(_render, source=source, field_name=config.field, tokenizer=tokenizer))
    rows = rows.select_columns(COLUMNS)
    return rows.filter(partial(_on_side, heldout=heldout, fraction=heldout_fraction))


def mix_probabilities(mix: Mapping[str, float] | Sequence[float]) -> tuple[float, float]:
    """``(p_web, p_chat)`` from ``{"web": p, "chat": p}`` or ``[p_web, p_chat]``; they must sum to 1."""
    if isinstance(mix, Mapping):
        if set(mix) != set(SOURCES):
            raise ValueError(f"mix={dict(mix)} must have exactly the keys {SOURCES}")
        values = (float(mix["web"]), float(mix["chat"]))
    else:
        if len(mix) != 2:
            raise ValueError(f"mix={list(mix)} must have two probabilities [web, chat]")
        values = (float(mix[0]), float(mix[1]))
    if min(values) < 0 or abs(sum(values) - 1) > 1e-6:
        raise ValueError(
            f"mix probabilities must be >= 0 and sum to 1, got web={values[0]}, chat={values[1]} "
            f"(sum {sum(values)}); e.g. mix={{web: 0.5, chat: 0.5}}"
        )
    return values


def mixed_rows(
    web: SourceConfig,
    chat: SourceConfig,
    tokenizer: PreTrainedTokenizerBase,
    mix: Mapping[str, float] | Sequence[float] = (0.5, 0.5),
    seed: int = 0,
    heldout: bool = False,
    heldout_fraction: float = 0.01,
    rank: int = 0,
    world_size: int = 1,
) -> IterableDataset:
    """Web and chat rows interleaved at random with probabilities ``mix``, this rank's part only.

    The stream ends when either source runs out, so the realised mix matches ``mix`` throughout.
    """
    probabilities = list(mix_probabilities(mix))
    configs = dict(zip(SOURCES, (web, chat)))
    parts = [source_rows(name, config, tokenizer, heldout, heldout_fraction) for name, config in configs.items()]
    rows = interleave_datasets(parts, probabilities=probabilities, seed=seed, stopping_strategy="first_exhausted")
    return split_dataset_by_node(rows, rank=rank, world_size=world_size)


@dataclass
class StreamStats:
    """What a stream of rows has delivered: kept documents per source and skipped rows per source and reason."""

    kept: Counter[str] = field(default_factory=Counter)
    skipped: Counter[tuple[str, str]] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, float]:
        """Flat floats for a logger: ``data/{web,chat}_docs``, ``data/{web,chat}_share``,
        ``data/skipped/<source>/<reason>``."""
        total = sum(self.kept.values())
        out: dict[str, float] = {}
        for source in SOURCES:
            out[f"data/{source}_docs"] = float(self.kept[source])
            out[f"data/{source}_share"] = self.kept[source] / total if total else 0.0
        for (source, reason), count in sorted(self.skipped.items()):
            out[f"data/skipped/{source}/{reason}"] = float(count)
        return out


def texts(rows: Iterable[dict], stats: StreamStats) -> Iterator[str]:
    """The usable texts of ``rows``; every row is counted in ``stats`` (kept, or skipped with its reason)."""
    for row in rows:
        if row["skip"] is None:
            stats.kept[row["source"]] += 1
            yield row["text"]
            continue
        key = (row["source"], row["skip"])
        if not stats.skipped[key]:
            log.warning("Skipping malformed %s rows (%s); counts are in the data stats", *key)
        stats.skipped[key] += 1
