"""Text sources: web documents and chat conversations streamed with `datasets`, mixed with a seed.

One code path for Hub datasets and local files: every source is
``load_dataset(path, name=..., data_files=..., split=..., streaming=True)``. Papergrade reads
``HuggingFaceFW/fineweb-edu`` (name ``sample-10BT``, field ``text``) and ``lmsys/lmsys-chat-1m`` (field
``conversation``); the embedded corpus is ``path="json"`` with a ``data_files`` glob (`embedded_source`).
A hub dataset is asked for once before `load_dataset` (`check_hub_source`): a hub that does not answer is an
error within ``HF_HUB_ETAG_TIMEOUT`` seconds that says how to run offline, not minutes of retries.

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
import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from datasets import IterableDataset, interleave_datasets, load_dataset
from datasets import config as datasets_config
from datasets.distributed import split_dataset_by_node
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
from hydra.utils import instantiate
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from crosscoder_pl.config import EmbeddedSourceConfig, TextSourceConfig, check_mix
from crosscoder_pl.config_group import thaw
from crosscoder_pl.data.outliers import OutlierCounts
from crosscoder_pl.data.sharegpt import build_embedded_corpus
from crosscoder_pl.network import (
    HubUnreachableError,
    ask_hub,
    hub_offline,
    timeout_advice,
)

log = logging.getLogger(__name__)

SourceName = Literal["web", "chat"]
SOURCES: tuple[SourceName, SourceName] = ("web", "chat")
ROLES = frozenset({"system", "user", "assistant"})
COLUMNS = ["text", "source", "skip", "skipped"]


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
    """The raw rows of ``source``, streamed. A hub dataset is first asked for once (`check_hub_source`), so that a
    hub that does not answer is an error within seconds rather than minutes of `datasets`' retries."""
    check_hub_source(source)
    try:
        return load_dataset(
            source.path, name=source.name, data_files=source.data_files, split=source.split, streaming=True
        )
    except (OSError, StopIteration) as error:  # auth, gating, network (OSError); no file matching data_files
        # (datasets' json builder reads the first file to infer the columns: StopIteration when there is none)
        if source.data_files is None:
            fix = (
                f"If it is gated (as lmsys/lmsys-chat-1m is), accept its terms on https://huggingface.co/datasets/"
                f"{source.path} and log in with `huggingface-cli login` or set HF_TOKEN; check the network "
                f"connection; or {_run_offline(source)}"
            )
        else:
            fix = "Check that the files exist; the embedded corpus is built by crosscoder_pl.data.sharegpt."
        reason = str(error) or "no file matches data_files"
        raise SourceUnavailableError(f"Could not load the text source ({_tried(source)}): {reason}. {fix}") from error


def is_hub_dataset(source: SourceConfig) -> bool:
    """Whether `datasets` looks ``source.path`` up on the hub: ``user/name`` that is no local path (a builder such
    as ``json`` or ``parquet`` has no slash)."""
    return source.path.count("/") == 1 and not source.path.startswith((".", "/", "~")) and not Path(source.path).exists()


def check_hub_source(source: SourceConfig) -> None:
    """For a hub dataset when not offline: one request for its info, given up on after ``HF_HUB_ETAG_TIMEOUT`` s
    (`crosscoder_pl.network.ask_hub`); `SourceUnavailableError` saying how to run offline when the hub does not
    answer. An answered error (not found, gated) is left to `load_dataset`, which names it."""
    if not is_hub_dataset(source) or hub_offline():
        return
    api = HfApi(endpoint=datasets_config.HF_ENDPOINT)
    try:
        ask_hub(lambda timeout: api.dataset_info(source.path, timeout=timeout))
    except HubUnreachableError as err:
        raise SourceUnavailableError(
            f"Could not load the text source ({_tried(source)}): the Hugging Face hub at {datasets_config.HF_ENDPOINT} "
            f"was asked for it and gave {err}. Check the network connection; or {_run_offline(source)}; "
            f"{timeout_advice()}."
        ) from err
    except HfHubHTTPError:
        pass


def _tried(source: SourceConfig) -> str:
    return f"path={source.path!r}, name={source.name!r}, split={source.split!r}, data_files={source.data_files!r}"


def _run_offline(source: SourceConfig) -> str:
    return (
        f"run offline: download its files once where the hub is reachable (hf download {source.path} "
        "--repo-type dataset --include '<files>' --local-dir DIR) and read them locally (for data.web or "
        "data.chat: path=parquet, name=null, data_files='DIR/<files>'), or train on the embedded corpus "
        "(data=embedded, the default of `python train.py`)"
    )


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


class _CarrySkips:
    """Map function over one source's rendered rows: marks the rows to drop (unusable, or on the other side of
    the held-out split) and hands each usable row the skip reasons of the unusable rows read since the last
    usable one (``skipped``). Unusable rows are thus dropped before the mix, so that they cannot lower their
    source's share of what is trained on, and still counted (by `texts`) from the rows themselves: a function
    of the data, not a side effect, so the counts survive `datasets`' copies of the pipeline and a resume."""

    def __init__(self, heldout: bool, fraction: float):
        self.heldout, self.fraction = heldout, fraction
        self.pending: list[str] = []

    def __call__(self, row: dict) -> dict:
        if row["skip"] is not None:
            if not self.heldout:  # counted in the training stream only
                self.pending.append(row["skip"])
            return {"skipped": [], "drop": True}
        if is_heldout(row["text"], self.fraction) != self.heldout:
            return {"skipped": [], "drop": True}
        carried, self.pending = self.pending, []
        return {"skipped": carried, "drop": False}


def _kept(row: dict) -> bool:
    return not row["drop"]


