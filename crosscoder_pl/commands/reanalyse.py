"""``python analyze.py artifact=DIR [analysis.*=...] [dashboard.*=...] [device=...]``: re-run the analyses on a
saved artifact and rewrite it (`crosscoder_pl.artifact.writer.write_artifact`: the same writer as training,
replacing the artifact atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from crosscoder_pl.artifact.reader import read_train_config, rebuild
from crosscoder_pl.artifact.writer import write_artifact
from crosscoder_pl.commands.settings import analysis_settings, dashboard_settings
from crosscoder_pl.config import AnalysisConfig, DashboardSettings


def run(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """Load the artifact's crosscoder, model pair and held-out data (activations ``[tokens, 2, d_model]``) and
    rewrite the artifact with the analyses, under the artifact's recorded settings and ``overrides``; return
    the metrics."""
    artifact = Path(cfg.artifact)
    train_cfg = read_train_config(artifact)  # refuses what this project would not build, before anything loads
    # Typed and checked once, before the models and the data load.
    settings = AnalysisConfig.read(analysis_settings(cfg, train_cfg, overrides))
    dashboard = DashboardSettings.read(dashboard_settings(cfg, train_cfg, overrides))
    loaded = rebuild(artifact, train_cfg, cfg.device)
    metrics = write_artifact(
        artifact, loaded.crosscoder, loaded.data, settings, train_cfg,
        command=loaded.crosscoder.metadata.get("command", "python train.py"),
        dashboard=dashboard,
    )
    print(f"\nanalyses rewritten in {artifact.resolve()}")
    return metrics
