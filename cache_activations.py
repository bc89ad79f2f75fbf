"""Write paired activations to disk once: `python cache_activations.py out=DIR n_tokens=N`."""

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from crosscoder_pl.data.datamodule import write_activation_cache


@hydra.main(version_base="1.3", config_path="conf", config_name="cache_activations")
def main(cfg: DictConfig) -> None:
    pair = instantiate(cfg.model_pair)
    datamodule = instantiate(cfg.data, _partial_=True, _convert_="all")(model_pair=pair)
    path = write_activation_cache(datamodule, cfg.out, cfg.n_tokens, cfg.tokens_per_shard, getattr(torch, cfg.dtype))
    print(f"\nactivation cache written to {path}; train on it with: python train.py data=cached data.path={path}")


if __name__ == "__main__":
    main()
