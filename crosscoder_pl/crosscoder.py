"""The BatchTopK crosscoder: one sparse dictionary over paired activations of a base and a chat model.

Shapes (docs/method.md, "Shapes and notation"): ``x [..., 2, d_model]`` (index 0 = base, 1 = chat),
``W_enc [2, d_model, F]``, ``b_enc [F]``, ``W_dec [F, 2, d_model]``, ``b_dec [2, d_model]``.

Per-model normalisation: training runs on ``(x_m - means[m]) * scales[m]``: centred, so that the large constant
part of a residual stream (over 90% of a Gemma token's norm) does not move every latent's pre-activation alike, and
scaled, so that both models weigh the same in the loss. While training (``folded=False``) the parameters live in that
normalised space and ``encode``/``decode`` convert from/to raw activations. ``fold()`` moves the means and scales
into the weights and biases, so a saved crosscoder takes and returns raw activations with no extra step;
``decoder_norms()`` always answers in the normalised space, where comparing a latent's two decoder norms is
meaningful.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from crosscoder_pl.distributed import Reducer, distributed, keep_global_top
from crosscoder_pl.files import write_whole
from crosscoder_pl.sparse import (
    SparseCodes,
    decode_sparse,
    pre_acts_at,
    select_batch_topk,
)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Present while a directory is being written (crosscoder_pl.artifact); removed last. Readers refuse it.
INCOMPLETE = "INCOMPLETE"
MODEL_ORDER = ("base", "chat")
LOSSES = ("mse", "l2")
STEP_IMPLS = ("sparse", "dense")


@dataclass(frozen=True)
class StepOutput:
    """Everything one training step computes and reports, in the normalised (training) space.

    ``loss = recon + aux_coef * aux * unit`` (docs/method.md, "Loss"): ``recon`` is the reconstruction
    term under the loss option, ``aux`` the AuxK error normalised by its target's (dimensionless: 1 = the
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
    min_kept: torch.Tensor  # [] smallest positive kept score (inf if none): what the threshold tracks
    n_tokens: int  # tokens of the (global) batch: batch on one process, summed over ranks under DDP

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


