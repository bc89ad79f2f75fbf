"""Splice-in evaluation against a direct computation with full logits (independent of the chunked code path)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from test_analysis_causal import LAYER, crosscoder, probes, tiny_pair

from crosscoder_pl.analysis.splice import _fraction_recovered, splice_evaluation
from crosscoder_pl.data.activations import content_mask, position_ids
from crosscoder_pl.hooks import edit_residual


@torch.inference_mode()
def logprobs(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, edit=None) -> torch.Tensor:
    """Full-vocabulary next-token log-probs ``[P, S, V]``, the layer output replaced by ``edit(h)`` if given."""
    captured = []

    def fn(hidden: torch.Tensor) -> torch.Tensor:
        captured.append(hidden)
        return hidden if edit is None else edit(hidden)

    with edit_residual(model, LAYER, fn):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).logits
    return logits.float().log_softmax(-1), captured[0]


def direct_splice(cc, pair, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, dict[str, float]]:
    """docs/method.md "Splice-in evaluation", written out with whole tensors."""
    content = content_mask(mask)
    scored = content[:, :-1] & mask[:, 1:].bool()  # position t predicts token t + 1, which must exist
    cleans = [logprobs(model, ids, mask) for model in (pair.base, pair.chat)]
    residual = torch.stack([h for _, h in cleans], dim=2)  # [P, S, 2, d]
    with torch.inference_mode():
        recon = cc(residual)
    out = {}
    for m, (name, model) in enumerate((("base", pair.base), ("chat", pair.chat))):
        clean = cleans[m][0]
        spliced, _ = logprobs(model, ids, mask, lambda h: torch.where(content[..., None], recon[:, :, m], h))
        zeroed, _ = logprobs(model, ids, mask, lambda h: torch.where(content[..., None], torch.zeros_like(h), h))

        def ce(lp: torch.Tensor) -> float:
            nll = -lp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
            return float(nll[scored].mean())

        kl = (clean.exp() * (clean - spliced)).sum(-1)
        c, s, z = ce(clean), ce(spliced), ce(zeroed)
        out[name] = {"ce_clean": c, "ce_splice": s, "ce_zero": z, "ce_increase": s - c,
                     "kl_splice": float(kl[content].mean()), "frac_recovered": (z - s) / (z - c)}
    return out


def test_splice_figures_match_the_direct_computation() -> None:
    cc, pair = crosscoder(tied_decoders=False), tiny_pair(identical=False)
    ids, mask = probes(pair.base)
    expected = direct_splice(cc, pair, ids, mask)
    got = splice_evaluation(cc, pair, ids, mask)
    assert set(got) == {"base", "chat"}
    for name in ("base", "chat"):
        assert set(got[name]) == set(expected[name])
        for key, value in expected[name].items():
            assert got[name][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, key)
    # Not a degenerate case: the (random) reconstruction costs something and zeroing the layer costs more.
    for figures in expected.values():
        assert figures["ce_splice"] > figures["ce_clean"] + 1e-3 and figures["kl_splice"] > 1e-4
        assert figures["ce_zero"] > figures["ce_clean"] + 1e-3


def test_fraction_recovered_and_its_undefined_cases(caplog) -> None:
    """(CE_zero - CE_splice) / (CE_zero - CE_clean); nan with a warning when zeroing does not raise the CE."""
    assert _fraction_recovered(1.0, 1.5, 3.0, "chat") == pytest.approx(0.75)
    assert _fraction_recovered(1.0, 3.5, 3.0, "chat") == pytest.approx(-0.25)  # worse than zeroing
    assert _fraction_recovered(1.0, 1.25, 1.5, "base") == pytest.approx(0.5)  # a gap below 1 nat is a gap
    assert math.isnan(_fraction_recovered(2.0, 2.5, 2.0, "base"))  # no gap
    assert math.isnan(_fraction_recovered(2.0, 1.5, 1.0, "chat"))  # negative gap
    assert caplog.text.count("gap recovered is nan") == 2


def test_a_model_whose_logits_are_not_its_head_is_refused(monkeypatch) -> None:
    """The chunked scoring recomputes logits from the final hidden state; a model that rescales them otherwise
    would be scored wrongly, so it is refused before any figure is computed."""
    cc, pair = crosscoder(tied_decoders=False), tiny_pair(identical=False)
    ids, mask = probes(pair.base)
    forward = pair.chat.forward
    monkeypatch.setattr(pair.chat, "forward", lambda **kw: SimpleNamespace(logits=2 * forward(**kw).logits))
    with pytest.raises(ValueError, match="cannot score it"):
        splice_evaluation(cc, pair, ids, mask)
