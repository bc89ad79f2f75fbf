"""The sparse kernels of the crosscoder's training step: only about k of the F latents are active per token.

The dense step (the reference, ``CrossCoder.step(impl="dense")``) multiplies all F latents through the
decoder, selects BatchTopK with one flat top-k over ``batch x F`` scores and back-propagates dense
``[batch, F]`` gradients. The sparse step computes the same numbers from the kept entries only:

- :func:`select_batch_topk`: the exact BatchTopK selection in two stages (a threshold from a sample keeps a
  few times ``k * batch`` candidates, then the top ``k * batch`` among them); the proof is in its docstring.
- :func:`pre_acts_at`: the ReLU pre-activations at the kept entries (and, before the ReLU, AuxK's dead columns),
  read from the pre-activations computed without autograd; its backward touches only these (encoder weight and bias
  gradients: a gathered sum per active latent instead of a ``[d, batch] x [batch, F]`` product).
- :func:`decode_sparse`: the decoder applied to the kept entries with ``embedding_bag`` (gathers only the
  active decoder rows; its backward gives the decoder gradient of the active rows only).
- :class:`SparseCodes`: the kept entries in coordinate form, with the dense codes on demand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Scores drawn (with a fixed seed: the same positions every step) to place the first-stage threshold.
SAMPLE_SIZE = 32768
# Rows per chunk of the CPU candidate pass are chosen so that a chunk's scores (float32) stay in cache.
CHUNK_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class SparseCodes:
    """A batch's codes in coordinate form: the entries ``(rows[i], cols[i])`` hold ``values[i]``, all others 0.

    ``rows``/``cols`` ``[nnz]`` (int64, row-major order: token, then latent), ``values`` ``[nnz]`` (the
    unscaled ``f`` of the kept entries; they may carry autograd history), ``shape = (batch, F)``.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]

    @classmethod
    def from_dense(cls, codes: torch.Tensor) -> SparseCodes:
        """The non-zero entries of dense codes ``[batch, F]`` (NaN counts as non-zero)."""
        rows, cols = codes.ne(0).nonzero(as_tuple=True)
        return cls(rows, cols, codes[rows, cols], (codes.shape[0], codes.shape[1]))

    def to_dense(self) -> torch.Tensor:
        """The codes as a dense ``[batch, F]`` tensor (differentiable with respect to ``values``)."""
        flat = self.values.new_zeros(self.shape[0] * self.shape[1])
        return flat.index_put((self.rows * self.shape[1] + self.cols,), self.values).view(self.shape)

    def fired(self) -> torch.Tensor:
        """``[F]`` bool: latents with a positive code on some token (``(codes > 0).any(0)``)."""
        out = torch.zeros(self.shape[1], dtype=torch.bool, device=self.cols.device)
        return out.index_fill_(0, self.cols[self.values.detach() > 0], True)

    def l0(self) -> torch.Tensor:
        """``[batch]`` int64: positive codes per token (``(codes > 0).sum(-1)``)."""
        rows = self.rows[self.values.detach() > 0]
        return torch.bincount(rows, minlength=self.shape[0])


