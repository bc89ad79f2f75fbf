"""The settings a command runs an artifact with: conf/analyze.yaml's group, under the artifact's recorded one,
under the command line's overrides of that group (so that a plain re-run reproduces the training run's figures)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf


def analysis_settings(cfg: DictConfig, train_cfg: Mapping[str, Any], overrides: list[str]) -> dict[str, Any]:
    """The artifact's own analysis settings with the command line's ``analysis.*`` overrides on top, so that
    a plain re-run reproduces the training run's figures; ``cfg.analysis`` (conf/analysis) for older artifacts
    and for keys added since the artifact was written (e.g. ``memory_budget_mb``)."""
    if "analysis" not in train_cfg:
        return OmegaConf.to_container(cfg.analysis, resolve=True)
    ours = [o.removeprefix("analysis.") for o in overrides if o.startswith("analysis.")]
    merged = OmegaConf.merge(cfg.analysis, train_cfg["analysis"], OmegaConf.from_dotlist(ours))
    return OmegaConf.to_container(merged, resolve=True)


def dashboard_settings(cfg: DictConfig, train_cfg: Mapping[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``cfg.dashboard`` (conf/dashboard), under the artifact's recorded dashboard settings, under the command
    line's ``dashboard.*`` overrides: as `analysis_settings` does for ``analysis``."""
    ours = [o.removeprefix("dashboard.") for o in overrides if o.startswith("dashboard.")]
    merged = OmegaConf.merge(cfg.dashboard, train_cfg.get("dashboard") or {}, OmegaConf.from_dotlist(ours))
    return OmegaConf.to_container(merged, resolve=True)
