"""``python analyze.py artifact=DIR push_to_hub=user/name [hub_private=true] [hub_license=...]``: upload the
artifact as it is, with its model card (`crosscoder_pl.hub`); with ``checkpoint=``, import it first."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from crosscoder_pl.commands import import_checkpoint


def run(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """Check the login and the Hub first (an error within seconds, before any import), import ``checkpoint=`` if
    given, then push; return the import's metrics (empty without one)."""
    from huggingface_hub import HfApi

    from crosscoder_pl import (
        hub,  # huggingface_hub only when pushing; hub's names looked up when called
    )

    api = HfApi(token=hub.check_hub_access(cfg.push_to_hub))
    metrics = import_checkpoint.run(cfg, overrides) if cfg.get("checkpoint") else {}
    hub.push_artifact(cfg.artifact, cfg.push_to_hub, private=cfg.hub_private, license=cfg.hub_license, api=api)
    return metrics
