"""LightningModule that trains a CrossCoder from any stream of paired activations ``[batch, 2, d_model]``.

The loss and everything reported about it is computed by :meth:`CrossCoder.step` (docs/method.md);
this module only optimises, schedules and logs:
  1. before the first step, the per-model means ``mu_m`` and scales ``sqrt(d_model) / mean ||x_m - mu_m||`` (and the
     bias inits) are estimated from the first ``scale_tokens`` tokens of the training data;
  2. ``k`` is annealed linearly from ``k_start``; the dead-latent counters feed AuxK;
  3. the inference threshold is a bias-corrected EMA of the smallest kept score per batch.
An L1 crosscoder (``sparsity: l1``) has none of 2-3: its penalty's coefficient rises linearly from 0 over the first
``l1_warmup_frac`` of the steps instead, and the dead-latent counters are only reported.
Gradient clipping is the Trainer's (``gradient_clip_val=1.0`` in the recipe).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any

import lightning as L
import torch
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric

from crosscoder_pl.config import CrossCoderConfig
from crosscoder_pl.crosscoder import CrossCoder
from crosscoder_pl.distributed import ProcessGroupReducer, Reducer
from crosscoder_pl.metrics import FiringCounts, VarianceExplained
from crosscoder_pl.schedules import k_at, l1_warmup, lr_factor
from crosscoder_pl.sparse import SparseCodes
from crosscoder_pl.step import StepOutput, token_loss

log = logging.getLogger(__name__)


class CrossCoderModule(L.LightningModule):
    """Trains a :class:`CrossCoder`.

    Args:
        d_model: the width of the models' activations.
        cfg: the ``crosscoder`` group (`crosscoder_pl.config.CrossCoderConfig`, or its plain values as a
            checkpoint holds them; an ``expansion`` is resolved with ``d_model``). Its fields:
        sparsity: ``"batchtopk"`` or ``"l1"`` (`crosscoder_pl.step.SPARSITIES`).
        n_latents, k: dictionary size and final BatchTopK k (null for l1).
        l1_coef: the L1 penalty's coefficient λ (l1 only), reached after ``l1_warmup_frac`` of the steps.
        k_start: k at step 0, annealed linearly to ``k`` over ``k_anneal_steps`` (default: ``k``).
        k_anneal_steps: optimiser steps of the k annealing (0 = no annealing).
        lr: Adam learning rate; constant, then linear decay to 0 over the last ``lr_decay_frac`` of steps.
        aux_coef: weight of the AuxK loss (Gao et al.: 1/32); 0 disables it.
        k_aux: dead latents used by AuxK per token (default ``d_model // 2``).
        dead_after_tokens: a latent that has not fired for this many tokens (all ranks) is dead.
        threshold_decay: EMA decay of the inference threshold.
        threshold_start_step: first step that updates the threshold (default: end of k annealing).
        scales: per-model normalisation scalars; estimated from the first ``scale_tokens`` tokens if None.
        center: subtract each model's activation mean (estimated from the same tokens as the scales, in float64)
            before the encoder and add it back after the decoder (folded into the biases on save). A residual
            stream is mostly a constant vector (Gemma-3-270M layer 6: 92% of a token's norm); uncentred, every
            update along it moves a latent's pre-activation by the same amount on every token, and most of the
            dictionary dies (docs/method.md, "Per-model normalisation and folding").
        scale_by: what the estimated scales equalise to ``sqrt(d_model)``: ``"mean_norm"`` (mean ``||x_m - mu_m||``
            of what the encoder reads, centred or not: the method's definition) or ``"std"`` (root of the centred
            second moment ``E||x_m - mean_m||^2``, as the dictionary_learning crosscoders normalise).
        b_dec_init: ``"mean"`` (decoder bias starts at the data mean, estimated with the scales) or ``"zeros"``.
        b_enc_init: ``"center"`` (encoder bias starts at ``-mean(x) @ W_enc``, so each latent's pre-activation
            is centred on the data and fires on about half the tokens at first; residual streams have a large
            mean, and without this about half the latents start negative on every token, never fire, and get
            no gradient, not even from AuxK) or ``"zeros"``.
        enc_init: ``"equal_variance"`` (each latent's encoder column rescaled so that its pre-activation has
            the same variance on the init tokens, so that no random direction starts in a low-variance
            subspace with small scores; measured on the embedded pair it did not lower the dead fraction,
            hence not the default) or ``"transpose"`` (the encoder is the decoder transposed).
        loss: ``"mse"`` (squared error summed over models and d_model) or ``"l2"`` (unsquared norm per
            model, as in the crosscoder paper's code); mean over tokens either way.
        step_impl: ``"sparse"`` (the step computed from the kept entries only, several times faster) or
            ``"dense"`` (all latents, the reference): the same codes, loss and gradients up to float rounding
            (:meth:`CrossCoder.step`, docs/method.md "Sparse step").
        metrics_window_steps: steps pooled by the training variance explained and tokens/s.
        metadata: JSON-able facts written into the exported ``config.json`` (model ids, layer, ...).
    """

    def __init__(self, d_model: int, cfg: CrossCoderConfig | Mapping[str, Any],
                 metadata: dict[str, Any] | None = None) -> None:
        super().__init__()
        # A checkpoint's hyperparameters hold the configuration as plain values: read back into the typed one.
        cfg = (cfg if isinstance(cfg, CrossCoderConfig) else CrossCoderConfig.read(cfg)).resolve(d_model)
        self.save_hyperparameters({"d_model": d_model, "cfg": cfg.model_dump(mode="json"), "metadata": metadata})
        self.cfg, self.d_model = cfg, d_model
        n_latents = cfg.n_latents
        self.k_start = cfg.start_k
        self.k_aux = min(d_model // 2 if cfg.k_aux is None else cfg.k_aux, n_latents)
        self.threshold_start_step = cfg.threshold_start
        self.crosscoder = CrossCoder(d_model, n_latents, cfg.k, dec_init_norm=cfg.dec_init_norm,
                                     scales=None if cfg.scales is None else list(cfg.scales), metadata=metadata,
                                     sparsity=cfg.sparsity)

        self.register_buffer("tokens_since_fired", torch.zeros(n_latents, dtype=torch.long))
        # θ's EMA state (float64: 1 - decay^n must not round to 0 for decays near 1), in the checkpoint.
        self.register_buffer("threshold_ema", torch.zeros((), dtype=torch.float64))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))
        # In the checkpoint, so a resumed run does not initialise from data twice.
        needs_data = (cfg.scales is None or cfg.center or cfg.b_dec_init == "mean" or cfg.b_enc_init == "center"
                      or cfg.enc_init == "equal_variance")
        self.register_buffer("data_init_done", torch.tensor(not needs_data))
        self.skipped_rows = 0
        self._ranks: Reducer | None = None  # made on the first DDP step (the process group exists by then)

        self.train_ve = VarianceExplained(2, d_model)
        self.val_ve = VarianceExplained(2, d_model)
        self.val_firing = FiringCounts(n_latents)
        self.val_l0 = MeanMetric()
        self.val_recon = MeanMetric()
        self._total_steps = 0  # set with the optimiser, from the trainer's max_steps
        self._window_start: float | None = None
        self._window_tokens = 0

    # ----------------------------------------------------------------------------------- training
    def training_step(self, batch: torch.Tensor | list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x = self._clean(batch)
        if x.shape[0] == 0:  # returning None would desynchronise DDP ranks
            raise ValueError(f"every row of the batch at step {self.global_step} was NaN/inf: check the activations")
        hp = self.cfg
        k_now = None if hp.k is None else k_at(self.global_step, hp.k, self.k_start, hp.k_anneal_steps)
        dead = self.tokens_since_fired >= hp.dead_after_tokens  # [F], before this step's batch
        out = self.crosscoder.step(x, k_now, dead, loss=hp.loss, aux_coef=hp.aux_coef, k_aux=self.k_aux,
                                   impl=hp.step_impl, reducer=self._reducer(), l1_coef=self.l1_coef_now())
        if not torch.isfinite(out.loss):
            raise FloatingPointError(
                f"non-finite loss {out.loss.item()} at step {self.global_step} (recon={out.recon.item()}, "
                f"aux={out.aux.item()}); lower crosscoder.lr (now {hp.lr}) or check the activations' scale "
                f"(scales={self.crosscoder.scales.tolist()})"
            )
        self._update_dead(out.active, out.n_tokens)
        if hp.sparsity == "batchtopk":
            self._update_threshold(out.min_kept)
        self.train_ve.update(out.x.detach(), out.x_hat.detach())
        self._log_train(out, dead, k_now)
        return out.loss

    def l1_coef_now(self) -> float:
        """The L1 penalty's coefficient at this step: linear from 0 to ``l1_coef`` over the first ``l1_warmup_frac``
        of the run's steps (Anthropic's April 2024 SAE training update: the first 5%), so that the penalty does not kill
        latents before the reconstruction has shaped them; 0 for BatchTopK."""
        hp = self.cfg
        if hp.l1_coef is None:
            return 0.0
        return hp.l1_coef * l1_warmup(self.global_step, self._total_steps, hp.l1_warmup_frac)

    def _reducer(self) -> Reducer | None:
        """The step's collectives under DDP (global BatchTopK and batch means); None on one process."""
        if self.trainer.world_size == 1:
            return None
        if self._ranks is None:
            self._ranks = ProcessGroupReducer()  # the world group the DDP strategy started
        return self._ranks

    @torch.no_grad()
    def _update_dead(self, codes: SparseCodes | torch.Tensor, n_tokens: int | None = None) -> None:
        """Advance the per-latent "tokens since last fired" counters by this step's batch (all ranks); ``codes``
        in coordinate form (what the step returns: no ``[batch, F]`` pass) or dense ``[batch, F]``; ``n_tokens``:
        the global batch's tokens (``StepOutput.n_tokens``; default: this rank's times the world size)."""
        if isinstance(codes, torch.Tensor):
            codes = SparseCodes.from_dense(codes)
        fired = codes.fired()
        gathered = self.all_gather(fired)
        if gathered.dim() == 2:  # [world, F] under DDP
            fired = gathered.any(0)
        tokens = codes.shape[0] * self.trainer.world_size if n_tokens is None else n_tokens
        self.tokens_since_fired = torch.where(fired, 0, self.tokens_since_fired + tokens)

    @torch.no_grad()
    def _update_threshold(self, min_kept: torch.Tensor) -> None:
        """From step ``threshold_start_step`` on, θ = bias-corrected EMA of the smallest kept score per batch.

        ``min_kept`` is the global batch's (under DDP the step's selection is global and returns it on every
        rank), so θ is the same on every rank and equal to the single-process θ.

        The EMA starts at 0 and is divided by ``1 - decay^n`` after n updates (as Adam's moments), so θ is
        a weighted mean of the scores seen so far at every step, not a first batch's value decaying slowly
        towards the truth: short runs get a calibrated threshold too.
        """
        if self.global_step < self.threshold_start_step:
            return
        min_kept = min_kept.detach().double()
        decay = self.cfg.threshold_decay
        finite = torch.isfinite(min_kept)  # nothing positive kept: skip the update (on device, no host sync)
        ema = torch.where(finite, decay * self.threshold_ema + (1 - decay) * min_kept, self.threshold_ema)
        self.threshold_ema.copy_(ema)
        self.threshold_updates += finite.long()
        theta = ema / (1 - decay ** self.threshold_updates.double())
        self.crosscoder.threshold.copy_(torch.where(self.threshold_updates > 0, theta, self.crosscoder.threshold))

    # ----------------------------------------------------------------------------------- scales
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A checkpoint written before centring existed trained uncentred: it resumes with zero means, exactly.
        checkpoint["state_dict"].setdefault("crosscoder.means", torch.zeros_like(self.crosscoder.means))

    def on_train_start(self) -> None:
        if not bool(self.data_init_done):  # nothing to estimate, or restored from a checkpoint
            self.estimate_scales(self.trainer.train_dataloader)

    @torch.no_grad()
    def estimate_scales(self, batches: Iterable[torch.Tensor | list[torch.Tensor]]) -> None:
        """Data-dependent init from the first ``scale_tokens`` tokens of ``batches`` (summed over ranks):
        ``means_m`` = the mean of ``x_m`` (if ``center``); ``scales_m = sqrt(d_model) / mean ||x_m - means_m||``
        (unless given); with ``enc_init="equal_variance"`` each encoder column rescaled so that every latent's
        pre-activation has the same variance on these tokens; b_dec = the normalised mean (if ``b_dec_init="mean"``;
        about 0 when centred); b_enc centring the pre-activations (if ``b_enc_init="center"``). A fresh iterator is
        used, so these tokens are trained on as well. Under DDP each rank reads its share, so that the ranks
        together read the tokens a single process would."""
        cc, hp = self.crosscoder, self.cfg
        width = 2 * cc.d_model
        x_sum = torch.zeros(width, dtype=torch.float64, device=self.device)
        xx_sum = torch.zeros(width, width, dtype=torch.float64, device=self.device)
        n = torch.zeros((), dtype=torch.float64, device=self.device)
        read: list[torch.Tensor] = []  # [batch, 2, d_model] each: the mean norm needs a second pass once centred
        for batch in batches:
            x = self._clean(batch).to(self.device)
            read.append(x)
            flat = x.double().flatten(1)  # [batch, 2 * d_model]
            x_sum += flat.sum(0)
            xx_sum += flat.T @ flat
            n += x.shape[0]
            if n * self.trainer.world_size >= hp.scale_tokens:
                break
        x_sum, xx_sum, n = (self._reduce(t) for t in (x_sum, xx_sum, n))
        if n == 0:
            raise ValueError("cannot estimate the per-model scales: the training data yielded no tokens")
        if n < hp.scale_tokens:
            warnings.warn(f"scales estimated from only {int(n)} tokens (scale_tokens={hp.scale_tokens})",
                          stacklevel=3)  # 3: past torch.no_grad's wrapper, at the caller
        if hp.center:
            cc.means.copy_((x_sum / n).view(2, cc.d_model))
        centre = cc.means.double()  # [2, d_model]: zeros without centring
        if hp.scales is None:
            if hp.scale_by == "mean_norm":  # mean ||x_m - mu_m||: the norm of what the encoder reads
                zero = torch.zeros(2, dtype=torch.float64, device=self.device)  # a rank may have read no token
                norm_sum = sum(((x.double() - centre).norm(dim=-1).sum(0) for x in read), zero)
                spread = self._reduce(norm_sum) / n  # [2]
            else:  # root of the centred second moment: the variable part of each model's activations
                var = (xx_sum.diagonal() / n - (x_sum / n) ** 2).view(2, cc.d_model).sum(-1)
                spread = var.clamp_min(1e-12).sqrt()
            cc.scales.copy_((math.sqrt(cc.d_model) / spread).float())
        s = cc.scales.double().repeat_interleave(cc.d_model)  # [2 * d_model], per coordinate
        mean = (x_sum / n - centre.flatten()) * s  # the data mean in the training space (about 0 when centred)
        W_enc = cc.W_enc.data.reshape(width, cc.n_latents)  # a view: edits land in the parameter
        if hp.enc_init == "equal_variance":
            cov = (xx_sum / n - torch.outer(x_sum / n, x_sum / n)) * torch.outer(s, s)
            var = _preact_variance(cov, W_enc)
            W_enc.mul_((var.sqrt().mean() / var.sqrt()).to(W_enc.dtype))
        if hp.b_dec_init == "mean":
            cc.b_dec.data.copy_(mean.view(2, cc.d_model))
        if hp.b_enc_init == "center":
            cc.b_enc.data.copy_(-(mean.to(W_enc.dtype) @ W_enc))
        self.data_init_done.fill_(True)
        log.info("data init from %d tokens: centred %s, per-model scales %s, encoder %s, b_dec %s, b_enc %s", int(n),
                 hp.center, [round(v, 5) for v in cc.scales.tolist()], hp.enc_init, hp.b_dec_init, hp.b_enc_init)

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self.trainer.strategy.reduce(t, reduce_op="sum") if self.trainer.world_size > 1 else t

    # ----------------------------------------------------------------------------------- validation
    def validation_step(self, batch: torch.Tensor | list[torch.Tensor], batch_idx: int) -> None:
        x = self._clean(batch)
        cc = self.crosscoder
        codes = cc.encode(x)  # eval mode: the learned threshold, token by token
        x_hat = cc.decode(codes, normalised=True)
        x_n = cc.normalise(x)
        self.val_ve.update(x_n, x_hat)
        self.val_firing.update(codes)
        self.val_l0.update((codes > 0).sum(-1).float())
        self.val_recon.update(token_loss(x_n - x_hat, self.cfg.loss).mean(), weight=x.shape[0])

    def on_validation_epoch_end(self) -> None:
        ve = self.val_ve.compute()
        counts = self.val_firing.compute()
        with self.val_firing.sync_context():  # the states summed over ranks, as compute() sees them
            tokens = self.val_firing.tokens.clone()
        self.log_dict({
            "val/ve_base": ve[0], "val/ve_chat": ve[1],
            "val/l0": self.val_l0.compute(),
            "val/dead_frac": (counts == 0).float().mean(),
            "val/loss_recon": self.val_recon.compute(),
            "val/tokens": tokens.float(),
        })
        for metric in (self.val_ve, self.val_firing, self.val_l0, self.val_recon):
            metric.reset()

    # ----------------------------------------------------------------------------------- plumbing
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.cfg
        # The fused kernel (CPU and CUDA) updates in one pass what the default one does in about seven; Lightning
        # refuses gradient clipping with it under mixed precision (it unscales internally), so only in full precision.
        fused = str(self.trainer.precision).endswith("-true")
        optimizer = torch.optim.Adam(self.crosscoder.parameters(), lr=hp.lr, betas=tuple(hp.betas), fused=fused)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("the lr schedule needs a finite run: set trainer.max_steps (e.g. trainer.max_steps=10000)")
        self._total_steps = int(total)  # the schedules' length: the lr's decay, the L1 coefficient's warm-up
        schedule = partial(lr_factor, total_steps=int(total), decay_frac=hp.lr_decay_frac)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": LambdaLR(optimizer, schedule), "interval": "step"}}

    def _clean(self, batch: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Check a batch ``[batch, 2, d_model]``; drop (count, warn) rows with non-finite values."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        want = (2, self.d_model)
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 3 or tuple(x.shape[1:]) != want:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected float activations [batch, 2, {want[1]}], got {got}")
        finite = torch.isfinite(x).flatten(1).all(1)
        n_bad = int((~finite).sum())
        if n_bad:
            self.skipped_rows += n_bad
            warnings.warn(f"dropped {n_bad} activation rows with NaN/inf at step {self.global_step} "
                          f"({self.skipped_rows} so far)", stacklevel=2)
            x = x[finite]
        return x.float()

    def _log_train(self, out: StepOutput, dead: torch.Tensor, k_now: int | None) -> None:
        # Only on the steps the logger writes (Lightning keeps the last value of the others): self.log costs
        # more than a demo step's selection, and the L0 a pass over the codes. The step is the same on every rank,
        # so the ranks meet in the same collectives.
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0 or self.global_step + 1 == self.trainer.max_steps:
            self._log_step(out, dead, k_now)
        self._log_window(out.n_tokens)

    def _log_step(self, out: StepOutput, dead: torch.Tensor, k_now: int | None) -> None:
        # The loss parts are the global batch's already (CrossCoder.step); the ranks keep unequal shares of the
        # global BatchTopK, so L0 (positive codes per token of the global batch) sums their shares.
        l0_share = out.active.l0().sum().float() / out.n_tokens
        self.log("train/l0", l0_share, sync_dist=self.trainer.world_size > 1, reduce_fx="sum")
        self.log_dict({
            "train/loss": out.loss, "train/loss_recon": out.recon, "train/loss_aux": out.aux,
            "train/dead_frac": dead.float().mean(),
            "train/skipped_rows": float(self.skipped_rows),
            # BatchTopK's k and threshold, or the L1 penalty and its coefficient: what the run's sparsity moves.
            **({"train/k": float(k_now), "train/threshold": self.crosscoder.threshold} if out.l1 is None else
               {"train/loss_l1": out.l1, "train/l1_coef": self.l1_coef_now()}),
        })

    def _log_window(self, n_tokens: int) -> None:
        """Training VE and tokens/s over the last ``metrics_window_steps`` steps; ``n_tokens``: the global batch's."""
        self._window_tokens += n_tokens
        now = time.perf_counter()
        if self._window_start is None:
            self._window_start = now
            self._window_tokens = 0
        if (self.global_step + 1) % self.cfg.metrics_window_steps == 0:
            ve = self.train_ve.compute()
            self.train_ve.reset()
            tps = self._window_tokens / max(now - self._window_start, 1e-9)
            self.log_dict({"train/ve_base": ve[0], "train/ve_chat": ve[1]})
            self.log("train/tokens_per_sec", tps, prog_bar=True)
            self._window_start, self._window_tokens = now, 0


def _preact_variance(cov: torch.Tensor, W: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """``w_j^T cov w_j`` for every column of ``W [2 * d_model, F]``: ``[F]`` float64, by chunks of latents
    (papergrade: one ``cov @ W`` in float64 would take 2.7 GB)."""
    parts = [((cov @ W[:, i : i + chunk].double()) * W[:, i : i + chunk].double()).sum(0)
             for i in range(0, W.shape[1], chunk)]
    return torch.cat(parts).clamp_min(1e-12)