@torch.no_grad()
def select_batch_topk(
    pre: torch.Tensor, weight: torch.Tensor, k: int, sample_size: int = SAMPLE_SIZE, n_keep: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchTopK's selection from pre-activations, exactly as the flat top-k over ``relu(pre) * weight`` keeps it.

    Args:
        pre: encoder pre-activations before the ReLU ``[batch, F]``.
        weight: the score weight of each latent ``[F]`` (the sum of its decoder norms, >= 0).
        k: ``k * batch`` entries are kept over the whole batch.
        sample_size: scores drawn to place the first-stage threshold (only speed depends on it).
        n_keep: entries to keep instead of ``k * batch`` (under DDP: the global batch's ``k * B_global``, so that
            this rank's candidates hold every entry the global cut can keep; :func:`crosscoder_pl.distributed.keep_global_top`).
    Returns:
        ``flat [nnz]``: the kept entries with a positive (or NaN) score, as flat indices into ``[batch, F]`` in
        ascending (row-major) order; ``scores [nnz]``: their scores; ``min_kept``: the smallest positive
        kept score (0-dim, ``inf`` if none), as :meth:`CrossCoder.batch_topk` returns it.

    Exactness. Let ``s = pre * weight`` (for ``pre > 0`` bitwise the dense score ``relu(pre) * weight``; an
    entry with ``pre <= 0`` has a dense score of 0 and a code of 0 whichever way it is ranked, so only
    positive scores matter), ``K = min(k * batch, batch * F)``, and ``t >= 0`` a threshold. Stage 1 keeps the
    candidates ``C = {s > t}`` (NaN included, as the flat top-k ranks NaN first). If ``|C| >= K``, every
    entry outside ``C`` has ``s <= t`` < every candidate, so the ``K`` largest scores of the batch are the
    ``K`` largest of ``C``: stage 2 is the top-``K`` of ``C``. If ``t = 0`` and ``|C| < K``, ``C`` holds every
    positive score and the flat top-``K`` keeps all of them (the rest of its ``K`` are zeros, codes 0): the
    selection is ``C``. Otherwise (``t > 0`` and ``|C| < K``) the threshold was too high: stage 1 is repeated
    with a lower one, finally ``t = 0``. No assumption on how the winners spread over rows: one token may
    hold all of them. The threshold is the ``r``-th largest of ``sample_size`` scores drawn at fixed random
    positions, with ``r`` chosen so that about ``2 K`` entries pass (a few standard deviations above ``K``):
    the guess only decides how much work stage 2 does and whether stage 1 runs again, never the result.

    Ties: when several entries share the ``K``-th largest score, which of them are kept is the choice of
    ``torch.topk`` among the candidates, possibly not the flat top-k's; the kept score multiset, the
    count and ``min_kept`` are the same either way.
    """
    n_rows, n_cols = pre.shape
    n = pre.numel()
    if n == 0:
        empty = pre.new_zeros(0)
        return empty.long(), empty, pre.new_full((), math.inf)
    n_keep = min(k * n_rows if n_keep is None else n_keep, n)
    flat_pre = pre.reshape(-1)
    for threshold in _thresholds(flat_pre, weight, n_keep, sample_size):
        flat, scores = _candidates(pre, weight, threshold)
        if flat.numel() >= n_keep or threshold == 0.0:
            break
    if flat.numel() > n_keep:
        top = scores.topk(n_keep, sorted=False).indices.sort().values
        flat, scores = flat[top], scores[top]
    positive = torch.where(scores > 0, scores, torch.full_like(scores, math.inf))
    min_kept = positive.min() if positive.numel() else scores.new_full((), math.inf)
    return flat, scores, min_kept


def _thresholds(flat_pre: torch.Tensor, weight: torch.Tensor, n_keep: int, sample_size: int) -> list[float]:
    """Decreasing stage-1 thresholds, ending with 0: the first lets about ``2 * n_keep`` entries through."""
    n, n_cols = flat_pre.numel(), weight.numel()
    n_sample = min(sample_size, n)
    generator = torch.Generator(device=flat_pre.device).manual_seed(0)
    pos = torch.randint(n, (n_sample,), generator=generator, device=flat_pre.device)
    scores = flat_pre[pos] * weight[pos % n_cols]
    expected = n_keep * n_sample / n  # sampled entries above the K-th largest score, on average
    ranks = [math.ceil(2 * expected + 4 * math.sqrt(expected) + 4)]
    while ranks[-1] * 4 < n_sample:
        ranks.append(ranks[-1] * 4)
    ranks = [r for r in ranks if r < n_sample]
    if not ranks:
        return [0.0]
    # The largest max(ranks) + 1 in descending order: the sorted sample's head, without sorting all of it
    # (a third of the whole selection's time at the demo's 1,024 x 1,024 scores).
    sample = scores.topk(ranks[-1] + 1).values
    out: list[float] = []
    for value in sample[ranks].tolist():  # one host sync
        if not value > 0:  # nan or <= 0: this and the lower ones would be no better than 0
            break
        if not out or value < out[-1]:
            out.append(value)
    return [*out, 0.0]


def _candidates(pre: torch.Tensor, weight: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (ascending) and scores of the entries whose score ``pre * weight`` is not ``<= threshold``.

    On CPU by chunks of rows, so that each chunk's scores and mask are made and read while in cache.
    """
    n_rows, n_cols = pre.shape
    rows_per_chunk = n_rows if pre.is_cuda else max(1, min(n_rows, CHUNK_ELEMENTS // n_cols))
    scores_buf = pre.new_empty(rows_per_chunk, n_cols)
    mask_buf = torch.empty(rows_per_chunk, n_cols, dtype=torch.bool, device=pre.device)
    flats, values = [], []
    for start in range(0, n_rows, rows_per_chunk):
        chunk = pre[start : start + rows_per_chunk]
        scores = torch.mul(chunk, weight, out=scores_buf[: chunk.shape[0]]).view(-1)
        keep = torch.le(scores, threshold, out=mask_buf[: chunk.shape[0]].view(-1)).logical_not_()
        idx = keep.nonzero().squeeze(1)
        flats.append(idx + start * n_cols)
        values.append(scores[idx])
    return torch.cat(flats), torch.cat(values)


class _PreActsAt(torch.autograd.Function):
    """``f = relu(x @ W + b)`` at some entries, and ``x @ W + b`` (no ReLU) in some full columns, read from
    ``pre = x @ W + b`` computed without autograd; the backward computes the gradients of ``x``, ``W`` and ``b``
    from these only."""

    @staticmethod
    def forward(ctx, x, W, b, pre, rows, cols, block_cols):  # noqa: ANN001, ANN205 (autograd.Function)
        values = pre[rows, cols].relu_()
        block = pre[:, block_cols]
        ctx.save_for_backward(x, W, rows, cols, block_cols, values)
        return values, block

    @staticmethod
    def backward(ctx, grad_values, grad_block):  # noqa: ANN001, ANN205
        x, W, rows, cols, block_cols, values = ctx.saved_tensors
        # The ReLU's backward, as F.relu's: no gradient where f = 0. The block has no ReLU.
        grad_values = torch.where(values > 0, grad_values, torch.zeros_like(grad_values))
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:  # not in training (activations are data); here for completeness
            grad_x = torch.zeros_like(x).index_add_(0, rows, W.t()[cols] * grad_values[:, None])
            grad_x += grad_block @ W[:, block_cols].t()
        if ctx.needs_input_grad[1]:
            # dL/dW[:, j] = sum over the entries (n, j) of grad * x[n]: a weighted sum of x rows per latent.
            grad_W = _segment_sum(cols, rows, grad_values, x, W.shape[1]).t().contiguous()
            if block_cols.numel():
                grad_W.index_add_(1, block_cols, x.t() @ grad_block)
        if ctx.needs_input_grad[2]:
            grad_b = grad_values.new_zeros(W.shape[1]).index_add_(0, cols, grad_values)
            grad_b.index_add_(0, block_cols, grad_block.sum(0))
        return grad_x, grad_W, grad_b, None, None, None, None


def pre_acts_at(
    x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, pre: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
    block_cols: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``f = relu(x @ W + b)`` at the entries ``(rows[i], cols[i])`` ``[nnz]``, and ``x @ W + b`` before the ReLU in
    the columns ``block_cols`` ``[batch, n_block]``, differentiable in ``x``, ``W``, ``b``.

    Args:
        x: ``[batch, in]``; W: ``[in, F]``; b: ``[F]``.
        pre: ``x @ W + b`` ``[batch, F]``, already computed (no autograd history needed).
        rows, cols: ``[nnz]`` int64 entries (repeats allowed: their gradients add up).
        block_cols: ``[n_block]`` int64 latents whose pre-activations are needed for every token (AuxK's dead
            latents: their top-k_aux per token is taken among them, and a dense block is faster than entries
            at the dead fractions training sees). Before the ReLU: AuxK applies its own, straight through.
    """
    return _PreActsAt.apply(x, W, b, pre, rows, cols, block_cols)


def decode_sparse(weight: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                  n_rows: int) -> torch.Tensor:
    """``codes @ weight`` for codes given as entries: ``[n_rows, out]``.

    Args:
        weight: ``[F, out]`` (the decoder, flattened over models).
        values, rows, cols: ``[nnz]``, ``rows`` ascending.
    Only the ``nnz`` active rows of ``weight`` are read; the backward (``embedding_bag``'s) writes the
    gradient of those rows only and one dot product per entry.
    """
    counts = torch.bincount(rows, minlength=n_rows)
    offsets = counts.cumsum(0) - counts
    return F.embedding_bag(cols, weight, offsets, mode="sum", per_sample_weights=values.to(weight.dtype))


def _segment_sum(group: torch.Tensor, other: torch.Tensor, coef: torch.Tensor, table: torch.Tensor,
                 n_groups: int) -> torch.Tensor:
    """``out[g] = sum over i with group[i] == g of coef[i] * table[other[i]]``: ``[n_groups, table.shape[1]]``."""
    order = group.argsort()
    counts = torch.bincount(group, minlength=n_groups)
    return F.embedding_bag(other[order], table, counts.cumsum(0) - counts, mode="sum",
                           per_sample_weights=coef[order].to(table.dtype))
