"""Re-running the end-of-training analyses on a saved artifact (``python analyze.py artifact=DIR``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from crosscoder_pl.analysis.report import run_analyses
from crosscoder_pl.crosscoder import CrossCoder

log = logging.getLogger(__name__)
TRAIN_CONFIG = "train_config.yaml"


def analysis_settings(cfg: DictConfig, train_cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """The artifact's own analysis settings with the command line's ``analysis.*`` overrides on top, so that
    a plain re-run reproduces the training run's figures; ``cfg.analysis`` (conf/analysis) for older artifacts
    and for keys added since the artifact was written (e.g. ``memory_budget_mb``)."""
    if "analysis" not in train_cfg:
        return OmegaConf.to_container(cfg.analysis, resolve=True)
    ours = [o.removeprefix("analysis.") for o in overrides if o.startswith("analysis.")]
    merged = OmegaConf.merge(cfg.analysis, train_cfg.analysis, OmegaConf.from_dotlist(ours))
    return OmegaConf.to_container(merged, resolve=True)


def analyze(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """Load the artifact's crosscoder, model pair and held-out data; run the analyses into the artifact.

    ``overrides``: the command line's overrides (``analysis.causal.max_latents=80``), applied to the
    artifact's recorded analysis settings.
    """
    artifact = Path(cfg.artifact)
    if not (artifact / TRAIN_CONFIG).is_file():
        raise FileNotFoundError(f"{artifact / TRAIN_CONFIG} not found: artifact= must be a directory written by train.py")
    crosscoder = CrossCoder.from_pretrained(artifact)
    train_cfg = OmegaConf.load(artifact / TRAIN_CONFIG)
    if cfg.device is not None:
        train_cfg.model_pair.device = cfg.device
    pair = instantiate(train_cfg.model_pair)
    datamodule = instantiate(train_cfg.data, _partial_=True, _convert_="all")(model_pair=pair)
    input_ids, attention_mask = datamodule.probe_batch()
    device = next(pair.base.parameters()).device  # the resolved one: model_pair.device may be "auto"
    metrics = run_analyses(
        crosscoder.to(device), pair, datamodule.heldout_activations(), input_ids, attention_mask,
        artifact, analysis_settings(cfg, train_cfg, overrides or []), recipe=crosscoder.metadata,
        command=crosscoder.metadata.get("command", "python train.py"),
    )
    print(f"\nanalyses rewritten in {artifact.resolve()}")
    return metrics
