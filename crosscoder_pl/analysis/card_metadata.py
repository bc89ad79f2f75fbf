"""The model card's metadata (its YAML front matter), one module for the card that prints it
(`crosscoder_pl.analysis.card`) and the Hub push that publishes it (`crosscoder_pl.hub`).

Built with huggingface_hub's ``ModelCardData``, so that the Hub reads it as it reads any model card: license,
tags, the pair as ``base_model``, and the validation figures of ``metrics.json`` as evaluation results.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCardData

from crosscoder_pl.names import MODELS

TAGS = ("mechanistic-interpretability", "sparse-autoencoder", "crosscoder", "model-diffing")
LIBRARY = "crosscoder_pl"
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def card_data(metrics: Mapping[str, Any], license: str = "apache-2.0", hub_ids_only: bool = True) -> ModelCardData:
    """The card's metadata: license, tags, the pair as ``base_model`` (an identical pair once; with ``hub_ids_only``,
    as the Hub wants it, without local directories and the embedded pair) and the validation figures as
    evaluation results."""
    art = metrics["artifact"]
    models = [m for m in dict.fromkeys((art["base_model"], art["chat_model"])) if is_hub_id(m) or not hub_ids_only]
    name = f"crosscoder-{art['base_model']}-vs-{art['chat_model']}-layer{art['layer']}".replace("/", "_")
    return ModelCardData(
        license=license, tags=list(TAGS), base_model=models or None, library_name=LIBRARY, model_name=name,
        eval_results=_eval_results(metrics) or None,
    )


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a hub repo id (user/name) and is no local path."""
    return bool(REPO_ID.match(name)) and not Path(name).exists()


def _eval_results(metrics: Mapping[str, Any]) -> list[EvalResult]:
    """Held-out variance explained per model, L0, dead fraction and the median causal Pearson."""
    validation = metrics.get("validation", {})
    n_tokens = validation.get("n_tokens")
    figures = [(f"variance_explained_{m}", f"Variance explained ({m})", validation.get("variance_explained", {}).get(m))
               for m in MODELS]
    figures += [("l0", "L0 (active latents per token)", validation.get("l0")),
                ("dead_fraction", "Dead fraction", validation.get("dead_fraction")),
                ("median_causal_pearson", "Median causal Pearson (shared latents)",
                 metrics.get("causal", {}).get("median_pearson"))]
    return [
        EvalResult(task_type="feature-extraction", task_name="Crosscoder reconstruction", dataset_type="held-out",
                   dataset_name=f"held-out activations ({n_tokens} tokens)", metric_type=key, metric_name=label,
                   metric_value=float(value))
        for key, label, value in figures if isinstance(value, (int, float))
    ]
