"""The DataLoaders of both data modules: how DDP ranks split the training batches (`RANK_SPLITS`, `RankSlice`)
and the held-out set (`batches_of`)."""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

RANK_SPLITS = ("batch", "documents")


def check_rank_split(rank_split: str) -> None:
    if rank_split not in RANK_SPLITS:
        raise ValueError(f"rank_split={rank_split!r} is not one of {RANK_SPLITS}")


def rank_of(trainer: L.Trainer | None) -> tuple[int, int]:
    """``(global_rank, world_size)`` of the trainer's process; ``(0, 1)`` without a trainer."""
    return (trainer.global_rank, trainer.world_size) if trainer else (0, 1)


class RankSlice(IterableDataset):
    """This rank's rows of each global batch: ``[world_size * b, ...]`` in, rows ``rank * b : (rank + 1) * b`` out.

    Every rank reads the same global stream, so the ranks' batches are disjoint and together are exactly the
    batches a single process with ``batch_size = world_size * b`` trains on (``rank_split="batch"``).
    """

    def __init__(self, dataset: IterableDataset, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.dataset, self.rank, self.world_size = dataset, rank, world_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in self.dataset:
            yield batch.tensor_split(self.world_size)[self.rank]


def training_loader(dataset: IterableDataset, num_workers: int) -> DataLoader:
    """The training DataLoader over ``dataset``'s ready-made batches."""
    workers = {"num_workers": num_workers, "persistent_workers": num_workers > 0}
    return DataLoader(dataset, batch_size=None, **workers)


class _Listed(IterableDataset):
    """Iterable over a list of batches: Lightning injects no distributed sampler into an iterable's loader."""

    def __init__(self, batches: list[torch.Tensor]):
        self.batches = batches

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.batches)


def batches_of(tensor: torch.Tensor, batch_size: int, rank: int = 0, world_size: int = 1) -> DataLoader:
    """A DataLoader over ``tensor``'s consecutive slices (not token by token, as ``DataLoader(tensor)`` would);
    rank ``r`` of ``world_size`` gets slices ``r, r + world_size, ...``: every held-out token is read by exactly
    one rank (Lightning's distributed sampler would repeat batches to even out the ranks, counting them twice)."""
    return DataLoader(_Listed(list(tensor.split(batch_size))[rank::world_size]), batch_size=None)
