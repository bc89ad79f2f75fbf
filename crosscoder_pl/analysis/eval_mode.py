"""The one precondition every analysis shares: the crosscoder encodes with its inference threshold."""

from __future__ import annotations

from crosscoder_pl.crosscoder import CrossCoder


def check_eval_mode(crosscoder: CrossCoder) -> None:
    """Analyses encode token by token with the inference threshold; training-mode BatchTopK would not."""
    if crosscoder.training:
        raise ValueError("the crosscoder is in training mode; call .eval() before analysing it")
