"""``python analyze.py artifact=A compare=B [compare_out=DIR]``: two artifacts of one model pair side by side
(`crosscoder_pl.comparison`), e.g. an L1 and a BatchTopK crosscoder as in Minder et al. 2025."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from crosscoder_pl.comparison import FILES, compare_artifacts


def run(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """Compare ``cfg.artifact`` with ``cfg.compare``; write into ``compare_out`` (null: this run's directory,
    outputs/analyze/<date>); print the table; ``overrides`` unused."""
    out = Path(cfg.compare_out) if cfg.get("compare_out") else Path(HydraConfig.get().runtime.output_dir)
    result = compare_artifacts(Path(cfg.artifact), Path(cfg.compare), out)
    print((out / FILES[0]).read_text())
    print(f"comparison written to {out.resolve()} ({', '.join(FILES)})")
    return result
