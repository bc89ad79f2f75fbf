"""The tokens a latent fires on most (the card's chat-specific table), against brute force."""

from pathlib import Path

import torch
from test_analysis_causal import LAYER, tiny_pair
from test_analysis_report import crosscoder, inputs, settings

from crosscoder_pl.analysis.card import _cell, render_card
from crosscoder_pl.analysis.top_tokens import latent_activations, top_tokens
from crosscoder_pl.artifact.writer import run_analyses
from crosscoder_pl.config import AnalysisConfig


class CharTokenizer:
    """Decodes id i as the character chr(65 + i % 26), and id 7 as markup that must not render."""

    def decode(self, ids: torch.Tensor) -> str:
        return "".join("<b>|" if i == 7 else chr(65 + i % 26) for i in ids.tolist())


def test_latent_activations_and_top_tokens_match_brute_force() -> None:
    pair = tiny_pair(identical=False)
    paired, ids, mask = inputs(pair)
    cc = crosscoder(paired).fold().eval()
    latents = torch.tensor([0, 3, 17, 40])
    acts = latent_activations(cc, pair, ids, mask, latents, probes_per_chunk=4)
    with torch.inference_mode():
        hidden = [m.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[LAYER + 1]
                  for m in (pair.base, pair.chat)]
        codes = cc.encode(torch.stack(hidden, dim=2))[..., latents]  # [probes, seq, 4]
    codes = codes.clone()
    codes[:, 0] = 0  # BOS
    codes[mask == 0] = 0  # padding
    torch.testing.assert_close(acts, codes, rtol=1e-5, atol=1e-6)
    assert (acts > 0).any()

    top = top_tokens(acts, ids, CharTokenizer(), n_top=3)
    for j, rows in enumerate(top):
        positions = [(int(p), int(s)) for p, s in (acts[..., j] > 0).nonzero()]
        brute = sorted(positions, key=lambda ps: (-float(acts[ps[0], ps[1], j]), ps[0] * ids.shape[1] + ps[1]))[:3]
        assert [(r.probe, r.position) for r in rows] == brute
        for r in rows:
            assert r.activation == float(acts[r.probe, r.position, j])
            assert r.token == CharTokenizer().decode(ids[r.probe, r.position : r.position + 1])


def test_card_lists_the_top_chat_specific_latents_with_their_tokens(tmp_path: Path) -> None:
    pair = tiny_pair(identical=False)
    pair.tokenizer = CharTokenizer()
    paired, ids, mask = inputs(pair)
    cc = crosscoder(paired)
    metrics = run_analyses(cc, pair, paired, ids, mask, tmp_path, AnalysisConfig.read(settings()), cc.metadata, "python train.py")
    listed = metrics["chat_specific_latents"]
    assert listed, "the planted chat-only latents 0-3 have a defined nu"
    scores = [row["neg_log_nu_eps"] for row in listed]
    assert scores == sorted(scores, reverse=True)
    assert {row["latent"] for row in listed} <= {0, 1, 2, 3}  # only chat-only latents (Δnorm >= 0.9)
    card = (tmp_path / "README.md").read_text()
    assert "## Top chat-specific latents" in card
    first = listed[0]
    assert f"| {first['latent']} | {first['delta_norm']:.3f} |" in card
    assert first["top_tokens"], "the strongest chat-only latent fires in the probes"
    for row in first["top_tokens"]:
        assert f"**{_cell(row['token'])}** ({row['activation']:.2g})" in card


def test_card_escapes_token_text() -> None:
    row = {"latent": 5, "delta_norm": 0.95, "nu_r": 0.1, "nu_eps": 0.01, "neg_log_nu_eps": 4.6,
           "firing_frequency": 0.01, "chat_specific": True,
           "top_tokens": [{"token": "<script>|", "context": "a\nb*", "activation": 2.0, "probe": 0, "position": 3}]}
    metrics = {"artifact": {"base_model": "b", "chat_model": "c", "layer": 1, "n_latents": 8, "d_model": 4, "k": 2,
                            "scales": [1.0, 1.0]},
               "validation": {"variance_explained": {"base": 0.9, "chat": 0.9}, "l0": 2.0, "dead_fraction": 0.0,
                              "n_tokens": 10},
               "chat_specific_latents": [row]}
    card = render_card(metrics, {}, "cmd")
    assert "a⏎b\\***\\<script\\>\\|** (2)" in card
    assert "<script>" not in card
