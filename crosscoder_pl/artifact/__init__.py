"""The artifact directory: its writer (`writer.write_artifact`, for train.py and analyze.py alike) and its
reader (`reader.read_train_config` and the builders it rebuilds the model pair and the data with), side by side.

Layout (README, "The artifact directory"): ``config.json`` + ``model.safetensors`` (`CrossCoder.save_pretrained`),
``train_config.yaml`` (`layout.TRAIN_CONFIG`: the run's resolved configuration, read back by the reader) and every
file of `writer.run_analyses` (model card, ``metrics.json``, taxonomy, csv files, figures, dashboard when enabled).
"""

from crosscoder_pl.artifact.layout import TRAIN_CONFIG
from crosscoder_pl.artifact.reader import check_train_config, read_train_config, rebuild_data, rebuild_pair
from crosscoder_pl.artifact.writer import run_analyses, write_artifact

__all__ = [
    "TRAIN_CONFIG",
    "check_train_config",
    "read_train_config",
    "rebuild_data",
    "rebuild_pair",
    "run_analyses",
    "write_artifact",
]
