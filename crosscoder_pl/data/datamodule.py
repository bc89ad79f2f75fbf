"""LightningDataModules serving paired activations ``[batch, 2, d_model]`` to the crosscoder.

`ActivationDataModule` computes them on the fly: mixed web/chat text -> both language models (truncated
forward) -> shuffle buffer. Training batches stay on the language models' device (the buffer lives there;
Lightning's transfer is then a no-op), so extraction runs in the main process by default
(``num_workers=0``); workers only make sense for CPU models. `CachedActivationDataModule` reads a cache
written by `write_activation_cache`.

Validation: a fixed held-out set of ``val_tokens`` tokens (documents selected by hash, disjoint from
training, see `crosscoder_pl.data.sources`), computed once, kept on the CPU; under DDP Lightning splits
it across ranks with its distributed sampler. The held-out tensor carries its `TokenTable` (token ids,
positions, web/chat source of every row; `crosscoder_pl.data.activations.token_table`), and so does a cache's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
import torch
from datasets import IterableDataset as RowStream
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, IterableDataset

from crosscoder_pl.data.activations import (
    PaddingSide,
    PairLike,
    TokenTable,
    paired_activations,
    paired_activations_with_tokens,
    token_table,
    tokenize,
    with_tokens,
)
from crosscoder_pl.data.buffer import shuffled_batches
from crosscoder_pl.data.cache import CachedActivations, load_val, read_meta, write_cache
from crosscoder_pl.data.sources import SourceConfig, StreamStats, mix_probabilities, mixed_rows, texts

log = logging.getLogger(__name__)
PROBES = "probes.safetensors"


def _batches_of(tensor: torch.Tensor, batch_size: int) -> DataLoader:
    """A DataLoader over ``tensor``'s consecutive slices (not token by token, as ``DataLoader(tensor)`` would)."""
    return DataLoader(list(tensor.split(batch_size)), batch_size=None)


