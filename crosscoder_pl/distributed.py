"""The training step's collectives under data parallelism: a reducer, and BatchTopK's cut over the global batch.

Under DDP each rank holds a slice of the global batch. For two processes to compute the single process's step, two
things must be global: BatchTopK's selection (the ``k * B_global`` highest scores of the global batch, not
``k * B_local`` per rank) and every mean over the batch in the loss. :class:`CrossCoder.step` takes a
:class:`Reducer` for both and never imports Lightning; ``reducer=None`` (or a world of one) is the single-process
step, with no collective at all. :class:`ProcessGroupReducer` is the one over ``torch.distributed`` (the group
Lightning's DDP strategy starts); tests pass one that exchanges tensors between threads.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.distributed as dist

_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX"}
# Order-preserving integer keys of positive floats: their bit patterns (sign bit 0) compare as the floats do.
_KEY_DTYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64}
RADIX_BITS = 8


class Reducer(Protocol):
    """The collectives the step needs. Every rank calls the same ones in the same order with tensors of equal shape."""

    rank: int
    world_size: int

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Elementwise ``op`` (``"sum"``, ``"min"``, ``"max"``) of every rank's ``t``: a new tensor, ``t`` untouched."""
        ...

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` stacked in rank order: ``[world_size, *t.shape]``."""
        ...


class ProcessGroupReducer:
    """:class:`Reducer` over a ``torch.distributed`` process group (default: the world group)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out, op=getattr(dist.ReduceOp, _OPS[op]), group=self.group)
        return out

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.stack(parts)


def distributed(reducer: Reducer | None) -> Reducer | None:
    """``reducer`` if it spans more than one rank, else None (the single-process path: no collective)."""
    return reducer if reducer is not None and reducer.world_size > 1 else None


@torch.no_grad()
def keep_global_top(scores: torch.Tensor, n_keep: int, reducer: Reducer) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of this rank's candidate entries the global top-``n_keep`` keeps, and the global ``min_kept``.

    Args:
        scores: ``[n]`` this rank's candidates' scores, all positive or NaN, in a fixed order (ties are broken by
            rank, then by this order). They must include every entry of this rank among its own
            ``min(n_keep, n_positive)`` largest (what a local top-``n_keep`` keeps): an entry with ``n_keep``
            larger ones on its own rank cannot be among the global ``n_keep`` largest.
        n_keep: entries kept over all ranks (``min(k * B_global, B_global * F)``), the same on every rank.
        reducer: the ranks' collectives.
    Returns:
        ``keep [n]`` bool, and ``min_kept``: the smallest positive kept score over all ranks (0-dim float, ``inf``
        if none), the same tensor value on every rank.

    The cut, exactly. Scores are mapped to integer keys that order as the floats (the bit pattern of a positive
    float; NaN above +inf, as ``torch.topk`` ranks it). The key ``c`` of the ``n_keep``-th largest candidate over
    all ranks is found digit by digit, most significant first (a radix select): per round every rank counts its
    candidates whose key has the prefix found so far, by their next 8-bit digit (a ``[256]`` histogram); the
    histograms are summed over ranks, and the digit of ``c`` is the bin where the count from the top reaches the
    entries still to place. After ``bits / 8`` rounds (4 for float32) ``c`` is known exactly and so is ``r``, how
    many entries equal to ``c`` the selection keeps. Every rank keeps its candidates above ``c``; the ``r`` ties
    go to the ranks in rank order (one gather of each rank's tie count). The result is the flat single-process
    top-``n_keep`` of the global batch up to which of the tied entries are kept (same count, same score multiset,
    same ``min_kept``). The candidates suffice: every entry above ``c`` is among its rank's ``n_keep`` largest
    (fewer than ``n_keep`` entries lie above ``c`` over all ranks), and the count from the top reaches
    ``n_keep`` at ``c`` (``n_keep`` entries are ``>= c``, all candidates, or ``c`` is a rank's ``n_keep``-th largest
    and that rank alone holds ``n_keep``). Fewer than ``n_keep`` candidates in all: every one is kept (the flat
    top-k fills up with zeros), which is the same rounds with ``n_keep`` lowered to the total.

    Cost: ``bits / 8 + 1`` collectives of 256 counts and one count (5 for float32, about 8 KB in all, whatever
    the batch and F), no host sync; a few elementwise passes over this rank's candidates per round, and two for
    the keep mask (on one CPU thread about 0.05 s for 819,200 candidates, a rank's ``k * B_global`` at papergrade
    on 2 ranks; on a GPU, microseconds). Gathering each rank's top ``n_keep`` scores instead would move
    ``world * k * B_global`` values (papergrade, 4,096 tokens and k = 100 per rank on 8 ranks: 105 MB per step to
    each rank). The price of exactness is on the candidates' side: each rank takes its top ``k * B_global``, not
    ``k * B_local`` (the sparse step's second stage ranks about twice that many values instead of twice
    ``k * B_local``), because all the winners may sit on one rank.
    """
    key_dtype = _KEY_DTYPES[scores.element_size()]
    top_key = torch.iinfo(key_dtype).max
    keys = torch.where(scores.isnan(), top_key, scores.view(key_dtype)).long()  # [n]
    bits = 8 * scores.element_size()
    n_bins = 1 << RADIX_BITS
    device = scores.device
    prefix = torch.zeros((), dtype=torch.long, device=device)
    remaining: torch.Tensor | None = None
    found_count = torch.zeros((), dtype=torch.long, device=device)
    match = torch.ones_like(keys, dtype=torch.bool)  # [n] the candidates sharing the prefix found so far
    ones = torch.ones_like(keys)
    for shift in range(bits - RADIX_BITS, -1, -RADIX_BITS):
        digits = (keys >> shift) & (n_bins - 1)  # [n]
        # index_add, not bincount (which syncs with the host on CUDA); the others go to a bin past the last.
        slot = torch.where(match, digits, n_bins)
        hist = keys.new_zeros(n_bins + 1).index_add_(0, slot, ones)[:n_bins]
        hist = reducer.all_reduce(hist, "sum")  # [256] over all ranks
        if remaining is None:  # fewer candidates than n_keep in all: keep every one (see the docstring)
            remaining = hist.sum().clamp(max=n_keep).clamp(min=1)
            found_count = hist.sum()
        from_top = hist.flip(0).cumsum(0).flip(0)  # [256] candidates in this bin or above
        digit = (from_top >= remaining).sum() - 1  # the highest bin where the count from the top reaches remaining
        remaining = remaining - (from_top[digit] - hist[digit])
        prefix = prefix * n_bins + digit
        match &= digits == digit
    ties = keys == prefix
    before = reducer.all_gather(ties.sum()[None])[: reducer.rank].sum()  # ties held by the lower ranks
    tie_rank = ties.long().cumsum(0) - 1 + before  # this tie's place among all ranks' ties
    keep = (keys > prefix) | (ties & (tie_rank < remaining))
    cut = prefix.to(key_dtype).view(scores.dtype)  # the n_keep-th largest score itself
    positive = (found_count > 0) & (prefix != top_key)  # a NaN is never the smallest positive kept score
    min_kept = torch.where(positive, cut, torch.full((), math.inf, dtype=scores.dtype, device=device))
    return keep, min_kept
