"""Whether an experiment (``+experiment=NAME``) composes with the ``model_pair`` and ``data`` options chosen next to it.

An experiment file (``conf/experiment/NAME.yaml``) picks its options (``override /data: papergrade``) and sets
keys inside those groups (``data.seq_len``). When the command line chooses another option for a group, the
experiment's keys land on that option's node instead. Three ways that goes wrong, refused here by name before
anything loads:

- a key the chosen option's ``_target_`` does not take (``+experiment=tiny data=cached``: the cache fixed
  ``seq_len`` when it was written): a TypeError deep in instantiation otherwise;
- a recipe value the chosen option sets differently and the experiment does not pin (``RECIPE_KEYS``): the run
  would silently leave the recipe (``+experiment=papergrade data=cached`` training with the cache's batch size);
- an experiment that names its own models while another ``model_pair`` option was chosen: the experiment's
  models would silently replace the chosen ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from crosscoder_pl.config import target_keys
from crosscoder_pl.names import MODELS

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("model_pair", "data")
RECIPE_KEYS = {"data": ("batch_size",)}  # what a recipe means by itself, whichever data option feeds it


def check_experiment(cfg: DictConfig, choices: Mapping[str, Any] | None = None) -> None:
    """Raise one ValueError naming every conflict between the chosen experiment and the chosen options.

    Args:
        cfg: the composed training configuration.
        choices: Hydra's runtime choices (group -> option); default: ``cfg.hydra.runtime.choices`` when composed
            with the Hydra node, else the running app's.
    """
    choices = dict(choices if choices is not None else _choices(cfg))
    experiment = choices.get("experiment")
    if not experiment:
        return
    recipe = experiment_file(experiment)
    intended = {**default_options(), **declared_options(recipe)}
    problems: list[str] = []
    for group in GROUPS:
        chosen, meant = choices.get(group), intended.get(group)
        if chosen is None or chosen == meant:
            continue
        keys = recipe.get(group) or {}
        params = target_keys(cfg[group].get("_target_"))
        untaken = [k for k in keys if params is not None and k not in params]
        if untaken:
            problems.append(
                f"+experiment={experiment} sets {', '.join(f'{group}.{k}' for k in untaken)}, which {group}={chosen} "
                f"({cfg[group].get('_target_')}) does not take"
                + (": an activation cache fixed them when it was written (python cache_activations.py "
                   f"+experiment={experiment} ...)" if chosen == "cached" else "")
            )
        meant_node = option_file(group, meant) if meant else {}
        for key in RECIPE_KEYS.get(group, ()):
            if key not in keys and key in meant_node and cfg[group].get(key) != meant_node[key]:
                problems.append(
                    f"+experiment={experiment} trains with {group}.{key}={meant_node[key]} ({group}={meant}), but "
                    f"{group}={chosen} sets {cfg[group].get(key)}: add {group}.{key}={meant_node[key]} to keep the recipe"
                )
        named = [k for k in MODELS if k in keys] if group == "model_pair" else []
        if named:
            shown = ", ".join(f"{group}.{k}={keys[k]}" for k in named)
            problems.append(
                f"+experiment={experiment} sets {shown}, which would replace the models of {group}={chosen}: name "
                f"the models with {', '.join(f'{group}.{k}=...' for k in named)} instead of {group}={chosen}"
            )
    if problems:
        raise ValueError("the experiment does not compose with the chosen options: " + "; ".join(problems))


def experiment_file(name: str) -> dict[str, Any]:
    path = CONF / "experiment" / f"{name}.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def option_file(group: str, option: str) -> dict[str, Any]:
    path = CONF / group / f"{option}.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def declared_options(recipe: Mapping[str, Any]) -> dict[str, str]:
    """``{group: option}`` of the recipe's ``- override /group: option`` defaults."""
    out = {}
    for entry in recipe.get("defaults") or []:
        if isinstance(entry, Mapping):
            for key, value in entry.items():
                group = str(key).removeprefix("override").strip().lstrip("/")
                out[group] = value
    return out


def default_options() -> dict[str, str]:
    """``{group: option}`` of conf/train.yaml's defaults list."""
    train = yaml.safe_load((CONF / "train.yaml").read_text()) or {}
    return {k: v for entry in train.get("defaults") or [] if isinstance(entry, Mapping) for k, v in entry.items()}


def _choices(cfg: DictConfig) -> Mapping[str, Any]:
    if "hydra" in cfg:
        return cfg.hydra.runtime.choices
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}