def source_rows(
    source: SourceName,
    config: SourceConfig,
    tokenizer: PreTrainedTokenizerBase,
    heldout: bool = False,
    heldout_fraction: float = 0.01,
) -> IterableDataset:
    """One source's usable rows ``{"text": str, "source": str, "skip": None, "skipped": [reason, ...]}``, one side
    of the split; the unusable rows are dropped, their reasons carried by the next usable row (`_CarrySkips`)."""
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction={heldout_fraction} must be in [0, 1)")
    rows = load_rows(config).map(partial(_render, source=source, field_name=config.field, tokenizer=tokenizer))
    rows = rows.select_columns(["text", "source", "skip"]).map(_CarrySkips(heldout, heldout_fraction))
    return rows.filter(_kept).select_columns(COLUMNS)


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
    """Usable web and chat rows interleaved at random with probabilities ``mix``, this rank's part only.

    Rows that cannot be used are dropped before the mix (`texts` counts them), and the stream ends when
    either source runs out, so the realised document mix matches ``mix`` throughout.
    """
    probabilities = list(check_mix(mix))
    configs = dict(zip(SOURCES, (web, chat)))
    parts = [source_rows(name, config, tokenizer, heldout, heldout_fraction) for name, config in configs.items()]
    rows = interleave_datasets(parts, probabilities=probabilities, seed=seed, stopping_strategy="first_exhausted")
    return split_dataset_by_node(rows, rank=rank, world_size=world_size)


@dataclass
class StreamStats:
    """What a stream of rows has delivered: kept documents per source, skipped rows per source and reason, and the
    outlier tokens per model (`crosscoder_pl.data.outliers`; counted by the activation stream)."""

    kept: Counter[str] = field(default_factory=Counter)
    skipped: Counter[tuple[str, str]] = field(default_factory=Counter)
    tokens: Counter[str] = field(default_factory=Counter)  # tokens served to the crosscoder, per source
    outliers: OutlierCounts = field(default_factory=OutlierCounts)

    def skip(self, source: str, reason: str) -> None:
        """Count one unusable row (a warning the first time per source and reason)."""
        if not self.skipped[(source, reason)]:
            log.warning("Skipping malformed %s rows (%s); counts are in the data stats", source, reason)
        self.skipped[(source, reason)] += 1

    def state_dict(self) -> dict[str, Any]:
        """Plain values for a checkpoint."""
        return {"kept": dict(self.kept), "skipped": [[s, r, n] for (s, r), n in self.skipped.items()],
                "tokens": dict(self.tokens), "outliers": self.outliers.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.kept = Counter(state["kept"])
        self.skipped = Counter({(s, r): n for s, r, n in state["skipped"]})
        self.tokens = Counter(state.get("tokens", {}))
        self.outliers = OutlierCounts()
        self.outliers.load_state_dict(state.get("outliers", {}))  # absent from checkpoints of earlier versions

    def as_dict(self) -> dict[str, float]:
        """Flat floats for a logger: ``data/{web,chat}_docs``, ``data/{web,chat}_share`` (of documents),
        ``data/{web,chat}_token_share`` (of the tokens extracted), ``data/skipped/<source>/<reason>``, and the
        outliers' ``data/outliers_<model>``, ``data/outlier_frac_<model>`` (`OutlierCounts.as_dict`)."""
        total = sum(self.kept.values())
        total_tokens = sum(self.tokens.values())
        out: dict[str, float] = {}
        for source in SOURCES:
            out[f"data/{source}_docs"] = float(self.kept[source])
            out[f"data/{source}_share"] = self.kept[source] / total if total else 0.0
            if total_tokens:
                out[f"data/{source}_token_share"] = self.tokens[source] / total_tokens
        for (source, reason), count in sorted(self.skipped.items()):
            out[f"data/skipped/{source}/{reason}"] = float(count)
        return out | self.outliers.as_dict()


class MalformedSourceError(ValueError):
    """A data file of a text source cannot be parsed (e.g. a JSON lines file cut off mid-record)."""


def read_rows(rows: Iterable[dict]) -> Iterator[dict]:
    """``rows``, with a parse failure of a data file turned into a `MalformedSourceError` that says what to do."""
    iterator = iter(rows)
    while True:
        try:
            row = next(iterator)
        except StopIteration:
            return
        except (pa.ArrowInvalid, json.JSONDecodeError) as err:
            raise MalformedSourceError(
                f"a data file of the text sources cannot be parsed ({err}); the file is named in the log line just "
                "above. It is truncated or not JSON lines: repair it (e.g. drop its last, cut-off line) or remove it"
            ) from err
        yield row


def texts(rows: Iterable[dict], stats: StreamStats) -> Iterator[str]:
    """The usable texts of ``rows``; every row is counted in ``stats`` (kept, or skipped with its reason)."""
    for row in read_rows(rows):
        for reason in row.get("skipped") or ():  # unusable rows read before this one (dropped before the mix)
            stats.skip(row["source"], reason)
        if row["skip"] is None:
            stats.kept[row["source"]] += 1
            yield row["text"]
            continue
        stats.skip(row["source"], row["skip"])


def build_source(group: TextSourceConfig | EmbeddedSourceConfig | Mapping[str, Any]) -> SourceConfig:
    """The source of a typed ``data.web`` / ``data.chat`` group: text read from a dataset, a half of the embedded
    corpus, or a ``_target_`` of the user's own (built by Hydra)."""
    if isinstance(group, EmbeddedSourceConfig):
        return embedded_source(group.source)
    if isinstance(group, TextSourceConfig):
        return SourceConfig(**thaw(group.model_dump()))
    return instantiate(thaw(group), _convert_="all")
