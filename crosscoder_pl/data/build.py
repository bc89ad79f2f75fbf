"""The data module of a typed ``data`` group: what training and the artifact's reader both build from."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra.utils import instantiate

from crosscoder_pl.config import CachedDataConfig, StreamDataConfig
from crosscoder_pl.config_group import thaw
from crosscoder_pl.data.cached import CachedActivationDataModule
from crosscoder_pl.data.datamodule import ActivationDataModule


def build_data(group: StreamDataConfig | CachedDataConfig | Mapping[str, Any], pair: Any) -> Any:
    """The data module of the ``data`` group on ``pair`` (a ``_target_`` of the user's own: built by Hydra)."""
    if isinstance(group, StreamDataConfig):
        return ActivationDataModule(pair, group)
    if isinstance(group, CachedDataConfig):
        return CachedActivationDataModule(group, model_pair=pair)
    # Passed after instantiation: Hydra would turn the ModelPair dataclass into a config node.
    return instantiate(thaw(group), _partial_=True, _convert_="all")(model_pair=pair)
