"""The one resume mechanism of the training data, shared by the streamed and the cached data module.

A data module serves its training batches from a `TrackedPasses`: endless passes over the data, pass ``p``
seeded with its number. The first iterator made is the trainer's (tracked): each batch it serves is noted, the
data module calls `TrackedPasses.consumed` once the trainer has taken one (its `on_before_batch_transfer`), so
`state_dict` says where the trainer stands, the batches it drew ahead (prefetched) included; a resumed run then
serves the very batches the interrupted one would have. Later iterators (e.g. the scale estimate's look at the
data) are side passes: untracked, their pass numbers drawn from the same count.

`ResumableData` is the data modules' side: the position in the checkpoint, with the settings that give it its
meaning (`why_not_continued`: a position is continued only under the same settings, world size and rank split).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import IterableDataset

MAX_PREFETCH = 8  # batches a consumer may draw ahead of what it trains on (Lightning: 1)


def check_pass(served: int, excused: bool = False) -> None:
    """Refuse a whole pass that served no batch (endless passes over it would never yield); ``excused``: a resumed
    pass, which may have been served to its end before the checkpoint."""
    if not served and not excused:
        raise ValueError("a whole pass over the training data gave no full batch: add data or lower batch_size")


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
            check_pass(served)


class TrackedPasses(IterableDataset):
    """Endless training batches, pass after pass, with the trainer's position kept for the checkpoint.

    Subclasses serve the batches (`_start`: the iterator of the trainer when ``tracked``, else of a side pass) and
    say what a position is (`state_dict`, `_restore`); here: the pass count (`next_pass`), which iterator is the
    trainer's, the notes of the batches it served and the trainer has not yet taken (`note`, `consumed`; at most
    `MAX_PREFETCH`: a consumer that never reports, e.g. `write_activation_cache`, keeps no more alive), and the rule
    that a position is loaded before the first iterator is made.
    """

    ITERATED: ClassVar[str] = "the data"  # in the error of a late `load_state_dict`

    def __init__(self) -> None:
        self.passes = 0  # pass numbers handed out so far, to the trainer's iterator and to side passes
        self._served: deque[Any] | None = None  # the trainer's iterator: notes of the batches served, not yet taken

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self._served is not None:
            return self._start(tracked=False)
        self._served = deque(maxlen=MAX_PREFETCH)
        return self._start(tracked=True)

    def _start(self, tracked: bool) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    def next_pass(self) -> int:
        """A fresh pass number, drawn from the count."""
        index, self.passes = self.passes, self.passes + 1
        return index

    def note(self, served: Any) -> None:
        """The trainer's iterator served a batch (``served``: what `state_dict` needs to know of it)."""
        self._served.append(served)

    def consumed(self) -> None:
        """The trainer took the oldest batch the tracked iterator served (called once per training batch)."""
        if self._served:
            self._taken(self._served.popleft())

    def _taken(self, served: Any) -> None:
        """The trainer took the batch of this note."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (a `state_dict`) at the next iterator made; before any is made."""
        if self._served is not None:
            raise RuntimeError(f"load_state_dict must come before {self.ITERATED} is iterated")
        self._restore(state)

    def _restore(self, state: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError


def why_not_continued(state: Mapping[str, Any], world_size: int, rank_split: str,
                      settings: Mapping[str, Any]) -> str | None:
    """Why a data position saved in a checkpoint (``world_size``, ``rank_split``, ``settings`` of the run that wrote
    it) cannot be continued exactly by this run, or None when it can."""
    saved = (state.get("world_size", 1), state.get("rank_split"))
    if saved != (world_size, rank_split):
        return (f"was written with world_size={saved[0]}, rank_split={saved[1]} (this run: world_size={world_size}, "
                f"rank_split={rank_split})")
    if world_size > 1 and rank_split == "documents":
        # The checkpoint holds rank 0's position only; with "batch" every rank's position is rank 0's.
        return "holds rank 0's position only under rank_split=documents (rank_split=batch resumes exactly)"
    written = state.get("settings") or {}
    changed = sorted(key for key, value in settings.items() if written.get(key) != value)
    return f"had other settings ({', '.join(changed)})" if changed else None


class ResumableData:
    """A LightningDataModule's resume (mixed in): its `TrackedPasses`, made in ``train_dataloader`` and held in the
    attribute named `POSITION`, goes into every checkpoint under that key, with what it means.

    Lightning saves `state_dict` in every checkpoint and calls `load_state_dict` before ``train_dataloader``, which
    calls `_resume_position` once it has made the passes. The subclass gives `_settings` (what a position means)
    and the wording of its warnings.
    """

    POSITION: ClassVar[str]  # the attribute holding the `TrackedPasses`, and its key in the checkpoint
    WHAT: ClassVar[str]  # "the checkpoint's <WHAT> <why not>"
    RESTARTS: ClassVar[str]  # "<RESTARTS> starts afresh"
    WORKERS_LOSE: ClassVar[str]  # warned when num_workers > 0: what is not in the checkpoint

    _saved_position: dict[str, Any] | None = None  # from a checkpoint, applied in train_dataloader

    def _passes(self) -> TrackedPasses | None:
        return getattr(self, self.POSITION)

    def state_dict(self) -> dict[str, Any]:
        """The position of the trainer's iterator (`TrackedPasses.state_dict`) and what it means, for the checkpoint."""
        passes = self._passes()
        if passes is None:
            return {}
        if self.cfg.num_workers > 0:
            rank_zero_warn(self.WORKERS_LOSE)
            return {}
        world_size = self.trainer.world_size if self.trainer else 1
        return {self.POSITION: passes.state_dict(), "world_size": world_size, "rank_split": self.cfg.rank_split,
                "settings": self._settings()}

    def _settings(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved_position = state_dict or None

    def _resume_position(self, world_size: int) -> None:
        """Continue the checkpoint's position, if one was loaded, with the passes just made (when it means the same)."""
        if self._saved_position is None:
            return
        state, self._saved_position = self._checkpointed(self._saved_position), None
        if state is None:
            return
        reason = why_not_continued(state, world_size, self.cfg.rank_split, self._settings())
        if reason is not None:
            rank_zero_warn(f"the checkpoint's {self.WHAT} {reason}: {self.RESTARTS} starts afresh instead of "
                           "continuing exactly")
        elif state.get(self.POSITION):
            self._passes().load_state_dict(state[self.POSITION])

    def _checkpointed(self, state: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """The checkpoint's data state as this version reads it (None: nothing to continue)."""
        return state

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Called once per batch the trainer takes, after its one-batch prefetch: what the checkpoint must replay.
        passes = self._passes()
        if self.trainer is not None and self.trainer.training and passes is not None:
            passes.consumed()
        return batch
