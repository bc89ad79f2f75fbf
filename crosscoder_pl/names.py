"""The two pairs of names the whole application shares, each in its one order.

Index 0 and 1 of every paired tensor (``[batch, 2, d_model]``, ``[2, d_model]``) are the models of `MODELS`;
the two halves of the data mix are the sources of `SOURCES`. Everything that spells these out imports them from
here, so that no module can disagree with another about which half is which. This module imports nothing.
"""

from typing import Literal

ModelName = Literal["base", "chat"]
SourceName = Literal["web", "chat"]

MODELS: tuple[ModelName, ModelName] = ("base", "chat")  # index 0: the base model, 1: its chat version
SOURCES: tuple[SourceName, SourceName] = ("web", "chat")  # the two halves of the data mix, in conf/data's order
