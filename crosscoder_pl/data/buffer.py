"""Shuffle buffer: mixes paired activations from many sequences before serving crosscoder batches.

Tokens of one sequence are strongly correlated; serving them together would make every batch about a
handful of documents. The buffer fills to ``capacity`` tokens, permutes them, serves batches from the
front as long as at least ``capacity / 2`` tokens stay behind, then tops up and permutes again. All on the
device of the incoming activations. Only full batches are served: at the end of the stream the last
partial batch is dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


def _top_up(
    store: torch.Tensor | None, chunks: Iterator[torch.Tensor], capacity: int
) -> tuple[torch.Tensor | None, bool]:
    """``store`` grown with chunks to at least ``capacity`` tokens, and whether ``chunks`` ran out."""
    parts = [] if store is None else [store]
    size = sum(len(part) for part in parts)
    exhausted = True
    for chunk in chunks:
        parts.append(chunk)
        size += len(chunk)
        if size >= capacity:
            exhausted = False
            break
    return (torch.cat(parts) if parts else None), exhausted


def shuffled_batches(
    chunks: Iterable[torch.Tensor], batch_size: int, capacity: int, seed: int = 0
) -> Iterator[torch.Tensor]:
    """Batches ``[batch_size, 2, d_model]`` from chunks ``[n_i, 2, d_model]``, shuffled across chunks."""
    if batch_size <= 0 or capacity < 2 * batch_size:
        raise ValueError(
            f"buffer capacity={capacity} tokens must be at least twice batch_size={batch_size} (and batch_size > 0); "
            "raise buffer_tokens"
        )
    chunks = iter(chunks)
    store: torch.Tensor | None = None
    generator: torch.Generator | None = None
    while True:
        store, exhausted = _top_up(store, chunks, capacity)
        if store is None:
            return
        if generator is None:
            generator = torch.Generator(device=store.device).manual_seed(seed)
        store = store[torch.randperm(len(store), generator=generator, device=store.device)]
        # Not exhausted means len(store) >= capacity >= 2 * batch_size: at least one batch each round.
        n_batches = len(store) // batch_size if exhausted else (len(store) - capacity // 2) // batch_size
        for i in range(n_batches):
            yield store[i * batch_size : (i + 1) * batch_size]
        if exhausted:
            return
        store = store[n_batches * batch_size :]
