"""Experiment loggers that never block: W&B goes offline when no account is configured."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)


def wandb_logged_in() -> bool:
    """True when W&B has an API key (``WANDB_API_KEY`` or the ``~/.netrc`` entry ``wandb login`` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(Path.home() / ".netrc").authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(offline: bool | None = None, **kwargs: Any) -> WandbLogger:
    """A WandbLogger that logs online when logged in and offline otherwise (``wandb sync`` uploads later)."""
    if offline is None:
        offline = os.environ.get("WANDB_MODE") == "offline" or not wandb_logged_in()
    if offline:
        log.info("W&B: no API key found, logging offline (run `wandb login`, then `wandb sync` to upload)")
    return WandbLogger(offline=offline, **kwargs)
