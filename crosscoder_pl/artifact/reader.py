"""Reading an artifact back: its ``train_config.yaml`` and the model pair, data and crosscoder it records.

The artifact's ``train_config.yaml`` is data, never code (an artifact may come from anyone): the model pair
and the data module are rebuilt by this project's own builders, one table per place in the file, with the
recorded values. A recorded ``_target_`` is only looked up in its table; anything else (another target, a
target where none belongs, an interpolation) is refused before anything is built, and nothing is imported.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from crosscoder_pl.artifact.layout import TRAIN_CONFIG
from crosscoder_pl.config import (
    CachedDataConfig,
    EmbeddedSourceConfig,
    StreamDataConfig,
    TextSourceConfig,
)
from crosscoder_pl.config_group import Group
from crosscoder_pl.crosscoder import CrossCoder, check_complete
from crosscoder_pl.data.build import build_data
from crosscoder_pl.data.outliers import upgraded
from crosscoder_pl.models.pair import ModelPair, load_model_pair
from crosscoder_pl.names import SOURCES

TARGET = "_target_"
# What a recorded `_target_` may name, by its place in train_config.yaml (the targets of conf/).
PAIR_BUILDERS: dict[str, Callable[..., Any]] = {"crosscoder_pl.models.pair.load_model_pair": load_model_pair}
# The data module and its sources are built from their typed groups (`crosscoder_pl.config`): a recorded node
# may hold the group's fields only.
DATA_BUILDERS: dict[str, type[Group]] = {
    "crosscoder_pl.data.datamodule.ActivationDataModule": StreamDataConfig,
    "crosscoder_pl.data.datamodule.CachedActivationDataModule": CachedDataConfig,
    # The class's address once it lives in its own module; the one above stays for the artifacts that record it.
    "crosscoder_pl.data.cached.CachedActivationDataModule": CachedDataConfig,
}
SOURCE_BUILDERS: dict[str, type[Group]] = {"crosscoder_pl.data.sources.embedded_source": EmbeddedSourceConfig}
# The groups analyze.py reads; interpolations (``${...}``) are refused in them, as resolvers could read the
# environment. train.py writes the file resolved, so its own artifacts never hold one.
READ_GROUPS = ("model_pair", "data", "analysis", "dashboard")


def read_train_config(artifact: Path) -> dict[str, Any]:
    """The artifact's ``train_config.yaml`` as plain data (YAML's safe loader), checked by `check_train_config`;
    an artifact whose write was interrupted says so first."""
    if artifact.is_dir():
        check_complete(artifact)
    path = artifact / TRAIN_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: artifact= must be a directory written by train.py")
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a {type(config).__name__}, not the mapping train.py writes: the artifact "
                         "is damaged; copy it again from its source, or retrain")
    check_train_config(config, path)
    return config


def check_train_config(config: Mapping[str, Any], path: Path | str = TRAIN_CONFIG) -> None:
    """Raise one ValueError naming every part of ``config`` analyze.py would not rebuild with its own builders."""
    groups = ("model_pair", "data")
    problems = [f"{group} is missing or not a mapping" for group in groups if not isinstance(config.get(group), dict)]
    if not problems:
        places = _builder_places(config)
        for key, (node, builders, ours) in places.items():
            problems += _check_builder(key, node, builders, ours)
        problems += [f"{key}={value!r}: no {TARGET} belongs there" for key, value in _items(config, groups)
                     if key.rpartition(".")[2] == TARGET and key.rpartition(".")[0] not in places]
    problems += [f"{key}={value!r} is an interpolation, not a value" for key, value in _items(config, READ_GROUPS)
                 if isinstance(value, str) and "${" in value]
    if problems:
        raise ValueError(
            f"{path} is refused: analyze.py rebuilds the model pair and data with this project's own builders and "
            f"runs no code an artifact names. {'; '.join(problems)}. Rewrite these keys with the values train.py "
            "records (see conf/), or do not use an artifact you cannot trust"
        )


def rebuild_pair(node: Mapping[str, Any], device: str | None = None) -> ModelPair:
    """The model pair of a checked ``model_pair`` node (``device``: overrides the recorded one)."""
    values = _arguments(node)
    if device is not None:
        values["device"] = device
    return PAIR_BUILDERS[node.get(TARGET, next(iter(PAIR_BUILDERS)))](**values)


def rebuild_data(node: Mapping[str, Any], pair: ModelPair) -> Any:
    """The data module of a checked ``data`` node, on ``pair``; a node written before ``drop_outliers`` existed
    keeps its meaning (a non-null ``outlier_factor`` dropped), so its held-out set is the one trained with."""
    group = DATA_BUILDERS[node.get(TARGET, next(iter(DATA_BUILDERS)))]
    return build_data(group.read(upgraded(_arguments(node))), pair)


Builders = Mapping[str, Callable[..., Any]]


def _builder_places(config: Mapping[str, Any]) -> dict[str, tuple[Mapping[str, Any], Builders, tuple[str, ...]]]:
    """Each node analyze.py builds from: its dotted key -> (node, the builders it may name, the arguments that
    analyze.py passes itself). A source without ``_target_`` holds `SourceConfig`'s fields."""
    data = config["data"]
    places = {"model_pair": (config["model_pair"], PAIR_BUILDERS, ()), "data": (data, DATA_BUILDERS, ("model_pair",))}
    for role in SOURCES:
        if isinstance(data.get(role), dict):
            builders = SOURCE_BUILDERS if TARGET in data[role] else {"SourceConfig": TextSourceConfig}
            places[f"data.{role}"] = (data[role], builders, ())
    return places


