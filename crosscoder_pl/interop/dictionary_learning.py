"""Crosscoders of ``dictionary_learning`` / ``crosscoder_learning`` (Minder et al. 2025), in and out: their
``BatchTopKCrossCoder`` and their plain ``CrossCoder`` (the L1 crosscoder).

Their layout (``dictionary.py`` and ``trainers/crosscoder.py`` of science-of-finetuning/dictionary_learning, read
for this module):

- weights of both classes: ``encoder.weight [L, D, F]``, ``encoder.bias [F]``, ``decoder.weight [L, F, D]``,
  ``decoder.bias [L, D]``, the buffer ``code_normalization_id`` (1 CROSSCODER, 2 SAE, 3 MIXED, 4 NONE,
  5 DECOUPLED) and the activation normaliser's ``target_rms``, ``activation_mean [L, D]``, ``activation_std [L, D]``,
  ``activation_global_scale [L]`` (NaN mean/std: none). ``BatchTopKCrossCoder`` adds the buffers ``k`` (int) and
  ``threshold`` (scalar; ``[L]`` for the decoupled variant), and has had both since it was written; the plain
  ``CrossCoder`` has neither;
- files: ``config.json`` + ``model.safetensors`` (huggingface_hub's ``PyTorchModelHubMixin``: the constructor's
  arguments ``activation_dim``, ``dict_size``, ``num_layers``, ``code_normalization``, ..., with ``k`` for a
  ``BatchTopKCrossCoder`` only; crosscoder_learning's ``save_pretrained`` adds ``dict_class``), or a training
  directory with ``config.json`` (``{"trainer": {"dict_class": ..., "trainer_class": ..., ...}}``) and
  ``model_final.pt`` / ``checkpoint_<step>.pt`` (``torch.save`` of the state dict; every key after
  ``_orig_mod.`` when saved while torch.compiled). The paper's hub repos carry that trainer config as
  ``trainer_config.json`` next to the mixin's files.

Their forward, with ``g = activation_global_scale`` and ``mu = activation_mean`` (when the normaliser is on):
``x'_l = (x_l - mu_l) * g_l``; ``f = relu(sum_l x'_l @ W_enc[l] + b_enc)``;
``x_hat_l = (f @ W_dec[l] + b_dec[l]) / (g_l + 1e-8) + mu_l``. The plain ``CrossCoder``'s codes are every ``f``
(sparse through the L1 penalty it was trained with): crosscoder_pl's ``sparsity="l1"``. ``BatchTopKCrossCoder``
then keeps ``f_j`` where ``f_j * w_j > threshold`` (strictly), ``w_j = sum_l ||W_dec[l, j]||`` with the CROSSCODER
code normalisation. Either is this project's crosscoder with the normaliser folded into the weights
(`load_dictionary_learning`) and per-model scales ``g_l + 1e-8``, which keep the decoder norms, hence the
threshold's scores, the L1 penalty's weights and Δnorm, those of their normalised space. Their
``activation_mean`` is our ``means`` (folded into the biases, kept as the record of what they hold), both ways.

Which class wrote a checkpoint (`sparsity_of`): the weights' ``k`` / ``threshold`` buffers and a ``k`` in the
config say BatchTopK; a class name (``dict_class`` at the top of ``config.json`` or in its ``trainer``) or a trainer
name (``trainer.trainer_class``: ``CrossCoderTrainer`` or ``BatchTopKCrossCoderTrainer``) says either. When these
disagree the checkpoint is refused. When none is there, a ``config.json`` of constructor arguments
(``activation_dim``, ``dict_size``) without ``k`` is the plain ``CrossCoder``'s (the mixin records ``k`` for every
``BatchTopKCrossCoder``). Weights without ``k`` and nothing else to go by are refused: ``sparsity="l1"`` or
``"batchtopk"`` says which.

Code normalisation: CROSSCODER only, for both classes. It is BatchTopK's threshold score. The plain
``CrossCoder``'s ``encode``/``decode`` do not read it (it scales only their ``get_activations`` and
``forward(output_features=True)``, and weighs the L1 penalty); the others are refused all the same, because
crosscoder_pl's L1 crosscoder is the CROSSCODER penalty ``sum_j f_j sum_l ||W_dec[l, j]||`` (what its card and
recipe say) and an export could not give the other value back.

crosscoder_learning (science-of-finetuning/crosscoder_learning): its main branch is dictionary_learning plus
``dict_class`` in the hub ``config.json``. The plain ``CrossCoder`` of its 2024 ``hf_hub`` branch, the class of the
paper's public L1 Gemma-2-2B crosscoder, has only the four weights (no normaliser, no ``code_normalization_id``:
CROSSCODER, as their loader assumes) and a config of ``activation_dim``, ``dict_size``, ``num_layers``, ... Its
``feat/benchmark-emb-sparsity`` branch names the layer count ``num_encoder_layers`` (and
``encoder_layers_indices``), may store the decoder as one ``decoder.layers.<l>.weight [F, D]`` per layer
(``decoder_type="embedding_bag"``), and its BatchTopK falls back to BatchTopK while the threshold is negative,
where dictionary_learning keeps every positive ``f``: all are read as their library means them.
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

from crosscoder_pl.crosscoder import CrossCoder
from crosscoder_pl.files import write_whole
from crosscoder_pl.hub_download import from_hub

CONFIG_NAME = "config.json"
TRAINER_CONFIG = "trainer_config.json"  # the paper's hub repos: the training directory's config.json
HUB_WEIGHTS = "model.safetensors"
TRAINING_WEIGHTS = ("model_final.pt", "ae.pt")
METADATA_NAME = "crosscoder_pl.json"  # our metadata next to an export; their loaders ignore the file
CODE_NORMALIZATIONS = {1: "CROSSCODER", 2: "SAE", 3: "MIXED", 4: "NONE", 5: "DECOUPLED"}
SUPPORTED = "CROSSCODER"
EPS = 1e-8  # their denormaliser divides by (activation_global_scale + 1e-8)
LAYOUTS = ("hub", "training")
# Their class and trainer names, and our sparsity for each.
CLASSES = {"CrossCoder": "l1", "BatchTopKCrossCoder": "batchtopk"}
TRAINERS = {"CrossCoderTrainer": "l1", "BatchTopKCrossCoderTrainer": "batchtopk"}
THEIR_CLASS = {sparsity: name for name, sparsity in CLASSES.items()}
THEIR_TRAINER = {sparsity: name for name, sparsity in TRAINERS.items()}
WEIGHTS = ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias")


def load_dictionary_learning(
    path: str | Path, dtype: torch.dtype = torch.float32, sparsity: str | None = None
) -> CrossCoder:
    """Their ``BatchTopKCrossCoder`` or plain (L1) ``CrossCoder`` as a folded, eval-mode `CrossCoder` with the same
    outputs.

    Args:
        path: their directory (``config.json`` + ``model.safetensors``, or a training directory with
            ``model_final.pt`` / ``checkpoint_<step>.pt``), one weights file, or a hub id (``owner/name``).
        dtype: of the returned weights; the translation itself runs in float64.
        sparsity: ``"l1"`` (their ``CrossCoder``) or ``"batchtopk"``, for a checkpoint that does not say which
            (`sparsity_of`); None: read from the checkpoint.
    Returns:
        a `CrossCoder` (``sparsity="batchtopk"`` or ``"l1"``) whose ``encode`` equals their ``encode(x)`` (threshold
        mode for BatchTopK) and whose ``decode`` equals their ``decode``: raw activations ``[..., L, D]`` in and out.
    Raises:
        ValueError naming the variant for what has no exact equivalent here (SAE, MIXED, NONE or DECOUPLED code
        normalisation, an encoder reading a subset of the layers, a latent processor), and for a checkpoint whose
        class cannot be told or whose marks disagree.
    """
    weights, config = _find_files(path)
    cc = from_state_dict(_read_state(weights), config, source=str(path), dtype=dtype, sparsity=sparsity)
    ours = weights.parent / METADATA_NAME  # written by save_dictionary_learning: model ids, layer, recipe
    if ours.is_file():
        cc.metadata = {**_read_json(ours), "imported_from": cc.metadata["imported_from"]}
    return cc


def from_state_dict(
    state: dict[str, torch.Tensor], config: dict[str, Any] | None = None, source: str = "state dict",
    dtype: torch.dtype = torch.float32, sparsity: str | None = None,
) -> CrossCoder:
    """`load_dictionary_learning` from their state dict and (optional) ``config.json`` contents."""
    config = dict(config or {})
    state = _their_tensors(state)
    kind = sparsity_of(state, config, source, sparsity)
    n_layers, d_model, n_latents = _check_shapes(state, source)
    _check_variant(state, config, n_layers, source, kind)
    mean, gain = _normaliser(state, n_layers, d_model)
    weights, scales = _fold(state, mean, gain)
    metadata = _metadata(config, source, kind)
    if kind == "l1":
        cc = CrossCoder(d_model, n_latents, None, n_models=n_layers, scales=scales.float(), folded=True,
                        metadata=metadata, sparsity="l1")
    else:
        k, threshold = _batchtopk_settings(state, config, source)
        cc = CrossCoder(d_model, n_latents, min(k, n_latents), n_models=n_layers, scales=scales.float(),
                        threshold=threshold, folded=True, metadata=metadata)
    cc = cc.to(dtype)
    with torch.no_grad():  # copied after the cast: a float64 import keeps the float64 translation
        cc.scales.copy_(scales)
        cc.means.copy_(mean)
        for name, value in weights.items():
            getattr(cc, name).copy_(value)
    return cc.eval()


def sparsity_of(
    state: dict[str, torch.Tensor], config: dict[str, Any], source: str = "checkpoint", said: str | None = None
) -> str:
    """Which of their classes wrote ``state`` (keys without ``_orig_mod.``) and ``config``: ``"l1"`` (plain
    ``CrossCoder``) or ``"batchtopk"`` (``BatchTopKCrossCoder``). ``said``, the caller's word, is needed only where
    the checkpoint says nothing, and must agree with whatever it says."""
    if said is not None and said not in THEIR_CLASS:
        raise ValueError(f"sparsity={said!r} is not one of {sorted(THEIR_CLASS)}")
    signs = _signs(state, config, source)
    if said is not None:
        against = [what for what, kind in signs if kind != said]
        if against:
            raise ValueError(f"{source}: sparsity={said!r} ({THEIR_CLASS[said]}) was given, but {'; '.join(against)}")
        return said
    kinds = {kind for _, kind in signs}
    if len(kinds) > 1:
        told = "; ".join(f"{what} ({THEIR_CLASS[kind]})" for what, kind in signs)
        raise ValueError(f"{source} has the marks of both classes: {told}. Not loaded: one of them is wrong")
    if kinds:
        return kinds.pop()
    if "activation_dim" in config and "dict_size" in config and "k" not in config:
        return "l1"  # their PyTorchModelHubMixin records k among a BatchTopKCrossCoder's constructor arguments
    raise ValueError(
        f"{source}: cannot tell their plain CrossCoder (L1) from a BatchTopKCrossCoder. Looked at: the weights' "
        "buffers 'k' and 'threshold' (every BatchTopKCrossCoder has both; absent here), and config.json's "
        "dict_class, trainer.dict_class, trainer.trainer_class and k, and whether it holds the constructor's "
        f"arguments (activation_dim, dict_size; a BatchTopKCrossCoder's include k): {_what_config_said(config)}. "
        "Say which it is: load_dictionary_learning(path, sparsity='l1') or sparsity='batchtopk' "
        "(python analyze.py checkpoint=... sparsity=l1)"
    )


def save_dictionary_learning(crosscoder: CrossCoder, directory: str | Path, layout: str = "hub") -> Path:
    """Write ``crosscoder`` in dictionary_learning's layout, loadable by their ``from_pretrained``: a BatchTopK
    crosscoder as their ``BatchTopKCrossCoder``, an L1 one as their plain ``CrossCoder``.

    ``layout="hub"``: ``config.json`` (their constructor's arguments) + ``model.safetensors`` (``from_pretrained(dir,
    from_hub=True)``, or ``push_to_hub``); ``"training"``: ``config.json`` ``{"trainer": ...}`` + ``model_final.pt``
    (``from_pretrained(dir / "model_final.pt")``). Our per-model means and scales become their normaliser
    (``activation_mean`` = our means, global scale = our scale), so their decoder norms are ours in the normalised
    space. Also writes ``crosscoder_pl.json`` (model ids, layer, recipe), which `load_dictionary_learning` reads
    back and their code ignores.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
    cc = crosscoder.fold()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = to_state_dict(cc)
    if layout == "hub":
        write_whole(directory / HUB_WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
        config = _hub_config(cc)
    else:
        write_whole(directory / TRAINING_WEIGHTS[0], lambda tmp: torch.save(state, tmp))
        config = {"trainer": _trainer_config(cc)}
    write_whole(directory / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    write_whole(directory / METADATA_NAME, lambda tmp: tmp.write_text(json.dumps(cc.metadata, indent=2, default=str) + "\n"))
    return directory


def to_state_dict(cc: CrossCoder) -> dict[str, torch.Tensor]:
    """Their state dict of a folded crosscoder (float32 tensors as they keep them, int buffers as theirs): the
    buffers of their ``BatchTopKCrossCoder``, or of their plain ``CrossCoder`` (no ``k``, no ``threshold``: its
    ``load_state_dict`` is strict) for an L1 crosscoder."""
    if not cc.folded:
        raise ValueError("to_state_dict needs a folded crosscoder (CrossCoder.fold())")
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
    }
    if cc.sparsity == "batchtopk":
        tensors |= _batchtopk_buffers(cc)
    return {name: t.contiguous().cpu() for name, t in tensors.items()}


def _batchtopk_buffers(cc: CrossCoder) -> dict[str, torch.Tensor]:
    if not cc.threshold_calibrated:
        warnings.warn("the crosscoder's threshold is not calibrated: exported as -1, which their encode reads as "
                      "'keep every positive pre-activation'", stacklevel=3)
    threshold = float(cc.threshold) if cc.threshold_calibrated else -1.0
    return {"k": torch.tensor(cc.k, dtype=torch.int32), "threshold": torch.tensor(threshold)}


def _hub_config(cc: CrossCoder) -> dict[str, Any]:
    """The constructor arguments their ``PyTorchModelHubMixin`` builds the class from (buffers come from the
    weights). ``dict_class``: as crosscoder_learning writes it; dictionary_learning's plain ``CrossCoder`` takes no
    ``**kwargs``, so the mixin leaves it out of the call."""
    config = {"activation_dim": cc.d_model, "dict_size": cc.n_latents, "num_layers": cc.n_models}
    if cc.sparsity == "batchtopk":
        return {**config, "k": cc.k, "code_normalization": SUPPORTED, "target_rms": 1.0}
    return {**config, "code_normalization": SUPPORTED, "target_rms": 1.0, "dict_class": THEIR_CLASS["l1"]}


def _trainer_config(cc: CrossCoder) -> dict[str, Any]:
    """``trainer`` of the ``config.json`` their ``trainSAE`` writes next to ``model_final.pt``."""
    trainer: dict[str, Any] = {
        "trainer_class": THEIR_TRAINER[cc.sparsity], "dict_class": THEIR_CLASS[cc.sparsity],
        "activation_dim": cc.d_model, "dict_size": cc.n_latents, "code_normalization": SUPPORTED,
        "layer": cc.metadata.get("layer"), "lm_name": cc.metadata.get("base_model"), "target_rms": 1.0,
    }
    if cc.sparsity == "batchtopk":
        trainer["k"] = cc.k
    return trainer


def _find_files(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(weights file, config contents or {}) of a directory, a weights file or a hub id."""
    given = Path(path)
    if given.is_file():
        return given, _read_config(given.parent)
    directory = _directory(path)
    candidates = [directory / HUB_WEIGHTS, *(directory / name for name in TRAINING_WEIGHTS)]
    steps = sorted(directory.glob("checkpoint_*.pt"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    for weights in [*candidates, *reversed(steps)]:
        if weights.is_file():
            return weights, _read_config(directory)
    raise FileNotFoundError(
        f"no dictionary_learning weights in {directory}: expected {HUB_WEIGHTS} (save_pretrained / the hub), "
        f"{' or '.join(TRAINING_WEIGHTS)} or checkpoint_<step>.pt (trainSAE's save_dir)"
    )


def _directory(path: str | Path) -> Path:
    """A local directory, or a hub id's files (config.json, model.safetensors, trainer_config.json)."""
    given = Path(path)
    if given.is_dir():
        return given
    if isinstance(path, str) and path.count("/") == 1 and not given.exists():
        return from_hub(path, [CONFIG_NAME, HUB_WEIGHTS, TRAINER_CONFIG])
    raise FileNotFoundError(f"no dictionary_learning crosscoder at {path!s}: not a directory, a weights file or a "
                            "hub id (owner/name)")


def _read_config(directory: Path) -> dict[str, Any]:
    """``config.json``; with the trainer config of ``trainer_config.json`` (the paper's hub repos) when it has none."""
    config = _read_json(directory / CONFIG_NAME) if (directory / CONFIG_NAME).is_file() else {}
    if "trainer" not in config and (directory / TRAINER_CONFIG).is_file():
        config["trainer"] = _trainer(_read_json(directory / TRAINER_CONFIG))
    return config


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


def _their_tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Their tensors under their module's names: ``_orig_mod.`` (saved while torch.compiled) removed, anything
    else dropped (crosscoder_learning may keep its config, ``_hub_mixin_config``, inside), and a per-layer decoder
    (crosscoder_learning's ``decoder_type="embedding_bag"``, ``[F, D]`` per layer) stacked into ``decoder.weight``."""
    state = {key.removeprefix("_orig_mod."): value for key, value in state.items() if isinstance(value, torch.Tensor)}
    layers = [k for k in state if re.fullmatch(r"decoder\.layers\.\d+\.weight", k)]
    if "decoder.weight" not in state and layers:
        state["decoder.weight"] = torch.stack([state[f"decoder.layers.{i}.weight"] for i in range(len(layers))])
    return state


def _check_shapes(state: dict[str, torch.Tensor], source: str) -> tuple[int, int, int]:
    """(L, D, F) of a crosscoder whose encoder and decoder read the same layers."""
    missing = [k for k in WEIGHTS if k not in state]
    if missing:
        raise ValueError(f"{source} is not a dictionary_learning crosscoder: {', '.join(missing)} missing from its weights")
    W_enc, b_enc, W_dec, b_dec = (state[k] for k in WEIGHTS)
    shapes = ", ".join(f"{k} {tuple(state[k].shape)}" for k in WEIGHTS)
    if W_enc.dim() != 3:
        raise ValueError(f"{source}: shapes {shapes} are not a crosscoder's (encoder.weight [L, D, F])")
    n_layers, d_model, n_latents = W_enc.shape
    if W_dec.shape != (n_layers, n_latents, d_model) or b_enc.shape != (n_latents,) or b_dec.shape != (n_layers, d_model):
        raise ValueError(
            f"{source}: shapes {shapes} are not a crosscoder whose encoder and decoder read the same layers ([L, D, F], "
            "[F], [L, F, D], [L, D]); num_decoder_layers != num_layers is not supported"
        )
    return n_layers, d_model, n_latents


def _signs(state: dict[str, torch.Tensor], config: dict[str, Any], source: str) -> list[tuple[str, str]]:
    """What the checkpoint itself says of its class: (where, ``"l1"`` or ``"batchtopk"``) for each mark found."""
    trainer = _trainer(config)
    signs = [(f"its weights have the buffer {name!r}", "batchtopk") for name in ("k", "threshold") if name in state]
    for where, value in (("config.json's k", config.get("k")), ("its trainer config's k", trainer.get("k"))):
        if value is not None:
            signs.append((f"{where} is {value!r}", "batchtopk"))
    for where, value in (("config.json's dict_class", config.get("dict_class")),
                         ("its trainer config's dict_class", trainer.get("dict_class"))):
        if value is not None and value not in CLASSES:
            raise ValueError(f"{source}: {where} is {value!r}; only their {' and '.join(CLASSES)} are read")
        if value is not None:
            signs.append((f"{where} is {value!r}", CLASSES[value]))
    if trainer.get("trainer_class") in TRAINERS:
        signs.append((f"its trainer config's trainer_class is {trainer['trainer_class']!r}",
                      TRAINERS[trainer["trainer_class"]]))
    return signs


def _what_config_said(config: dict[str, Any]) -> str:
    if not config:
        return "there is no config.json (nor trainer_config.json) next to the weights"
    return f"its config has none of these (keys: {', '.join(sorted(config))})"


def _check_variant(
    state: dict[str, torch.Tensor], config: dict[str, Any], n_layers: int, source: str, kind: str
) -> None:
    """Refuse, by name, what has no exact equivalent here: code normalisations other than CROSSCODER, an encoder
    over a subset of the layers, a per-layer (decoupled) threshold, a latent processor."""
    if "code_normalization_id" in state:
        code = CODE_NORMALIZATIONS.get(int(state["code_normalization_id"]), f"id {int(state['code_normalization_id'])}")
    else:  # as their loader: the config's name, else CROSSCODER (older checkpoints have no id)
        code = str(config.get("code_normalization", _trainer(config).get("code_normalization", SUPPORTED))).upper()
    if code != SUPPORTED:
        raise ValueError(f"{source} uses code normalisation {code}: {_why_crosscoder_only(kind)}")
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
    if config.get("latent_processor") not in (None, "None", "null"):
        raise ValueError(f"{source} has a latent_processor ({config['latent_processor']!r}) between encode and decode: "
                         "it is code, not saved with the weights; not supported")


def _why_crosscoder_only(kind: str) -> str:
    if kind == "batchtopk":
        return (f"only {SUPPORTED} (threshold on f * sum_l ||W_dec[l, j]||) has an exact equivalent in crosscoder_pl, "
                "whose BatchTopK score is f times the sum of the per-model decoder norms. SAE and MIXED weigh the "
                "latents differently, NONE does not weigh them, DECOUPLED gives one code per layer")
    return (f"their plain CrossCoder's encode and decode do not read it, but it is the L1 penalty the crosscoder "
            f"was trained with (and the scale of their get_activations), and crosscoder_pl's L1 crosscoder is the "
            f"{SUPPORTED} one, sum_j f_j sum_l ||W_dec[l, j]||, which its card reports and an export writes back: "
            f"only {SUPPORTED} is read")


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


def _fold(
    state: dict[str, torch.Tensor], mean: torch.Tensor, gain: torch.Tensor | None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Our ``W_enc``, ``b_enc``, ``W_dec [F, L, D]``, ``b_dec`` and per-model scales (float64): their weights with
    ``x' = (x - mean) * gain`` folded into the encoder and ``x = x' / (gain + 1e-8) + mean`` into the decoder."""
    W_enc, b_enc, W_dec, b_dec = (state[k].double() for k in WEIGHTS)
    scales = torch.ones(W_enc.shape[0], dtype=torch.float64)
    if gain is not None:
        b_enc = b_enc - torch.einsum("ld,ldf->f", mean * gain[:, None], W_enc)
        W_enc = W_enc * gain[:, None, None]
        scales = gain + EPS
        W_dec = W_dec / scales[:, None, None]
        b_dec = b_dec / scales[:, None] + mean
    return {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec.permute(1, 0, 2), "b_dec": b_dec}, scales


def _batchtopk_settings(state: dict[str, torch.Tensor], config: dict[str, Any], source: str) -> tuple[int, float]:
    """(k, threshold) of their BatchTopKCrossCoder, the threshold as crosscoder_pl reads it."""
    k = int(state["k"]) if "k" in state else int(_trainer(config).get("k", config.get("k", 0)))
    if k < 1:
        raise ValueError(f"{source}: no k in its weights (buffer 'k') or config.json; it is not a BatchTopK crosscoder")
    threshold = float(state["threshold"]) if "threshold" in state else -1.0
    if threshold < 0 and _is_crosscoder_learning(config):
        # crosscoder_learning's encode falls back to BatchTopK while the threshold is negative: as ours does.
        warnings.warn(f"{source}: threshold {threshold} was never calibrated; eval-mode encode uses BatchTopK with "
                      f"k={k}, as crosscoder_learning's does", stacklevel=3)
    elif threshold < 0:
        # Theirs keeps every f with f * w > threshold < 0, i.e. every positive f; ours reads a negative threshold
        # as "not calibrated" (BatchTopK). 0 keeps the same entries (all f > 0 with a non-zero decoder).
        warnings.warn(f"{source}: threshold {threshold} was never calibrated; imported as 0 (every positive "
                      "pre-activation is kept, as their encode does)", stacklevel=3)
        threshold = 0.0
    return k, threshold


def _is_crosscoder_learning(config: dict[str, Any]) -> bool:
    """crosscoder_learning's configs name the layer count ``num_encoder_layers`` (dictionary_learning: ``num_layers``)."""
    return "num_encoder_layers" in config


def _metadata(config: dict[str, Any], source: str, kind: str) -> dict[str, Any]:
    """What the card can say about an imported crosscoder: their class, model name and layer when recorded."""
    trainer = _trainer(config)
    metadata: dict[str, Any] = {
        "imported_from": f"dictionary_learning {THEIR_CLASS[kind]} ({SUPPORTED} code normalisation) at {source}"}
    if trainer.get("layer") is not None:
        metadata["layer"] = trainer["layer"]
    if trainer.get("lm_name"):
        metadata["lm_name"] = trainer["lm_name"]
    if math.isfinite(float(trainer.get("k_initial", math.nan))):
        metadata["k_start"] = int(trainer["k_initial"])
    return metadata
