"""Experiment loggers that never block: W&B goes offline when no account is configured."""

from __future__ import annotations

import logging
import netrc
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger

from crosscoder_pl.headline import TAXONOMY, headline_figures, is_number

log = logging.getLogger(__name__)


def wandb_logged_in() -> bool:
    """True when W&B has an API key (``WANDB_API_KEY`` or the ``~/.netrc`` entry ``wandb login`` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(Path.home() / ".netrc").authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


# Seconds wandb.init waits for the W&B server before it gives up (wandb's own default: 90).
WANDB_INIT_TIMEOUT = 25.0


def wandb_logger(offline: bool | None = None, **kwargs: Any) -> WandbLogger:
    """A WandbLogger that logs online when logged in and offline otherwise (``wandb sync`` uploads later).

    Online, ``wandb.init`` gives up after ``WANDB_INIT_TIMEOUT`` seconds (or the environment's
    ``WANDB_INIT_TIMEOUT``, or ``settings.init_timeout`` passed here) instead of wandb's 90."""
    if offline is None:
        offline = os.environ.get("WANDB_MODE") == "offline" or not wandb_logged_in()
    if offline:
        log.info("W&B: no API key found, logging offline (run `wandb login`, then `wandb sync` to upload)")
    else:
        kwargs["settings"] = _with_init_timeout(kwargs.get("settings"))
        log.info("W&B: logging online; if the server does not answer within %.0f s the run stops (WANDB_MODE=offline "
                 "logs offline, `wandb sync` uploads later)", kwargs["settings"].init_timeout)
    return WandbLogger(offline=offline, **kwargs)


def _with_init_timeout(settings: Any) -> Any:
    """``settings`` (a ``wandb.Settings``, a dict or None) with an ``init_timeout``: the caller's, else the
    environment's ``WANDB_INIT_TIMEOUT``, else `WANDB_INIT_TIMEOUT`."""
    import wandb

    if settings is None:
        settings = wandb.Settings()
    elif isinstance(settings, Mapping):
        settings = wandb.Settings(**settings)
    if "init_timeout" not in settings.model_fields_set:
        timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", WANDB_INIT_TIMEOUT))
        settings = settings.model_copy(update={"init_timeout": timeout})
    return settings


def card_summary(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The model card's figures as flat ``card/...`` numbers for a run summary (absent analyses are left out)."""
    return {f"card/{_CARD_NAMES.get(name, name)}": float(value)
            for name, value in headline_figures(metrics).items() if is_number(value)}


# Headline figure -> its name under ``card/`` in a W&B run summary (the rest keep their own).
_CARD_NAMES = {
    "chat_specific": "n_chat_specific",
    "ce_increase_base": "splice/ce_increase_base",
    "ce_increase_chat": "splice/ce_increase_chat",
    **{name: f"taxonomy/{name}" for name in TAXONOMY},
}


def log_artifact_to_wandb(loggers: Iterable[Logger], directory: str | Path, metrics: Mapping[str, Any]) -> None:
    """For each W&B logger: the artifact directory as a W&B artifact of type ``model`` (aliased ``latest``; offline
    runs keep it for ``wandb sync``) and `card_summary` in the run summary. No W&B logger: nothing."""
    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        import wandb

        run = logger.experiment
        summary = card_summary(metrics)
        artifact = wandb.Artifact(name=f"crosscoder-{run.id}", type="model", metadata=summary,
                                  description=f"crosscoder_pl artifact ({Path(directory).name}): weights, model card, analyses")
        artifact.add_dir(str(directory))
        run.log_artifact(artifact, aliases=["latest"])
        run.summary.update(summary)
        log.info("W&B: artifact crosscoder-%s (type model) logged with %d summary figures", run.id, len(summary))