def _batched(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    while batch := list(islice(items, size)):
        yield batch


def _labelled_texts(rows: RowStream, stats: StreamStats) -> Iterator[tuple[str, str]]:
    """``(text, source)`` of the usable rows (``texts`` per row, so skipped rows are counted alike)."""
    for row in rows:
        for text in texts((row,), stats):
            yield text, row["source"]


class Endless(IterableDataset):
    """Pass after pass over an iterable dataset, so training is bounded by ``max_steps`` alone.

    Per-rank streams and cache shards differ in length; with epochs, one DDP rank would end its pass
    while the others wait in a collective for ever.
    """

    def __init__(self, dataset: IterableDataset):
        self.dataset = dataset

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            served = 0
            for batch in self.dataset:
                served += 1
                yield batch
            if not served:
                raise ValueError("a whole pass over the training data gave no full batch: add data or lower batch_size")


class ActivationStream(IterableDataset):
    """Training batches ``[batch_size, 2, d_model]``: text rows -> paired activations -> shuffle buffer.

    Each ``iter()`` is one pass over the rows (re-mixed and reshuffled per pass). ``stats`` counts the
    documents of this process (with DataLoader workers, the workers' counts stay in the workers).
    """

    def __init__(self, pair: PairLike, rows: RowStream, *, seq_len: int, text_batch_size: int, batch_size: int,
                 buffer_tokens: int, seed: int, padding_side: PaddingSide, outlier_factor: float | None):
        self.model_pair = pair
        self.rows = rows
        self.seq_len = seq_len
        self.text_batch_size = text_batch_size
        self.batch_size = batch_size
        self.buffer_tokens = buffer_tokens
        self.seed = seed
        self.padding_side = padding_side
        self.outlier_factor = outlier_factor
        self.stats = StreamStats()
        self.passes = 0

    def chunks(self) -> Iterator[torch.Tensor]:
        """Activations ``[tokens, 2, d_model]`` of successive groups of ``text_batch_size`` texts."""
        for group in _batched(texts(self.rows, self.stats), self.text_batch_size):
            yield paired_activations(self.model_pair, group, self.seq_len, self.padding_side, self.outlier_factor)

    def __iter__(self) -> Iterator[torch.Tensor]:
        self.rows.set_epoch(self.passes)
        seed = self.seed + self.passes
        self.passes += 1
        return shuffled_batches(self.chunks(), self.batch_size, self.buffer_tokens, seed)


class ActivationDataModule(L.LightningDataModule):
    """Paired activations of ``model_pair`` on a seeded web/chat mix, computed on the fly.

    ``web`` / ``chat``: a `SourceConfig` (e.g. ``embedded_source("web")``) or its fields (``path``, ``field``,
    ``name``, ``split``, ``data_files``).
    ``mix``: ``{"web": p, "chat": p}`` or ``[p_web, p_chat]``, summing to 1. ``batch_size``: tokens per
    crosscoder batch; ``text_batch_size``: sequences per language-model forward; ``buffer_tokens``: shuffle
    buffer size; ``val_tokens``: size of the held-out set, drawn from the ``heldout_fraction`` of documents
    held out; ``outlier_factor``: drop tokens whose norm exceeds this multiple of the median (None: keep).
    ``n_probes`` / ``probe_len``: the held-out token sequences of the end-of-training causal analyses.
    """

    def __init__(
        self,
        model_pair: PairLike,
        web: SourceConfig | Mapping[str, Any],
        chat: SourceConfig | Mapping[str, Any],
        mix: Mapping[str, float] | Sequence[float] = (0.5, 0.5),
        seed: int = 0,
        seq_len: int = 1024,
        batch_size: int = 4096,
        text_batch_size: int = 16,
        buffer_tokens: int = 2**18,
        val_tokens: int = 8192,
        heldout_fraction: float = 0.01,
        outlier_factor: float | None = None,
        padding_side: PaddingSide = "right",
        num_workers: int = 0,
        n_probes: int = 32,
        probe_len: int = 64,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["model_pair", "web", "chat"])  # sources: frozen dataclasses, logged via stats()
        self.model_pair = model_pair
        self.web, self.chat = (c if isinstance(c, SourceConfig) else SourceConfig(**c) for c in (web, chat))
        self.mix = mix_probabilities(mix)
        self.val_acts: torch.Tensor | None = None
        self.stream: ActivationStream | None = None

    def _rows(self, heldout: bool, rank: int = 0, world_size: int = 1) -> RowStream:
        h = self.hparams
        return mixed_rows(self.web, self.chat, self.model_pair.tokenizer, self.mix, h.seed, heldout, h.heldout_fraction,
                          rank, world_size)

    def setup(self, stage: str | None = None) -> None:
        if self.val_acts is None:
            self.val_acts = self._heldout_activations()

    def heldout_activations(self) -> torch.Tensor:
        """The validation set: raw paired activations ``[val_tokens, 2, d_model]`` never trained on (CPU), carrying
        its `TokenTable` (read it with `token_table`)."""
        self.setup("validate")
        return self.val_acts

    def heldout_tokens(self) -> TokenTable:
        """Where each held-out row was read: token ids, positions, web/chat source."""
        return token_table(self.heldout_activations())

    def probe_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n_probes`` held-out texts (web and chat, as mixed by the seed), tokenised:
        ``input_ids`` and ``attention_mask`` ``[n_probes, <= probe_len]``, one BOS each."""
        h = self.hparams
        probes = list(islice(texts(self._rows(heldout=True), StreamStats()), h.n_probes))
        if not probes:
            raise ValueError(f"no held-out text for the probes (heldout_fraction={h.heldout_fraction}); raise it")
        batch = tokenize(self.model_pair.tokenizer, probes, h.probe_len, h.padding_side)
        return batch["input_ids"], batch["attention_mask"]

    def _heldout_activations(self) -> torch.Tensor:
        """The first ``val_tokens`` held-out tokens, float32 ``[n, 2, d_model]`` on the CPU (same on every rank),
        with their `TokenTable` attached."""
        h = self.hparams
        parts, tables, n = [], [], 0
        for group in _batched(_labelled_texts(self._rows(heldout=True), StreamStats()), h.text_batch_size):
            group_texts, sources = zip(*group)
            acts, tokens = paired_activations_with_tokens(
                self.model_pair, group_texts, h.seq_len, h.padding_side, h.outlier_factor, sources
            )
            parts.append(acts.cpu())
            tables.append(tokens)
            n += len(acts)
            if n >= h.val_tokens:
                break
        if n == 0:
            raise ValueError(f"The held-out stream is empty (heldout_fraction={h.heldout_fraction}); raise it")
        if n < h.val_tokens:
            log.warning("Only %d of val_tokens=%d held-out tokens available; raise heldout_fraction", n, h.val_tokens)
        pad = self.model_pair.tokenizer.pad_token_id or 0
        return with_tokens(torch.cat(parts)[: h.val_tokens], TokenTable.concat(tables, pad).head(h.val_tokens))

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        self.stream = ActivationStream(
            self.model_pair, self._rows(False, rank, world_size), seq_len=h.seq_len, text_batch_size=h.text_batch_size,
            batch_size=h.batch_size, buffer_tokens=h.buffer_tokens, seed=h.seed + rank, padding_side=h.padding_side,
            outlier_factor=h.outlier_factor,
        )
        workers = {"num_workers": h.num_workers, "persistent_workers": h.num_workers > 0}
        return DataLoader(Endless(self.stream), batch_size=None, **workers)

    def val_dataloader(self) -> DataLoader:
        if self.val_acts is None:
            self.setup("validate")
        return _batches_of(self.val_acts, self.hparams.batch_size)

    def stats(self) -> dict[str, float]:
        """Realised mix and skipped rows of the training stream so far (this process), as floats for a logger."""
        return self.stream.stats.as_dict() if self.stream else {}


def write_activation_cache(
    datamodule: ActivationDataModule, out_dir: str | Path, n_tokens: int, tokens_per_shard: int = 2**16,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Cache ``n_tokens`` training tokens of ``datamodule``, its held-out set and its probe batch
    (``probes.safetensors``: ``input_ids``, ``attention_mask``) at ``out_dir`` (format: see `cache`)."""
    datamodule.setup("fit")
    h = datamodule.hparams
    source = {
        "base_id": datamodule.model_pair.base_id, "chat_id": datamodule.model_pair.chat_id, "layer": datamodule.model_pair.layer,
        "web": asdict(datamodule.web), "chat": asdict(datamodule.chat), "mix": list(datamodule.mix),
        **{key: h[key] for key in ("seed", "seq_len", "heldout_fraction", "outlier_factor", "padding_side")},
    }
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    input_ids, attention_mask = datamodule.probe_batch()
    save_file({"input_ids": input_ids.contiguous(), "attention_mask": attention_mask.contiguous()},
              str(Path(out_dir) / PROBES))
    batches = iter(datamodule.train_dataloader())
    path = write_cache(out_dir, batches, n_tokens, tokens_per_shard, datamodule.val_acts, source, dtype,
                       val_tokens=token_table(datamodule.val_acts))
    log.info("Cache stream stats: %s", datamodule.stats())
    return path


class CachedActivationDataModule(L.LightningDataModule):
    """Paired activations read from a cache written by `write_activation_cache` (``data=cached``).

    Validation reads the cache's held-out set. Given a ``model_pair``, the cache must come from the same
    models and layer. Training batches are float32 on the CPU (Lightning moves them).
    """

    def __init__(self, path: str | Path, batch_size: int = 4096, seed: int = 0, num_workers: int = 0,
                 model_pair: Any | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["model_pair"])
        self.meta = read_meta(path)
        self.model_pair = model_pair
        if model_pair is not None:
            self._check_pair(model_pair)

    def _check_pair(self, pair: Any) -> None:
        expected = {"base_id": pair.base_id, "chat_id": pair.chat_id, "layer": pair.layer}
        found = {key: self.meta["source"].get(key) for key in expected}
        if found != expected or self.meta["d_model"] != pair.d_model:
            raise ValueError(
                f"The activation cache at {self.hparams.path} was written for {found} "
                f"(d_model={self.meta['d_model']}), not for the configured pair {expected} (d_model={pair.d_model}); "
                "rewrite the cache or change data.path"
            )

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        dataset = CachedActivations(h.path, h.batch_size, h.seed, rank, world_size)
        workers = {"num_workers": h.num_workers, "persistent_workers": h.num_workers > 0}
        return DataLoader(Endless(dataset), batch_size=None, **workers)

    def val_dataloader(self) -> DataLoader:
        return _batches_of(self.heldout_activations(), self.hparams.batch_size)

    def heldout_activations(self) -> torch.Tensor:
        """The cache's held-out tokens ``[n, 2, d_model]``, with their `TokenTable` when the cache stores one."""
        return load_val(self.hparams.path)

    def heldout_tokens(self) -> TokenTable | None:
        """Where each held-out row was read (None for caches written before token ids were kept)."""
        return token_table(self.heldout_activations())

    def probe_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The probe batch stored with the cache (``input_ids``, ``attention_mask``)."""
        path = Path(self.hparams.path) / PROBES
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: rewrite the cache with write_activation_cache")
        probes = load_file(str(path))
        return probes["input_ids"], probes["attention_mask"]
