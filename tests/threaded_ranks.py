"""Several ranks in one process, for tests of the step's collectives without starting processes.

:func:`run_ranks` runs one function per rank in threads; each gets a :class:`ThreadReducer` (the
:class:`crosscoder_pl.distributed.Reducer` protocol) whose collectives meet at a barrier and combine the ranks'
tensors in rank order, as ``torch.distributed`` would.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

TIMEOUT_S = 60  # a rank that skips a collective fails the test instead of hanging it


class ThreadReducer:
    def __init__(self, rank: int, world_size: int, slots: list[Any], barrier: threading.Barrier) -> None:
        self.rank, self.world_size = rank, world_size
        self._slots, self._barrier = slots, barrier
        self.calls = 0

    def _exchange(self, t: torch.Tensor) -> list[torch.Tensor]:
        self.calls += 1
        self._slots[self.rank] = t.detach().clone()
        self._barrier.wait()
        parts = list(self._slots)
        self._barrier.wait()  # nobody overwrites a slot before every rank has read them all
        return parts

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        stacked = torch.stack(self._exchange(t))
        out = {"sum": lambda: stacked.sum(0), "min": lambda: stacked.amin(0), "max": lambda: stacked.amax(0)}[op]()
        return out.to(t.dtype)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        return torch.stack(self._exchange(t))


def run_ranks(world_size: int, fn: Callable[[ThreadReducer], Any]) -> list[Any]:
    """``[fn(reducer of rank 0), fn(reducer of rank 1), ...]``, the calls running concurrently; re-raises a rank's error."""
    slots: list[Any] = [None] * world_size
    barrier = threading.Barrier(world_size, timeout=TIMEOUT_S)
    results: list[Any] = [None] * world_size
    errors: list[BaseException] = []

    def body(rank: int) -> None:
        try:
            results[rank] = fn(ThreadReducer(rank, world_size, slots, barrier))
        except BaseException as err:  # noqa: BLE001 (re-raised below, in the caller's thread)
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=body, args=(rank,)) for rank in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
