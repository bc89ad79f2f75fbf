"""Re-run the end-of-training analyses on a saved artifact: `python analyze.py artifact=DIR` (and the other
commands of conf/analyze.yaml: serve=, checkpoint=, push_to_hub=, sweep=; `crosscoder_pl.commands`)."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from crosscoder_pl.commands.dispatch import analyze


@hydra.main(version_base="1.3", config_path="conf", config_name="analyze")
def main(cfg: DictConfig) -> None:
    analyze(cfg, list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    main()
