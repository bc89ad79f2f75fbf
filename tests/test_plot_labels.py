"""The artifact's figures say what they show: thresholds and medians labelled, axes with units, notable latents
named by id (planted values, read back from the figures' artists)."""

from __future__ import annotations

import math

import torch

from crosscoder_pl.analysis.causal import CausalResult, cosine_vs_causal_figure
from crosscoder_pl.analysis.taxonomy import (
    CLASSES,
    DEAD,
    SHARED,
    Taxonomy,
    Thresholds,
    delta_histogram_figure,
)


def texts(fig) -> list[str]:
    ax = fig.axes[0]
    return [t.get_text() for t in ax.texts] + [ax.get_xlabel(), ax.get_ylabel(), ax.get_title()]


def test_delta_histogram_labels_thresholds_and_names_the_extreme_latents() -> None:
    delta = torch.linspace(0.2, 0.8, 10)
    delta[3], delta[7], delta[5] = 0.02, 0.97, 0.99  # latent 5 is dead: never named, whatever its Δnorm
    classes = torch.full((10,), SHARED)
    classes[5] = DEAD
    taxonomy = Taxonomy(delta, torch.zeros(10), torch.ones(10), classes, n_tokens=100)
    fig = delta_histogram_figure(taxonomy, Thresholds(), n_notable=1)
    labels = texts(fig)
    for label in ("base-only ≤ 0.1", "shared ≥ 0.4", "shared < 0.6", "chat-only ≥ 0.9"):
        assert label in labels
    notable = next(t for t in labels if t.startswith("most base-sided"))
    assert notable == "most base-sided: #3 (0.020)\nmost chat-sided: #7 (0.970)"
    xlabel, ylabel = fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel()
    assert "dimensionless" in xlabel and "log scale" in ylabel
    assert "9 live latents" in fig.axes[0].get_title() and len(CLASSES) == 5


def result(n: int) -> CausalResult:
    g = torch.Generator().manual_seed(0)
    pearson = torch.rand(n, generator=g)
    pearson[0] = math.nan  # undefined: not plotted, not named
    return CausalResult(latents=torch.arange(100, 100 + n), delta_norm=torch.full((n,), 0.5),
                        decoder_cosine=torch.rand(n, generator=g), kl=torch.rand(n, 2, 4, generator=g),
                        n_probes_active=torch.full((n,), 4), pearson=pearson)


def test_cosine_vs_causal_labels_medians_units_and_latent_ids() -> None:
    few = result(6)
    fig = cosine_vs_causal_figure(few)
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == [f"#{i}" for i in range(101, 106)]  # every plotted latent
    summary = few.summary()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [f"median cosine {summary['median_decoder_cosine']:.3f}", f"median Pearson {summary['median_pearson']:.3f}"]
    assert "−1 to 1" in ax.get_xlabel() and "−1 to 1" in ax.get_ylabel()

    many = result(40)
    ax = cosine_vs_causal_figure(many, max_labelled=20, n_notable=3).axes[0]
    defined = ~many.pearson.isnan()
    lowest = many.latents[defined][many.pearson[defined].argsort()[:3]]
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"#{int(i)}" for i in lowest)  # the least equivalent
