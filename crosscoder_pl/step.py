"""The crosscoder's training step: the loss and everything reported about it (docs/method.md, "Loss").

`training_step` (what `CrossCoder.step` runs) normalises the batch, selects BatchTopK's entries and reconstructs
the batch with one of two implementations of the same numbers (`STEP_IMPLS`): `_forward_dense` (the reference,
all F latents through the decoder) and `_forward_sparse` (the kept entries only, with the kernels of
`crosscoder_pl.sparse`, whose docstring holds the exactness argument). AuxK (`aux_topk`, `_aux_codes`,
`aux_error`) adds the dead latents' reconstruction of the residual. Under DDP (a `Reducer` spanning several
ranks) the selection is the global batch's (`_batch_topk_global`, `crosscoder_pl.distributed.keep_global_top`)
and every mean over the batch is the global one (`_global_terms`). `token_loss` is the one place where the
loss option (`LOSSES`) is interpreted, and `training_step` the one place where the sparsity (`SPARSITIES`) is:
BatchTopK's selection, or the L1 crosscoder's ReLU codes and decoder-norm-weighted penalty (`_l1_step`,
`l1_penalty`; always dense: every code is nonzero wherever its pre-activation is positive).

The functions take the crosscoder as their first argument and read its parameters; they hold no state.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F

from crosscoder_pl.distributed import Reducer, distributed, keep_global_top
from crosscoder_pl.sparse import (
    SparseCodes,
    decode_sparse,
    pre_acts_at,
    select_batch_topk,
)

LOSSES = ("mse", "l2")
STEP_IMPLS = ("sparse", "dense")
# batchtopk: Bussmann et al. 2024 in the crosscoder form of Minder et al. 2025; l1: Lindsey et al. 2024's
# crosscoder, ReLU codes penalised by sum_j f_j sum_m ||d_j^m||.
SPARSITIES = ("batchtopk", "l1")


@dataclass(frozen=True)
class StepOutput:
    """Everything one training step computes and reports, in the normalised (training) space.

    ``loss = recon + aux_coef * aux * unit`` for BatchTopK, ``loss = recon + l1_coef * l1`` for the L1 crosscoder
    (docs/method.md, "Loss"): ``recon`` is the reconstruction term under the loss option, ``l1`` the L1 penalty
    (`l1_penalty`; 0 for BatchTopK), ``aux`` the AuxK error normalised by its target's (dimensionless: 1 = the
    dead latents explain none of the residual, 0 when no latent is dead), ``unit`` the loss of predicting
    the batch mean, which puts AuxK in the reconstruction term's units under either loss option.
    Under DDP (a reducer spanning several ranks) ``loss``, ``recon``, ``aux``, ``unit``, ``min_kept`` and ``n_tokens`` hold the
    global batch's values on every rank, while ``loss``'s gradient is this rank's share (DDP's average over ranks
    is the global batch's gradient); ``active``, ``x`` and ``x_hat`` are this rank's tokens.
    The codes come in coordinate form (``active``: what the training loop reads, without a ``[batch, F]``
    pass); ``codes`` makes the dense ``[batch, F]`` tensor on first use.
    """

    loss: torch.Tensor  # [] what the optimiser minimises
    recon: torch.Tensor  # []
    aux: torch.Tensor  # []
    unit: torch.Tensor  # [] detached
    active: SparseCodes  # the kept BatchTopK entries (unscaled f), shape (batch, F)
    x: torch.Tensor  # [batch, n_models, d_model] normalised input
    x_hat: torch.Tensor  # [batch, n_models, d_model] its reconstruction
    min_kept: torch.Tensor  # [] smallest positive kept score (inf if none, and for L1): what the threshold tracks
    n_tokens: int  # tokens of the (global) batch: batch on one process, summed over ranks under DDP
    l1: torch.Tensor | None = None  # [] the L1 penalty before its coefficient (None: BatchTopK)

    @cached_property
    def codes(self) -> torch.Tensor:
        """``[batch, F]`` BatchTopK codes (unscaled f of the kept entries, 0 elsewhere)."""
        return self.active.to_dense()


def token_loss(err: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-token error of ``err [batch, n_models, d_model]`` under a loss option: ``[batch]``.

    ``mse``: squared norm summed over models; ``l2``: unsquared norm per model, summed over models
    (the crosscoder paper's code). The one place where the loss option is interpreted.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r} is not one of {LOSSES}")
    sq = err.pow(2).sum(-1)  # [batch, n_models]
    return (sq if loss == "mse" else sq.sqrt()).sum(-1)


def l1_penalty(cc: Any, f: torch.Tensor) -> torch.Tensor:
    """The L1 crosscoder's per-token penalty ``sum_j f_j * sum_m ||d_j^m||`` (Lindsey et al. 2024; the sum over
    models of the decoder norms, in the normalised space, so that shrinking a decoder cannot buy a smaller
    penalty), from codes ``f [batch, F]``: ``[batch]``."""
    return f @ cc.decoder_norms().sum(-1)


def training_step(
    cc: Any,
    x: torch.Tensor,
    k: int,
    dead: torch.Tensor | None = None,
    *,
    loss: str = "mse",
    aux_coef: float = 1 / 32,
    k_aux: int = 1,
    impl: str = "sparse",
    reducer: Reducer | None = None,
    l1_coef: float = 0.0,
) -> StepOutput:
    """One training step of the crosscoder ``cc`` (`CrossCoder.step`): its loss and everything reported about it
    (docs/method.md, "Loss").

    Args:
        cc: the `crosscoder_pl.crosscoder.CrossCoder` trained (unfolded).
        x: raw activations ``[batch, n_models, d_model]``.
        k: BatchTopK's k for this step (``k * batch`` entries kept over the whole batch); None for an L1 crosscoder
            (``cc.sparsity == "l1"``), whose step has no selection, no AuxK and always runs dense.
        dead: ``[F]`` bool, latents that had not fired for the dead-latent window before this step
            (None or all False: no AuxK).
        loss: ``"mse"`` or ``"l2"`` (:func:`token_loss`); AuxK uses the same per-token error.
        aux_coef: AuxK weight relative to the reconstruction term (Gao et al. 2024: 1/32).
        k_aux: dead latents AuxK may use per token.
        impl: ``"sparse"`` computes from the kept entries only (:mod:`crosscoder_pl.sparse`: exact two-stage
            selection, decoder rows gathered, gradients of the active entries only); ``"dense"`` multiplies
            all F latents (the reference). Both keep the same entries and give the same loss and
            gradients up to float summation order (docs/method.md, "Sparse step").
        reducer: the collectives of data-parallel training (:mod:`crosscoder_pl.distributed`), ``x`` being this
            rank's slice of the global batch: BatchTopK keeps the ``k * B_global`` highest scores of the global
            batch and every mean over the batch is the global one, so that the ranks together compute the
            single-process step on the global batch (docs/method.md, "Data parallelism"). None, or a world of
            one: the single-process step, without any collective.
        l1_coef: the L1 crosscoder's penalty coefficient λ at this step (warmed up by the caller).
    """
    if cc.folded:
        raise RuntimeError("a folded crosscoder is for inference; train the unfolded one (CrossCoder.fold copies)")
    if impl not in STEP_IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {STEP_IMPLS}")
    cc._check_input(x)
    x_n = cc.normalise(x.to(cc.W_enc.dtype))  # [batch, n_models, d_model], the training space
    if cc.sparsity == "l1":
        return _l1_step(cc, x_n, loss, l1_coef, distributed(reducer))
    if k is None:
        raise ValueError("a BatchTopK crosscoder's step needs k")
    # One host sync; healthy runs skip AuxK's work.
    dead_idx = dead.nonzero().squeeze(1) if dead is not None and aux_coef > 0 else None
    if dead_idx is not None and dead_idx.numel() == 0:
        dead_idx = None
    forward = _forward_sparse if impl == "sparse" else _forward_dense
    group = distributed(reducer)
    n_global = x_n.shape[0]
    if group is None:
        active, min_kept, x_hat, e_hat = forward(cc, x_n, k, dead_idx, k_aux)
        recon = token_loss(x_n - x_hat, loss).mean()
        unit = token_loss(x_n - x_n.mean(0), loss).mean().detach()
        aux = recon.new_zeros(()) if e_hat is None else aux_error((x_n - x_hat).detach(), e_hat, loss)
    else:
        # One collective for the global batch size (a host int: the selection's size) and the inputs' mean.
        sums = group.all_reduce(torch.cat([x_n.new_full((1,), x_n.shape[0]), x_n.sum(0).flatten()]).double())
        n_global = int(sums[0].item())
        x_mean = (sums[1:] / n_global).to(x_n.dtype).view_as(x_n[0])
        n_keep = min(k * n_global, n_global * cc.n_latents)
        active, min_kept, x_hat, e_hat = forward(cc, x_n, k, dead_idx, k_aux, (group, n_keep))
        recon, aux, unit = _global_terms(x_n, x_hat, e_hat, x_mean, n_global, loss, group)
    total = recon + aux_coef * aux * unit
    return StepOutput(total, recon, aux, unit, active, x_n, x_hat, min_kept, n_global)


def _l1_step(cc: Any, x_n: torch.Tensor, loss: str, l1_coef: float, group: Reducer | None) -> StepOutput:
    """The L1 crosscoder's step on normalised ``x_n [batch, n_models, d_model]``: ``recon + l1_coef * l1``, every
    positive code kept (`StepOutput`; ``aux`` 0, ``min_kept`` inf). Under DDP every mean is the global batch's,
    as in the BatchTopK step (`_global_terms`)."""
    f = F.relu(cc._encoder_affine(x_n))  # [batch, F]
    x_hat = cc.decode(f, normalised=True)
    penalty = l1_penalty(cc, f)  # [batch]
    n_global = x_n.shape[0]
    if group is None:
        recon = token_loss(x_n - x_hat, loss).mean()
        unit = token_loss(x_n - x_n.mean(0), loss).mean().detach()
        l1 = penalty.mean()
    else:
        sums = group.all_reduce(torch.cat([x_n.new_full((1,), n_global), x_n.sum(0).flatten(),
                                           penalty.detach().sum()[None]]).double())
        n_global = int(sums[0].item())
        x_mean = (sums[1:-1] / n_global).to(x_n.dtype).view_as(x_n[0])
        recon, _, unit = _global_terms(x_n, x_hat, None, x_mean, n_global, loss, group)
        l1 = _valued(penalty.sum() * group.world_size / n_global, sums[-1] / n_global)
    min_kept = torch.full((), torch.inf, device=x_n.device)
    active = SparseCodes.from_dense(f.detach())
    return StepOutput(recon + l1_coef * l1, recon, recon.new_zeros(()), unit, active, x_n, x_hat, min_kept,
                      n_global, l1.detach())


def _forward_dense(
    cc: Any, x_n: torch.Tensor, k: int, dead_idx: torch.Tensor | None, k_aux: int,
    ranks: tuple[Reducer, int] | None = None,
) -> tuple[SparseCodes, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The reference: all F latents through the decoder. Returns the kept entries, ``min_kept``, the
    reconstruction ``x_hat`` and AuxK's reconstruction of the residual ``e_hat`` (None without dead latents),
    both ``[batch, n_models, d_model]``. ``ranks``: the reducer and the number of entries the global BatchTopK
    keeps, under DDP."""
    pre = cc._encoder_affine(x_n)  # [batch, F], before the ReLU
    f = F.relu(pre)
    codes, min_kept = cc.batch_topk(f, k) if ranks is None else _batch_topk_global(cc, f, *ranks)
    x_hat = cc.decode(codes, normalised=True)
    e_hat = None
    if dead_idx is not None:
        aux_codes = aux_topk(cc, pre, dead_idx, k_aux)  # [batch, n_dead]
        e_hat = _aux_decode(cc, aux_codes, dead_idx).view_as(x_n)
    return SparseCodes.from_dense(codes), min_kept, x_hat, e_hat


