"""The names of the artifact's own files, shared by its writer and its reader (this module imports nothing).

The weights' files (``config.json``, ``model.safetensors``) and the ``INCOMPLETE`` marker are
`crosscoder_pl.crosscoder`'s; the analyses' files are named where they are written (`crosscoder_pl.analysis`).
"""

TRAIN_CONFIG = "train_config.yaml"  # the run's resolved configuration, plain YAML (data, never code)
