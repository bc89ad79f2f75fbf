"""Re-running the end-of-training analyses on a saved artifact (``python analyze.py artifact=DIR``).

The artifact's ``train_config.yaml`` is data, never code (an artifact may come from anyone): the model pair
and the data module are rebuilt by this project's own builders, one table per place in the file, with the
recorded values. A recorded ``_target_`` is only looked up in its table; anything else (another target, a
target where none belongs, an interpolation) is refused before anything is built, and nothing is imported.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from crosscoder_pl.artifact import TRAIN_CONFIG, write_artifact
from crosscoder_pl.config import AnalysisConfig
from crosscoder_pl.crosscoder import CrossCoder, check_complete
from crosscoder_pl.data.cached import CachedActivationDataModule
from crosscoder_pl.data.datamodule import ActivationDataModule
from crosscoder_pl.data.outliers import upgraded
from crosscoder_pl.data.sources import SourceConfig, embedded_source
from crosscoder_pl.models.pair import ModelPair, load_model_pair

log = logging.getLogger(__name__)
TARGET = "_target_"
# What a recorded `_target_` may name, by its place in train_config.yaml (the targets of conf/).
PAIR_BUILDERS: dict[str, Callable[..., Any]] = {"crosscoder_pl.models.pair.load_model_pair": load_model_pair}
DATA_BUILDERS: dict[str, Callable[..., Any]] = {
    "crosscoder_pl.data.datamodule.ActivationDataModule": ActivationDataModule,
    "crosscoder_pl.data.datamodule.CachedActivationDataModule": CachedActivationDataModule,
}
SOURCE_BUILDERS: dict[str, Callable[..., Any]] = {"crosscoder_pl.data.sources.embedded_source": embedded_source}
SOURCES = ("web", "chat")
# The groups analyze.py reads; interpolations (``${...}``) are refused in them, as resolvers could read the
# environment. train.py writes the file resolved, so its own artifacts never hold one.
READ_GROUPS = ("model_pair", "data", "analysis", "dashboard")


def read_train_config(artifact: Path) -> dict[str, Any]:
    """The artifact's ``train_config.yaml`` as plain data (YAML's safe loader), checked by `check_train_config`."""
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
    values = upgraded(_arguments(node))
    for role in SOURCES:
        source = values.get(role)
        if isinstance(source, dict) and TARGET in source:
            values[role] = SOURCE_BUILDERS[source[TARGET]](**_arguments(source))
    return DATA_BUILDERS[node.get(TARGET, next(iter(DATA_BUILDERS)))](model_pair=pair, **values)


Builders = Mapping[str, Callable[..., Any]]


def _builder_places(config: Mapping[str, Any]) -> dict[str, tuple[Mapping[str, Any], Builders, tuple[str, ...]]]:
    """Each node analyze.py builds from: its dotted key -> (node, the builders it may name, the arguments that
    analyze.py passes itself). A source without ``_target_`` holds `SourceConfig`'s fields."""
    data = config["data"]
    places = {"model_pair": (config["model_pair"], PAIR_BUILDERS, ()), "data": (data, DATA_BUILDERS, ("model_pair",))}
    for role in SOURCES:
        if isinstance(data.get(role), dict):
            builders = SOURCE_BUILDERS if TARGET in data[role] else {"SourceConfig": SourceConfig}
            places[f"data.{role}"] = (data[role], builders, ())
    return places


def _check_builder(key: str, node: Mapping[str, Any], builders: Builders, ours: tuple[str, ...]) -> list[str]:
    """Whether ``node`` names one of ``builders`` (the first when it names none) and only takes its arguments."""
    target = node.get(TARGET, next(iter(builders)))
    if not isinstance(target, str) or target not in builders:
        return [f"{key}.{TARGET}={target!r} is not one of this project's builders for {key} ({', '.join(builders)})"]
    params = inspect.signature(builders[target]).parameters
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