def _forward_sparse(
    cc: Any, x_n: torch.Tensor, k: int, dead_idx: torch.Tensor | None, k_aux: int,
    ranks: tuple[Reducer, int] | None = None,
) -> tuple[SparseCodes, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`_forward_dense` computed from the kept entries: the encoder's matmul is the only ``[batch, F]``
    product; selection, decoding and the backward touch the kept entries (and AuxK's dead columns) only."""
    n_tokens = x_n.shape[0]
    x_flat = x_n.reshape(n_tokens, -1)
    W_enc = cc.W_enc.reshape(-1, cc.n_latents)
    with torch.no_grad():
        pre = cc._encoder_affine(x_n)  # [batch, F], before the ReLU; no autograd graph
        weight = cc.decoder_norms().sum(-1)  # [F] the score weight, as in scores()
        if ranks is None:
            flat, _, min_kept = select_batch_topk(pre, weight, k)
        else:  # this rank's top k * B_global, then the global cut among all ranks' candidates
            group, n_keep = ranks
            flat, scores, _ = select_batch_topk(pre, weight, k, n_keep=n_keep)
            keep, min_kept = keep_global_top(scores, n_keep, group)
            flat = flat[keep]
        rows, cols = flat.div(cc.n_latents, rounding_mode="floor"), flat.remainder(cc.n_latents)
    dead_cols = torch.zeros(0, dtype=torch.long, device=pre.device) if dead_idx is None else dead_idx
    values, pre_dead = pre_acts_at(x_flat, W_enc, cc.b_enc, pre, rows, cols, dead_cols)
    active = SparseCodes(rows, cols, values, (n_tokens, cc.n_latents))
    W_dec = cc.W_dec.reshape(cc.n_latents, -1)
    x_hat = decode_sparse(W_dec, values, rows, cols, n_tokens).view_as(x_n) + cc.b_dec
    e_hat = None
    if dead_idx is not None:  # AuxK as in the dense step, on the dead columns only
        aux_codes = _aux_codes(pre_dead, weight[dead_idx], k_aux)
        e_hat = _aux_decode(cc, aux_codes, dead_idx).view_as(x_n)
    return active, min_kept, x_hat, e_hat


def _batch_topk_global(cc: Any, f: torch.Tensor, group: Reducer, n_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`CrossCoder.batch_topk` of the global batch under DDP, ``f [batch, F]`` being this rank's pre-activations: the
    codes of this rank's entries among the ``n_keep`` highest scores over all ranks, and the global
    ``min_kept``. Candidates: this rank's positive (or NaN) scores among its own top ``n_keep``, in flat order
    (:func:`crosscoder_pl.distributed.keep_global_top` says why they suffice)."""
    flat_f = f.reshape(-1)
    values, idx = cc.scores(f).reshape(-1).topk(min(n_keep, flat_f.numel()), sorted=False)
    candidate = (values > 0) | values.isnan()
    idx, values = idx[candidate], values[candidate]
    order = idx.argsort()
    idx, values = idx[order], values[order]
    keep, min_kept = keep_global_top(values, n_keep, group)
    idx = idx[keep]
    codes = torch.zeros_like(flat_f).scatter(0, idx, flat_f.gather(0, idx))
    return codes.view_as(f), min_kept.detach()


def aux_topk(cc: Any, pre: torch.Tensor, dead_idx: torch.Tensor, k_aux: int) -> torch.Tensor:
    """AuxK's selection, the per-token twin of `CrossCoder.batch_topk`: among the dead latents ``dead_idx [n_dead]``,
    keep each token's ``k_aux`` highest scores. ``pre``: pre-activations before the ReLU ``[batch, F]``.
    Returns codes ``[batch, n_dead]``: the ReLU'd values, with a straight-through gradient (`_aux_codes`)."""
    return _aux_codes(pre[:, dead_idx], cc.decoder_norms()[dead_idx].sum(-1), k_aux)


def _aux_codes(pre_dead: torch.Tensor, weight_dead: torch.Tensor, k_aux: int) -> torch.Tensor:
    """`aux_topk` from the dead latents' pre-activations before the ReLU ``[batch, n_dead]`` and score
    weights ``[n_dead]``.

    The kept values are ``relu(pre)`` (the references' AuxK: a dead latent below zero adds nothing to the
    reconstruction), but the gradient passes through the ReLU as if it were the identity. With the ReLU's own
    gradient a latent whose pre-activation is below zero on every token gets none, and AuxK cannot bring it
    back; straight through, its encoder learns to raise the pre-activation on the tokens whose residual its
    decoder direction would reduce (docs/method.md, "AuxK")."""
    scores = pre_dead * weight_dead
    idx = scores.topk(min(k_aux, pre_dead.shape[-1]), dim=-1, sorted=False).indices
    kept = pre_dead.gather(-1, idx)
    kept = kept + (kept.clamp_min(0) - kept).detach()
    return torch.zeros_like(pre_dead).scatter(-1, idx, kept)


def _aux_decode(cc: Any, aux_codes: torch.Tensor, dead_idx: torch.Tensor) -> torch.Tensor:
    """AuxK's reconstruction ``[batch, n_models * d_model]`` from codes over the dead latents: decoder, no bias."""
    return aux_codes @ cc.W_dec[dead_idx].reshape(dead_idx.numel(), -1)


def aux_error(residual: torch.Tensor, e_hat: torch.Tensor, loss: str) -> torch.Tensor:
    """AuxK (Gao et al. 2024): the error of the dead latents' reconstruction ``e_hat`` (decoder, no bias) of
    the detached residual ``[batch, n_models, d_model]``, normalised by the error of predicting the
    residual's mean (both under ``loss``)."""
    baseline = token_loss(residual - residual.mean(0), loss).mean().clamp_min(1e-12)
    return token_loss(residual - e_hat, loss).mean() / baseline


def _global_terms(
    x_n: torch.Tensor, x_hat: torch.Tensor, e_hat: torch.Tensor | None, x_mean: torch.Tensor, n_global: int,
    loss: str, group: Reducer,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``recon``, ``aux``, ``unit`` of the global batch from this rank's tokens (the single-process formulas of
    `training_step` and `aux_error` with every mean over the batch taken over all ranks).

    Each value is the global one; each gradient is this rank's share, ``world / B_global`` times the sum over its
    tokens, so that DDP's mean of the ranks' gradients is the gradient of the mean over the global batch (even
    when the ranks hold unequal numbers of tokens, as after dropping non-finite rows). Collectives: one of
    ``2 + n_models * d_model`` sums (reconstruction and unit error sums, and the residual's sum when AuxK acts), and
    one of 2 sums (AuxK's error and baseline) when AuxK acts.
    """
    share = group.world_size / n_global
    residual = (x_n - x_hat).detach()
    per_token = token_loss(x_n - x_hat, loss)  # [batch]
    unit_sum = token_loss(x_n - x_mean, loss).sum()
    parts = [per_token.detach().sum()[None], unit_sum[None]]
    if e_hat is not None:
        parts.append(residual.sum(0).flatten())
    sums = group.all_reduce(torch.cat(parts).double())
    recon = _valued(per_token.sum() * share, sums[0] / n_global)
    unit = (sums[1] / n_global).to(x_n.dtype)
    if e_hat is None:
        return recon, recon.new_zeros(()), unit
    residual_mean = (sums[2:] / n_global).to(residual.dtype).view_as(residual[0])
    aux_per_token = token_loss(residual - e_hat, loss)  # [batch]
    base_sum = token_loss(residual - residual_mean, loss).sum()
    aux_sums = group.all_reduce(torch.stack([aux_per_token.detach().sum(), base_sum]).double())
    baseline = (aux_sums[1] / n_global).clamp_min(1e-12)
    aux = _valued(aux_per_token.sum() * share / baseline.to(x_n.dtype), aux_sums[0] / n_global / baseline)
    return recon, aux, unit


def _valued(local: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A tensor with ``local``'s gradient and ``value``'s value (the global one, computed without autograd)."""
    return local + (value.to(local.dtype) - local).detach()
