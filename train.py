"""Train a crosscoder: `python train.py` (embedded demo) or `python train.py +experiment=papergrade`."""

import hydra
from omegaconf import DictConfig

from crosscoder_pl.metrics import check_objective, sweep_objective
from crosscoder_pl.training import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    check_objective(cfg.objective.max_dead_frac, cfg.objective.penalty)  # before hours of training, not after
    metrics = train(cfg)
    return sweep_objective(metrics, cfg.objective.max_dead_frac, cfg.objective.penalty)  # what a sweeper maximises


if __name__ == "__main__":
    main()
