"""BatchTopK crosscoders of ``dictionary_learning`` / ``crosscoder_learning`` (Minder et al. 2025), in and out.

Their layout (``BatchTopKCrossCoder`` of science-of-finetuning/dictionary_learning, read for this module):

- weights: ``encoder.weight [L, D, F]``, ``encoder.bias [F]``, ``decoder.weight [L, F, D]``, ``decoder.bias [L, D]``,
  buffers ``k`` (int), ``threshold`` (scalar; ``[L]`` for the decoupled variant), ``code_normalization_id``
  (1 CROSSCODER, 2 SAE, 3 MIXED, 4 NONE, 5 DECOUPLED) and the activation normaliser's ``target_rms``,
  ``activation_mean [L, D]``, ``activation_std [L, D]``, ``activation_global_scale [L]`` (NaN mean/std: none);
- files: ``config.json`` + ``model.safetensors`` (huggingface_hub's ``PyTorchModelHubMixin``: the constructor's
  arguments ``activation_dim``, ``dict_size``, ``num_layers``, ``k``, ``code_normalization``, ...), or a training
  directory with ``config.json`` (``{"trainer": {...}}``) and ``model_final.pt`` / ``checkpoint_<step>.pt``
  (``torch.save`` of the state dict).

Their forward, with ``g = activation_global_scale`` and ``mu = activation_mean`` (when the normaliser is on):
``x'_l = (x_l - mu_l) * g_l``; ``f = relu(sum_l x'_l @ W_enc[l] + b_enc)``; with the CROSSCODER code normalisation
``w_j = sum_l ||W_dec[l, j]||`` the threshold keeps ``f_j`` where ``f_j * w_j > threshold`` (strictly);
``x_hat_l = (f @ W_dec[l] + b_dec[l]) / (g_l + 1e-8) + mu_l``. That is this project's crosscoder with the
normaliser folded into the weights (`load_dictionary_learning`) and per-model scales ``g_l + 1e-8``, which keep
the decoder norms, hence the threshold's scores and Δnorm, those of their normalised space. Their
``activation_mean`` is our ``means`` (folded into the biases, kept as the record of what they hold), both ways.

crosscoder_learning (science-of-finetuning/crosscoder_learning) writes the same weights without the normaliser,
names the layer count ``num_encoder_layers`` (and ``encoder_layers_indices``) in ``config.json``, may store the
decoder as one ``decoder.layers.<l>.weight [F, D]`` per layer (``decoder_type="embedding_bag"``), and falls back
to BatchTopK while the threshold is negative, where dictionary_learning keeps every positive ``f``: both are read
as their library means them.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from crosscoder_pl.crosscoder import CrossCoder, _resolve
from crosscoder_pl.files import write_whole

CONFIG_NAME = "config.json"
HUB_WEIGHTS = "model.safetensors"
TRAINING_WEIGHTS = ("model_final.pt", "ae.pt")
METADATA_NAME = "crosscoder_pl.json"  # our metadata next to an export; their loaders ignore the file
CODE_NORMALIZATIONS = {1: "CROSSCODER", 2: "SAE", 3: "MIXED", 4: "NONE", 5: "DECOUPLED"}
SUPPORTED = "CROSSCODER"
EPS = 1e-8  # their denormaliser divides by (activation_global_scale + 1e-8)
LAYOUTS = ("hub", "training")


def load_dictionary_learning(path: str | Path, dtype: torch.dtype = torch.float32) -> CrossCoder:
    """A dictionary_learning ``BatchTopKCrossCoder`` as a folded, eval-mode `CrossCoder` with the same outputs.

    Args:
        path: their directory (``config.json`` + ``model.safetensors``, or a training directory with
            ``model_final.pt`` / ``checkpoint_<step>.pt``), one weights file, or a hub id (``owner/name``).
        dtype: of the returned weights; the translation itself runs in float64.
    Returns:
        a `CrossCoder` whose ``encode`` equals their ``encode(x, use_threshold=True)`` and whose ``decode`` equals
        their ``decode``: raw activations ``[..., L, D]`` in and out.
    Raises:
        ValueError naming the variant for what has no exact equivalent here (SAE, MIXED, NONE or DECOUPLED code
        normalisation, an encoder reading a subset of the layers).
    """
    weights, config = _find_files(path)
    cc = from_state_dict(_read_state(weights), config, source=str(path), dtype=dtype)
    ours = weights.parent / METADATA_NAME  # written by save_dictionary_learning: model ids, layer, recipe
    if ours.is_file():
        cc.metadata = {**_read_json(ours), "imported_from": cc.metadata["imported_from"]}
    return cc


def from_state_dict(
    state: dict[str, torch.Tensor], config: dict[str, Any] | None = None, source: str = "state dict",
    dtype: torch.dtype = torch.float32,
) -> CrossCoder:
    """`load_dictionary_learning` from their state dict and (optional) ``config.json`` contents."""
    config = dict(config or {})
    # "_orig_mod.": saved while torch.compiled; crosscoder_learning may keep its config ("_hub_mixin_config") inside.
    state = {key.removeprefix("_orig_mod."): value for key, value in state.items() if isinstance(value, torch.Tensor)}
    layers = sorted(k for k in state if re.fullmatch(r"decoder\.layers\.\d+\.weight", k))
    if "decoder.weight" not in state and layers:  # crosscoder_learning's decoder_type="embedding_bag": [F, D] per layer
        state["decoder.weight"] = torch.stack([state[f"decoder.layers.{i}.weight"] for i in range(len(layers))])
    missing = [k for k in ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias") if k not in state]
    if missing:
        raise ValueError(f"{source} is not a dictionary_learning crosscoder: {', '.join(missing)} missing from its weights")
    W_enc, b_enc = state["encoder.weight"].double(), state["encoder.bias"].double()
    W_dec, b_dec = state["decoder.weight"].double(), state["decoder.bias"].double()
    n_layers, d_model, n_latents = W_enc.shape
    if W_dec.shape != (n_layers, n_latents, d_model) or b_enc.shape != (n_latents,) or b_dec.shape != (n_layers, d_model):
        raise ValueError(
            f"{source}: shapes encoder.weight {tuple(W_enc.shape)}, encoder.bias {tuple(b_enc.shape)}, decoder.weight "
            f"{tuple(W_dec.shape)}, decoder.bias {tuple(b_dec.shape)} are not a crosscoder whose encoder and decoder "
            "read the same layers ([L, D, F], [F], [L, F, D], [L, D]); num_decoder_layers != num_layers is not supported"
        )
    _check_variant(state, config, n_layers, source)
    k = int(state["k"]) if "k" in state else int(_trainer(config).get("k", config.get("k", 0)))
    if k < 1:
        raise ValueError(f"{source}: no k in its weights (buffer 'k') or config.json; it is not a BatchTopK crosscoder")

    scales = torch.ones(n_layers, dtype=torch.float64)
    mean, gain = _normaliser(state, n_layers, d_model)
    if gain is not None:
        # Fold x' = (x - mean) * gain into the encoder and x = x' / (gain + 1e-8) + mean into the decoder.
        b_enc = b_enc - torch.einsum("ld,ldf->f", mean * gain[:, None], W_enc)
        W_enc = W_enc * gain[:, None, None]
        scales = gain + EPS
        W_dec = W_dec / scales[:, None, None]
        b_dec = b_dec / scales[:, None] + mean

    threshold = float(state["threshold"]) if "threshold" in state else -1.0
    if threshold < 0 and _is_crosscoder_learning(config):
        # crosscoder_learning's encode falls back to BatchTopK while the threshold is negative: as ours does.
        warnings.warn(f"{source}: threshold {threshold} was never calibrated; eval-mode encode uses BatchTopK with "
                      f"k={k}, as crosscoder_learning's does", stacklevel=2)
    elif threshold < 0:
        # Theirs keeps every f with f * w > threshold < 0, i.e. every positive f; ours reads a negative threshold
        # as "not calibrated" (BatchTopK). 0 keeps the same entries (all f > 0 with a non-zero decoder).
        warnings.warn(f"{source}: threshold {threshold} was never calibrated; imported as 0 (every positive "
                      "pre-activation is kept, as their encode does)", stacklevel=2)
        threshold = 0.0
    metadata = _metadata(config, source)
    cc = CrossCoder(d_model, n_latents, min(k, n_latents), n_models=n_layers, scales=scales.float(),
                    threshold=threshold, folded=True, metadata=metadata).to(dtype)
    with torch.no_grad():  # copied after the cast: a float64 import keeps the float64 translation
        cc.scales.copy_(scales)
        cc.means.copy_(mean)
        cc.W_enc.copy_(W_enc)
        cc.b_enc.copy_(b_enc)
        cc.W_dec.copy_(W_dec.permute(1, 0, 2))
        cc.b_dec.copy_(b_dec)
    return cc.eval()


def save_dictionary_learning(crosscoder: CrossCoder, directory: str | Path, layout: str = "hub") -> Path:
    """Write ``crosscoder`` in dictionary_learning's layout, loadable by their ``BatchTopKCrossCoder.from_pretrained``.

    ``layout="hub"``: ``config.json`` (their constructor's arguments) + ``model.safetensors`` (``from_pretrained(dir,
    from_hub=True)``, or ``push_to_hub``); ``"training"``: ``config.json`` ``{"trainer": ...}`` + ``model_final.pt``
    (``from_pretrained(dir / "model_final.pt")``). Our per-model means and scales become their normaliser
    (``activation_mean`` = our means, global scale = our scale), so their decoder norms are ours in the normalised
    space. Also writes ``crosscoder_pl.json``
    (model ids, layer, recipe), which `load_dictionary_learning` reads back and their code ignores.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
    cc = crosscoder.fold()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = to_state_dict(cc)
    if layout == "hub":
        write_whole(directory / HUB_WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
        config = {"activation_dim": cc.d_model, "dict_size": cc.n_latents, "num_layers": cc.n_models, "k": cc.k,
                  "code_normalization": SUPPORTED, "target_rms": 1.0}
    else:
        write_whole(directory / TRAINING_WEIGHTS[0], lambda tmp: torch.save(state, tmp))
        config = {"trainer": {
            "trainer_class": "BatchTopKCrossCoderTrainer", "dict_class": "BatchTopKCrossCoder",
            "activation_dim": cc.d_model, "dict_size": cc.n_latents, "k": cc.k, "code_normalization": SUPPORTED,
            "layer": cc.metadata.get("layer"), "lm_name": cc.metadata.get("base_model"), "target_rms": 1.0,
        }}
    write_whole(directory / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    write_whole(directory / METADATA_NAME, lambda tmp: tmp.write_text(json.dumps(cc.metadata, indent=2, default=str) + "\n"))
    return directory


def to_state_dict(cc: CrossCoder) -> dict[str, torch.Tensor]:
    """Their state dict of a folded crosscoder (float32 tensors as they keep them, int buffers as theirs)."""
    if not cc.folded:
        raise ValueError("to_state_dict needs a folded crosscoder (CrossCoder.fold())")
    if not cc.threshold_calibrated:
        warnings.warn("the crosscoder's threshold is not calibrated: exported as -1, which their encode reads as "
                      "'keep every positive pre-activation'", stacklevel=2)
    gain = cc.scales.double()
    scales = gain + EPS
    mean = cc.means.detach().double()  # [L, D]: unfolded from the biases into their normaliser
    W_enc = cc.W_enc.detach().double() / gain[:, None, None]
    b_enc = cc.b_enc.detach().double() + torch.einsum("ld,ldf->f", mean, cc.W_enc.detach().double())
    W_dec = cc.W_dec.detach().double().permute(1, 0, 2) * scales[:, None, None]
    b_dec = (cc.b_dec.detach().double() - mean) * scales[:, None]
    # Their normaliser recomputes the gain from the std only when built with one; the saved buffer wins on load.
    # A std whose total variance gives that gain keeps the two consistent.
    std = ((1.0 / gain**2 - EPS).clamp_min(0) / cc.d_model).sqrt()[:, None].expand(cc.n_models, cc.d_model)
    tensors = {
        "target_rms": torch.tensor(1.0),
        "activation_mean": mean.float(),
        "activation_std": std.float(),
        "activation_global_scale": gain.float(),
        "encoder.weight": W_enc.float(),
        "encoder.bias": b_enc.float(),
        "decoder.weight": W_dec.float(),
        "decoder.bias": b_dec.float(),
        "code_normalization_id": torch.tensor(1),
        "k": torch.tensor(cc.k, dtype=torch.int32),
        "threshold": torch.tensor(float(cc.threshold) if cc.threshold_calibrated else -1.0),
    }
    return {name: t.contiguous().cpu() for name, t in tensors.items()}


def _find_files(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(weights file, config.json contents or {}) of a directory, a weights file or a hub id."""
    given = Path(path)
    if given.is_file():
        config_path = given.parent / CONFIG_NAME
        return given, _read_json(config_path) if config_path.is_file() else {}
    directory = given if given.is_dir() else _resolve(path)  # a hub id: config.json + model.safetensors
    config = _read_json(directory / CONFIG_NAME) if (directory / CONFIG_NAME).is_file() else {}
    candidates = [directory / HUB_WEIGHTS, *(directory / name for name in TRAINING_WEIGHTS)]
    steps = sorted(directory.glob("checkpoint_*.pt"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    for weights in [*candidates, *reversed(steps)]:
        if weights.is_file():
            return weights, config
    raise FileNotFoundError(
        f"no dictionary_learning weights in {directory}: expected {HUB_WEIGHTS} (save_pretrained / the hub), "
        f"{' or '.join(TRAINING_WEIGHTS)} or checkpoint_<step>.pt (trainSAE's save_dir)"
    )


def _read_state(weights: Path) -> dict[str, torch.Tensor]:
    if weights.suffix == ".safetensors":
        return load_file(str(weights))
    # torch's restricted unpickler: tensors and plain values only, never code.
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{weights} holds a {type(state).__name__}, not the state dict trainSAE saves")
    return state


def _read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}


def _trainer(config: dict[str, Any]) -> dict[str, Any]:
    trainer = config.get("trainer")
    return trainer if isinstance(trainer, dict) else {}


def _check_variant(state: dict[str, torch.Tensor], config: dict[str, Any], n_layers: int, source: str) -> None:
    """Refuse, by name, what has no exact equivalent here: code normalisations other than CROSSCODER, an encoder
    over a subset of the layers, a per-layer (decoupled) threshold."""
    if "code_normalization_id" in state:
        code = CODE_NORMALIZATIONS.get(int(state["code_normalization_id"]), f"id {int(state['code_normalization_id'])}")
    else:  # as their loader: the config's name, else CROSSCODER (older checkpoints have no id)
        code = str(config.get("code_normalization", _trainer(config).get("code_normalization", SUPPORTED))).upper()
    if code != SUPPORTED:
        raise ValueError(
            f"{source} uses code normalisation {code}: only {SUPPORTED} (threshold on f * sum_l ||W_dec[l, j]||) has an "
            "exact equivalent in crosscoder_pl, whose BatchTopK score is f times the sum of the per-model decoder norms. "
            "SAE and MIXED weigh the latents differently, NONE does not weigh them, DECOUPLED gives one code per layer"
        )
    threshold = state.get("threshold")
    if threshold is not None and threshold.numel() != 1:
        raise ValueError(f"{source} has one threshold per layer {tuple(threshold.shape)} (the DECOUPLED variant): not supported")
    layers = config.get("encoder_layers", config.get("encoder_layers_indices",
                                                     _trainer(config).get("dict_class_kwargs", {}).get("encoder_layers")))
    if isinstance(layers, str):  # trainSAE writes dict_class_kwargs as strings
        layers = json.loads(layers) if layers not in ("None", "null") else None
    if layers is not None and list(layers) != list(range(n_layers)):
        raise ValueError(f"{source} encodes from layers {layers} only (encoder_layers): crosscoder_pl's encoder reads "
                         f"all {n_layers} inputs; not supported")


def _is_crosscoder_learning(config: dict[str, Any]) -> bool:
    """crosscoder_learning's configs name the layer count ``num_encoder_layers`` (dictionary_learning: ``num_layers``)."""
    return "num_encoder_layers" in config


def _normaliser(state: dict[str, torch.Tensor], n_layers: int, d_model: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(``activation_mean [L, D]``, ``activation_global_scale [L]``) in float64, or (zeros, None) when the
    checkpoint has no normaliser (absent, or NaN as their constructor leaves it)."""
    mean, std = state.get("activation_mean"), state.get("activation_std")
    if mean is None or std is None or bool(torch.isnan(mean).any()) or bool(torch.isnan(std).any()):
        return torch.zeros(n_layers, d_model, dtype=torch.float64), None
    mean = mean.double().reshape(n_layers, d_model)
    if "activation_global_scale" in state:
        gain = state["activation_global_scale"].double().reshape(n_layers)
    else:  # their formula: target_rms / sqrt(total variance + 1e-8), per layer
        target = float(state.get("target_rms", torch.tensor(1.0)))
        gain = target / torch.sqrt(std.double().pow(2).sum(-1) + EPS)
    if not bool(torch.all(torch.isfinite(gain) & (gain > 0))):
        raise ValueError(f"activation_global_scale {gain.tolist()} is not positive and finite: the checkpoint is damaged")
    return mean, gain


def _metadata(config: dict[str, Any], source: str) -> dict[str, Any]:
    """What the card can say about an imported crosscoder: their model name and layer when recorded."""
    trainer = _trainer(config)
    metadata: dict[str, Any] = {
        "imported_from": f"dictionary_learning BatchTopKCrossCoder ({SUPPORTED} code normalisation) at {source}"}
    if trainer.get("layer") is not None:
        metadata["layer"] = trainer["layer"]
    if trainer.get("lm_name"):
        metadata["lm_name"] = trainer["lm_name"]
    if math.isfinite(float(trainer.get("k_initial", math.nan))):
        metadata["k_start"] = int(trainer["k_initial"])
    return metadata
