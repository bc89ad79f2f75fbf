"""``python analyze.py sweep=multirun/<run>/<date>``: one table (``sweep_summary.csv``/``.md``) and one figure
across the jobs of a Hydra multirun (`crosscoder_pl.sweep`)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from crosscoder_pl.sweep import summarise_sweep


def run(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """Summarise ``cfg.sweep``; return ``{"swept": [...], "rows": [...]}`` (``overrides`` unused)."""
    return summarise_sweep(cfg.sweep)
