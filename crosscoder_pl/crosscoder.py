"""The crosscoder: one sparse dictionary over paired activations of a base and a chat model, BatchTopK or L1.

Shapes (docs/method.md, "Shapes and notation"): ``x [..., 2, d_model]`` (index 0 = base, 1 = chat),
``W_enc [2, d_model, F]``, ``b_enc [F]``, ``W_dec [F, 2, d_model]``, ``b_dec [2, d_model]``.

Per-model normalisation: training runs on ``(x_m - means[m]) * scales[m]``: centred, so that the large constant
part of a residual stream (over 90% of a Gemma token's norm) does not move every latent's pre-activation alike, and
scaled, so that both models weigh the same in the loss. While training (``folded=False``) the parameters live in that
normalised space and ``encode``/``decode`` convert from/to raw activations. ``fold()`` moves the means and scales
into the weights and biases, so a saved crosscoder takes and returns raw activations with no extra step;
``decoder_norms()`` always answers in the normalised space, where comparing a latent's two decoder norms is
meaningful.

Here: the parameters, encoding and decoding, folding, saving and loading. The training step (``step``, its sparse
and dense variants, AuxK) is in `crosscoder_pl.step`; a hub id given to ``from_pretrained`` is downloaded by
`crosscoder_pl.hub_download`.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from crosscoder_pl.files import write_whole
from crosscoder_pl.hub_download import from_hub
from crosscoder_pl.names import MODELS
from crosscoder_pl.step import SPARSITIES, StepOutput, training_step

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Present while a directory is being written (crosscoder_pl.artifact); removed last. Readers refuse it.
INCOMPLETE = "INCOMPLETE"
# config.json's "architecture" per sparsity (step.SPARSITIES).
ARCHITECTURES = {"batchtopk": "BatchTopKCrossCoder", "l1": "L1CrossCoder"}


class CrossCoder(nn.Module):
    """BatchTopK crosscoder (Bussmann et al. 2024; crosscoder form of Minder et al. 2025), or the L1 crosscoder of
    Lindsey et al. 2024 (``sparsity="l1"``: codes are the ReLU pre-activations, all of them, in training and at
    inference; sparsity comes from the loss's penalty, `crosscoder_pl.step.l1_penalty`).

    Args:
        d_model: width of each model's residual stream.
        n_latents: dictionary size F.
        k: active latents per token on average (BatchTopK keeps ``k * batch`` entries per batch); None for L1.
        n_models: number of activation sources; 2 = (base, chat).
        dec_init_norm: norm of every decoder vector at init (encoder starts as the decoder transposed).
        scales: per-model normalisation scalars ``[n_models]``; ones when not given.
        means: per-model activation means ``[n_models, d_model]`` in raw units, subtracted before the encoder and
            added back after the decoder; zeros (no centring) when not given. A folded crosscoder keeps them as
            the record of what its biases hold (the reference layout's ``activation_mean``).
        threshold: inference threshold on the selection score; negative means "not calibrated yet".
        folded: whether ``scales`` are already folded into the weights (true for saved crosscoders).
        metadata: free-form JSON-able facts saved in ``config.json`` (model ids, layer, recipe).
        sparsity: ``"batchtopk"`` or ``"l1"`` (`crosscoder_pl.step.SPARSITIES`).
    """

    def __init__(
        self,
        d_model: int,
        n_latents: int,
        k: int | None,
        n_models: int = 2,
        dec_init_norm: float = 0.08,
        scales: torch.Tensor | list[float] | None = None,
        means: torch.Tensor | list[list[float]] | None = None,
        threshold: float = -1.0,
        folded: bool = False,
        metadata: dict[str, Any] | None = None,
        sparsity: str = "batchtopk",
    ) -> None:
        super().__init__()
        _check_sizes(d_model, n_latents, k, n_models, sparsity)
        self.d_model, self.n_latents, self.k, self.n_models = d_model, n_latents, k, n_models
        self.sparsity = sparsity
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

    def threshold_codes(self, f: torch.Tensor) -> torch.Tensor:
        """Inference encoding: keep every entry whose score exceeds ``threshold``; ``[..., F]``."""
        return f * (self.scores(f) > self.threshold)

    def encode(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Sparse latents ``[..., F]`` of raw activations ``x [..., 2, d_model]``.

        Training mode: BatchTopK over all leading dimensions with ``k`` (default ``self.k``).
        Eval mode: the learned threshold, so one token encodes alone. Before the threshold is
        calibrated, eval mode falls back to BatchTopK and warns once. An L1 crosscoder: the ReLU pre-activations
        in either mode (``k`` is not used).
        """
        f = self.pre_acts(x)
        if self.sparsity == "l1":
            return f
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

    @property
    def encodes_alone(self) -> bool:
        """Whether eval-mode ``encode`` codes each token alone, the same in any batch (what token-by-token
        examples and the online app need): an L1 crosscoder always, BatchTopK once its threshold is calibrated."""
        return self.sparsity == "l1" or self.threshold_calibrated

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
    def step(self, x: torch.Tensor, k: int, dead: torch.Tensor | None = None, **options: Any) -> StepOutput:
        """One training step's loss and everything reported about it (docs/method.md, "Loss"), from raw activations
        ``x [batch, n_models, d_model]`` with BatchTopK's ``k``: `crosscoder_pl.step.training_step`, where the
        keyword ``options`` are documented (``loss``, ``aux_coef``, ``k_aux``, ``impl``: the sparse or the dense
        step, ``reducer``: under DDP)."""
        return training_step(self, x, k, dead, **options)

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
        encode = "f = relu(sum_m x_m @ W_enc[m] + b_enc)"
        if self.sparsity == "batchtopk":
            encode += "; keep f where f * sum_m(||W_dec[:, m]|| * scales[m]) > threshold"
        return {
            "architecture": ARCHITECTURES[self.sparsity],
            "sparsity": self.sparsity,
            "d_model": self.d_model,
            "n_latents": self.n_latents,
            "k": self.k,
            "n_models": self.n_models,
            "model_order": list(MODELS[: self.n_models]),
            "scales": [float(s) for s in self.scales],
            "centred": bool(self.means.any()),
            "threshold": float(self.threshold),
            "folded": True,
            "encode": encode,
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
        sparsity = {name: key for key, name in ARCHITECTURES.items()}.get(config.get("architecture"))
        if sparsity is None:
            raise ValueError(f"{directory / CONFIG_NAME}: architecture {config.get('architecture')!r} is not one of "
                             f"{sorted(ARCHITECTURES.values())}")
        model = cls(
            d_model=config["d_model"],
            n_latents=config["n_latents"],
            k=config["k"],
            n_models=config["n_models"],
            scales=config["scales"],
            folded=True,
            metadata=config.get("metadata"),
            sparsity=sparsity,
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


def _check_sizes(d_model: int, n_latents: int, k: int | None, n_models: int, sparsity: str) -> None:
    if sparsity not in SPARSITIES:
        raise ValueError(f"sparsity={sparsity!r} is not one of {SPARSITIES}")
    if sparsity == "l1" and k is not None:
        raise ValueError(f"k={k!r}: an L1 crosscoder keeps every positive code; pass k=None")
    sizes = (("d_model", d_model), ("n_latents", n_latents), ("n_models", n_models))
    for name, value in (*sizes, *((("k", k),) if sparsity == "batchtopk" else ())):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if k is not None and k > n_latents:
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
        return from_hub(directory, [CONFIG_NAME, WEIGHTS_NAME])
    aside = sorted(path.parent.glob(f".{path.name}.replaced-*"))
    hint = f"; a complete copy set aside by an interrupted rewrite is at {aside[-1]}: rename it to {path}" if aside else ""
    raise FileNotFoundError(f"no crosscoder at {directory!s}: expected a directory with {CONFIG_NAME} and {WEIGHTS_NAME}{hint}")

