import math
from itertools import islice
from pathlib import Path

import pytest
from datasets.exceptions import DatasetNotFoundError
from test_data_helpers import tiny_tokenizer, write_corpus, write_jsonl
from torch.utils.data import DataLoader

from crosscoder_pl.config import check_mix
from crosscoder_pl.data import sources
from crosscoder_pl.data.sources import (
    SourceConfig,
    SourceUnavailableError,
    StreamStats,
    embedded_source,
    mixed_rows,
    source_rows,
    texts,
)


def local(root: Path, name: str) -> SourceConfig:
    field = "text" if name == "web" else "conversation"
    return SourceConfig("json", field, data_files=str(root / name / "shard-*.jsonl"))


def test_malformed_rows_are_skipped_and_counted(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    good_chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the cat"}]
    write_jsonl(tmp_path / "web" / "shard-00000.jsonl", [
        {"text": "the cat sat"}, {"text": ""}, {"text": "   "}, {"other": "x"}, {"text": None}, {"text": 5},
        {"text": ["a"]}, {"text": "a dog ran"},
    ])
    write_jsonl(tmp_path / "chat" / "shard-00000.jsonl", [
        {"conversation": good_chat}, {"conversation": "not a list"}, {"conversation": []},
        {"conversation": [{"role": "wizard", "content": "hi"}]}, {"conversation": [{"role": "user", "content": 3}]},
        {"conversation": [{"role": "user"}]}, {"nothing": 1},
        {"conversation": [{"role": "assistant", "content": "hi"}]},  # does not start with user: template error
        {"conversation": good_chat},  # skips are counted with the next usable row (they are dropped before the mix)
    ])
    stats = StreamStats()
    web = list(texts(source_rows("web", local(tmp_path, "web"), tokenizer, heldout_fraction=0), stats))
    chat = list(texts(source_rows("chat", local(tmp_path, "chat"), tokenizer, heldout_fraction=0), stats))

    assert web == ["the cat sat", "a dog ran"]
    assert chat == [tokenizer.apply_chat_template(good_chat, tokenize=False).removeprefix("<bos>")] * 2
    assert stats.kept == {"web": 2, "chat": 2}
    assert stats.skipped == {
        ("web", "empty"): 2, ("web", "missing_field"): 2, ("web", "wrong_type"): 2,
        ("chat", "wrong_type"): 3, ("chat", "empty"): 1, ("chat", "unknown_role"): 1,
        ("chat", "missing_field"): 1, ("chat", "template_error"): 1,
    }
    assert stats.as_dict()["data/skipped/chat/wrong_type"] == 3.0


def test_chat_and_web_texts_start_with_exactly_one_bos(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    write_corpus(tmp_path, n_web=5, n_chat=5)
    rows = mixed_rows(local(tmp_path, "web"), local(tmp_path, "chat"), tokenizer, heldout_fraction=0)
    for text in texts(rows, StreamStats()):
        ids = tokenizer(text)["input_ids"]
        assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def test_realised_mix_matches_config(tmp_path: Path) -> None:
    n, p_chat = 2000, 0.7
    write_corpus(tmp_path, n_web=n, n_chat=n)
    stats = StreamStats()
    mix = {"web": 1 - p_chat, "chat": p_chat}
    rows = mixed_rows(local(tmp_path, "web"), local(tmp_path, "chat"), tiny_tokenizer(), mix, seed=1)
    assert len(list(islice(texts(rows, stats), n))) == n
    tolerance = 4 * math.sqrt(p_chat * (1 - p_chat) / n)  # 4 binomial standard deviations
    assert abs(stats.as_dict()["data/chat_share"] - p_chat) < tolerance


@pytest.mark.parametrize("mix", [[0.3, 0.6], {"web": 0.5, "chat": 0.6}, [-0.5, 1.5]])
def test_mix_must_sum_to_one(mix) -> None:
    with pytest.raises(ValueError, match="web=.*chat=.*sum"):
        check_mix(mix)


def test_heldout_is_disjoint_from_training(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    write_corpus(tmp_path, n_web=300, n_chat=0)
    web = local(tmp_path, "web")
    train = set(texts(source_rows("web", web, tokenizer, heldout=False, heldout_fraction=0.2), StreamStats()))
    heldout = set(texts(source_rows("web", web, tokenizer, heldout=True, heldout_fraction=0.2), StreamStats()))
    assert not train & heldout
    assert len(train | heldout) == 300
    assert 30 < len(heldout) < 90


@pytest.mark.parametrize(("world_size", "num_workers"), [(2, 2), (3, 0)])
def test_rank_and_worker_parts_are_disjoint_and_cover_the_stream(
    tmp_path: Path, world_size: int, num_workers: int
) -> None:
    tokenizer = tiny_tokenizer()
    write_corpus(tmp_path, n_web=120, n_chat=10, n_shards=4)
    web, chat = local(tmp_path, "web"), local(tmp_path, "chat")
    everything = list(texts(mixed_rows(web, chat, tokenizer, mix=[1, 0], heldout_fraction=0), StreamStats()))
    parts = []
    for rank in range(world_size):
        rows = mixed_rows(web, chat, tokenizer, mix=[1, 0], heldout_fraction=0, rank=rank, world_size=world_size)
        parts.append([row["text"] for row in DataLoader(rows, batch_size=None, num_workers=num_workers)])
    assert sum(map(len, parts)) == len(everything) == 120
    assert set().union(*parts) == set(everything)


def test_embedded_source_reads_the_corpus_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CROSSCODER_PL_CACHE", str(tmp_path))
    write_corpus(tmp_path / "corpus", n_web=3, n_chat=3, n_shards=2)
    (tmp_path / "corpus" / "meta.json").write_text('{"max_conversations": null}')  # marks the corpus as built
    stats = StreamStats()
    rows = mixed_rows(embedded_source("web"), embedded_source("chat"), tiny_tokenizer(), heldout_fraction=0)
    assert len(list(texts(rows, stats))) >= 3 and not stats.skipped


def test_unreachable_hub_source_says_how_to_log_in(monkeypatch: pytest.MonkeyPatch) -> None:
    def gated(*args, **kwargs):
        raise DatasetNotFoundError("Dataset 'lmsys/lmsys-chat-1m' is a gated dataset on the Hub.")

    monkeypatch.setattr(sources, "load_dataset", gated)
    with pytest.raises(SourceUnavailableError, match="lmsys/lmsys-chat-1m.*huggingface-cli login.*HF_TOKEN"):
        sources.load_rows(SourceConfig("lmsys/lmsys-chat-1m", "conversation"))
