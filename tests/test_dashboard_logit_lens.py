"""Logit lens of decoder vectors against a direct computation, for Gemma's (1 + w) and Llama's w norm gains."""

from __future__ import annotations

import pytest
import torch
from test_analysis_causal import VOCAB, D, tiny_pair
from transformers import LlamaConfig, LlamaForCausalLM

from crosscoder_pl.crosscoder import CrossCoder
from crosscoder_pl.dashboard.logit_lens import logit_lens, norm_gain


def random_gains(model: torch.nn.Module) -> None:
    """Final-norm weights far from their init, so that leaving the gain out would change the ranking."""
    with torch.no_grad():
        model.get_decoder().norm.weight.copy_(torch.randn(D) * 2)


def folded_crosscoder() -> CrossCoder:
    torch.manual_seed(3)
    cc = CrossCoder(D, 20, k=4, scales=[0.5, 3.0], threshold=0.1)
    with torch.no_grad():
        cc.W_dec.normal_()
    return cc.fold().eval()


def test_gemma_logit_lens_is_the_unembedding_of_the_gain_times_the_raw_decoder() -> None:
    pair = tiny_pair(identical=False)
    for model in (pair.base, pair.chat):
        random_gains(model)
    cc = folded_crosscoder()
    k = 5
    lens = logit_lens(cc, (pair.base, pair.chat), k=k, memory_budget_mb=0.001)  # tiny budget: one latent per chunk
    for m, model in enumerate((pair.base, pair.chat)):
        gain = 1 + model.get_decoder().norm.weight.detach()  # Gemma's RMSNorm multiplies by (1 + weight)
        logits = (cc.W_dec[:, m].detach() * gain) @ model.lm_head.weight.detach().T  # [F, VOCAB]; folded: raw units
        top_values, top_ids = logits.topk(k, dim=-1)
        bottom_values, bottom_ids = logits.topk(k, dim=-1, largest=False)
        assert torch.equal(lens.top_ids[m], top_ids) and torch.equal(lens.bottom_ids[m], bottom_ids)
        torch.testing.assert_close(lens.top_values[m], top_values, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(lens.bottom_values[m], bottom_values, rtol=1e-4, atol=1e-5)
        # Without the gain the promoted tokens differ: the test can tell the two choices apart.
        assert not torch.equal((cc.W_dec[:, m].detach() @ model.lm_head.weight.detach().T).topk(k).indices, top_ids)
    assert lens.top_ids.shape == (2, 20, k) and "Gemma2RMSNorm" in lens.norm[0]
    assert not torch.equal(lens.top_ids[0], lens.top_ids[1])  # two models, two decoders: side by side differs


def test_llama_gain_is_its_weight() -> None:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    random_gains(model)
    gain, centre, _ = norm_gain(model, D)
    assert not centre
    torch.testing.assert_close(gain, model.get_decoder().norm.weight.detach(), rtol=1e-5, atol=1e-5)


def test_layernorm_gain_centres_the_vector() -> None:
    model = torch.nn.Module()
    model.norm = torch.nn.LayerNorm(D)
    model.get_decoder = lambda: model
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 2.0)
    gain, centre, description = norm_gain(model, D)
    assert centre and "centred" in description
    assert torch.equal(gain, model.norm.weight.detach())


@pytest.mark.parametrize("k", [1, VOCAB + 5])
def test_k_is_capped_by_the_vocabulary(k: int) -> None:
    pair = tiny_pair(identical=True)
    lens = logit_lens(folded_crosscoder(), (pair.base, pair.chat), k=k)
    assert lens.top_ids.shape[-1] == min(k, VOCAB)
