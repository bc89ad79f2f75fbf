"""Train a crosscoder: `python train.py` (embedded demo) or `python train.py +experiment=papergrade`."""

import hydra
from omegaconf import DictConfig

from crosscoder_pl.metrics import sweep_objective
from crosscoder_pl.training import check_config, train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    run = check_config(cfg)  # the whole configuration, typed and checked once, before anything loads
    metrics = train(run)
    return sweep_objective(metrics, run.objective)  # what a sweeper maximises


if __name__ == "__main__":
    main()
