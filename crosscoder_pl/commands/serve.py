"""``python analyze.py artifact=DIR serve=true [dashboard.server.port=8765]``: serve the artifact's latent
dashboard with a prompt box (`crosscoder_pl.dashboard.server`); the analyses are not re-run, and the dashboard
is written first if the artifact has none."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from crosscoder_pl.artifact.reader import read_train_config, rebuild
from crosscoder_pl.commands.settings import dashboard_settings


def run(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """Serve until interrupted, with the artifact's recorded dashboard settings under ``overrides``; return {}."""
    from crosscoder_pl.dashboard.server import (
        serve_artifact,  # the web stack only when serving
    )

    artifact = Path(cfg.artifact)
    train_cfg = read_train_config(artifact)  # refuses what this project would not build, before anything loads
    loaded = rebuild(artifact, train_cfg, cfg.device)
    dashboard = dashboard_settings(cfg, train_cfg, overrides)
    serve_artifact(artifact, loaded.crosscoder, loaded.pair, loaded.data.heldout_activations, dashboard)
    return {}
