"""Write paired activations to disk once: `python cache_activations.py out=DIR n_tokens=N`."""

import hydra
import torch
from omegaconf import DictConfig

from crosscoder_pl.config import ModelPairConfig, StreamDataConfig
from crosscoder_pl.config_group import plain
from crosscoder_pl.data.build import build_data
from crosscoder_pl.data.datamodule import write_activation_cache
from crosscoder_pl.training import build_pair


@hydra.main(version_base="1.3", config_path="conf", config_name="cache_activations")
def main(cfg: DictConfig) -> None:
    data = StreamDataConfig.read(cfg.data)  # typed and checked before the models load
    node = cfg.model_pair  # ours typed and checked, a target of the user's own as written
    pair = build_pair(ModelPairConfig.read(node) if node.get("_target_") == ModelPairConfig.TARGET else plain(node))
    datamodule = build_data(data, pair)
    path = write_activation_cache(datamodule, cfg.out, cfg.n_tokens, cfg.tokens_per_shard, getattr(torch, cfg.dtype))
    print(f"\nactivation cache written to {path}; train on it with: python train.py data=cached data.path={path}")


if __name__ == "__main__":
    main()
