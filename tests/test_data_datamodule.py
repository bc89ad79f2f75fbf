import json
from itertools import islice
from pathlib import Path

import lightning as L
import pytest
import torch
from test_data_helpers import tiny_pair, write_corpus

from crosscoder_pl.config import CachedDataConfig, StreamDataConfig
from crosscoder_pl.data.activations import tokenize
from crosscoder_pl.data.cache import (
    CHAT_PROBES,
    CachedActivations,
    NoHeldoutChats,
    read_meta,
)
from crosscoder_pl.data.cached import CachedActivationDataModule
from crosscoder_pl.data.datamodule import ActivationDataModule, write_activation_cache
from crosscoder_pl.data.resume import Endless
from crosscoder_pl.data.sources import StreamStats, source_rows, texts


def datamodule(root: Path, **overrides) -> ActivationDataModule:
    write_corpus(root, n_web=200, n_chat=200, n_shards=2)
    settings = dict(
        web={"path": "json", "field": "text", "data_files": str(root / "web" / "shard-*.jsonl")},
        chat={"path": "json", "field": "conversation", "data_files": str(root / "chat" / "shard-*.jsonl")},
        mix={"web": 0.5, "chat": 0.5}, seed=0, seq_len=32, batch_size=32, text_batch_size=4, buffer_tokens=256,
        val_tokens=64, heldout_fraction=0.2,
    )
    return ActivationDataModule(tiny_pair(layer=1), StreamDataConfig(**(settings | overrides)))


def test_serves_training_and_heldout_batches_and_stats(tmp_path: Path) -> None:
    dm = datamodule(tmp_path)
    dm.setup("fit")
    val = torch.cat(list(dm.val_dataloader()))
    assert val.shape == (64, 2, 32) and val.device.type == "cpu"
    batches = list(islice(dm.train_dataloader(), 5))
    assert all(b.shape == (32, 2, 32) and b.dtype == torch.float32 and b.isfinite().all() for b in batches)
    assert not any(b.is_inference() for b in batches)  # usable as autograd inputs
    stats = dm.stats()
    assert stats["data/web_docs"] > 0 and stats["data/chat_docs"] > 0


