"""The training application: everything built from the Hydra config, then ``Trainer.fit``."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from crosscoder_pl.callbacks.artifact import ExportArtifact
from crosscoder_pl.data.sources import mix_probabilities
from crosscoder_pl.models.pair import read_hidden_size
from crosscoder_pl.module import CrossCoderModule

log = logging.getLogger(__name__)


def check_config(cfg: DictConfig) -> None:
    """Fail in seconds, before any model is loaded, on impossible values (each error names its key)."""
    missing = [f"model_pair.{role}" for role in ("base", "chat") if cfg.model_pair.get(role) is None]
    if missing:
        raise ValueError(
            f"{' and '.join(missing)} not set: name both models, e.g. python train.py +experiment=own_pair "
            "model_pair.base=DIR model_pair.chat=DIR (a save_pretrained directory, a .gguf file or a hub id)"
        )
    d_model = read_hidden_size(cfg.model_pair.base, cfg.model_pair.get("token")) if _expansion(cfg) else 2
    with torch.device("cpu"):
        # Every CrossCoderModule check, on a 2-dim stand-in with the real dictionary size.
        instantiate(crosscoder_config(cfg, d_model), d_model=2)
    if "mix" in cfg.data:
        mix_probabilities(OmegaConf.to_container(cfg.data.mix))
    if not isinstance(cfg.trainer.max_steps, int) or cfg.trainer.max_steps <= 0:
        raise ValueError(f"trainer.max_steps={cfg.trainer.max_steps} must be a positive number of steps")
    c = cfg.crosscoder
    start = c.threshold_start_step if c.threshold_start_step is not None else c.k_anneal_steps
    if start >= cfg.trainer.max_steps:
        raise ValueError(
            f"the inference threshold starts at step {start} (crosscoder.threshold_start_step, default "
            f"crosscoder.k_anneal_steps) but training stops at trainer.max_steps={cfg.trainer.max_steps}: "
            "the saved crosscoder would have no threshold"
        )


def crosscoder_config(cfg: DictConfig, d_model: int) -> DictConfig:
    """``cfg.crosscoder`` with ``n_latents`` resolved from ``crosscoder.expansion`` (latents per d_model) when
    that key is set, and the key removed (CrossCoderModule takes ``n_latents``)."""
    node = cfg.crosscoder.copy()
    expansion = _expansion(cfg)
    if expansion is None:
        return node
    with open_dict(node):
        del node["expansion"]
    if not isinstance(expansion, int) or expansion < 1:
        raise ValueError(f"crosscoder.expansion={expansion} must be a positive integer (latents per d_model dimension)")
    n_latents = expansion * d_model
    if node.n_latents not in (None, n_latents):
        raise ValueError(
            f"crosscoder.n_latents={node.n_latents} and crosscoder.expansion={expansion} (d_model {d_model}: "
            f"{n_latents} latents) disagree: set crosscoder.n_latents=null or crosscoder.expansion=null"
        )
    node.n_latents = n_latents
    return node


def _expansion(cfg: DictConfig) -> int | None:
    return cfg.crosscoder.get("expansion")


def recipe(cfg: DictConfig, pair: Any) -> dict[str, Any]:
    """Facts about the run for the exported ``config.json`` metadata and the model card's recipe."""
    c, t = cfg.crosscoder, cfg.trainer
    tokens = t.max_steps * cfg.data.batch_size * t.devices * t.num_nodes if isinstance(t.devices, int) else None
    data = cfg.data
    sources = (
        f"web: {data.web.get('path', 'embedded corpus (web half)')}, chat: {data.chat.get('path', 'embedded corpus (chat half)')}, "
        f"mix {dict(data.mix)}" if "web" in data else f"activation cache {data.get('path')}"
    )
    return {
        "base_model": pair.base_id, "chat_model": pair.chat_id, "layer": pair.layer,
        "k_start": c.k_start if c.k_start is not None else c.k, "k_anneal_steps": c.k_anneal_steps,
        "training_tokens": tokens, "data": sources,
        "normalisation": "per-model scalar sqrt(d_model)/mean||x||, BOS and padding dropped",
        "lr": c.lr, "lr_decay_frac": c.lr_decay_frac, "gradient_clip_val": t.gradient_clip_val,
        "aux_coef": c.aux_coef, "dead_after_tokens": c.dead_after_tokens, "loss": c.loss, "seed": cfg.seed,
        "language_model_dtype": cfg.model_pair.get("dtype"),
        "command": shlex.join(["python", *sys.argv]),
    }


def train(cfg: DictConfig) -> dict[str, float]:
    """Train a crosscoder as configured; write the artifact to ``cfg.artifact_dir``; return final metrics."""
    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision(cfg.matmul_precision)  # "high": TF32 tensor cores on Ampere and newer
    pair = instantiate(cfg.model_pair)
    # Passed after instantiation: Hydra would turn the ModelPair dataclass into a config node.
    datamodule = instantiate(cfg.data, _partial_=True, _convert_="all")(model_pair=pair)
    # Plain containers, not OmegaConf nodes: checkpoints then load with torch's weights_only unpickler.
    crosscoder = crosscoder_config(cfg, pair.d_model)
    module: CrossCoderModule = instantiate(crosscoder, d_model=pair.d_model, metadata=recipe(cfg, pair), _convert_="all")
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    train_config = OmegaConf.to_container(cfg, resolve=True)
    train_config["crosscoder"]["n_latents"] = crosscoder.n_latents  # resolved from the expansion, if any
    train_config["model_pair"]["layer"] = pair.layer  # resolved when null
    for callback in callbacks:
        if isinstance(callback, ExportArtifact):
            callback.train_config = train_config
    loggers = [instantiate(c) for c in cfg.logger.values()]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("artifact: %s", Path(cfg.artifact_dir).resolve())
    print(f"\nartifact written to {Path(cfg.artifact_dir).resolve()}")
    return metrics
