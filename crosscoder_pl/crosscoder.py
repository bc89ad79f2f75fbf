"""The BatchTopK crosscoder: one sparse dictionary over paired activations of a base and a chat model.

Shapes (docs/method.md, "Shapes and notation"): ``x [..., 2, d_model]`` (index 0 = base, 1 = chat),
``W_enc [2, d_model, F]``, ``b_enc [F]``, ``W_dec [F, 2, d_model]``, ``b_dec [2, d_model]``.

Per-model normalisation: training runs on ``x_m * scales[m]`` so both models weigh the same in the loss.
While training (``folded=False``) the parameters live in that normalised space and ``encode``/``decode``
convert from/to raw activations. ``fold()`` moves the scales into the weights, so a saved crosscoder
takes and returns raw activations with no extra step; ``decoder_norms()`` always answers in the
normalised space, where comparing a latent's two decoder norms is meaningful.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_ORDER = ("base", "chat")
LOSSES = ("mse", "l2")


@dataclass(frozen=True)
class StepOutput:
    """Everything one training step computes and reports, in the normalised (training) space.

    ``loss = recon + aux_coef * aux * unit`` (docs/method.md, "Loss"): ``recon`` is the reconstruction
    term under the loss option, ``aux`` the AuxK error normalised by its target's (dimensionless: 1 = the
    dead latents explain none of the residual, 0 when no latent is dead), ``unit`` the loss of predicting
    the batch mean, which puts AuxK in the reconstruction term's units under either loss option.
    """

    loss: torch.Tensor  # [] what the optimiser minimises
    recon: torch.Tensor  # []
    aux: torch.Tensor  # []
    unit: torch.Tensor  # [] detached
    codes: torch.Tensor  # [batch, F] BatchTopK codes (unscaled f of the kept entries)
    x: torch.Tensor  # [batch, n_models, d_model] normalised input
    x_hat: torch.Tensor  # [batch, n_models, d_model] its reconstruction
    min_kept: torch.Tensor  # [] smallest positive kept score (inf if none): what the threshold tracks


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
        self.W_enc = nn.Parameter(W_dec.permute(1, 2, 0).clone())
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.b_dec = nn.Parameter(torch.zeros(n_models, d_model))
        scales = torch.ones(n_models) if scales is None else torch.as_tensor(scales, dtype=torch.float32)
        if scales.shape != (n_models,) or not bool(torch.all(torch.isfinite(scales) & (scales > 0))):
            raise ValueError(f"scales must be {n_models} finite positive numbers, got {scales.tolist()}")
        self.register_buffer("scales", scales.clone())
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self._warned_uncalibrated = False

    # ----------------------------------------------------------------------------------- encoding
    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Raw activations ``[..., n_models, d_model]`` into the space the weights live in (``x_m * scales[m]``
        before folding, unchanged after): the one place the per-model scales touch the input."""
        return x if self.folded else x * self.scales[:, None].to(x.dtype)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU pre-activations ``[..., F]`` of raw activations ``x [..., 2, d_model]``."""
        self._check_input(x)
        return self._pre_acts_normalised(self.normalise(x))

    def _pre_acts_normalised(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU pre-activations ``[..., F]`` of activations already in the weights' space ``[..., 2, d_model]``."""
        flat = x.reshape(*x.shape[:-2], self.n_models * self.d_model).to(self.W_enc.dtype)
        # One matmul over the concatenated models == sum_m x_m @ W_enc[m].
        return F.relu(flat @ self.W_enc.reshape(-1, self.n_latents) + self.b_enc)

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
        return x_hat / self.scales[:, None]

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
        """
        if self.folded:
            raise RuntimeError("a folded crosscoder is for inference; train the unfolded one (CrossCoder.fold copies)")
        self._check_input(x)
        x_n = self.normalise(x.to(self.W_enc.dtype))  # [batch, n_models, d_model], the training space
        f = self._pre_acts_normalised(x_n)  # [batch, F]
        codes, min_kept = self.batch_topk(f, k)
        x_hat = self.decode(codes, normalised=True)
        recon = token_loss(x_n - x_hat, loss).mean()
        unit = token_loss(x_n - x_n.mean(0), loss).mean().detach()
        aux = self.aux_error((x_n - x_hat).detach(), f, dead, k_aux, loss) if aux_coef > 0 else recon.new_zeros(())
        total = recon + aux_coef * aux * unit
        return StepOutput(total, recon, aux, unit, codes, x_n, x_hat, min_kept)

    def aux_topk(self, f: torch.Tensor, dead_idx: torch.Tensor, k_aux: int) -> torch.Tensor:
        """AuxK's selection, the per-token twin of :meth:`batch_topk`: among the dead latents ``dead_idx [n_dead]``,
        keep each token's ``k_aux`` highest scores. Returns codes ``[batch, n_dead]`` (unscaled ``f``)."""
        f_dead = f[:, dead_idx]  # [batch, n_dead]
        scores = f_dead * self.decoder_norms()[dead_idx].sum(-1)
        idx = scores.topk(min(k_aux, dead_idx.numel()), dim=-1, sorted=False).indices
        return torch.zeros_like(f_dead).scatter(-1, idx, f_dead.gather(-1, idx))

    def aux_error(
        self, residual: torch.Tensor, f: torch.Tensor, dead: torch.Tensor | None, k_aux: int, loss: str
    ) -> torch.Tensor:
        """AuxK (Gao et al. 2024): the top-``k_aux`` dead latents reconstruct the detached residual
        ``[batch, n_models, d_model]`` with the decoder and no bias; returns their error normalised by the
        error of predicting the residual's mean (both under ``loss``). 0 with no dead latent."""
        # One host sync; healthy runs skip all the work below.
        dead_idx = dead.nonzero().squeeze(1) if dead is not None else f.new_zeros(0, dtype=torch.long)
        if dead_idx.numel() == 0:
            return residual.new_zeros(())
        aux_codes = self.aux_topk(f, dead_idx, k_aux)
        e_hat = (aux_codes @ self.W_dec[dead_idx].reshape(dead_idx.numel(), -1)).view_as(residual)
        baseline = token_loss(residual - residual.mean(0), loss).mean().clamp_min(1e-12)
        return token_loss(residual - e_hat, loss).mean() / baseline

    # ----------------------------------------------------------------------------------- folding / io
    def fold(self) -> CrossCoder:
        """A copy with the per-model scales folded into the weights (raw activations in and out)."""
        out = copy.deepcopy(self)
        if self.folded:
            return out
        s = self.scales.to(self.W_dec.dtype)
        with torch.no_grad():
            out.W_enc.mul_(s[:, None, None])
            out.W_dec.div_(s[None, :, None])
            out.b_dec.div_(s[:, None])
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
            "threshold": float(self.threshold),
            "folded": True,
            "encode": "f = relu(sum_m x_m @ W_enc[m] + b_enc); keep f where f * sum_m(||W_dec[:, m]|| * scales[m]) > threshold",
            "decode": "x_hat[m] = f @ W_dec[:, m] + b_dec[m]",
            "metadata": self.metadata,
        }

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (always folded: raw activations in and out)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        folded = self.fold()
        tensors = {name: t.detach().contiguous().cpu() for name, t in folded.state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        (directory / CONFIG_NAME).write_text(json.dumps(folded.config(), indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> CrossCoder:
        """Load a saved crosscoder; a non-existent local path is tried as a Hugging Face hub repo id.

        Only JSON and safetensors are read: loading never unpickles code.
        """
        directory = _resolve(directory)
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
        model.load_state_dict(state, strict=True)
        return model.to(device).eval()

    def _check_input(self, x: torch.Tensor) -> None:
        want = (self.n_models, self.d_model)
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"CrossCoder expects a floating-point tensor [..., {want[0]}, {want[1]}], got {_describe(x)}")
        if x.dim() < 2 or tuple(x.shape[-2:]) != want:
            raise ValueError(f"CrossCoder expects activations [..., {want[0]}, {want[1]}], got shape {tuple(x.shape)}")


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


def _resolve(directory: str | Path) -> Path:
    path = Path(directory)
    if path.is_dir():
        return path
    if isinstance(directory, str) and directory.count("/") == 1 and not path.exists():
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(directory, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]))
    raise FileNotFoundError(f"no crosscoder at {directory!s}: expected a directory with {CONFIG_NAME} and {WEIGHTS_NAME}")
