"""Writing the artifact directory at the end of training, and logging what the data stream did."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import yaml

log = logging.getLogger(__name__)


class ExportArtifact(L.Callback):
    """At the end of fit (rank zero), save the folded crosscoder (``config.json`` + ``model.safetensors``)
    and the run's resolved configuration (``train_config.yaml``, read back by ``analyze.py``) into
    ``artifact_dir``. Put it before the analyses callback, which adds the other files."""

    def __init__(self, artifact_dir: str | Path, train_config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.artifact_dir = Path(artifact_dir)
        self.train_config = train_config

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        # The training-window dead fraction (the literature's), next to the held-out one of the card.
        pl_module.crosscoder.metadata["training_dead_fraction"] = {
            "fraction": float((pl_module.tokens_since_fired >= pl_module.hparams.dead_after_tokens).float().mean()),
            "window_tokens": int(pl_module.hparams.dead_after_tokens),
            "step": trainer.global_step,
        }
        pl_module.crosscoder.save_pretrained(self.artifact_dir)
        if self.train_config is not None:
            (self.artifact_dir / "train_config.yaml").write_text(yaml.safe_dump(self.train_config, sort_keys=False))
        log.info("crosscoder saved to %s", self.artifact_dir)


class DataStreamStats(L.Callback):
    """Logs ``datamodule.stats()`` (realised web/chat mix, skipped rows by reason) every ``every_n_steps``."""

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        stats = getattr(trainer.datamodule, "stats", None)
        if stats is not None and trainer.global_step % self.every_n_steps == 0:
            pl_module.log_dict(stats(), rank_zero_only=True)