class Autoencoder(L.LightningModule):
    """The smallest consumer of the batches: a linear autoencoder that logs the data stats."""

    def __init__(self, d_model: int):
        super().__init__()
        self.linear = torch.nn.Linear(d_model, d_model)

    def training_step(self, x: torch.Tensor, _: int) -> torch.Tensor:
        self.log_dict(self.trainer.datamodule.stats())
        return (self.linear(x) - x).pow(2).mean()

    def validation_step(self, x: torch.Tensor, _: int) -> None:
        self.log("val_mse", (self.linear(x) - x).pow(2).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_trains_with_a_lightning_trainer(tmp_path: Path) -> None:
    dm = datamodule(tmp_path)
    trainer = L.Trainer(
        max_steps=4, val_check_interval=2, check_val_every_n_epoch=None, accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(Autoencoder(dm.model_pair.d_model), datamodule=dm)
    assert trainer.global_step == 4
    assert {"val_mse", "data/web_share", "data/chat_docs", "data/outlier_frac_base", "data/outlier_frac_chat",
            "data/outliers_base", "data/outliers_chat"} <= set(trainer.callback_metrics)


def test_bad_mix_is_rejected_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="web=0.5, chat=0.6"):
        datamodule(tmp_path, mix=[0.5, 0.6])


def test_written_cache_serves_the_same_data(tmp_path: Path) -> None:
    dm = datamodule(tmp_path / "corpus")
    path = write_activation_cache(dm, tmp_path / "cache", n_tokens=200, tokens_per_shard=64)
    meta = read_meta(path)
    assert [s["n_tokens"] for s in meta["shards"]] == [64, 64, 64, 8]
    assert meta["source"]["layer"] == 1 and meta["source"]["mix"] == [0.5, 0.5]

    cached = CachedActivationDataModule(CachedDataConfig(path=str(path), batch_size=16), model_pair=dm.model_pair)
    assert torch.equal(torch.cat(list(cached.val_dataloader())), dm.val_acts)
    assert all(torch.equal(a, b) for a, b in zip(cached.probe_batch(), dm.probe_batch()))
    assert all(torch.equal(a, b) for a, b in zip(cached.chat_probe_batch(5), dm.chat_probe_batch(5)))
    assert sum(len(b) for b in CachedActivations(path, batch_size=16)) == 192  # one pass: full batches of 16 only
    assert len(list(islice(cached.train_dataloader(), 30))) == 30  # training runs pass after pass

    other = tiny_pair(layer=2)
    with pytest.raises(ValueError, match="'layer': 1.*'layer': 2"):
        CachedActivationDataModule(CachedDataConfig(path=str(path), batch_size=16), model_pair=other)


def test_probe_batch_is_heldout_text_with_one_bos_per_row(tmp_path: Path) -> None:
    dm = datamodule(tmp_path, n_probes=6, probe_len=16)
    ids, mask = dm.probe_batch()
    assert ids.shape[0] == 6 and ids.shape[1] <= 16 and mask.shape == ids.shape
    bos = dm.model_pair.tokenizer.bos_token_id
    assert torch.equal((ids == bos).sum(1), torch.ones(6, dtype=torch.long))
    assert torch.equal(ids[:, 0], torch.full((6,), bos))  # right padding: BOS first
    again, _ = dm.probe_batch()
    assert torch.equal(ids, again)  # fixed by the seed
    assert dm.heldout_activations() is dm.heldout_activations()  # computed once


def test_endless_repeats_passes_and_refuses_an_empty_one() -> None:
    class Passes(torch.utils.data.IterableDataset):
        def __init__(self, sizes: list[int]):
            self.sizes, self.calls = sizes, 0

        def __iter__(self):
            size = self.sizes[min(self.calls, len(self.sizes) - 1)]
            self.calls += 1
            return iter([torch.full((1,), float(self.calls))] * size)

    assert [float(b) for b in islice(Endless(Passes([2, 3])), 6)] == [1, 1, 2, 2, 2, 3]
    with pytest.raises(ValueError, match="gave no full batch"):
        next(iter(Endless(Passes([0]))))


def test_chat_probe_batch_is_heldout_chats(tmp_path: Path) -> None:
    """Whole chats of the chat source only, rendered with the template, none of them on the training side."""
    dm = datamodule(tmp_path, seq_len=24)
    ids, mask = dm.chat_probe_batch(7)
    tokenizer = dm.model_pair.tokenizer
    assert ids.shape[0] == 7 and ids.shape[1] <= 24 and mask.shape == ids.shape
    assert torch.equal(ids[:, 0], torch.full((7,), tokenizer.bos_token_id))
    starts = (ids == tokenizer.convert_tokens_to_ids("<start_of_turn>")) & mask.bool()
    assert torch.equal(starts.int().argmax(1), torch.ones(7, dtype=torch.long))  # a turn right after BOS: a chat

    def chats(heldout: bool) -> set[tuple[int, ...]]:
        rows = source_rows("chat", dm.chat, tokenizer, heldout, dm.cfg.heldout_fraction)
        batch = tokenize(tokenizer, list(texts(rows, StreamStats())), 24)
        return {tuple(row[m.bool()].tolist()) for row, m in zip(batch["input_ids"], batch["attention_mask"])}

    got = {tuple(row[m.bool()].tolist()) for row, m in zip(ids, mask)}
    assert got <= chats(heldout=True) and not got & chats(heldout=False)
    assert torch.equal(dm.chat_probe_batch(7)[0], ids)  # fixed


def test_caches_without_chats_and_streams_without_them_say_so(tmp_path: Path) -> None:
    dm = datamodule(tmp_path / "corpus")
    path = write_activation_cache(dm, tmp_path / "cache", n_tokens=64, tokens_per_shard=64)
    meta = read_meta(path)
    (path / CHAT_PROBES).unlink()  # a cache written before the chats were kept
    del meta["files"][CHAT_PROBES]
    (path / "meta.json").write_text(json.dumps(meta))
    cached = CachedActivationDataModule(CachedDataConfig(path=str(path), batch_size=16))
    with pytest.raises(NoHeldoutChats, match="holds no held-out chats"):
        cached.chat_probe_batch(4)
    with pytest.raises(NoHeldoutChats, match="no held-out chat"):
        datamodule(tmp_path / "corpus", heldout_fraction=1e-9).chat_probe_batch(4)
