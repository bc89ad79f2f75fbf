"""The artifact directory, written whole by one function for train.py and analyze.py alike.

`write_artifact` writes the weights (`CrossCoder.save_pretrained`), ``train_config.yaml`` and every file of
`run_analyses`: the analyses (`crosscoder_pl.analysis.report.write_analyses`) and the latent dashboard
(`crosscoder_pl.dashboard.offline.write_dashboard`), the two called side by side from here so that neither
package imports the other.

Atomic: everything is written into a hidden sibling directory (``.artifact.partial-XXXX``) that holds an
``INCOMPLETE`` file until the last file is written; the finished directory then replaces the old one by two
renames. A run killed at any moment leaves either the previous artifact or the new one at the final path,
plus at most a hidden partial directory, which `CrossCoder.from_pretrained` and analyze.py refuse.
Between the two renames (microseconds) the final path is absent; a complete copy is then at
``.artifact.replaced-XXXX``, which the loader's error names.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml

from crosscoder_pl.analysis.patching import ChatSource
from crosscoder_pl.analysis.report import Step, write_analyses
from crosscoder_pl.artifact.layout import TRAIN_CONFIG
from crosscoder_pl.config import AnalysisConfig, DashboardSettings
from crosscoder_pl.crosscoder import INCOMPLETE, CrossCoder
from crosscoder_pl.dashboard.offline import resolve_settings, write_dashboard
from crosscoder_pl.data.activations import token_table
from crosscoder_pl.files import dir_mode, replace_dir, write_whole

log = logging.getLogger(__name__)


class AnalysisData(Protocol):
    """What the analyses read (an `ActivationDataModule` or `CachedActivationDataModule`)."""

    model_pair: Any  # base, chat, layer, base_id, chat_id (and tokenizer, for top tokens)

    def heldout_activations(self) -> torch.Tensor: ...  # [tokens, 2, d_model], raw, never trained on

    def probe_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...  # input_ids, attention_mask [n_probes, seq]

    # Optional: outlier_report() -> the outlier tokens counted ({"training": ..., "heldout": ...}) for the card.
    # Optional: chat_probe_batch(n) -> input_ids, attention_mask [<= n, seq] of held-out chats (base→chat patching).


def write_artifact(
    directory: str | Path,
    crosscoder: CrossCoder,
    data: AnalysisData,
    settings: AnalysisConfig,
    train_config: Mapping[str, Any],
    command: str,
    dashboard: DashboardSettings | None = None,
) -> dict[str, Any]:
    """Write the whole artifact at ``directory``, replacing any previous one atomically; return the metrics.

    Args:
        crosscoder: the trained crosscoder (folded or not: saved folded, analysed as a folded eval-mode copy).
        data: the model pair, held-out activations and probe batch the analyses run on.
        settings: the ``analysis`` group, typed and checked once by the caller (`RunConfig.analysis`).
        train_config: the run's resolved configuration, plain containers (written as ``train_config.yaml``).
        command: the command that reproduces the artifact (for the card).
        dashboard: the ``dashboard`` group, typed; None: the one in ``train_config`` (see `run_analyses`).
    """
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        os.chmod(staging, dir_mode())  # mkdtemp makes it private (0700); an artifact is as readable as any new dir
        (staging / INCOMPLETE).write_text(f"being written by: {command}\n")
        crosscoder.save_pretrained(staging)
        # Before the analyses: run_analyses reads the dashboard settings from it when none are given.
        config_text = yaml.safe_dump(dict(train_config), sort_keys=False)
        write_whole(staging / TRAIN_CONFIG, lambda tmp: tmp.write_text(config_text))
        input_ids, attention_mask = data.probe_batch()
        heldout = data.heldout_activations()  # first: the report then holds the held-out set's outliers
        report = getattr(data, "outlier_report", None)
        metrics = run_analyses(
            crosscoder, data.model_pair, heldout, input_ids, attention_mask, staging, settings,
            recipe=crosscoder.metadata, command=command, dashboard=dashboard,
            outliers=report() if report is not None else None, chats=getattr(data, "chat_probe_batch", None),
        )
        _keep_other_files(final, staging)
        (staging / INCOMPLETE).unlink()
        replace_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # not reached on SIGKILL: the INCOMPLETE file marks it then
        raise
    log.info("artifact written to %s", final)
    return metrics


def run_analyses(
    crosscoder: CrossCoder,
    pair: Any,
    activations: torch.Tensor,
    probe_ids: torch.Tensor,
    probe_mask: torch.Tensor,
    out_dir: str | Path,
    settings: AnalysisConfig,
    recipe: Mapping[str, Any],
    command: str,
    dashboard: DashboardSettings | None = None,
    outliers: Mapping[str, Mapping[str, Any]] | None = None,
    chats: ChatSource | None = None,
) -> dict[str, Any]:
    """Every analysis file of an artifact, ``metrics.json`` and ``README.md`` into ``out_dir``: the enabled analyses
    (`write_analyses`, whose arguments these are) and then the latent dashboard; return the metrics.

    Args:
        activations: raw held-out paired activations ``[tokens, 2, d_model]``; the dashboard needs them carrying
            their token ids (``data.activations.token_table``), else it is skipped with a warning.
        probe_ids, probe_mask: probe batch ``[n_probes, seq]``, BOS first, padding allowed.
        dashboard: the ``dashboard`` group, typed; None: the one recorded in ``out_dir/train_config.yaml``, else
            the defaults (on).
        chats: held-out chats for the base→chat patching (``chat_probe_batch``); None: it is skipped.
    """
    steps: dict[str, Step] = {"dashboard": _dashboard_step(pair, activations, out_dir, dashboard)}
    return write_analyses(crosscoder, pair, activations, probe_ids, probe_mask, out_dir, settings, recipe, command,
                          outliers=outliers, steps=steps, chats=chats)


def _dashboard_step(pair: Any, activations: torch.Tensor, out_dir: str | Path,
                    given: DashboardSettings | None) -> Step:
    """The dashboard as a step of `write_analyses`: written when enabled and the activations carry token ids."""

    def step(crosscoder: CrossCoder) -> dict[str, Any] | None:
        settings = resolve_settings(given, out_dir)
        if not settings.enabled:
            return None
        tokens = token_table(activations)
        if tokens is None:
            log.warning("dashboard not written: the held-out activations carry no token ids (an older cache?)")
            return None
        return write_dashboard(crosscoder, pair, activations, tokens, Path(out_dir), settings)

    return step


def _keep_other_files(old: Path, new: Path) -> None:
    """Copy into ``new`` what the previous artifact ``old`` holds and this write did not produce (the user's own
    notes, or the files of an analysis disabled this time), so that rewriting an artifact loses nothing."""
    if not old.is_dir():
        return
    for path in old.iterdir():
        target = new / path.name
        if target.exists() or target.is_symlink():
            continue
        log.info("keeping %s from the previous artifact", path.name)
        if path.is_dir() and not path.is_symlink():
            shutil.copytree(path, target, symlinks=True)
        else:
            shutil.copy2(path, target, follow_symlinks=False)
