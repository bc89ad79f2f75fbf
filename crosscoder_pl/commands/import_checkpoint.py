"""A crosscoder trained elsewhere, turned into a complete artifact of this application
(``python analyze.py checkpoint=DIR artifact=NEW_DIR model_pair=... data=...``).

The foreign checkpoint has no ``train_config.yaml``: the command line names the model pair it was trained on
and the data to analyse it with (the ``model_pair`` and ``data`` groups of ``conf/``). They are recorded in the
new artifact's ``train_config.yaml``, so ``python analyze.py artifact=NEW_DIR`` re-runs it like any other.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from crosscoder_pl.artifact.reader import check_train_config, rebuild_data, rebuild_pair
from crosscoder_pl.artifact.writer import write_artifact
from crosscoder_pl.config import AnalysisConfig, DashboardSettings
from crosscoder_pl.crosscoder import CrossCoder
from crosscoder_pl.interop.dictionary_learning import load_dictionary_learning

# Each loader: (checkpoint, sparsity=None: read from the checkpoint, else "l1" or "batchtopk") -> CrossCoder.
FORMATS: dict[str, Callable[..., CrossCoder]] = {"dictionary_learning": load_dictionary_learning}


def load_foreign(checkpoint: str, fmt: str, sparsity: str | None = None) -> CrossCoder:
    """The crosscoder at ``checkpoint`` (a directory, file or hub id) written by the library ``fmt``; ``sparsity``
    (``"l1"`` or ``"batchtopk"``) for a checkpoint that does not say which of its classes wrote it."""
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} is not one of {sorted(FORMATS)} (crosscoder_learning checkpoints are "
                         "format=dictionary_learning)")
    return FORMATS[fmt](checkpoint, sparsity=sparsity)


def run(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """Load ``cfg.checkpoint`` (format ``cfg.format``), run every analysis on ``cfg.model_pair`` with held-out
    data of ``cfg.data`` (activations ``[tokens, 2, d_model]``), and write a new artifact at ``cfg.artifact``;
    return its metrics. ``overrides``: unused (the groups of ``cfg`` already hold them)."""
    if cfg.get("model_pair") is None or cfg.get("data") is None:
        raise ValueError(
            f"checkpoint={cfg.checkpoint} has no record of its models: name the pair it was trained on and the data to "
            "analyse it with, e.g. model_pair=gemma2_2b data=papergrade, or model_pair=embedded data=embedded "
            "(then model_pair.base=..., model_pair.chat=..., model_pair.layer=... as trained)"
        )
    # Typed and checked once, before anything loads.
    analysis = AnalysisConfig.read(cfg.analysis)
    dashboard = DashboardSettings.read(cfg.dashboard)
    artifact = Path(cfg.artifact)
    if artifact.exists():
        raise FileExistsError(f"artifact={artifact} exists: an import writes a new artifact; choose a new directory")
    crosscoder = load_foreign(str(cfg.checkpoint), cfg.get("format", "dictionary_learning"), cfg.get("sparsity"))
    train_config = {
        "model_pair": OmegaConf.to_container(cfg.model_pair, resolve=True),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "analysis": OmegaConf.to_container(cfg.analysis, resolve=True),
        "dashboard": OmegaConf.to_container(cfg.dashboard, resolve=True),
        "seed": cfg.get("seed", 0),
        "imported_from": {"checkpoint": str(cfg.checkpoint), "format": cfg.get("format", "dictionary_learning"),
                          "sparsity": crosscoder.sparsity},
    }
    check_train_config(train_config, "the command line's model_pair and data")
    pair = rebuild_pair(train_config["model_pair"], cfg.device)
    if crosscoder.n_models != 2 or crosscoder.d_model != pair.d_model:
        raise ValueError(
            f"checkpoint={cfg.checkpoint} reads {crosscoder.n_models} activations of width {crosscoder.d_model}, but the "
            f"pair {pair.base_id} / {pair.chat_id} has 2 models of width {pair.d_model}: name the pair it was trained on"
        )
    command = shlex.join(["python", *sys.argv])
    crosscoder.metadata.update(base_model=pair.base_id, chat_model=pair.chat_id, layer=pair.layer, command=command)
    datamodule = rebuild_data(train_config["data"], pair)
    device = next(pair.base.parameters()).device
    metrics = write_artifact(artifact, crosscoder.to(device), datamodule, analysis, train_config, command=command,
                             dashboard=dashboard)
    print(f"\nimported {cfg.checkpoint} into {artifact.resolve()}")
    return metrics
