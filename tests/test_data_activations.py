import random

import pytest
import torch
from test_data_helpers import sentence, tiny_pair

from crosscoder_pl.data.activations import outlier_mask, paired_activations, tokenize

TEXTS = [sentence(random.Random(i), 1, 15) for i in range(6)]


def reference(model: torch.nn.Module, tokenizer, layer: int, texts: list[str]) -> torch.Tensor:
    """Each text alone (no padding), full forward: ``hidden_states[layer + 1]`` without the BOS position."""
    rows = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        assert ids[0, 0] == tokenizer.bos_token_id
        rows.append(model(ids, output_hidden_states=True).hidden_states[layer + 1][0, 1:])
    return torch.cat(rows)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_matches_full_forward_hidden_states(padding_side: str) -> None:
    pair = tiny_pair(layer=1)
    acts = paired_activations(pair, TEXTS, seq_len=64, padding_side=padding_side)
    with torch.no_grad():
        expected = [reference(model, pair.tokenizer, pair.layer, TEXTS) for model in (pair.base, pair.chat)]
    expected = torch.stack(expected, dim=1)
    assert acts.dtype == torch.float32 and acts.shape == expected.shape and not acts.is_inference()
    torch.testing.assert_close(acts, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(acts[:, 0], acts[:, 1])  # two different models


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_bos_and_padding_never_reach_the_crosscoder(padding_side: str) -> None:
    pair = tiny_pair(layer=2)
    tokenizer = pair.tokenizer
    with torch.no_grad():  # planted: BOS and pad embeddings far larger than any real token's
        for model in (pair.base, pair.chat):
            model.model.embed_tokens.weight[[tokenizer.bos_token_id, tokenizer.pad_token_id]] = 100.0
    batch = tokenize(tokenizer, TEXTS, seq_len=64, padding_side=padding_side)
    n_pad = int((batch["attention_mask"] == 0).sum())
    assert n_pad > 0
    acts = paired_activations(pair, TEXTS, seq_len=64, padding_side=padding_side)
    assert len(acts) == batch["attention_mask"].numel() - n_pad - len(TEXTS)
    assert acts.norm(dim=-1).max() < 100  # a planted position would have norm > 3000


def test_truncates_to_seq_len() -> None:
    pair = tiny_pair()
    long_text = " ".join(["cat"] * 100)
    assert len(paired_activations(pair, [long_text], seq_len=16)) == 15


def test_outlier_tokens_are_dropped() -> None:
    acts = torch.randn(100, 2, 8)
    acts[7, 1] *= 50  # an outlier in the chat model only
    keep = outlier_mask(acts, factor=10.0)
    assert keep.sum() == 99 and not keep[7]


def test_bad_padding_side_is_rejected() -> None:
    with pytest.raises(ValueError, match="padding_side='middle'"):
        tokenize(tiny_pair().tokenizer, TEXTS, seq_len=8, padding_side="middle")
