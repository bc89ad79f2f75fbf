"""Sparsity-artifact diagnostics on hand-built crosscoders whose answers are planted.

Every crosscoder here reads orthonormal axes: latent j's encoder picks one model's coefficient on its axis, so its
code is that coefficient, and its decoders say how much of the axis it writes in each model. Activations are built
from the same axes, so which latent should be flagged, and by how much, is known exactly.
"""

from __future__ import annotations

import math

import pytest
import torch

from crosscoder_pl.analysis.diagnostics import (
    DiagnosticRules,
    central_interval,
    cofiring,
    complete_shrinkage,
    find_twins,
    heldout_template_mask,
    latent_decoupling,
    sparsity_diagnostics,
    template_share,
)
from crosscoder_pl.analysis.scaling import latent_scaling
from crosscoder_pl.analysis.taxonomy import (
    Thresholds,
    build_taxonomy,
    heldout_statistics,
)
from crosscoder_pl.crosscoder import CrossCoder

D = 16
BASE, CHAT = 0, 1


def axis_crosscoder(latents: list[tuple[int, int, torch.Tensor, torch.Tensor]]) -> CrossCoder:
    """Folded (scales 1), threshold 0. Per latent: (model whose activation it reads, axis it reads, base decoder,
    chat decoder)."""
    cc = CrossCoder(D, len(latents), k=1, threshold=0.0, folded=True)
    with torch.no_grad():
        cc.W_enc.zero_()
        cc.b_enc.zero_()
        cc.b_dec.zero_()
        for j, (model, axis, base, chat) in enumerate(latents):
            cc.W_enc[model, axis, j] = 1.0
            cc.W_dec[j, BASE], cc.W_dec[j, CHAT] = base, chat
    return cc.eval()


E = torch.eye(D)
# Shared latents (the comparison group): axis 2+i, present in the base model at strength S[i] (Δnorm in [0.4, 0.6)).
S = [0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2]
SHRUNK, CHAT_ONLY, DECOUPLED, BASE_TWIN = 0, 1, 2, 3


def shrinkage_setup(n: int = 400) -> tuple[CrossCoder, torch.Tensor]:
    """Latent 0: a truly shared concept (axis 0, equal in both models) whose base decoder was shrunk to 0.05
    (Δnorm 0.975: chat-only). Latent 1: a truly chat-only concept (axis 1, absent from the base activations, base
    decoder 0). Latents 2 and 3: one shared concept (axis 10, equal in both models) decoupled into a chat-only latent
    and a base-only latent that fire together. Latents 4..: shared latents."""
    latents = [
        (CHAT, 0, 0.05 * E[0], E[0]),
        (CHAT, 1, torch.zeros(D), E[1]),
        (CHAT, 10, torch.zeros(D), E[10]),
        (BASE, 10, E[10], torch.zeros(D)),
        *[(CHAT, 2 + i, s * E[2 + i], E[2 + i]) for i, s in enumerate(S)],
    ]
    g = torch.Generator().manual_seed(0)
    coef = 0.5 + torch.rand(n, D, generator=g)  # every concept on every token, random positive strength
    presence = torch.zeros(2, D)  # how much of each axis each model's activation holds
    presence[:, 0] = 1.0
    presence[CHAT, 1] = 1.0
    presence[:, 10] = 1.0
    for i, s in enumerate(S):
        presence[:, 2 + i] = torch.tensor([s, 1.0])
    x = torch.einsum("nd,md->nmd", coef, presence)
    return axis_crosscoder(latents), x


