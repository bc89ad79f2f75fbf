"""Crosscoders of other libraries, in and out (`crosscoder_pl.interop.dictionary_learning`)."""

from crosscoder_pl.interop.dictionary_learning import (
    load_dictionary_learning,
    save_dictionary_learning,
)

__all__ = ["load_dictionary_learning", "save_dictionary_learning"]
