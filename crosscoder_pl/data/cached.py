"""`CachedActivationDataModule`: paired activations ``[batch, 2, d_model]`` read from a cache written by
`crosscoder_pl.data.datamodule.write_activation_cache` (``data=cached``; format: `crosscoder_pl.data.cache`).

Validation reads the cache's held-out set, which carries its `TokenTable` when the cache stores one.
`CachePasses` serves the training batches pass after pass and counts the batches the trainer takes from the
cache, for an exact resume (`crosscoder_pl.data.resume`). Outlier tokens (`crosscoder_pl.data.outliers`): the
batches trained on can be screened again, each against its own median; ``stats()`` holds the running totals for
the logger, ``outlier_report()`` what the model card states.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from crosscoder_pl.config import CachedDataConfig, check_outliers
from crosscoder_pl.data.activations import TokenTable, token_table, with_tokens
from crosscoder_pl.data.cache import (
    CHAT_PROBES,
    PROBES,
    CachedActivations,
    NoHeldoutChats,
    load_checked,
    load_val,
    read_meta,
)
from crosscoder_pl.data.loaders import (
    RankSlice,
    batches_of,
    rank_of,
    training_loader,
)
from crosscoder_pl.data.outliers import OutlierCounts, screen, upgraded
from crosscoder_pl.data.resume import ResumableData, TrackedPasses, check_pass

log = logging.getLogger(__name__)


class CachePasses(TrackedPasses):
    """Endless batches of a cache reader, pass after pass (pass ``p``: the reader's shuffle with seed ``seed + p``),
    with the trainer's position kept for the checkpoint (`TrackedPasses`).

    Each batch the trainer's iterator serves is noted as ``(pass, batch number)``, so `state_dict` says where to
    continue: at the oldest batch served and not yet trained on (the trainer prefetches one). A pass is a pure
    function of its number, so a resumed iterator re-reads that pass and skips what was trained on instead of
    keeping batches in the checkpoint.

    ``outlier_factor``: ``outliers`` counts the outlier tokens of the batches the trainer took, each batch
    screened against its own median norm per model (None: none counted); kept in `state_dict`. ``drop_outliers``:
    they are also removed from the batches served (a batch then holds fewer rows).
    """

    ITERATED = "the cache"

    def __init__(self, reader: CachedActivations, outlier_factor: float | None = None, drop_outliers: bool = False):
        super().__init__()
        self.reader = reader
        self.outlier_factor, self.drop_outliers = outlier_factor, drop_outliers
        self.outliers = OutlierCounts()  # of the batches consumed
        self._next = (0, 0)  # the trainer's iterator: (pass, batch number) of the batch it would serve next
        self._plan: list[tuple[int, int]] = []  # from a checkpoint: (pass, batches to skip) to serve first

    def _start(self, tracked: bool) -> Iterator[torch.Tensor]:
        if not tracked:
            return self._serve([], tracked=False)
        plan, self._plan = self._plan, []
        return self._serve(plan, tracked=True)

    def _serve(self, plan: list[tuple[int, int]], tracked: bool) -> Iterator[torch.Tensor]:
        while True:
            if plan:
                index, skip = plan.pop(0)
            else:
                index, skip = self.next_pass(), 0
            served = 0
            for number, batch in enumerate(self._pass(index)):
                if number < skip:
                    continue
                counts = OutlierCounts()
                keep = screen(batch, self.outlier_factor, self.drop_outliers, counts)
                if tracked:
                    self.note((index, number, counts))  # with the outliers of the batch, counted once it is taken
                    self._next = (index, number + 1)
                served += 1
                yield batch if keep is None else batch[keep]
            check_pass(served, excused=bool(skip))

    def _pass(self, index: int) -> Iterator[torch.Tensor]:
        # The reader seeds a pass with its own counter when the pass starts (its first batch, drawn right here).
        self.reader.passes = index
        yield from self.reader

    def _taken(self, served: tuple[int, int, OutlierCounts]) -> None:
        self.outliers.add(served[2])

    def state_dict(self) -> dict[str, Any]:
        """Plain values: the pass count and where the trainer's iterator continues, ``[[pass, batch], ...]`` (the
        batches served but not trained on, then the next one), and the outlier counts of the batches trained on
        (with an ``outlier_factor``); empty before the trainer's first batch."""
        if self._served is None or self._next == (0, 0):
            return {}
        continue_at = [[index, number] for index, number, _ in self._served] + [list(self._next)]
        state = {"passes": self.passes, "continue_at": continue_at}
        if self.outlier_factor is not None:  # the batches served but not trained on are counted again on resume
            state["outliers"] = self.outliers.state_dict()
        return state

    def _restore(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        self.outliers.load_state_dict(state.get("outliers", {}))
        self.passes = int(state["passes"])
        plan: list[tuple[int, int]] = []
        for index, number in state["continue_at"]:  # consecutive batches: the first of each pass is where it resumes
            if not plan or plan[-1][0] != index:
                plan.append((int(index), int(number)))
        self._plan = plan


class CachedActivationDataModule(ResumableData, L.LightningDataModule):
    """Paired activations read from a cache written by `write_activation_cache` (``data=cached``).

    Validation reads the cache's held-out set. Given a ``model_pair``, the cache must come from the same
    models and layer. Training batches are float32 on the CPU (Lightning moves them). ``rank_split`` (DDP):
    ``"batch"``: every rank reads every shard and keeps its slice of each global batch (`RankSlice`), exactly
    the single-process batches; ``"documents"``: each rank reads its own shards. A checkpoint holds the reader's
    position (`CachePasses`), so a resumed run trains on the very batches the interrupted one would have.

    Outliers: with ``outlier_factor`` (None: the factor the cache was written with, its manifest's ``source``), the
    batches trained on are screened again, each against its own median (``stats()``); with ``drop_outliers`` their
    outliers are removed from them, and those of the held-out set (screened by batches of ``batch_size``) from it,
    so that one cache serves runs with and without. Rows the writer dropped are not in the cache. The writer's
    own counts come from the manifest's ``stats``.
    """

    POSITION = "reader"
    WHAT = "cache reader"
    RESTARTS = "the reader"
    WORKERS_LOSE = ("data.num_workers > 0: the workers' positions in the cache are not in the checkpoint; a resumed "
                    "run restarts its pass (use num_workers=0 for an exact resume)")

    def __init__(self, cfg: CachedDataConfig, model_pair: Any | None = None) -> None:
        super().__init__()
        # The group as plain values in the checkpoint; the typed group itself is what the module reads.
        self.save_hyperparameters({"data": cfg.model_dump(mode="json")})  # "data": not the module's "cfg" (merged)
        self.cfg = cfg
        path, outlier_factor, drop_outliers = cfg.path, cfg.outlier_factor, cfg.drop_outliers
        self.meta = read_meta(path)
        self.written_with = upgraded(self.meta.get("source") or {})  # outlier settings: before drop_outliers existed
        self.outlier_factor = self.written_with.get("outlier_factor") if outlier_factor is None else outlier_factor
        check_outliers(self.outlier_factor, drop_outliers)
        self.model_pair = model_pair
        if model_pair is not None:
            self._check_pair(model_pair)
        self.reader: CachePasses | None = None

    def _check_pair(self, pair: Any) -> None:
        expected = {"base_id": pair.base_id, "chat_id": pair.chat_id, "layer": pair.layer}
        found = {key: self.meta["source"].get(key) for key in expected}
        if found != expected or self.meta["d_model"] != pair.d_model:
            raise ValueError(
                f"The activation cache at {self.cfg.path} was written for {found} "
                f"(d_model={self.meta['d_model']}), not for the configured pair {expected} (d_model={pair.d_model}); "
                "rewrite the cache or change data.path"
            )

    def train_dataloader(self) -> DataLoader:
        h = self.cfg
        rank, world_size = rank_of(self.trainer)
        by_batch = h.rank_split == "batch"
        screening = (self.outlier_factor, h.drop_outliers)
        if by_batch:
            self.reader = CachePasses(CachedActivations(h.path, h.batch_size * world_size, h.seed), *screening)
        else:
            self.reader = CachePasses(CachedActivations(h.path, h.batch_size, h.seed, rank, world_size), *screening)
        self._resume_position(world_size)
        dataset = RankSlice(self.reader, rank, world_size) if by_batch else self.reader
        return training_loader(dataset, h.num_workers)

    def val_dataloader(self) -> DataLoader:
        return batches_of(self.heldout_activations(), self.cfg.batch_size, *rank_of(self.trainer))

    def stats(self) -> dict[str, float]:
        """The outlier tokens of the batches trained on so far (this process), as floats for a logger."""
        return self.reader.outliers.as_dict() if self.reader else {}

    def outlier_report(self) -> dict[str, dict[str, Any]]:
        """The outlier tokens the model card states: ``training`` (the batches trained on so far, each against its
        own median), and the writer's counts of its stream (``cache_training``) and held-out set (``heldout``)
        when the manifest has them; empty for a cache written without an ``outlier_factor``."""
        factor = self.outlier_factor
        if factor is None:
            return {}
        written = (self.meta.get("stats") or {}).get("outliers") or {}
        report = {f"cache_{key}" if key == "training" else key: value for key, value in written.items()}
        if self.reader is not None:  # trained on as read: never dropped here, whatever the writer dropped before
            over = f"each batch of {self.reader.reader.batch_size} tokens read from the cache"
            if self.written_with.get("drop_outliers"):
                over += " (its writer had dropped the outliers of its own groups)"
            report["training"] = self.reader.outliers.summary(factor, self.cfg.drop_outliers, over)
        return report

    # Resume (`ResumableData`): the reader's position (`CachePasses.state_dict`) under the key "reader".
    def _settings(self) -> dict[str, Any]:
        """What a position means: the same batches of the same cache (its shards, by checksum), in the same order."""
        shards = [[shard["file"], shard.get("sha256")] for shard in self.meta["shards"]]
        return {"batch_size": self.cfg.batch_size, "seed": self.cfg.seed, "shards": shards}

    def _checkpointed(self, state: Mapping[str, Any]) -> Mapping[str, Any] | None:
        if "reader" not in state:  # a checkpoint of an earlier version
            rank_zero_warn("data=cached: the checkpoint does not hold the cache reader's position; the resumed run "
                           "reads the cache from the start of a pass")
            return None
        return state

    def heldout_activations(self) -> torch.Tensor:
        """The cache's held-out tokens ``[n, 2, d_model]``, with their `TokenTable` when the cache stores one;
        without the outliers of each ``batch_size`` rows with ``drop_outliers``."""
        val = load_val(self.cfg.path)
        if not self.cfg.drop_outliers:
            return val
        keep = torch.cat([screen(part, self.outlier_factor, True, OutlierCounts())
                          for part in val.split(self.cfg.batch_size)])
        tokens = token_table(val)
        return val[keep] if tokens is None else with_tokens(val[keep], tokens.rows(keep))

    def heldout_tokens(self) -> TokenTable | None:
        """Where each held-out row was read (None for caches written before token ids were kept)."""
        return token_table(self.heldout_activations())

    def probe_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The probe batch stored with the cache (``input_ids``, ``attention_mask``)."""
        path = Path(self.cfg.path) / PROBES
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: rewrite the cache with write_activation_cache")
        probes = load_checked(self.cfg.path, PROBES, self.meta)
        return probes["input_ids"], probes["attention_mask"]

    def chat_probe_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` held-out chats stored with the cache (``input_ids``, ``attention_mask``); `NoHeldoutChats`
        for a cache written without them."""
        if not (Path(self.cfg.path) / CHAT_PROBES).is_file():
            raise NoHeldoutChats(f"the cache at {self.cfg.path} holds no held-out chats (written before they were "
                                 "kept, or from a stream without chats): rewrite it with cache_activations.py")
        chats = load_checked(self.cfg.path, CHAT_PROBES, self.meta)
        if chats["input_ids"].shape[0] < n:
            log.info("the cache holds %d held-out chats, fewer than the %d asked for", chats["input_ids"].shape[0], n)
        ids, mask = chats["input_ids"][:n], chats["attention_mask"][:n]
        width = mask.any(0)  # padding columns of the chats left out, as if these n had been tokenised alone
        return ids[:, width], mask[:, width]