def test_complete_shrinkage_flags_the_shrunk_shared_latent_not_the_true_chat_only_one() -> None:
    cc, x = shrinkage_setup()
    taxonomy = build_taxonomy(cc, heldout_statistics(cc, x), Thresholds())
    chat_only, shared = taxonomy.members("chat_only").tolist(), taxonomy.members("shared").tolist()
    assert chat_only == [SHRUNK, CHAT_ONLY, DECOUPLED] and shared == list(range(4, 4 + len(S)))
    scaling = latent_scaling(cc, x, torch.arange(cc.n_latents))
    # The shrunk latent's base error holds the whole concept: nu_eps = 1 (a shared latent's); nu_r = 0.05.
    assert scaling.nu_eps[SHRUNK] == pytest.approx(1.0, abs=1e-5)
    assert scaling.nu_r[SHRUNK] == pytest.approx(0.05, abs=1e-5)
    assert scaling.nu_eps[CHAT_ONLY] == pytest.approx(0.0, abs=1e-6) and scaling.nu_r[CHAT_ONLY] == pytest.approx(0.0, abs=1e-6)
    # The decoupled chat-only latent: the base-only twin reconstructs the concept in the base model.
    assert scaling.nu_r[DECOUPLED] == pytest.approx(1.0, abs=1e-5) and scaling.nu_eps[DECOUPLED] == pytest.approx(0.0, abs=1e-5)
    assert scaling.nu_eps[4:].tolist() == pytest.approx(S, abs=1e-5)

    result = sparsity_diagnostics(cc, x, {name: taxonomy.members(name) for name in ("chat_only", "base_only", "shared")},
                                  scaling, DiagnosticRules())
    shrink, decouple = result.summary["complete_shrinkage"], result.summary["latent_decoupling"]
    low, high = shrink["shared_interval"]
    assert 0.85 < low < 0.87 and 1.18 < high < 1.2  # central 95% of S (linear quantiles)
    # Of the three chat-only latents, only the shrunk one has a shared-like nu_eps; only the decoupled one a
    # shared-like nu_r.
    assert (shrink["n_chat_only"], shrink["n_inside"], shrink["share_inside"]) == (3, 1, pytest.approx(1 / 3))
    assert (decouple["n_chat_only"], decouple["n_inside"]) == (3, 1)
    assert shrink["median_shared"] == pytest.approx(1.025, abs=1e-5)
    flags = {name: result.columns[name][:4] for name in ("shrinkage_suspect", "decoupling_suspect")}
    assert flags == {"shrinkage_suspect": [True, False, False, None], "decoupling_suspect": [False, False, True, None]}
    assert result.columns["twin_latent"][DECOUPLED] == BASE_TWIN and result.columns["twin_latent"][BASE_TWIN] == DECOUPLED
    assert result.columns["twin_cofiring"][DECOUPLED] == pytest.approx(1.0)


def test_shared_range_share_counts_defined_chat_only_values_against_the_central_interval() -> None:
    shared = torch.arange(101, dtype=torch.float32) / 100  # 0.00 .. 1.00: central 95% is [0.025, 0.975]
    assert central_interval(shared, 0.95) == pytest.approx((0.025, 0.975))
    chat_only = torch.tensor([0.01, 0.03, 0.5, 0.97, 0.98, float("nan")])
    inside, result = complete_shrinkage(chat_only, shared, 0.95)
    assert inside.tolist() == [False, True, True, True, False, False]
    assert (result["n_chat_only"], result["n_inside"], result["share_inside"]) == (5, 3, pytest.approx(0.6))
    assert central_interval(shared, 0.5) == pytest.approx((0.25, 0.75))
    _, empty = latent_decoupling(torch.tensor([float("nan")]), torch.tensor([]), 0.95)
    assert empty["n_chat_only"] == 0 and math.isnan(empty["share_inside"]) and all(map(math.isnan, empty["shared_interval"]))


def twins_setup() -> tuple[CrossCoder, torch.Tensor]:
    """Latent 0 (chat-only) and latent 1 (base-only): one concept on axis 0 split in two, same direction (cos 1).
    Latent 2 (chat-only, axis 3) and latent 3 (base-only): decoder cosine 0.8, not twins. Latent 4: shared.

    Token i: the chat activation holds axis 0 when i % 4 != 3, the base one when i % 4 != 2, so the pair fires
    together on half the tokens, each alone on a quarter: Jaccard 2/4 / (3/4 + 3/4 - 2/4) = 0.5."""
    tilted = 0.8 * E[3] + 0.6 * E[4]
    latents = [
        (CHAT, 0, torch.zeros(D), 2.0 * E[0]),
        (BASE, 0, 0.5 * E[0], torch.zeros(D)),
        (CHAT, 3, torch.zeros(D), E[3]),
        (BASE, 4, tilted, torch.zeros(D)),
        (CHAT, 5, E[5], E[5]),
    ]
    n = 40
    i = torch.arange(n)
    x = torch.zeros(n, 2, D)
    x[:, CHAT, 0] = (i % 4 != 3).float() * 2.0
    x[:, BASE, 0] = (i % 4 != 2).float() * 3.0
    x[:, CHAT, 3] = 1.0
    x[:, BASE, 4] = 1.0
    x[:, :, 5] = 1.0
    return axis_crosscoder(latents), x


