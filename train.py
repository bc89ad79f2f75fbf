"""Train a crosscoder: `python train.py` (embedded demo) or `python train.py +experiment=papergrade`."""

import hydra
from omegaconf import DictConfig

from crosscoder_pl.training import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    metrics = train(cfg)
    return metrics.get("val/ve_chat", float("nan"))  # the value a sweeper optimises


if __name__ == "__main__":
    main()
