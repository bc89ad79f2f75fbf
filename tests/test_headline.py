"""One reading of the card's headline figures serves the W&B summary and the sweep table alike."""

import math

from crosscoder_pl.analysis.taxonomy import CLASSES
from crosscoder_pl.headline import TAXONOMY, headline_figures
from crosscoder_pl.loggers import card_summary
from crosscoder_pl.sweep import FIGURES, job_figures

METRICS = {
    "artifact": {"threshold": 0.25},
    "validation": {"variance_explained": {"base": 0.99, "chat": 0.98}, "l0": 31.5, "dead_fraction": 0.05},
    "taxonomy": {"counts": {"shared": 40, "dead": 60, "unclassified": 900, "base_only": 1, "chat_only": 23}},
    "scaling": {"n_chat_specific": 13},
    "causal": {"median_pearson": 0.88, "median_decoder_cosine": 0.05},
    "splice": {"base": {"ce_increase": -0.001}, "chat": {"ce_increase": 0.007}},
}


def test_card_summary_names_every_figure_under_card():
    assert card_summary(METRICS) == {
        "card/ve_base": 0.99, "card/ve_chat": 0.98, "card/l0": 31.5, "card/dead_fraction": 0.05,
        "card/threshold": 0.25, "card/n_chat_specific": 13.0, "card/median_causal_pearson": 0.88,
        "card/median_decoder_cosine": 0.05, "card/taxonomy/shared": 40.0, "card/taxonomy/dead": 60.0,
        "card/taxonomy/unclassified": 900.0, "card/taxonomy/base_only": 1.0, "card/taxonomy/chat_only": 23.0,
        "card/splice/ce_increase_base": -0.001, "card/splice/ce_increase_chat": 0.007,
    }


def test_sweep_row_and_card_read_the_same_figures():
    row, card = job_figures(METRICS), card_summary(METRICS)
    assert set(row) == set(FIGURES)
    assert (row["ve_chat"], row["chat_only"], row["chat_specific"]) == (
        card["card/ve_chat"], card["card/taxonomy/chat_only"], card["card/n_chat_specific"])


def test_disabled_analyses_are_absent_or_nan_never_zero():
    partial = {"validation": METRICS["validation"], "causal": {"median_pearson": True}}  # a bool is no figure
    assert headline_figures(partial)["chat_only"] is None
    assert set(card_summary(partial)) == {"card/ve_base", "card/ve_chat", "card/l0", "card/dead_fraction"}
    row = job_figures(partial)
    assert row["l0"] == 31.5 and math.isnan(row["chat_only"]) and math.isnan(row["median_causal_pearson"])


def test_the_taxonomy_classes_are_the_analysis_own():
    """Spelt out in headline.py to keep it import-light: the same classes, in the same order."""
    assert TAXONOMY == CLASSES
