"""`ActivationDataModule`: paired activations ``[batch, 2, d_model]`` computed on the fly for the crosscoder.

Mixed web/chat text -> both language models (truncated forward) -> shuffle buffer. Training batches stay on the
language models' device (the buffer lives there; Lightning's transfer is then a no-op), so extraction runs in the
main process by default (``num_workers=0``); workers only make sense for CPU models. `write_activation_cache`
writes its stream to a cache that `crosscoder_pl.data.cached.CachedActivationDataModule` reads. Both resume
exactly through `crosscoder_pl.data.resume`.

Validation: a fixed held-out set of ``val_tokens`` tokens (documents selected by hash, disjoint from
training, see `crosscoder_pl.data.sources`), computed once, kept on the CPU; under DDP Lightning splits
it across ranks with its distributed sampler. The held-out tensor carries its `TokenTable` (token ids,
positions, web/chat source of every row; `crosscoder_pl.data.activations.token_table`), and so does a cache's.

Outlier tokens (`crosscoder_pl.data.outliers`): each group of texts read together is screened (the median per
model over the group) before the shuffle buffer, in the training stream (`StreamStats.outliers`, kept in
checkpoints) and in the held-out set; the tokens are dropped only with ``drop_outliers``. ``stats()`` holds the
running totals for the logger, ``outlier_report()`` what the model card states.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
import torch
from datasets import IterableDataset as RowStream
from torch.utils.data import DataLoader

from crosscoder_pl.config import StreamDataConfig
from crosscoder_pl.data.activations import (
    SOURCE_CODES,
    PaddingSide,
    PairLike,
    TokenTable,
    paired_activations_with_tokens,
    token_table,
    tokenize,
    with_tokens,
)
from crosscoder_pl.data.buffer import ShuffleBuffer
from crosscoder_pl.data.cache import CHAT_PROBES, PROBES, NoHeldoutChats, write_cache
from crosscoder_pl.data.loaders import (
    RankSlice,
    batches_of,
    rank_of,
    training_loader,
)
from crosscoder_pl.data.memo import GIB, ActivationMemo, per_document
from crosscoder_pl.data.outliers import OutlierCounts, screen, upgraded
from crosscoder_pl.data.resume import Endless, ResumableData, TrackedPasses, check_pass
from crosscoder_pl.data.sources import (
    StreamStats,
    build_source,
    mixed_rows,
    read_rows,
    source_rows,
    texts,
)
from crosscoder_pl.names import SOURCES

log = logging.getLogger(__name__)


def _batched(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    while batch := list(islice(items, size)):
        yield batch


def _labelled_texts(rows: RowStream, stats: StreamStats) -> Iterator[tuple[str, str]]:
    """``(text, source)`` of the usable rows (``texts`` per row, so skipped rows are counted alike)."""
    for row in read_rows(rows):
        for text in texts((row,), stats):
            yield text, row["source"]


class ActivationStream(TrackedPasses):
    """Endless training batches ``[batch_size, 2, d_model]``: text rows -> paired activations -> shuffle buffer.

    Pass after pass over the rows (``make_rows()`` gives a fresh row stream per pass), re-mixed and reshuffled
    per pass (pass ``p``: ``rows.set_epoch(p)``, buffer seed ``seed + p``). The first iterator made is the
    trainer's (`TrackedPasses`): its position is tracked and `state_dict` returns it, so a resumed run serves the
    very batches the interrupted one would have (`load_state_dict` before that first iterator is made). Later
    iterators (e.g. the scale estimate's look at the data) are side passes: untracked, counted in a throw-away
    `StreamStats`. ``stats`` counts the trainer's documents (in this process: DataLoader workers keep theirs),
    and its outlier tokens: each group's tokens above ``outlier_factor`` times the group's median norm, per
    model (None: none counted); they are dropped when ``drop_outliers``.

    ``memo_bytes > 0``: the tracked iterator's first pass keeps each document's activations (`ActivationMemo`,
    up to that many bytes) and later passes serve them instead of running the models again. A restored stream
    replays the first pass's groups (``memo_groups`` of them, from the state) to refill the memo first.
    """

    ITERATED = "the stream"

    def __init__(self, pair: PairLike, make_rows: Callable[[], RowStream], *, seq_len: int, text_batch_size: int,
                 batch_size: int, buffer_tokens: int, seed: int, padding_side: PaddingSide,
                 outlier_factor: float | None, drop_outliers: bool = False, memo_bytes: int = 0):
        super().__init__()
        self.model_pair = pair
        self.make_rows = make_rows
        self.seq_len = seq_len
        self.text_batch_size = text_batch_size
        self.batch_size = batch_size
        self.buffer_tokens = buffer_tokens
        self.seed = seed
        self.padding_side = padding_side
        self.outlier_factor = outlier_factor
        self.drop_outliers = drop_outliers
        self.stats = StreamStats()
        self._tracked: _Position | None = None
        self._resume: dict[str, Any] | None = None
        self.memo = ActivationMemo(memo_bytes) if memo_bytes > 0 else None
        self._memo_pass: int | None = None  # the pass that fills the memo (the tracked iterator's first)
        self._memo_groups = 0  # text groups that pass has read so far

    def chunks(self, rows: RowStream, stats: StreamStats, memo: ActivationMemo | None = None,
               fill: bool = False) -> Iterator[torch.Tensor]:
        """Activations ``[tokens, 2, d_model]`` of successive groups of ``text_batch_size`` texts; the tokens
        extracted from each source are counted in ``stats`` (the realised token mix), and so are the outliers
        (`_screened`). With a ``memo``, documents found there are not run through the models; ``fill``: the
        documents run are stored in it."""
        for group in _batched(_labelled_texts(rows, stats), self.text_batch_size):
            group_texts, sources = zip(*group)
            if memo is None:
                acts, table = paired_activations_with_tokens(self.model_pair, group_texts, self.seq_len,
                                                             self.padding_side, None, sources)
                row_source = table.row_source().long()
            else:
                acts, row_source = self._remembered(group_texts, sources, memo, fill)
            acts, row_source = self._screened(acts, row_source, stats)
            per_source = torch.bincount(row_source, minlength=len(SOURCES)).tolist()
            stats.tokens.update({name: n for name, n in zip(SOURCES, per_source) if n})
            yield acts

    def _remembered(self, group_texts: Sequence[str], sources: Sequence[str], memo: ActivationMemo,
                    fill: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """A group's activations ``[tokens, 2, d_model]`` with the models run on the documents ``memo`` lacks only
        (stored when ``fill``), outliers not yet screened; and each row's source code ``[tokens]`` (CPU). Without a
        memo hit: the same tensor `paired_activations_with_tokens` gives for the group."""
        docs = [memo.get(source, text) for source, text in zip(sources, group_texts)]
        missing = [i for i, doc in enumerate(docs) if doc is None]
        if missing:
            acts, table = paired_activations_with_tokens(self.model_pair, [group_texts[i] for i in missing],
                                                         self.seq_len, self.padding_side, None)
            for i, part in zip(missing, per_document(acts, table.seq, len(missing))):
                docs[i] = part
                if fill:
                    memo.put(sources[i], group_texts[i], part)
        codes = torch.tensor([SOURCE_CODES[source] for source in sources])
        row_source = codes.repeat_interleave(torch.tensor([len(doc) for doc in docs]))
        return torch.cat(docs), row_source

    def _screened(self, acts: torch.Tensor, row_source: torch.Tensor,
                  stats: StreamStats) -> tuple[torch.Tensor, torch.Tensor]:
        """A group's ``acts [tokens, 2, d_model]`` and ``row_source [tokens]`` (CPU) with its outliers counted in
        ``stats`` (the median over the whole group, whether its documents came from the memo or the models) and
        dropped when ``drop_outliers``."""
        keep = screen(acts, self.outlier_factor, self.drop_outliers, stats.outliers)
        if keep is None:
            return acts, row_source
        return acts[keep], row_source[keep.cpu()]

    def _start(self, tracked: bool) -> Iterator[torch.Tensor]:
        position = _Position()
        if not tracked:
            return self._serve(position, StreamStats(), None)
        self._tracked, resume, self._resume = position, self._resume, None
        return self._serve(position, self.stats, resume)

    def _serve(self, at: _Position, stats: StreamStats, resume: Mapping[str, Any] | None) -> Iterator[torch.Tensor]:
        tracked = at is self._tracked
        if resume is not None:
            self.passes = int(resume["passes"])
            stats.load_state_dict(resume["stats"])
            at.unserved.extend(resume["pending"])
            self._refill_memo(resume)
        while True:
            if resume is None:
                at.pass_index = self.next_pass()
            else:
                at.pass_index = int(resume["pass"])
            memo = self.memo if tracked else None  # side passes neither read nor fill it
            if memo is not None and self._memo_pass is None:
                self._memo_pass = at.pass_index
            fill = memo is not None and at.pass_index == self._memo_pass
            at.rows = self.make_rows()
            at.rows.set_epoch(at.pass_index)
            at.buffer = ShuffleBuffer(self.batch_size, self.buffer_tokens, self.seed + at.pass_index)
            if resume is not None:
                at.rows.load_state_dict(resume["rows"])
                at.buffer.load_state_dict(resume["buffer"])
            served = 0
            while at.unserved:  # batches the interrupted run had drawn but not trained on (prefetched)
                batch = at.unserved.popleft()
                self.note(batch)  # only the tracked iterator has any
                served += 1
                yield batch
            chunks = self.chunks(at.rows, stats, memo, fill)
            for batch in at.buffer.batches(self._counted(chunks) if fill else chunks):
                if tracked:
                    self.note(batch)
                served += 1
                yield batch
            check_pass(served, excused=resume is not None)
            resume = None

    def _counted(self, chunks: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        """``chunks`` of the memo-filling pass, counted (the state's ``memo_groups``)."""
        for chunk in chunks:
            self._memo_groups += 1
            yield chunk

    def _refill_memo(self, resume: Mapping[str, Any]) -> None:
        """Run the models again on the first ``memo_groups`` groups of the memo-filling pass, in the same groups (so
        to the same bits), storing them as that pass did: the memo an uninterrupted run would hold now."""
        self._memo_pass, self._memo_groups = resume.get("memo_pass"), int(resume.get("memo_groups", 0))
        if self.memo is None or self._memo_pass is None or not self._memo_groups:
            return
        log.info("refilling the activation memo: %d text groups of pass %d", self._memo_groups, self._memo_pass)
        rows = self.make_rows()
        rows.set_epoch(self._memo_pass)
        for _ in islice(self.chunks(rows, StreamStats(), self.memo, fill=True), self._memo_groups):
            pass

    def state_dict(self) -> dict[str, Any]:
        """Where the trainer's iterator stands: pass, row stream, buffer, counts, and the batches served but not
        yet trained on (the trainer prefetches one). Tensors and plain values (``weights_only`` checkpoints)."""
        at = self._tracked
        if at is None or at.rows is None:
            return {}
        return {
            "passes": self.passes, "pass": at.pass_index, "rows": at.rows.state_dict(),
            "buffer": at.buffer.state_dict(), "stats": self.stats.state_dict(),
            "pending": [batch.cpu().clone() for batch in (*self._served, *at.unserved)],
            "memo_pass": self._memo_pass, "memo_groups": self._memo_groups,
        }

    def _restore(self, state: Mapping[str, Any]) -> None:
        self._resume = dict(state) if state else None


@dataclass
class _Position:
    """An iterator's position: its pass, row stream and buffer; ``unserved``: restored batches still to serve (the
    batches served and not yet consumed are the `TrackedPasses` notes)."""

    pass_index: int = 0
    rows: RowStream | None = None
    buffer: ShuffleBuffer | None = None
    unserved: deque[torch.Tensor] = field(default_factory=deque)


class ActivationDataModule(ResumableData, L.LightningDataModule):
    """Paired activations of ``model_pair`` on a seeded web/chat mix, computed on the fly, as ``cfg`` (the typed
    ``data`` group, `crosscoder_pl.config.StreamDataConfig`) says:

    ``web`` / ``chat``: a dataset's text (``path``, ``field``, ``name``, ``split``, ``data_files``) or a half of
    the embedded corpus (`crosscoder_pl.data.sources.build_source`).
    ``mix``: ``{"web": p, "chat": p}`` or ``[p_web, p_chat]``, summing to 1. ``batch_size``: tokens per
    crosscoder batch; ``text_batch_size``: sequences per language-model forward; ``buffer_tokens``: shuffle
    buffer size; ``val_tokens``: size of the held-out set, drawn from the ``heldout_fraction`` of documents
    held out; ``outlier_factor``: a token whose norm in a model exceeds this multiple of that model's median
    norm (over each group of ``text_batch_size`` texts) is an outlier, counted per model in the training stream
    and the held-out set (None: none counted); ``drop_outliers``: drop them (else kept).
    ``n_probes`` / ``probe_len``: the held-out token sequences of the end-of-training causal analyses.
    ``rank_split`` (DDP): ``"batch"``: every rank extracts the global stream and trains on its slice of each
    global batch (`RankSlice`): exactly the single-process run's batches, but each rank runs both language
    models on every token; ``"documents"``: each rank reads its own documents (no repeated extraction; the
    union is another sample of the same mix). One process: the two are the same.
    ``memo_gb``: activations of the first training pass kept in memory (GiB, on the models' device) and served
    again in later passes without running the models (`crosscoder_pl.data.memo`); 0: every pass runs them.
    """

    POSITION = "stream"
    WHAT = "data stream"
    RESTARTS = "the data stream"
    WORKERS_LOSE = ("data.num_workers > 0: the workers' stream positions are not in the checkpoint; a resumed run "
                    "restarts the data stream (use num_workers=0 for an exact resume)")

    def __init__(self, model_pair: PairLike, cfg: StreamDataConfig) -> None:
        super().__init__()
        # The group as plain values in the checkpoint; the typed group itself is what the module reads.
        self.save_hyperparameters({"data": cfg.model_dump(mode="json")})  # "data": not the module's "cfg" (merged)
        self.cfg = cfg
        self.model_pair = model_pair
        self.web, self.chat = build_source(cfg.web), build_source(cfg.chat)
        self.mix = cfg.mix_pair
        self.val_acts: torch.Tensor | None = None
        self.heldout_counts = OutlierCounts()  # of the groups read to build the held-out set
        self.stream: ActivationStream | None = None

    def _rows(self, heldout: bool, rank: int = 0, world_size: int = 1) -> RowStream:
        h = self.cfg
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
        h = self.cfg
        probes = list(islice(texts(self._rows(heldout=True), StreamStats()), h.n_probes))
        if not probes:
            raise ValueError(f"no held-out text for the probes (heldout_fraction={h.heldout_fraction}); raise it")
        batch = tokenize(self.model_pair.tokenizer, probes, h.probe_len, h.padding_side)
        return batch["input_ids"], batch["attention_mask"]

    def chat_probe_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` held-out chats of the chat source (the hash split of the training stream: never trained
        on), rendered with the chat template and tokenised like the training text: ``input_ids`` and
        ``attention_mask`` ``[<= n, <= seq_len]``, one BOS each. For the base→chat patching; `NoHeldoutChats` when
        there is none."""
        h = self.cfg
        rows = source_rows("chat", self.chat, self.model_pair.tokenizer, True, h.heldout_fraction)
        chats = list(islice(texts(rows, StreamStats()), n))
        if not chats:
            raise NoHeldoutChats(f"the chat source holds no held-out chat (heldout_fraction={h.heldout_fraction})")
        if len(chats) < n:
            log.info("only %d of %d held-out chats available", len(chats), n)
        batch = tokenize(self.model_pair.tokenizer, chats, h.seq_len, h.padding_side)
        return batch["input_ids"], batch["attention_mask"]

    def _heldout_activations(self) -> torch.Tensor:
        """The first ``val_tokens`` held-out tokens, float32 ``[n, 2, d_model]`` on the CPU (same on every rank),
        with their `TokenTable` attached; the outliers of the groups read are counted in ``heldout_counts`` (and
        dropped when ``drop_outliers``), as in the training stream."""
        h = self.cfg
        parts, tables, n = [], [], 0
        self.heldout_counts = OutlierCounts()
        for group in _batched(_labelled_texts(self._rows(heldout=True), StreamStats()), h.text_batch_size):
            group_texts, sources = zip(*group)
            acts, tokens = paired_activations_with_tokens(
                self.model_pair, group_texts, h.seq_len, h.padding_side, None, sources
            )
            keep = screen(acts, h.outlier_factor, h.drop_outliers, self.heldout_counts)
            if keep is not None:
                acts, tokens = acts[keep], tokens.rows(keep.cpu())
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
        h = self.cfg
        rank, world_size = rank_of(self.trainer)
        by_batch = h.rank_split == "batch"
        # "batch": the global stream on every rank (same rows, seed, batch size), sliced below.
        shard, shards, reader_seed = (0, 1, h.seed) if by_batch else (rank, world_size, h.seed + rank)
        self.stream = ActivationStream(
            self.model_pair, partial(self._rows, False, shard, shards), seq_len=h.seq_len, text_batch_size=h.text_batch_size,
            batch_size=h.batch_size * (world_size if by_batch else 1), buffer_tokens=h.buffer_tokens,
            seed=reader_seed, padding_side=h.padding_side, outlier_factor=h.outlier_factor,
            drop_outliers=h.drop_outliers, memo_bytes=int(h.memo_gb * GIB),
        )
        self._resume_position(world_size)
        dataset = RankSlice(self.stream, rank, world_size) if by_batch else self.stream
        return training_loader(Endless(dataset), h.num_workers)

    def val_dataloader(self) -> DataLoader:
        if self.val_acts is None:
            self.setup("validate")
        return batches_of(self.val_acts, self.cfg.batch_size, *rank_of(self.trainer))

    def stats(self) -> dict[str, float]:
        """Realised mix, skipped rows and outlier tokens of the training stream so far (this process; under
        ``rank_split=batch`` that is the global stream), as floats for a logger."""
        return self.stream.stats.as_dict() if self.stream else {}

    def outlier_report(self) -> dict[str, dict[str, Any]]:
        """The outlier tokens the model card states (`OutlierCounts.summary`): ``training`` (the stream so far, when
        it has started) and ``heldout`` (once built); empty when ``outlier_factor`` is None."""
        h = self.cfg
        if h.outlier_factor is None:
            return {}
        report = {}
        median_over = f"each group of {h.text_batch_size} texts read together"
        if self.stream is not None:
            report["training"] = self.stream.stats.outliers.summary(h.outlier_factor, h.drop_outliers, median_over)
        if self.val_acts is not None:
            report["heldout"] = self.heldout_counts.summary(h.outlier_factor, h.drop_outliers, median_over)
        return report

    # Resume (`ResumableData`): the stream's exact position (`ActivationStream.state_dict`) under the key "stream".
    def _settings(self) -> dict[str, Any]:
        """What the stream's position means: a position is only continued under the same settings."""
        h = self.cfg
        keys = ("seed", "seq_len", "batch_size", "text_batch_size", "buffer_tokens", "heldout_fraction", "outlier_factor",
                "drop_outliers", "padding_side", "memo_gb")
        return {**{key: getattr(h, key) for key in keys}, "mix": list(self.mix), "web": asdict(self.web), "chat": asdict(self.chat)}

    def _checkpointed(self, state: Mapping[str, Any]) -> Mapping[str, Any]:
        settings = self._settings()
        return {**state, "settings": upgraded(state.get("settings", settings))}  # older checkpoints: what they meant


def write_activation_cache(
    datamodule: ActivationDataModule, out_dir: str | Path, n_tokens: int, tokens_per_shard: int = 2**16,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Cache ``n_tokens`` training tokens of ``datamodule``, its held-out set, its probe batch
    (``probes.safetensors``: ``input_ids``, ``attention_mask``) and ``n_probes`` held-out chats
    (``chat_probes.safetensors``, when the chat source has any) at ``out_dir`` (format: see `cache`). The manifest's
    ``source`` records the outlier settings; its ``stats`` the outliers the writer counted
    (`ActivationDataModule.outlier_report`: ``training``, over every token its stream screened, shuffle buffer's
    surplus included; ``heldout``)."""
    datamodule.setup("fit")
    h = datamodule.cfg
    source = {
        "base_id": datamodule.model_pair.base_id, "chat_id": datamodule.model_pair.chat_id, "layer": datamodule.model_pair.layer,
        "web": asdict(datamodule.web), "chat": asdict(datamodule.chat), "mix": list(datamodule.mix),
        **{key: getattr(h, key) for key in ("seed", "seq_len", "heldout_fraction", "outlier_factor", "drop_outliers",
                                   "padding_side")},
    }
    input_ids, attention_mask = datamodule.probe_batch()
    extra = {PROBES: {"input_ids": input_ids, "attention_mask": attention_mask}}
    try:
        chat_ids, chat_mask = datamodule.chat_probe_batch(h.n_probes)
        extra[CHAT_PROBES] = {"input_ids": chat_ids, "attention_mask": chat_mask}
    except NoHeldoutChats as err:
        log.warning("cache written without held-out chats (%s): its base→chat patching will be skipped", err)
    batches = iter(datamodule.train_dataloader())
    path = write_cache(out_dir, batches, n_tokens, tokens_per_shard, datamodule.val_acts, source, dtype,
                       val_tokens=token_table(datamodule.val_acts), extra=extra,
                       stats=lambda: {"outliers": datamodule.outlier_report()})
    log.info("Cache stream stats: %s", datamodule.stats())
    return path