class CrossCoder(nn.Module):
    """BatchTopK crosscoder (Bussmann et al. 2024; crosscoder form of Minder et al. 2025).

    Args:
        d_model: width of each model's residual stream.
        n_latents: dictionary size F.
        k: active latents per token on average (BatchTopK keeps ``k * batch`` entries per batch).
        n_models: number of activation sources; 2 = (base, chat).
        dec_init_norm: norm of every decoder vector at init (encoder starts as the decoder transposed).
        scales: per-model normalisation scalars ``[n_models]``; ones when not given.
        means: per-model activation means ``[n_models, d_model]`` in raw units, subtracted before the encoder and
            added back after the decoder; zeros (no centring) when not given. A folded crosscoder keeps them as
            the record of what its biases hold (the reference layout's ``activation_mean``).
        threshold: inference threshold on the selection score; negative means "not calibrated yet".
        folded: whether ``scales`` are already folded into the weights (true for saved crosscoders).
        metadata: free-form JSON-able facts saved in ``config.json`` (model ids, layer, recipe).
    """

    def __init__(
        self,
        d_model: int,
        n_latents: int,
        k: int,
        n_models: int = 2,
        dec_init_norm: float = 0.08,
        scales: torch.Tensor | list[float] | None = None,
        means: torch.Tensor | list[list[float]] | None = None,
        threshold: float = -1.0,
        folded: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        _check_sizes(d_model, n_latents, k, n_models)
        self.d_model, self.n_latents, self.k, self.n_models = d_model, n_latents, k, n_models
        self.folded = folded
        self.metadata = dict(metadata or {})

        direction = torch.randn(n_latents, n_models, d_model)
        W_dec = direction / direction.norm(dim=-1, keepdim=True) * dec_init_norm
        self.W_dec = nn.Parameter(W_dec)
        # contiguous, not clone: a clone keeps the permuted strides, and every step would copy the encoder.
        self.W_enc = nn.Parameter(W_dec.permute(1, 2, 0).contiguous())
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.b_dec = nn.Parameter(torch.zeros(n_models, d_model))
        scales = torch.ones(n_models) if scales is None else torch.as_tensor(scales, dtype=torch.float32)
        if scales.shape != (n_models,) or not bool(torch.all(torch.isfinite(scales) & (scales > 0))):
            raise ValueError(f"scales must be {n_models} finite positive numbers, got {scales.tolist()}")
        self.register_buffer("scales", scales.clone())
        means = torch.zeros(n_models, d_model) if means is None else torch.as_tensor(means, dtype=torch.float32)
        if means.shape != (n_models, d_model) or not bool(torch.isfinite(means).all()):
            raise ValueError(f"means must be a finite [{n_models}, {d_model}] tensor, got shape {tuple(means.shape)}")
        self.register_buffer("means", means.clone())
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self._warned_uncalibrated = False

    # ----------------------------------------------------------------------------------- encoding
    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Raw activations ``[..., n_models, d_model]`` into the space the weights live in (``(x_m - means[m]) *
        scales[m]`` before folding, unchanged after): the one place the means and scales touch the input."""
        return x if self.folded else (x - self.means.to(x.dtype)) * self.scales[:, None].to(x.dtype)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU pre-activations ``[..., F]`` of raw activations ``x [..., 2, d_model]``."""
        self._check_input(x)
        return self._pre_acts_normalised(self.normalise(x))

    def _pre_acts_normalised(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU pre-activations ``[..., F]`` of activations already in the weights' space ``[..., 2, d_model]``."""
        return F.relu(self._encoder_affine(x))

    def _encoder_affine(self, x: torch.Tensor) -> torch.Tensor:
        """``sum_m x_m @ W_enc[m] + b_enc`` (before the ReLU) ``[..., F]`` of normalised ``x [..., 2, d_model]``.

        The one place both training steps get their pre-activations from, so that they rank bitwise equal
        scores. One matmul over the concatenated models == sum_m x_m @ W_enc[m]. The bias is added in place
        (not by addmm, whose rounding depends on the number of rows: a token encoded alone must get the
        same pre-activations as in a batch, or the threshold keeps it in one and drops it in the other)."""
        flat = x.reshape(-1, self.n_models * self.d_model).to(self.W_enc.dtype)
        out = flat @ self.W_enc.reshape(-1, self.n_latents)
        return out.add_(self.b_enc).view(*x.shape[:-2], self.n_latents)

    def decoder(self, normalised: bool) -> torch.Tensor:
        """``W_dec [F, n_models, d_model]`` in the normalised space or in raw activation units, folded or not."""
        if normalised == self.folded:  # stored in the other space
            scales = self.scales[:, None]
            return self.W_dec * scales if self.folded else self.W_dec / scales
        return self.W_dec

    def decoder_norms(self) -> torch.Tensor:
        """``n[j, m] = ||W_dec[j, m]||`` in the normalised space: ``[F, n_models]``."""
        return self.decoder(normalised=True).norm(dim=-1)

    def scores(self, f: torch.Tensor) -> torch.Tensor:
        """BatchTopK selection score ``f * (sum_m n[:, m])``: ``[..., F]``."""
        return f * self.decoder_norms().sum(-1)

    def batch_topk(self, f: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the ``k * batch`` highest-scoring entries of the whole batch.

        Args:
            f: pre-activations ``[batch, F]``.
        Returns:
            the sparse codes ``[batch, F]`` (unscaled ``f`` values of the kept entries) and the
            smallest positive kept score (a 0-dim tensor; ``inf`` if nothing positive was kept).
        """
        flat_f = f.reshape(-1)
        n_keep = min(k * f.shape[0], flat_f.numel())
        values, idx = self.scores(f).reshape(-1).topk(n_keep, sorted=False)
        min_kept = torch.where(values > 0, values, torch.full_like(values, math.inf)).min()
        codes = torch.zeros_like(flat_f).scatter(0, idx, flat_f.gather(0, idx))
        return codes.view_as(f), min_kept.detach()

    def _batch_topk_global(self, f: torch.Tensor, group: Reducer, n_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`batch_topk` of the global batch under DDP, ``f [batch, F]`` being this rank's pre-activations: the
        codes of this rank's entries among the ``n_keep`` highest scores over all ranks, and the global
        ``min_kept``. Candidates: this rank's positive (or NaN) scores among its own top ``n_keep``, in flat order
        (:func:`crosscoder_pl.distributed.keep_global_top` says why they suffice)."""
        flat_f = f.reshape(-1)
        values, idx = self.scores(f).reshape(-1).topk(min(n_keep, flat_f.numel()), sorted=False)
        candidate = (values > 0) | values.isnan()
        idx, values = idx[candidate], values[candidate]
        order = idx.argsort()
        idx, values = idx[order], values[order]
        keep, min_kept = keep_global_top(values, n_keep, group)
        idx = idx[keep]
        codes = torch.zeros_like(flat_f).scatter(0, idx, flat_f.gather(0, idx))
        return codes.view_as(f), min_kept.detach()

    def threshold_codes(self, f: torch.Tensor) -> torch.Tensor:
        """Inference encoding: keep every entry whose score exceeds ``threshold``; ``[..., F]``."""
        return f * (self.scores(f) > self.threshold)

    def encode(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Sparse latents ``[..., F]`` of raw activations ``x [..., 2, d_model]``.

        Training mode: BatchTopK over all leading dimensions with ``k`` (default ``self.k``).
        Eval mode: the learned threshold, so one token encodes alone. Before the threshold is
        calibrated, eval mode falls back to BatchTopK and warns once.
        """
        f = self.pre_acts(x)
        if not self.training and self.threshold_calibrated:
            return self.threshold_codes(f)
        if not self.training and not self._warned_uncalibrated:
            warnings.warn("CrossCoder threshold not calibrated yet: eval-mode encode uses BatchTopK", stacklevel=2)
            self._warned_uncalibrated = True
        lead = f.shape[:-1]
        codes, _ = self.batch_topk(f.reshape(-1, self.n_latents), self.k if k is None else k)
        return codes.reshape(*lead, self.n_latents)

    @property
    def threshold_calibrated(self) -> bool:
        return bool(self.threshold >= 0)

    # ----------------------------------------------------------------------------------- decoding
    def decode(self, f: torch.Tensor, normalised: bool = False) -> torch.Tensor:
        """Reconstruction ``[..., 2, d_model]`` of latents ``f [..., F]``.

        Raw activations by default; ``normalised=True`` returns the training-space reconstruction
        (only meaningful before folding, where the loss is computed).
        """
        flat = f.to(self.W_dec.dtype) @ self.W_dec.reshape(self.n_latents, -1)
        x_hat = flat.reshape(*f.shape[:-1], self.n_models, self.d_model) + self.b_dec
        if self.folded or normalised:
            return x_hat
        return x_hat / self.scales[:, None] + self.means

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``decode(encode(x))``: raw activations in, raw reconstructions out."""
        return self.decode(self.encode(x))

    # ----------------------------------------------------------------------------------- training
    def step(
        self,
        x: torch.Tensor,
        k: int,
        dead: torch.Tensor | None = None,
        *,
        loss: str = "mse",
        aux_coef: float = 1 / 32,
        k_aux: int = 1,
        impl: str = "sparse",
        reducer: Reducer | None = None,
    ) -> StepOutput:
        """One training step's loss and everything reported about it (docs/method.md, "Loss").

        Args:
            x: raw activations ``[batch, n_models, d_model]``.
            k: BatchTopK's k for this step (``k * batch`` entries kept over the whole batch).
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
        """
        if self.folded:
            raise RuntimeError("a folded crosscoder is for inference; train the unfolded one (CrossCoder.fold copies)")
        if impl not in STEP_IMPLS:
            raise ValueError(f"impl={impl!r} is not one of {STEP_IMPLS}")
        self._check_input(x)
        x_n = self.normalise(x.to(self.W_enc.dtype))  # [batch, n_models, d_model], the training space
        # One host sync; healthy runs skip AuxK's work.
        dead_idx = dead.nonzero().squeeze(1) if dead is not None and aux_coef > 0 else None
        if dead_idx is not None and dead_idx.numel() == 0:
            dead_idx = None
        forward = self._forward_sparse if impl == "sparse" else self._forward_dense
        group = distributed(reducer)
        n_global = x_n.shape[0]
        if group is None:
            active, min_kept, x_hat, e_hat = forward(x_n, k, dead_idx, k_aux)
            recon = token_loss(x_n - x_hat, loss).mean()
            unit = token_loss(x_n - x_n.mean(0), loss).mean().detach()
            aux = recon.new_zeros(()) if e_hat is None else self.aux_error((x_n - x_hat).detach(), e_hat, loss)
        else:
            # One collective for the global batch size (a host int: the selection's size) and the inputs' mean.
            sums = group.all_reduce(torch.cat([x_n.new_full((1,), x_n.shape[0]), x_n.sum(0).flatten()]).double())
            n_global = int(sums[0].item())
            x_mean = (sums[1:] / n_global).to(x_n.dtype).view_as(x_n[0])
            n_keep = min(k * n_global, n_global * self.n_latents)
            active, min_kept, x_hat, e_hat = forward(x_n, k, dead_idx, k_aux, (group, n_keep))
            recon, aux, unit = _global_terms(x_n, x_hat, e_hat, x_mean, n_global, loss, group)
        total = recon + aux_coef * aux * unit
        return StepOutput(total, recon, aux, unit, active, x_n, x_hat, min_kept, n_global)

    def _forward_dense(
        self, x_n: torch.Tensor, k: int, dead_idx: torch.Tensor | None, k_aux: int,
        ranks: tuple[Reducer, int] | None = None,
    ) -> tuple[SparseCodes, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The reference: all F latents through the decoder. Returns the kept entries, ``min_kept``, the
        reconstruction ``x_hat`` and AuxK's reconstruction of the residual ``e_hat`` (None without dead latents),
        both ``[batch, n_models, d_model]``. ``ranks``: the reducer and the number of entries the global BatchTopK
        keeps, under DDP."""
        pre = self._encoder_affine(x_n)  # [batch, F], before the ReLU
        f = F.relu(pre)
        codes, min_kept = self.batch_topk(f, k) if ranks is None else self._batch_topk_global(f, *ranks)
        x_hat = self.decode(codes, normalised=True)
        e_hat = None
        if dead_idx is not None:
            aux_codes = self.aux_topk(pre, dead_idx, k_aux)  # [batch, n_dead]
            e_hat = self._aux_decode(aux_codes, dead_idx).view_as(x_n)
        return SparseCodes.from_dense(codes), min_kept, x_hat, e_hat

    def _forward_sparse(
        self, x_n: torch.Tensor, k: int, dead_idx: torch.Tensor | None, k_aux: int,
        ranks: tuple[Reducer, int] | None = None,
    ) -> tuple[SparseCodes, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`_forward_dense` computed from the kept entries: the encoder's matmul is the only ``[batch, F]``
        product; selection, decoding and the backward touch the kept entries (and AuxK's dead columns) only."""
        n_tokens = x_n.shape[0]
        x_flat = x_n.reshape(n_tokens, -1)
        W_enc = self.W_enc.reshape(-1, self.n_latents)
        with torch.no_grad():
            pre = self._encoder_affine(x_n)  # [batch, F], before the ReLU; no autograd graph
            weight = self.decoder_norms().sum(-1)  # [F] the score weight, as in scores()
            if ranks is None:
                flat, _, min_kept = select_batch_topk(pre, weight, k)
            else:  # this rank's top k * B_global, then the global cut among all ranks' candidates
                group, n_keep = ranks
                flat, scores, _ = select_batch_topk(pre, weight, k, n_keep=n_keep)
                keep, min_kept = keep_global_top(scores, n_keep, group)
                flat = flat[keep]
            rows, cols = flat.div(self.n_latents, rounding_mode="floor"), flat.remainder(self.n_latents)
        dead_cols = torch.zeros(0, dtype=torch.long, device=pre.device) if dead_idx is None else dead_idx
        values, pre_dead = pre_acts_at(x_flat, W_enc, self.b_enc, pre, rows, cols, dead_cols)
        active = SparseCodes(rows, cols, values, (n_tokens, self.n_latents))
        W_dec = self.W_dec.reshape(self.n_latents, -1)
        x_hat = decode_sparse(W_dec, values, rows, cols, n_tokens).view_as(x_n) + self.b_dec
        e_hat = None
        if dead_idx is not None:  # AuxK as in the dense step, on the dead columns only
            aux_codes = self._aux_codes(pre_dead, weight[dead_idx], k_aux)
            e_hat = self._aux_decode(aux_codes, dead_idx).view_as(x_n)
        return active, min_kept, x_hat, e_hat

    def aux_topk(self, pre: torch.Tensor, dead_idx: torch.Tensor, k_aux: int) -> torch.Tensor:
        """AuxK's selection, the per-token twin of :meth:`batch_topk`: among the dead latents ``dead_idx [n_dead]``,
        keep each token's ``k_aux`` highest scores. ``pre``: pre-activations before the ReLU ``[batch, F]``.
        Returns codes ``[batch, n_dead]``: the ReLU'd values, with a straight-through gradient (:meth:`_aux_codes`)."""
        return self._aux_codes(pre[:, dead_idx], self.decoder_norms()[dead_idx].sum(-1), k_aux)

    @staticmethod
    def _aux_codes(pre_dead: torch.Tensor, weight_dead: torch.Tensor, k_aux: int) -> torch.Tensor:
        """:meth:`aux_topk` from the dead latents' pre-activations before the ReLU ``[batch, n_dead]`` and score
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

    def _aux_decode(self, aux_codes: torch.Tensor, dead_idx: torch.Tensor) -> torch.Tensor:
        """AuxK's reconstruction ``[batch, n_models * d_model]`` from codes over the dead latents: decoder, no bias."""
        return aux_codes @ self.W_dec[dead_idx].reshape(dead_idx.numel(), -1)

    @staticmethod
    def aux_error(residual: torch.Tensor, e_hat: torch.Tensor, loss: str) -> torch.Tensor:
        """AuxK (Gao et al. 2024): the error of the dead latents' reconstruction ``e_hat`` (decoder, no bias) of
        the detached residual ``[batch, n_models, d_model]``, normalised by the error of predicting the
        residual's mean (both under ``loss``)."""
        baseline = token_loss(residual - residual.mean(0), loss).mean().clamp_min(1e-12)
        return token_loss(residual - e_hat, loss).mean() / baseline

    # ----------------------------------------------------------------------------------- folding / io
    def fold(self) -> CrossCoder:
        """A copy with the per-model means and scales folded into the weights (raw activations in and out):
        ``W_enc[m] * s_m``, ``b_enc - sum_m (mu_m s_m) @ W_enc[m]``, ``W_dec[:, m] / s_m``, ``b_dec[m] / s_m + mu_m``."""
        out = copy.deepcopy(self)
        if self.folded:
            return out
        s = self.scales.to(self.W_dec.dtype)
        with torch.no_grad():
            # float64: the mean's part of the bias is a sum of d_model products of large numbers
            shift = torch.einsum("md,mdf->f", self.means.double() * self.scales.double()[:, None], self.W_enc.double())
            out.b_enc.sub_(shift.to(out.b_enc.dtype))
            out.W_enc.mul_(s[:, None, None])
            out.W_dec.div_(s[None, :, None])
            out.b_dec.div_(s[:, None]).add_(self.means.to(out.b_dec.dtype))
        out.folded = True
        return out

    def config(self) -> dict[str, Any]:
        return {
            "architecture": "BatchTopKCrossCoder",
            "d_model": self.d_model,
            "n_latents": self.n_latents,
            "k": self.k,
            "n_models": self.n_models,
            "model_order": list(MODEL_ORDER[: self.n_models]),
            "scales": [float(s) for s in self.scales],
            "centred": bool(self.means.any()),
            "threshold": float(self.threshold),
            "folded": True,
            "encode": "f = relu(sum_m x_m @ W_enc[m] + b_enc); keep f where f * sum_m(||W_dec[:, m]|| * scales[m]) > threshold",
            "means": "the per-model activation means (tensor 'means') are already folded into b_enc and b_dec",
            "decode": "x_hat[m] = f @ W_dec[:, m] + b_dec[m]",
            "metadata": self.metadata,
        }

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (always folded: raw activations in and out)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        folded = self.fold()
        tensors = {name: t.detach().contiguous().cpu() for name, t in folded.state_dict().items()}
        # Each file lands whole, with the umask's mode (safetensors alone would leave 0600); weights first, so
        # that config.json never describes weights that are not there yet.
        write_whole(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        write_whole(directory / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(folded.config(), indent=2) + "\n"))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> CrossCoder:
        """Load a saved crosscoder; a non-existent local path is tried as a Hugging Face hub repo id.

        Only JSON and safetensors are read: loading never unpickles code. A directory still being written
        (it holds an ``INCOMPLETE`` file: see `crosscoder_pl.artifact`) is refused. Hub downloads give up
        after ``HF_HUB_ETAG_TIMEOUT`` seconds (default 10) without an answer, naming the offline alternatives.
        """
        directory = _resolve(directory)
        check_complete(directory)
        config = json.loads((directory / CONFIG_NAME).read_text())
        if config.get("architecture") != "BatchTopKCrossCoder":
            raise ValueError(f"{directory / CONFIG_NAME}: architecture {config.get('architecture')!r} is not BatchTopKCrossCoder")
        model = cls(
            d_model=config["d_model"],
            n_latents=config["n_latents"],
            k=config["k"],
            n_models=config["n_models"],
            scales=config["scales"],
            folded=True,
            metadata=config.get("metadata"),
        )
        state = load_file(str(directory / WEIGHTS_NAME), device=str(device))
        # Saved before centring existed: nothing was subtracted, so the record of what the biases hold is zeros.
        state.setdefault("means", torch.zeros(model.n_models, model.d_model, device=str(device)))
        model.load_state_dict(state, strict=True)
        return model.to(device).eval()

    def _check_input(self, x: torch.Tensor) -> None:
        want = (self.n_models, self.d_model)
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"CrossCoder expects a floating-point tensor [..., {want[0]}, {want[1]}], got {_describe(x)}")
        if x.dim() < 2 or tuple(x.shape[-2:]) != want:
            raise ValueError(f"CrossCoder expects activations [..., {want[0]}, {want[1]}], got shape {tuple(x.shape)}")


def _global_terms(
    x_n: torch.Tensor, x_hat: torch.Tensor, e_hat: torch.Tensor | None, x_mean: torch.Tensor, n_global: int,
    loss: str, group: Reducer,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``recon``, ``aux``, ``unit`` of the global batch from this rank's tokens (the single-process formulas of
    :meth:`CrossCoder.step` and :meth:`CrossCoder.aux_error` with every mean over the batch taken over all ranks).

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


def _check_sizes(d_model: int, n_latents: int, k: int, n_models: int) -> None:
    for name, value in (("d_model", d_model), ("n_latents", n_latents), ("k", k), ("n_models", n_models)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if k > n_latents:
        raise ValueError(f"k={k} is larger than the dictionary (n_latents={n_latents}); choose k <= n_latents")


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of dtype {x.dtype} and shape {tuple(x.shape)}"
    return type(x).__name__


def check_complete(directory: Path) -> None:
    """Raise a clear error unless ``directory`` holds a finished crosscoder (both files, no ``INCOMPLETE``)."""
    if (directory / INCOMPLETE).exists():
        raise ValueError(
            f"{directory} is an incomplete artifact: its writer was stopped before finishing (the {INCOMPLETE} file "
            "is still there), so files may be missing or stale. Use the complete artifact next to it (the same name "
            "without the leading dot and '.partial-' suffix), or write it again (re-run training, or python "
            "analyze.py artifact=<the complete one>); this directory can be deleted."
        )
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory} is not a saved crosscoder: {' and '.join(missing)} missing (CrossCoder.save_pretrained "
            "writes both)"
        )


def _resolve(directory: str | Path) -> Path:
    path = Path(directory)
    if path.is_dir():
        return path
    if isinstance(directory, str) and directory.count("/") == 1 and not path.exists():
        return _from_hub(directory)
    aside = sorted(path.parent.glob(f".{path.name}.replaced-*"))
    hint = f"; a complete copy set aside by an interrupted rewrite is at {aside[-1]}: rename it to {path}" if aside else ""
    raise FileNotFoundError(f"no crosscoder at {directory!s}: expected a directory with {CONFIG_NAME} and {WEIGHTS_NAME}{hint}")


def _from_hub(repo_id: str) -> Path:
    """The hub repo's two files: from the local cache if there, else downloaded after one probe request that
    gives up after ``HF_HUB_ETAG_TIMEOUT`` s (huggingface_hub's own calls retry a silent hub for minutes)."""
    from huggingface_hub import model_info, snapshot_download

    from crosscoder_pl.network import (
        HubUnreachableError,
        ask_hub,
        hub_offline,
        hub_timeout,
    )

    files = [CONFIG_NAME, WEIGHTS_NAME]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=files, local_files_only=True))
    except FileNotFoundError:  # huggingface_hub's LocalEntryNotFoundError: not in the cache
        pass
    if hub_offline():
        raise FileNotFoundError(_hub_failure(repo_id, "offline mode is on (HF_HUB_OFFLINE) and it is not in the cache"))
    try:
        ask_hub(lambda timeout: model_info(repo_id, timeout=timeout))
    except HubUnreachableError as err:
        raise ConnectionError(_hub_failure(repo_id, str(err))) from err
    except Exception as err:  # the hub answered with an error (not found, gated, no access)
        raise ConnectionError(_hub_failure(repo_id, f"{type(err).__name__}: {err}")) from err
    return Path(snapshot_download(repo_id, allow_patterns=files, etag_timeout=hub_timeout()))


def _hub_failure(repo_id: str, reason: str) -> str:
    from huggingface_hub import constants

    return (
        f"could not load the crosscoder {repo_id!r}: it is not a local directory, so it was looked up on the "
        f"Hugging Face hub ({constants.ENDPOINT}): {reason}. To run offline, pass the artifact's local directory, or "
        f"download it once where the hub is reachable (hf download {repo_id}) and set HF_HUB_OFFLINE=1 to use that "
        "cached copy; on a slow network raise HF_HUB_ETAG_TIMEOUT and HF_HUB_DOWNLOAD_TIMEOUT (seconds)."
    )
