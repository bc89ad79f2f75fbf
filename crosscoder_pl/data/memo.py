"""Activations of documents already run through both models, kept to serve later passes without the models.

A small corpus (the embedded demo's: about 10,000 documents, 1.2M tokens a pass) is read pass after pass; every
pass after the first would run both language models on the same documents again (the demo: 70% of its
extraction time). `ActivationMemo` keeps each document's activations from the stream's first pass, up to a
byte budget, and later passes take them from memory.

What stays exact: a document's activations are those its first-pass group of ``text_batch_size`` texts gave
(a forward pass's float rounding can depend on its batch's other texts and padding, so the same document
read in another group could differ in the last bits). Only the first pass fills the memo; a resumed run
replays that pass's groups to refill it (`crosscoder_pl.data.datamodule.ActivationStream`), so it serves the
very tensors an uninterrupted run serves. Token masks and outlier counting (and dropping) apply to the assembled group,
as to a freshly extracted one. The memo lives on the models' device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

GIB = 2**30


class ActivationMemo:
    """Per-document activations ``[tokens, 2, d_model]`` by ``(source, text)``, up to ``max_bytes`` in all."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"the activation memo's budget must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.full = False  # a document did not fit: the budget is spent, later ones are not stored
        self._docs: dict[tuple[str, str], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._docs)

    def get(self, source: str, text: str) -> torch.Tensor | None:
        return self._docs.get((source, text))

    def put(self, source: str, text: str, acts: torch.Tensor) -> bool:
        """Keep ``acts`` for the document unless the budget is spent (then nothing more is kept, so that what is
        kept is always the first documents of the pass, whatever their sizes). True if kept."""
        if (source, text) in self._docs:  # a document met twice in the pass is stored once
            return True
        size = acts.numel() * acts.element_size()
        if self.full or self.bytes + size > self.max_bytes:
            self.full = True
            return False
        # A copy: a view would keep its whole group's tensor alive, documents not kept included.
        self._docs[(source, text)] = acts.clone()
        self.bytes += size
        return True


def per_document(acts: torch.Tensor, seq: torch.Tensor, n_docs: int) -> Sequence[torch.Tensor]:
    """Split a group's activation rows ``[tokens, 2, d_model]`` (row-major: document, then position; ``seq
    [tokens]`` the document of each row) into one tensor per document (views; empty for a document with none)."""
    return acts.split(torch.bincount(seq.cpu(), minlength=n_docs).tolist())
