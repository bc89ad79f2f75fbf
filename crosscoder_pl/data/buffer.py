"""Shuffle buffer: mixes paired activations from many sequences before serving crosscoder batches.

Tokens of one sequence are strongly correlated; serving them together would make every batch about a
handful of documents. The buffer fills to ``capacity`` tokens, permutes them, serves batches from the
front as long as at least ``capacity / 2`` tokens stay behind, then tops up and permutes again. All on the
device of the incoming activations. Only full batches are served: at the end of the stream the last
partial batch is dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch


class ShuffleBuffer:
    """The buffer's whole state, so that a checkpoint can hold it and a resumed run serve the same batches.

    ``store``: the permuted tokens not served yet, the next batch first ``[n, 2, d_model]``; ``ready``: the
    batches servable before the next top-up; ``exhausted``: the chunks ran out at the last top-up;
    the generator (seeded with ``seed`` at the first permutation) draws each round's permutation.
    """

    def __init__(self, batch_size: int, capacity: int, seed: int = 0):
        if batch_size <= 0 or capacity < 2 * batch_size:
            raise ValueError(
                f"buffer capacity={capacity} tokens must be at least twice batch_size={batch_size} (and batch_size > 0); "
                "raise buffer_tokens"
            )
        self.batch_size, self.capacity, self.seed = batch_size, capacity, seed
        self.store: torch.Tensor | None = None
        self.ready = 0
        self.exhausted = False
        self.generator: torch.Generator | None = None
        self._generator_state: torch.Tensor | None = None  # restored, applied at the next permutation

    def batches(self, chunks: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Batches ``[batch_size, 2, d_model]``; the state is up to date at every ``yield``."""
        while True:
            while self.ready:
                batch = self.store[: self.batch_size]
                self.store = self.store[self.batch_size :]
                self.ready -= 1
                yield batch
            if self.exhausted or not self._refill(chunks):
                return

    def _refill(self, chunks: Iterator[torch.Tensor]) -> bool:
        """Top up to ``capacity`` and permute; False when there is nothing left at all."""
        parts = [] if self.store is None or not len(self.store) else [self.store]
        size = sum(len(part) for part in parts)
        self.exhausted = True
        for chunk in chunks:
            if parts and parts[0].device != chunk.device:  # a store restored from a checkpoint is on the CPU
                parts[0] = parts[0].to(chunk.device)
            parts.append(chunk)
            size += len(chunk)
            if size >= self.capacity:
                self.exhausted = False
                break
        if not parts:
            self.store = None
            return False
        store = torch.cat(parts)
        if self.generator is None:
            self.generator = torch.Generator(device=store.device).manual_seed(self.seed)
            if self._generator_state is not None:
                self.generator.set_state(self._generator_state)
                self._generator_state = None
        self.store = store[torch.randperm(len(store), generator=self.generator, device=store.device)]
        # Not exhausted means len(store) >= capacity >= 2 * batch_size: at least one batch each round.
        keep = 0 if self.exhausted else self.capacity // 2
        self.ready = (len(self.store) - keep) // self.batch_size
        return True

    def state_dict(self) -> dict[str, Any]:
        """Tensors (on the CPU) and plain values only: checkpoints load with ``weights_only=True``."""
        generator = self.generator.get_state() if self.generator is not None else self._generator_state
        return {
            "store": None if self.store is None else self.store.cpu().clone(),
            "ready": self.ready, "exhausted": self.exhausted, "generator": generator,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.store, self.ready, self.exhausted = state["store"], int(state["ready"]), bool(state["exhausted"])
        self.generator, self._generator_state = None, state["generator"]


def shuffled_batches(
    chunks: Iterable[torch.Tensor], batch_size: int, capacity: int, seed: int = 0
) -> Iterator[torch.Tensor]:
    """Batches ``[batch_size, 2, d_model]`` from chunks ``[n_i, 2, d_model]``, shuffled across chunks."""
    return ShuffleBuffer(batch_size, capacity, seed).batches(iter(chunks))
