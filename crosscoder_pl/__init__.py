"""crosscoder_pl: train sparse BatchTopK crosscoders on a base model and its chat version."""

from crosscoder_pl.crosscoder import CrossCoder
from crosscoder_pl.module import CrossCoderModule

__all__ = ["CrossCoder", "CrossCoderModule"]