def test_twins_found_by_decoder_direction_and_their_cofiring_measured() -> None:
    cc, x = twins_setup()
    twins = find_twins(cc, torch.tensor([0, 2]), torch.tensor([1, 3]), min_cosine=0.9)
    assert twins.chat.tolist() == [0] and twins.base.tolist() == [1]
    assert twins.cosine.tolist() == pytest.approx([1.0])
    assert twins.base_partner.tolist() == [0, -1] and twins.base_cosine[0] == pytest.approx(1.0)
    assert math.isnan(twins.base_cosine[1])
    loose = find_twins(cc, torch.tensor([0, 2]), torch.tensor([1, 3]), min_cosine=0.7)
    assert loose.chat.tolist() == [0, 2] and loose.base.tolist() == [1, 3]
    assert loose.cosine.tolist() == pytest.approx([1.0, 0.8])

    firing = cofiring(cc, x, twins.chat, twins.base, chunk_tokens=7)
    assert (firing.chat.tolist(), firing.base.tolist(), firing.both.tolist()) == ([30], [30], [20])
    assert firing.jaccard.tolist() == pytest.approx([0.5])
    # Each twin alone on 10 tokens (at its full, "high" activation; the other at 0), either high on 40.
    assert firing.divergence.tolist() == pytest.approx([0.5])
    chunked = cofiring(cc, x, twins.chat, twins.base, chunk_tokens=1000)
    assert chunked.jaccard.tolist() == firing.jaccard.tolist()


def test_twin_divergence_uses_the_pairs_larger_maximum() -> None:
    """Activations are divided by the pair's larger maximum (the reference's "abs_max_act"): high above 0.4, low at
    most 0.1, anything between is neither."""
    cc, x = twins_setup()
    x[:, CHAT, 0] = 0.5  # chat twin: 0.5 * 1 (encoder reads the coefficient) -> relative 1/6: neither high nor low
    x[:, BASE, 0] = 3.0
    firing = cofiring(cc, x, torch.tensor([0]), torch.tensor([1]))
    assert firing.both.tolist() == [40] and firing.jaccard.tolist() == pytest.approx([1.0])
    assert firing.divergence.tolist() == pytest.approx([0.0])
    x[:, CHAT, 0] = 0.2  # relative 1/15 <= 0.1: low, so every high base token is "only base high"
    assert cofiring(cc, x, torch.tensor([0]), torch.tensor([1])).divergence.tolist() == pytest.approx([1.0])
    x[:, :, 0] = 0.0
    never = cofiring(cc, x, torch.tensor([0]), torch.tensor([1]))
    assert never.jaccard[0].isnan() and never.divergence[0].isnan()


def test_sparsity_diagnostics_writes_twin_columns_for_both_members() -> None:
    cc, x = twins_setup()
    classes = {"chat_only": torch.tensor([0, 2]), "base_only": torch.tensor([1, 3]), "shared": torch.tensor([4])}
    result = sparsity_diagnostics(cc, x, classes, None, DiagnosticRules(), chunk_tokens=9)
    cols = result.columns
    assert cols["twin_latent"] == [1, 0, None, None, None]
    assert cols["twin_cosine"][:2] == pytest.approx([1.0, 1.0]) and cols["twin_cofiring"][0] == pytest.approx(0.5)
    assert cols["template_share"] == [None] * 5  # no template mask given
    twins = result.summary["twins"]
    assert (twins["n_pairs"], twins["n_base_only_with_twin"]) == (1, 1)
    assert twins["pairs"][0] == {"chat": 0, "base": 1, "cosine": pytest.approx(1.0), "fired_chat": 30, "fired_base": 30,
                                 "fired_both": 20, "cofiring": pytest.approx(0.5), "divergence": pytest.approx(0.5)}
    assert "complete_shrinkage" not in result.summary and "template" not in result.summary


