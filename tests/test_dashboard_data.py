"""Held-out and cached activations keep their token ids, positions and sources (what the dashboard shows)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from test_data_datamodule import datamodule
from test_data_helpers import sentence, tiny_pair

from crosscoder_pl.config import CachedDataConfig
from crosscoder_pl.data.activations import (
    TokenTable,
    paired_activations,
    paired_activations_with_tokens,
    token_table,
    with_tokens,
)
from crosscoder_pl.data.cache import load_val, write_cache
from crosscoder_pl.data.cached import CachedActivationDataModule
from crosscoder_pl.data.datamodule import write_activation_cache


@pytest.mark.parametrize(("padding_side", "outlier_factor"), [("right", None), ("left", None), ("right", 1.05)])
def test_token_table_points_at_the_token_each_row_was_read_at(padding_side: str, outlier_factor: float | None) -> None:
    pair = tiny_pair(layer=1)
    texts = [sentence(random.Random(i), 2, 12) for i in range(5)]
    sources = ["web", "chat", "web", "chat", "web"]
    acts, tokens = paired_activations_with_tokens(pair, texts, 32, padding_side, outlier_factor, sources)
    assert torch.equal(acts, paired_activations(pair, texts, 32, padding_side, outlier_factor))
    assert len(tokens) == len(acts) and tokens.source.tolist() == [0, 1, 0, 1, 0]
    for row in range(len(acts)):
        seq, pos = int(tokens.seq[row]), int(tokens.pos[row])
        alone = pair.tokenizer(texts[seq])["input_ids"]  # the same text, unpadded, BOS first
        first = int(tokens.attention_mask[seq].argmax()) if padding_side == "left" else 0
        assert tokens.input_ids[seq, pos] == alone[pos - first] and pos - first >= 1  # never BOS, never padding
        with torch.no_grad():  # the row is the residual of that very position (base model)
            hidden = pair.base(torch.tensor([alone]), output_hidden_states=True).hidden_states[pair.layer + 1]
        torch.testing.assert_close(acts[row, 0], hidden[0, pos - first], atol=1e-5, rtol=1e-4)
    if outlier_factor is not None:
        assert len(acts) < int(tokens.attention_mask.sum()) - len(texts)  # some rows dropped, table follows


def test_concat_and_head_keep_rows_pointing_at_their_tokens() -> None:
    a = TokenTable(torch.tensor([[2, 5, 6]]), torch.ones(1, 3, dtype=torch.long), torch.tensor([0], dtype=torch.int8),
                   torch.tensor([0, 0]), torch.tensor([1, 2]))
    b = TokenTable(torch.tensor([[2, 7, 8, 9, 0], [2, 4, 0, 0, 0]]), torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]),
                   torch.tensor([1, 1], dtype=torch.int8), torch.tensor([0, 0, 0, 1]), torch.tensor([1, 2, 3, 1]))
    both = TokenTable.concat([a, b])
    assert both.input_ids[both.seq, both.pos].tolist() == [5, 6, 7, 8, 9, 4]
    assert both.row_source().tolist() == [0, 0, 1, 1, 1, 1]
    head = both.head(3)
    assert len(head) == 3 and head.input_ids.shape[0] == 2
    assert head.row_index()[1].tolist() == [-1, 2, -1, -1, -1]


def test_tokens_travel_with_the_tensor_and_are_checked() -> None:
    tokens = TokenTable(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3), torch.zeros(1, dtype=torch.int8),
                        torch.zeros(2, dtype=torch.long), torch.tensor([1, 2]))
    acts = with_tokens(torch.zeros(2, 2, 4), tokens)
    assert token_table(acts) is tokens and token_table(acts[:1]) is None  # any operation drops it
    with pytest.raises(ValueError, match="2 rows cannot describe 3"):
        with_tokens(torch.zeros(3, 2, 4), tokens)


def test_heldout_set_and_cache_keep_token_ids(tmp_path: Path) -> None:
    dm = datamodule(tmp_path / "corpus")
    acts = dm.heldout_activations()
    tokens = token_table(acts)
    assert tokens is not None and len(tokens) == len(acts) == 64
    assert set(tokens.row_source().tolist()) == {0, 1}  # web and chat both held out
    assert bool((tokens.input_ids[tokens.seq, tokens.pos] != dm.model_pair.tokenizer.bos_token_id).all())
    write_activation_cache(dm, tmp_path / "cache", n_tokens=64, tokens_per_shard=32)
    cached = CachedActivationDataModule(CachedDataConfig(path=str(tmp_path / "cache"), batch_size=32)).heldout_activations()
    assert torch.equal(cached, acts)
    for name, value in token_table(cached).tensors().items():
        assert torch.equal(value, tokens.tensors()[name]), name


def test_cache_refuses_tokens_that_do_not_describe_val(tmp_path: Path) -> None:
    tokens = TokenTable(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3), torch.zeros(1, dtype=torch.int8),
                        torch.zeros(2, dtype=torch.long), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="val_tokens describes 2 rows but val has 5"):
        write_cache(tmp_path, [torch.zeros(4, 2, 3)], 4, val=torch.zeros(5, 2, 3), val_tokens=tokens)
    write_cache(tmp_path, [torch.zeros(4, 2, 3)], 4, val=torch.zeros(5, 2, 3))  # older layout: no tokens
    assert token_table(load_val(tmp_path)) is None
