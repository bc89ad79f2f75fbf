"""Taxonomy on a hand-built crosscoder with planted base-only, chat-only, shared, unclassified and dead latents."""


import pytest
import torch

from crosscoder_pl.analysis.taxonomy import (
    CLASSES,
    Thresholds,
    build_taxonomy,
    decoder_cosine,
    delta_norm,
    heldout_statistics,
    plot_delta_histogram,
)
from crosscoder_pl.crosscoder import CrossCoder

D = 8
# (normalised base norm, normalised chat norm, fires?) -> expected class
PLANTED = [
    (1.0, 0.05, True, "base_only"),
    (0.05, 1.0, True, "chat_only"),
    (1.0, 1.0, True, "shared"),
    (0.5, 1.0, True, "unclassified"),  # Δ = 0.75
    (0.05, 1.0, False, "dead"),  # chat-only decoder, but dead is counted first
    (1.0, 1.0, False, "dead"),
]


def planted_crosscoder() -> CrossCoder:
    """Folded crosscoder with unequal per-model scales: raw decoder norms differ, normalised ones are planted."""
    scales = torch.tensor([4.0, 0.25])
    cc = CrossCoder(D, len(PLANTED), k=1, scales=scales, threshold=0.0, folded=True)
    with torch.no_grad():
        direction = torch.randn(len(PLANTED), 2, D)
        direction /= direction.norm(dim=-1, keepdim=True)
        norms = torch.tensor([[b, c] for b, c, _, _ in PLANTED])
        cc.W_dec.copy_(direction * (norms / scales)[..., None])
        cc.W_enc.zero_()
        cc.b_enc.copy_(torch.tensor([1.0 if fires else -1.0 for _, _, fires, _ in PLANTED]))
        cc.b_dec.zero_()
    return cc.eval()


def test_planted_classes_and_counts() -> None:
    cc = planted_crosscoder()
    stats = heldout_statistics(cc, torch.randn(50, 2, D), chunk_tokens=16)
    taxonomy = build_taxonomy(cc, stats, Thresholds())
    assert taxonomy.class_names() == [expected for *_, expected in PLANTED]
    counts = taxonomy.counts()
    assert list(counts) == list(CLASSES)
    assert sum(counts.values()) == cc.n_latents
    assert counts == {"shared": 1, "dead": 2, "unclassified": 1, "base_only": 1, "chat_only": 1}
    assert taxonomy.firing_frequency.tolist() == [1, 1, 1, 1, 0, 0]
    assert stats.l0 == 4 and stats.dead_fraction == pytest.approx(2 / 6)


def test_delta_norm_uses_normalised_space() -> None:
    delta = delta_norm(planted_crosscoder())
    assert delta[2] == pytest.approx(0.5) and delta[3] == pytest.approx(0.75)
    assert delta[0] == pytest.approx(0.025) and delta[1] == pytest.approx(0.975)


def test_decoder_cosine_of_identical_and_opposite_vectors() -> None:
    cc = planted_crosscoder()
    with torch.no_grad():
        cc.W_dec[0, 1] = 3 * cc.W_dec[0, 0]
        cc.W_dec[1, 1] = -cc.W_dec[1, 0]
    assert decoder_cosine(cc)[:2].tolist() == pytest.approx([1.0, -1.0], abs=1e-6)


def test_configurable_thresholds_and_bad_ones() -> None:
    cc = planted_crosscoder()
    stats = heldout_statistics(cc, torch.randn(10, 2, D))
    wide = build_taxonomy(cc, stats, Thresholds(shared_min=0.4, shared_max=0.8, chat_only_min=0.9))
    assert wide.class_names()[3] == "shared"
    with pytest.raises(ValueError, match="shared_min"):
        Thresholds(shared_min=0.7, shared_max=0.6)


def test_training_mode_and_bad_shapes_are_refused() -> None:
    cc = planted_crosscoder()
    with pytest.raises(ValueError, match=r"\[tokens > 0, 2, 8\]"):
        heldout_statistics(cc, torch.randn(10, D))
    with pytest.raises(ValueError, match="training mode"):
        heldout_statistics(cc.train(), torch.randn(10, 2, D))


def test_histogram_is_written(tmp_path) -> None:
    cc = planted_crosscoder()
    taxonomy = build_taxonomy(cc, heldout_statistics(cc, torch.randn(10, 2, D)), Thresholds())
    path = plot_delta_histogram(taxonomy, Thresholds(), tmp_path / "hist.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
