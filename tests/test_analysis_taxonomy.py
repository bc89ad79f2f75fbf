"""Taxonomy on a hand-built crosscoder with planted base-only, chat-only, shared, unclassified and dead latents."""

import dataclasses
import math

import pytest
import torch

from crosscoder_pl.analysis.decoder_norms import decoder_cosine, delta_norm
from crosscoder_pl.analysis.stats import nan_median
from crosscoder_pl.analysis.taxonomy import (
    CLASSES,
    Thresholds,
    build_taxonomy,
    classify,
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


def test_delta_norm_matches_the_formula_on_random_norms() -> None:
    """Norms of all sizes (not 1): Δ = 0.5 ((chat - base) / max + 1), in the normalised space, unfolded too."""
    torch.manual_seed(3)
    cc = CrossCoder(D, 20, k=1, scales=[4.0, 0.25])
    with torch.no_grad():
        cc.W_dec.mul_(torch.rand(20, 2, 1) * 7)
        cc.W_dec[5] = 0  # both decoders zero: no Δnorm
    norms = cc.W_dec.detach().norm(dim=-1)  # unfolded: the parameters live in the normalised space
    base, chat = norms[:, 0].double(), norms[:, 1].double()
    expected = 0.5 * ((chat - base) / torch.maximum(chat, base) + 1)
    got = delta_norm(cc)
    assert got[5].isnan() and expected[5].isnan()
    keep = torch.arange(20) != 5
    torch.testing.assert_close(got[keep].double(), expected[keep], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(delta_norm(cc.fold())[keep], got[keep], rtol=1e-5, atol=1e-6)
    # Planted ratios: chat twice the base -> 0.75; base four times the chat -> 0.125.
    with torch.no_grad():
        cc.W_dec[:2] /= cc.W_dec[:2].norm(dim=-1, keepdim=True)
        cc.W_dec[:2] *= torch.tensor([[3.0, 6.0], [8.0, 2.0]])[..., None]
    assert delta_norm(cc)[:2].tolist() == pytest.approx([0.75, 0.125], abs=1e-6)


def test_decoder_cosine_matches_the_direct_formula() -> None:
    torch.manual_seed(4)
    cc = CrossCoder(D, 10, k=1, scales=[4.0, 0.25])
    w = cc.W_dec.detach()
    expected = (w[:, 0] * w[:, 1]).sum(-1) / (w[:, 0].norm(dim=-1) * w[:, 1].norm(dim=-1))
    torch.testing.assert_close(decoder_cosine(cc), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(decoder_cosine(cc.fold()), expected, rtol=1e-5, atol=1e-6)  # scale-free


def test_classify_at_the_boundaries() -> None:
    """Minder et al.: base_only Δ <= 0.1, chat_only Δ >= 0.9, shared 0.4 <= Δ < 0.6; dead first; nan unclassified."""
    delta = torch.tensor([0.1, 0.10001, 0.9, 0.89999, 0.4, 0.39999, 0.6, 0.59999, 0.3, 0.7, 0.0, 1.0, float("nan"),
                          0.5, 0.95])
    counts = torch.tensor([1.0] * 13 + [0.0, 0.0])
    expected = ["base_only", "unclassified", "chat_only", "unclassified", "shared", "unclassified", "unclassified",
                "shared", "unclassified", "unclassified", "base_only", "chat_only", "unclassified", "dead", "dead"]
    classes = classify(delta, counts, Thresholds())
    assert [CLASSES[i] for i in classes.tolist()] == expected
    custom = classify(delta, counts, Thresholds(base_only_max=0.2, shared_min=0.3, shared_max=0.7, chat_only_min=0.8))
    expected_custom = ["base_only"] * 2 + ["chat_only"] * 2 + ["shared"] * 5 + ["unclassified"]
    assert [CLASSES[i] for i in custom.tolist()][:10] == expected_custom


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base_only_max": 0.0},
        {"chat_only_min": 1.0},
        {"shared_max": 0.9, "chat_only_min": 0.9},  # a shared class right up to chat_only is allowed
        {"base_only_max": 0.0, "shared_min": 0.01, "shared_max": 0.99, "chat_only_min": 1.0},
    ],
)
def test_edge_thresholds_are_accepted(kwargs) -> None:
    thresholds = Thresholds(**kwargs)
    assert all(getattr(thresholds, key) == value for key, value in kwargs.items())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base_only_max": -0.05},
        {"base_only_max": 0.4, "shared_min": 0.4},  # base_only and shared would touch
        {"base_only_max": 0.45},  # ... or overlap
        {"shared_min": 0.5, "shared_max": 0.5},  # empty shared class
        {"shared_max": 0.95, "chat_only_min": 0.9},
        {"chat_only_min": 1.05},
    ],
)
def test_inconsistent_thresholds_are_refused(kwargs) -> None:
    with pytest.raises(ValueError, match="taxonomy thresholds must satisfy"):
        Thresholds(**kwargs)


def test_thresholds_are_immutable_once_validated() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Thresholds().base_only_max = 0.7