def _check_builder(key: str, node: Mapping[str, Any], builders: Builders, ours: tuple[str, ...]) -> list[str]:
    """Whether ``node`` names one of ``builders`` (the first when it names none) and only takes its arguments."""
    target = node.get(TARGET, next(iter(builders)))
    if not isinstance(target, str) or target not in builders:
        return [f"{key}.{TARGET}={target!r} is not one of this project's builders for {key} ({', '.join(builders)})"]
    builder = builders[target]
    typed = isinstance(builder, type) and issubclass(builder, Group)
    params = builder.model_fields if typed else inspect.signature(builder).parameters
    return [f"{key}.{arg} is not an argument of {target}" for arg in node if arg != TARGET and arg not in params] + [
        f"{key}.{arg} is analyze.py's to set, not the artifact's" for arg in node if arg in ours]


def _arguments(node: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in node.items() if key != TARGET}


def _items(config: Mapping[str, Any], groups: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every entry at any depth under ``groups`` (list items as ``key.0``, ...)."""
    stack = [(group, config[group]) for group in groups if group in config]
    while stack:
        key, value = stack.pop()
        yield key, value
        if isinstance(value, Mapping):
            stack += [(f"{key}.{k}", v) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(f"{key}.{i}", v) for i, v in enumerate(value)]


@dataclass
class Rebuilt:
    """What an artifact records, loaded: its crosscoder (on ``device``), model pair and data module."""

    crosscoder: CrossCoder
    pair: ModelPair
    data: Any  # an ActivationDataModule or CachedActivationDataModule: heldout_activations() [tokens, 2, d_model]
    device: torch.device  # the pair's, resolved (model_pair.device may be "auto")


def rebuild(artifact: Path, train_config: Mapping[str, Any], device: str | None = None) -> Rebuilt:
    """The crosscoder of ``artifact`` and the model pair and data of its checked ``train_config``
    (`read_train_config`); ``device``: overrides the recorded one."""
    crosscoder = CrossCoder.from_pretrained(artifact)
    pair = rebuild_pair(train_config["model_pair"], device)
    data = rebuild_data(train_config["data"], pair)
    resolved = next(pair.base.parameters()).device
    return Rebuilt(crosscoder.to(resolved), pair, data, resolved)
