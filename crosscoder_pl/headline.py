"""The model card's headline figures, read from an artifact's ``metrics.json``.

One reading for everything that summarises a run in a few numbers: the W&B run summary
(`crosscoder_pl.loggers.card_summary`) and the sweep table (`crosscoder_pl.sweep.job_figures`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from crosscoder_pl.names import MODELS

# The taxonomy's classes (crosscoder_pl.analysis.taxonomy.CLASSES), spelt out: this module stays import-light.
TAXONOMY = ("shared", "dead", "unclassified", "base_only", "chat_only")


def headline_figures(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Flat figures by name; ``None`` where the analysis that gives one was disabled or is absent.

    ``ve_base``, ``ve_chat``, ``l0``, ``dead_fraction`` (held-out validation), ``threshold`` (inference),
    one count per taxonomy class, ``chat_specific`` (latent scaling), ``median_causal_pearson`` and
    ``median_decoder_cosine`` (causal validation), ``ce_increase_base`` / ``ce_increase_chat`` (splice-in).
    """
    validation = metrics.get("validation", {})
    counts = metrics.get("taxonomy", {}).get("counts", {})
    causal = metrics.get("causal", {})
    splice = metrics.get("splice", {})
    return {
        "ve_base": validation.get("variance_explained", {}).get("base"),
        "ve_chat": validation.get("variance_explained", {}).get("chat"),
        "l0": validation.get("l0"),
        "dead_fraction": validation.get("dead_fraction"),
        "threshold": metrics.get("artifact", {}).get("threshold"),
        **{name: counts.get(name) for name in TAXONOMY},
        "chat_specific": metrics.get("scaling", {}).get("n_chat_specific"),
        "median_causal_pearson": causal.get("median_pearson"),
        "median_decoder_cosine": causal.get("median_decoder_cosine"),
        **{f"ce_increase_{model}": splice.get(model, {}).get("ce_increase") for model in MODELS},
    }


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