def analysis_settings(cfg: DictConfig, train_cfg: Mapping[str, Any], overrides: list[str]) -> dict[str, Any]:
    """The artifact's own analysis settings with the command line's ``analysis.*`` overrides on top, so that
    a plain re-run reproduces the training run's figures; ``cfg.analysis`` (conf/analysis) for older artifacts
    and for keys added since the artifact was written (e.g. ``memory_budget_mb``)."""
    if "analysis" not in train_cfg:
        return OmegaConf.to_container(cfg.analysis, resolve=True)
    ours = [o.removeprefix("analysis.") for o in overrides if o.startswith("analysis.")]
    merged = OmegaConf.merge(cfg.analysis, train_cfg["analysis"], OmegaConf.from_dotlist(ours))
    return OmegaConf.to_container(merged, resolve=True)


def dashboard_settings(cfg: DictConfig, train_cfg: Mapping[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``cfg.dashboard`` (conf/dashboard), under the artifact's recorded dashboard settings, under the command
    line's ``dashboard.*`` overrides: as `analysis_settings` does for ``analysis``."""
    ours = [o.removeprefix("dashboard.") for o in overrides if o.startswith("dashboard.")]
    merged = OmegaConf.merge(cfg.dashboard, train_cfg.get("dashboard") or {}, OmegaConf.from_dotlist(ours))
    return OmegaConf.to_container(merged, resolve=True)


def analyze(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """Load the artifact's crosscoder, model pair and held-out data; rewrite the artifact with the analyses
    (`crosscoder_pl.artifact.write_artifact`: the same writer as training, replacing it atomically).

    ``overrides``: the command line's overrides (``analysis.causal.max_latents=80``), applied to the
    artifact's recorded analysis settings. ``sweep=DIR`` summarises a multirun instead (`crosscoder_pl.sweep`);
    ``checkpoint=DIR`` imports a foreign crosscoder into a new artifact (`crosscoder_pl.interop.artifact`);
    ``push_to_hub=user/name`` uploads the artifact as it is (`crosscoder_pl.hub`), after checking the login first.
    """
    if cfg.get("sweep"):
        from crosscoder_pl.sweep import summarise_sweep

        return summarise_sweep(cfg.sweep)
    if cfg.get("artifact") is None:
        raise ValueError("artifact=DIR is required: an artifact directory written by train.py (or a new one for "
                         "checkpoint=), or pass sweep=DIR to summarise a multirun")
    if cfg.get("push_to_hub"):
        from huggingface_hub import HfApi

        from crosscoder_pl.hub import check_hub_access, push_artifact

        api = HfApi(token=check_hub_access(cfg.push_to_hub))  # fails in seconds, before any import
        metrics = _import(cfg) if cfg.get("checkpoint") else {}
        push_artifact(cfg.artifact, cfg.push_to_hub, private=cfg.hub_private, license=cfg.hub_license, api=api)
        return metrics
    if cfg.get("checkpoint"):
        return _import(cfg)
    artifact = Path(cfg.artifact)
    if artifact.is_dir():
        check_complete(artifact)  # an interrupted write says so before anything else
    train_cfg = read_train_config(artifact)  # refuses what this project would not build, before anything loads
    settings = analysis_settings(cfg, train_cfg, overrides or [])
    if not cfg.get("serve"):
        AnalysisConfig.from_mapping(settings)  # typed and checked before the models and the data load
    crosscoder = CrossCoder.from_pretrained(artifact)
    pair = rebuild_pair(train_cfg["model_pair"], cfg.device)
    datamodule = rebuild_data(train_cfg["data"], pair)
    device = next(pair.base.parameters()).device  # the resolved one: model_pair.device may be "auto"
    dashboard = dashboard_settings(cfg, train_cfg, overrides or [])
    if cfg.get("serve"):
        from crosscoder_pl.dashboard.server import serve_artifact  # the web stack only when serving

        serve_artifact(artifact, crosscoder.to(device), pair, datamodule.heldout_activations, dashboard)
        return {}
    metrics = write_artifact(
        artifact, crosscoder.to(device), datamodule, settings, train_cfg,
        command=crosscoder.metadata.get("command", "python train.py"), dashboard=dashboard,
    )
    print(f"\nanalyses rewritten in {artifact.resolve()}")
    return metrics


def _import(cfg: DictConfig) -> dict[str, Any]:
    from crosscoder_pl.interop.artifact import import_artifact

    return import_artifact(cfg)
