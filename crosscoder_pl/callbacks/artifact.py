"""Writing the artifact at the end of training, and logging what the data stream did."""

from __future__ import annotations

import logging
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L

from crosscoder_pl.artifact.writer import write_artifact
from crosscoder_pl.config import AnalysisConfig, DashboardSettings
from crosscoder_pl.loggers import log_artifact_to_wandb

log = logging.getLogger(__name__)


class WriteArtifact(L.Callback):
    """At the end of fit (rank zero), write the whole artifact with
    `crosscoder_pl.artifact.writer.write_artifact`: the folded crosscoder, the run's resolved configuration and
    every analysis.

    The datamodule provides the analyses' inputs: ``model_pair``, ``heldout_activations()``, ``probe_batch()``.

    Args:
        artifact_dir: where the artifact goes (replaced atomically if it exists).
        analysis: the ``analysis`` group, typed (`RunConfig.analysis`).
        train_config: the run's resolved configuration, plain containers (``train_config.yaml``).
        dashboard: the ``dashboard`` group, typed (`RunConfig.dashboard`); None: the one in ``train_config``.
        command: the command recorded in the card's "Reproduce" section (default: this process's argv).
    """

    def __init__(
        self,
        artifact_dir: str | Path,
        analysis: AnalysisConfig,
        train_config: Mapping[str, Any],
        dashboard: DashboardSettings | None = None,
        command: str | None = None,
    ) -> None:
        super().__init__()
        self.artifact_dir = Path(artifact_dir)
        self.analysis = analysis
        self.train_config = train_config
        self.dashboard = dashboard
        self.command = command or shlex.join(["python", *sys.argv])

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if trainer.datamodule is None:
            raise RuntimeError(
                "WriteArtifact needs trainer.datamodule with model_pair, heldout_activations(), probe_batch()"
            )
        # The training-window dead fraction (the literature's), next to the held-out one of the card.
        pl_module.crosscoder.metadata["training_dead_fraction"] = {
            "fraction": float((pl_module.tokens_since_fired >= pl_module.cfg.dead_after_tokens).float().mean()),
            "window_tokens": int(pl_module.cfg.dead_after_tokens),
            "step": trainer.global_step,
        }
        log.info("writing the artifact (weights, configuration, analyses) to %s", self.artifact_dir)
        metrics = write_artifact(self.artifact_dir, pl_module.crosscoder, trainer.datamodule, self.analysis,
                                 self.train_config, self.command, self.dashboard)
        log_artifact_to_wandb(getattr(trainer, "loggers", []), self.artifact_dir, metrics)  # W&B: type model


class DataStreamStats(L.Callback):
    """Logs ``datamodule.stats()`` (realised web/chat mix, skipped rows by reason) every ``every_n_steps``."""

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        stats = getattr(trainer.datamodule, "stats", None)
        if stats is not None and trainer.global_step % self.every_n_steps == 0:
            pl_module.log_dict(stats(), rank_zero_only=True)