def test_template_share_known_answer_on_a_planted_mask() -> None:
    """20 rows: 0-9 chat, 10-19 web. Template rows: 0, 1, 2 (and web row 10, ignored as a web row can hold none).
    Latent 0 fires everywhere at 1: 3 of its 10 chat firings on the template. Latent 1 fires at 2 on rows 0-2 and at
    1 on rows 3-5: count share 3/6, mass share 6/9. Latent 2 fires only on web rows: nan."""
    latents = [(CHAT, j, E[j], E[j]) for j in range(3)]
    cc = axis_crosscoder(latents)
    x = torch.zeros(20, 2, D)
    x[:, CHAT, 0] = 1.0
    x[:3, CHAT, 1], x[3:6, CHAT, 1] = 2.0, 1.0
    x[10:, CHAT, 2] = 1.0
    template = torch.zeros(20, dtype=torch.bool)
    template[[0, 1, 2, 10]] = True
    chat_rows = torch.arange(20) < 10
    result = template_share(cc, x, template, chat_rows, chunk_tokens=4)
    assert result.share.tolist()[:2] == pytest.approx([0.3, 0.5]) and result.share[2].isnan()
    assert result.mass_share.tolist()[:2] == pytest.approx([0.3, 6 / 9]) and result.mass_share[2].isnan()
    assert (result.n_tokens, result.n_template) == (10, 3)
    everywhere = template_share(cc, x, template, None)
    assert everywhere.share.tolist() == pytest.approx([0.2, 0.5, 0.1])

    classes = {"chat_only": torch.tensor([0, 1]), "base_only": torch.tensor([], dtype=torch.long),
               "shared": torch.tensor([2])}
    diag = sparsity_diagnostics(cc, x, classes, None, DiagnosticRules(), template=(template, chat_rows),
                                extra_groups={"chat_specific": torch.tensor([1])})
    assert diag.columns["template_share"][:2] == pytest.approx([0.3, 0.5]) and diag.columns["template_share"][2] is None
    summary = diag.summary["template"]
    # Majority is strict (> 0.5, the reference's lmsys_ctrl_% > 0.5): latent 1 at exactly 0.5 is not "mainly".
    assert summary["chat_only"] == {"n_fired": 2, "n_mainly_template": 0, "share_mainly_template": 0.0}
    assert summary["shared"]["n_fired"] == 0 and math.isnan(summary["shared"]["share_mainly_template"])
    lower = sparsity_diagnostics(cc, x, classes, None, DiagnosticRules(template_majority=0.4),
                                 template=(template, chat_rows))
    assert lower.summary["template"]["chat_only"]["n_mainly_template"] == 1
    with pytest.raises(ValueError, match="bool masks"):
        template_share(cc, x, template[:5], None)


def test_heldout_template_mask_maps_token_positions_to_rows() -> None:
    pytest.importorskip("crosscoder_pl.data.chat_positions")
    from types import SimpleNamespace

    from crosscoder_pl.data.activations import TokenTable

    sot, eot, user, model, nl, word = 5, 6, 7, 8, 9, 10
    vocab = {"<start_of_turn>": [sot], "<end_of_turn>": [eot], "<start_of_turn>user\n": [sot, user, nl],
             "<start_of_turn>model\n": [sot, model, nl], "<end_of_turn>\n": [eot, nl]}
    tokenizer = SimpleNamespace(encode=lambda text, add_special_tokens=False: vocab[text])
    ids = torch.tensor([[1, sot, user, nl, word, eot, nl, sot, model, nl, word], [1, word, word, word, 0, 0, 0, 0, 0, 0, 0]])
    attention = (torch.arange(11) < torch.tensor([[11], [4]])).long()
    seq = torch.tensor([0] * 10 + [1] * 3)
    pos = torch.tensor([*range(1, 11), 1, 2, 3])  # BOS dropped
    tokens = TokenTable(ids, attention, torch.tensor([1, 0], dtype=torch.int8), seq, pos)
    template, chat_rows = heldout_template_mask(tokens, tokenizer)
    assert template.tolist() == [True, True, True, False, True, True, True, True, True, False, False, False, False]
    assert chat_rows.tolist() == [True] * 10 + [False] * 3
    assert heldout_template_mask(tokens, None) is None


