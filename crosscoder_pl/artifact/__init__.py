"""The artifact directory: its writer (`writer.write_artifact`, for train.py and analyze.py alike) and its
reader (`reader.read_train_config` and the builders it rebuilds the model pair and the data with), side by side.

Layout (README, "The artifact directory"): ``config.json`` + ``model.safetensors`` (`CrossCoder.save_pretrained`),
``train_config.yaml`` (`layout.TRAIN_CONFIG`: the run's resolved configuration, read back by the reader) and every
file of `writer.run_analyses` (model card, ``metrics.json``, taxonomy, csv files, figures, dashboard when enabled).

This package's modules are imported by name (``crosscoder_pl.artifact.writer``): importing one imports nothing else.
"""
