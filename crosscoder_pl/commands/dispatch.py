"""Which command ``python analyze.py`` runs: the first of `COMMANDS` whose key the command line sets, else the
re-analysis of ``artifact=``. A new command is one more module of `crosscoder_pl.commands` and one more row."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from crosscoder_pl.commands import (
    compare,
    import_checkpoint,
    push,
    reanalyse,
    serve,
    sweep_summary,
)

Run = Callable[[DictConfig, list[str]], dict[str, Any]]


@dataclass(frozen=True)
class Command:
    """A command of analyze.py: the conf/analyze.yaml key that selects it and its module's ``run``."""

    key: str
    run: Run
    needs_artifact: bool = True  # artifact= must be given


# In the order they are tried: push_to_hub= with checkpoint= imports first, then pushes (`push.run`).
COMMANDS: tuple[Command, ...] = (
    Command("sweep", sweep_summary.run, needs_artifact=False),
    Command("compare", compare.run),
    Command("push_to_hub", push.run),
    Command("checkpoint", import_checkpoint.run),
    Command("serve", serve.run),
)
DEFAULT = Command("artifact", reanalyse.run)


def choose(cfg: DictConfig) -> Command:
    """The command ``cfg`` names; a ValueError when it needs ``artifact=`` and has none."""
    command = next((c for c in COMMANDS if cfg.get(c.key)), DEFAULT)
    if command.needs_artifact and cfg.get("artifact") is None:
        raise ValueError("artifact=DIR is required: an artifact directory written by train.py (or a new one for "
                         "checkpoint=), or pass sweep=DIR to summarise a multirun")
    return command


def analyze(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the command ``cfg`` (conf/analyze.yaml, composed) names; return its figures.

    ``overrides``: the command line's overrides (``analysis.causal.max_latents=80``), applied over the
    artifact's recorded settings by the commands that read them (`crosscoder_pl.commands.settings`).
    """
    return choose(cfg).run(cfg, list(overrides or []))