def test_run_analyses_writes_the_template_share_from_the_token_table(tmp_path) -> None:
    """End to end: held-out rows carrying token ids, a tokenizer with the chat markers -> latents.csv's template
    share equals the direct computation on the planted mask; metrics.json and the card report it."""
    import csv
    from types import SimpleNamespace

    from test_analysis_causal import tiny_pair
    from test_analysis_report import crosscoder, inputs, settings

    from crosscoder_pl.artifact.writer import run_analyses
    from crosscoder_pl.config import AnalysisConfig, DashboardSettings
    from crosscoder_pl.data.activations import TokenTable, with_tokens

    sot, eot, user, nl = 3, 4, 5, 6
    vocab = {"<start_of_turn>": [sot], "<end_of_turn>": [eot], "<start_of_turn>user\n": [sot, user, nl],
             "<start_of_turn>model\n": [sot, 7, nl], "<end_of_turn>\n": [eot, nl]}
    pair = tiny_pair(identical=False)
    pair.tokenizer = SimpleNamespace(encode=lambda text, add_special_tokens=False: vocab[text],
                                     decode=lambda ids: "".join(f"<{int(i)}>" for i in ids))
    paired, ids, mask = inputs(pair)  # 6 sequences x positions 1..11
    seq_ids = torch.full((6, 12), 20)
    seq_ids[:, 0] = 2
    seq_ids[1::2, 1:4] = torch.tensor([sot, user, nl])  # chat sequences open with a user header ...
    seq_ids[1::2, 8:10] = torch.tensor([eot, nl])  # ... and close it
    seq_ids[0, 1:4] = torch.tensor([sot, user, nl])  # a web sequence's look-alike: ignored (web rows do not count)
    table = TokenTable(seq_ids, torch.ones(6, 12, dtype=torch.long), torch.tensor([0, 1] * 3, dtype=torch.int8),
                       torch.arange(6).repeat_interleave(11), torch.arange(1, 12).repeat(6))
    cfg = settings()
    cfg["causal"]["enabled"] = cfg["splice"]["enabled"] = False
    cc = crosscoder(paired)
    metrics = run_analyses(cc, pair, with_tokens(paired, table), ids, mask, tmp_path, AnalysisConfig.read(cfg), {}, "cmd",
                           dashboard=DashboardSettings(enabled=False))  # the stand-in tokenizer only encodes

    pos = torch.arange(1, 12).repeat(6)
    chat_rows = torch.arange(6).repeat_interleave(11) % 2 == 1
    template = ((pos <= 3) | (pos == 8) | (pos == 9)) & chat_rows | ((pos <= 3) & ~chat_rows)
    expected = template_share(cc.fold().eval(), paired, template, chat_rows).share
    with (tmp_path / "latents.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    written = [float(r["template_share"]) if r["template_share"] else math.nan for r in rows]
    assert written == pytest.approx(expected.tolist(), nan_ok=True, abs=1e-12)
    assert not all(math.isnan(v) for v in written)
    summary = metrics["diagnostics"]["template"]
    assert (summary["n_chat_tokens"], summary["n_template_tokens"]) == (33, 15)
    assert "held-out chat tokens): latents firing mainly" in (tmp_path / "README.md").read_text()


def test_no_twins_no_pass() -> None:
    cc, x = twins_setup()
    none = cofiring(cc, x, torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))
    assert none.jaccard.numel() == 0 and none.divergence.numel() == 0
    twins = find_twins(cc, torch.tensor([0]), torch.tensor([], dtype=torch.long), 0.9)
    assert twins.chat.numel() == 0 and twins.base_partner.numel() == 0


def test_the_shared_range_leaves_out_shared_latents_outside_the_reliability_filter() -> None:
    """An unreliable fit on one shared latent (nu_eps = -10) would stretch the shared range down to it; the
    reliability filter keeps it out, and the chat-only latents are judged against the reliable shared fits."""
    cc, x = shrinkage_setup()
    taxonomy = build_taxonomy(cc, heldout_statistics(cc, x), Thresholds())
    classes = {name: taxonomy.members(name) for name in ("chat_only", "base_only", "shared")}
    scaling = latent_scaling(cc, x, torch.arange(cc.n_latents))
    scaling.nu_eps[4] = -10.0  # the first shared latent
    stretched = sparsity_diagnostics(cc, x, classes, scaling, DiagnosticRules()).summary["complete_shrinkage"]
    filtered = sparsity_diagnostics(cc, x, classes, scaling,
                                    DiagnosticRules(shared_nu_range=(-0.1, 2.0))).summary["complete_shrinkage"]
    assert stretched["shared_interval"][0] < -5 and stretched["n_inside"] == 3  # nu_eps = 0 too is "shared-like"
    assert filtered["shared_interval"][0] > 0.85 and filtered["n_inside"] == 1  # only the shrunk latent
    assert (stretched["n_shared"], filtered["n_shared"]) == (len(S), len(S) - 1)