def test_heldout_statistics_on_fractional_planted_firing() -> None:
    """Latents that fire on 1/4, 3/4 and 0 of the tokens; L0 and frequencies are fractions, not integers."""
    cc = CrossCoder(D, 3, k=1, threshold=0.0, folded=True)
    with torch.no_grad():
        cc.W_enc.zero_()
        cc.W_enc[0, 0, 0] = 1.0  # fires where x_base[0] > 0
        cc.W_enc[1, 1, 1] = -1.0  # fires where x_chat[1] < 0
        cc.b_enc.copy_(torch.tensor([0.0, 0.0, -1.0]))
    x = torch.zeros(8, 2, D)
    x[:2, 0, 0] = 1.0  # latent 0: 2 of 8 tokens
    x[:6, 1, 1] = -1.0  # latent 1: 6 of 8 tokens
    stats = heldout_statistics(cc.eval(), x, chunk_tokens=3)
    assert stats.counts.tolist() == [2, 6, 0] and stats.n_tokens == 8
    assert stats.l0 == pytest.approx(1.0) and stats.dead_fraction == pytest.approx(1 / 3)
    taxonomy = build_taxonomy(cc, stats, Thresholds())
    assert taxonomy.firing_frequency.tolist() == [0.25, 0.75, 0.0]
    x[7, 1, 1] = -1.0  # latent 1 now on 7 of 8: L0 = 9 / 8
    assert heldout_statistics(cc, x).l0 == pytest.approx(1.125)


def test_heldout_statistics_variance_explained_is_pooled_in_normalised_space() -> None:
    torch.manual_seed(5)
    cc = CrossCoder(D, 16, k=2, scales=[4.0, 0.25], threshold=0.0)
    x = torch.randn(40, 2, D) * torch.tensor([0.25, 4.0])[:, None] + 1.0
    stats = heldout_statistics(cc.eval(), x, chunk_tokens=7)
    x_n, x_hat_n = x * cc.scales[:, None], cc.decode(cc.encode(x), normalised=True).detach()
    expected = 1 - (x_n - x_hat_n).pow(2).sum((0, 2)) / (x_n - x_n.mean(0)).pow(2).sum((0, 2))
    torch.testing.assert_close(stats.variance_explained, expected, rtol=1e-4, atol=1e-5)
    assert not stats.variance_explained.requires_grad and not stats.counts.requires_grad  # no autograd graph


@pytest.mark.parametrize("shape", [(10, D), (10, 3, D), (10, 2, D + 1), (10, 2, D - 1), (10, 1, 2, D), (0, 2, D)])
def test_heldout_statistics_refuses_every_wrong_shape(shape) -> None:
    with pytest.raises(ValueError, match=r"\[tokens > 0, 2, 8\]"):
        heldout_statistics(planted_crosscoder(), torch.randn(*shape))


def test_nan_median_and_members() -> None:
    assert nan_median(torch.tensor([1.0, float("nan"), 3.0, 2.0, 10.0])) == 2.5  # mean of the two middle values
    assert nan_median(torch.tensor([4.0, float("nan"), 1.0])) == 2.5
    assert nan_median(torch.tensor([7.0])) == 7.0
    assert math.isnan(nan_median(torch.tensor([float("nan")]))) and math.isnan(nan_median(torch.tensor([])))
    cc = planted_crosscoder()
    taxonomy = build_taxonomy(cc, heldout_statistics(cc, torch.randn(10, 2, D)), Thresholds())
    members = {name: taxonomy.members(name).tolist() for name in CLASSES}
    assert members == {"shared": [2], "dead": [4, 5], "unclassified": [3], "base_only": [0], "chat_only": [1]}


def test_heldout_statistics_builds_no_autograd_graph(monkeypatch) -> None:
    """At 73k latents a graph through every chunk's encode would hold gigabytes: the pass runs without autograd."""
    cc = planted_crosscoder()
    grad_enabled = []
    encode = cc.encode
    monkeypatch.setattr(cc, "encode", lambda x: grad_enabled.append(torch.is_grad_enabled()) or encode(x))
    heldout_statistics(cc, torch.randn(10, 2, D), chunk_tokens=4)
    assert grad_enabled == [False, False, False]


def test_heldout_statistics_never_wait_for_other_ranks(monkeypatch) -> None:
    """Under DDP only rank 0 computes the held-out statistics (for the artifact): the metrics must not synchronise,
    or rank 0 would wait for ranks that have left. Simulated: a distributed run whose gather would fail."""
    import torchmetrics.metric

    def gather(*args, **kwargs):
        raise RuntimeError("a synchronising metric waited for the other ranks")

    cc = planted_crosscoder()
    x = torch.randn(20, 2, D)
    want = heldout_statistics(cc, x, chunk_tokens=8)
    monkeypatch.setattr(torchmetrics.metric, "jit_distributed_available", lambda: True)
    monkeypatch.setattr(torchmetrics.metric, "gather_all_tensors", gather)
    got = heldout_statistics(cc, x, chunk_tokens=8)
    assert torch.equal(got.counts, want.counts) and torch.equal(got.variance_explained, want.variance_explained)
