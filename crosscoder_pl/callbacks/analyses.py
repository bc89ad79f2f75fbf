"""End-of-training analyses: taxonomy, latent scaling, causal validation, splice-in, model card.

Runs after the callback that saves the weights and ``config.json`` into the same artifact directory;
this one only adds files. The datamodule provides the inputs:

- ``model_pair``: base and chat models (``base``, ``chat``, ``layer``, ``base_id``, ``chat_id``);
- ``heldout_activations()``: raw paired activations ``[tokens, 2, d_model]`` never trained on;
- ``probe_batch()``: ``(input_ids, attention_mask)`` ``[n_probes, seq]``, BOS first.
"""

from __future__ import annotations

import logging
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L

from crosscoder_pl.analysis.report import run_analyses

log = logging.getLogger(__name__)


class EndOfTrainingAnalyses(L.Callback):
    """Runs ``run_analyses`` on the trained (folded) crosscoder into ``artifact_dir`` at the end of fit.

    Args:
        artifact_dir: the artifact directory (the one holding ``config.json``).
        chunk_tokens, taxonomy, scaling, causal, splice, memory_budget_mb: the ``conf/analysis`` group, key
            for key (``memory_budget_mb`` None: derived from the device's memory).
        command: the command recorded in the card's "Reproduce" section (default: this process's argv).
    """

    def __init__(
        self,
        artifact_dir: str | Path,
        chunk_tokens: int,
        taxonomy: Mapping[str, Any],
        scaling: Mapping[str, Any],
        causal: Mapping[str, Any],
        splice: Mapping[str, Any],
        memory_budget_mb: float | None = None,
        command: str | None = None,
    ) -> None:
        super().__init__()
        self.artifact_dir = Path(artifact_dir)
        self.settings = {
            "chunk_tokens": chunk_tokens,
            "memory_budget_mb": memory_budget_mb,
            "taxonomy": dict(taxonomy),
            "scaling": dict(scaling),
            "causal": dict(causal),
            "splice": dict(splice),
        }
        self.command = command or shlex.join(["python", *sys.argv])

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        if datamodule is None:
            raise RuntimeError(
                "EndOfTrainingAnalyses needs trainer.datamodule with model_pair, heldout_activations(), probe_batch()"
            )
        crosscoder = pl_module.crosscoder.fold()
        input_ids, attention_mask = datamodule.probe_batch()
        log.info("running end-of-training analyses into %s", self.artifact_dir)
        run_analyses(
            crosscoder,
            datamodule.model_pair,
            datamodule.heldout_activations(),
            input_ids,
            attention_mask,
            self.artifact_dir,
            self.settings,
            recipe=crosscoder.metadata,
            command=self.command,
        )
