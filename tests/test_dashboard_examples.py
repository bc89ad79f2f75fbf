"""The streaming max-activation pass against brute force: top-N per source, histograms, frequencies, windows."""

from __future__ import annotations

import pytest
import torch

from crosscoder_pl.crosscoder import CrossCoder
from crosscoder_pl.dashboard.examples import (
    RunningTopN,
    example_windows,
    latent_codes,
    scan,
    turn_roles,
)
from crosscoder_pl.data.activations import TokenTable

D, F, N_SEQ, SEQ = 8, 24, 30, 20


def table(generator: torch.Generator) -> TokenTable:
    """``N_SEQ`` sequences of ``SEQ`` ids, right-padded to random lengths; every valid position but the first
    (BOS) is an activation row, in row-major order; even sequences web, odd chat."""
    lengths = torch.randint(4, SEQ + 1, (N_SEQ,), generator=generator)
    mask = (torch.arange(SEQ)[None] < lengths[:, None]).long()
    ids = torch.randint(3, 50, (N_SEQ, SEQ), generator=generator) * mask
    keep = mask.bool() & (torch.arange(SEQ) > 0)
    seq, pos = keep.nonzero(as_tuple=True)
    source = (torch.arange(N_SEQ) % 2).to(torch.int8)
    return TokenTable(ids, mask, source, seq, pos)


def crosscoder(threshold: float = 0.05) -> CrossCoder:
    """Random; most latents fire on a fair share of random inputs, over a wide range of values."""
    torch.manual_seed(0)
    cc = CrossCoder(D, F, k=4, threshold=threshold)
    with torch.no_grad():
        cc.W_enc.mul_(torch.logspace(0, 1.5, F))  # latents of different scales
        cc.b_enc.uniform_(-0.5, 0.1)
    return cc.eval()


def planted() -> tuple[CrossCoder, torch.Tensor, TokenTable]:
    """Random activations, plus three planted rows where latent 5 fires far above anything else."""
    generator = torch.Generator().manual_seed(1)
    tokens = table(generator)
    acts = torch.randn(len(tokens), 2, D, generator=generator)
    cc = crosscoder()
    direction = cc.W_enc[:, :, 5].detach()  # [2, D]
    for row, gain in ((7, 40.0), (100, 30.0), (len(tokens) - 1, 20.0)):
        acts[row] = gain * direction / direction.norm()
    return cc, acts, tokens


def brute_force_top(codes: torch.Tensor, source: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[2, F, n]`` values and rows by a full sort of all codes per source."""
    values, rows = [], []
    for s in (0, 1):
        where = (source == s).nonzero().flatten()
        v, i = codes[where].sort(dim=0, descending=True)
        v, r = v[:n].T, where[i[:n]].T
        values.append(v)
        rows.append(torch.where(v > 0, r, -1))
    return torch.stack(values), torch.stack(rows)


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_scan_equals_brute_force(chunk: int) -> None:
    cc, acts, tokens = planted()
    top_n, bins = 5, 8
    result = scan(cc, acts, tokens, top_n=top_n, bins=bins, chunk_tokens=chunk)
    with torch.no_grad():
        codes = cc.encode(acts)  # [tokens, F]: the whole matrix, which the scan never holds
    source = tokens.row_source().long()
    values, rows = brute_force_top(codes, source, top_n)
    torch.testing.assert_close(result.values, values, rtol=1e-5, atol=1e-6)
    assert torch.equal(result.rows, rows)  # continuous random values: no ties
    # The planted rows are latent 5's strongest, in order, each in its own source.
    planted_rows = [7, 100, len(tokens) - 1]
    for row in planted_rows:
        s = int(source[row])
        assert row in result.rows[s, 5, :3].tolist()
    # Frequencies per source and tokens per source.
    assert result.n_tokens.tolist() == [int((source == 0).sum()), int((source == 1).sum())]
    for s in (0, 1):
        assert torch.equal(result.fired[s], (codes[source == s] > 0).sum(0))
    # Histogram: a direct binning of every positive activation over [0, 2^e), e = ceil(log2(max)).
    top = codes.max(0).values
    exponent = torch.ceil(torch.log2(top.clamp_min(1e-30)))
    expected = torch.zeros(2, F, bins, dtype=torch.long)
    row, latent = codes.nonzero(as_tuple=True)
    index = (codes[row, latent] / (torch.exp2(exponent[latent]) / bins)).floor().long().clamp(max=bins - 1)
    expected.index_put_((source[row], latent, index), torch.ones_like(index), accumulate=True)
    assert torch.equal(result.histogram, expected)
    assert torch.equal(result.histogram_max, torch.where(top > 0, torch.exp2(exponent).double(), 0.0))
    assert int(result.histogram.sum()) == int((codes > 0).sum())


def test_running_top_n_fills_with_fewer_positive_values_than_n() -> None:
    top = RunningTopN(n_latents=2, n=4)
    top.update(torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.0, 3.0]]), torch.tensor([10, 11, 12]))
    top.update(torch.tensor([[5.0, 0.0]]), torch.tensor([13]))
    values, rows = top.result()
    assert values.tolist() == [[5.0, 1.0, 0.0, 0.0], [3.0, 2.0, 0.0, 0.0]]
    assert rows.tolist() == [[13, 11, -1, -1], [12, 10, -1, -1]]


def test_scan_needs_eval_mode_and_a_threshold() -> None:
    cc, acts, tokens = planted()
    with pytest.raises(ValueError, match="training mode"):
        scan(cc.train(), acts, tokens, top_n=2)
    with pytest.raises(ValueError, match="not calibrated"):
        scan(crosscoder(threshold=-1.0), acts, tokens, top_n=2)


def test_windows_hold_the_tokens_and_the_latent_activations_in_context() -> None:
    cc, acts, tokens = planted()
    result = scan(cc, acts, tokens, top_n=3)
    rows = result.rows[:, 5].flatten()
    rows = rows[rows >= 0]
    latents = torch.full_like(rows, 5)
    before, after = 4, 2
    windows = example_windows(cc, acts, tokens, rows, latents, before, after, examples_per_chunk=2)
    with torch.no_grad():
        codes = cc.encode(acts)[:, 5]
    index = tokens.row_index()
    for e, row in enumerate(rows.tolist()):
        seq, pos = int(tokens.seq[row]), int(tokens.pos[row])
        for w, column in enumerate(range(pos - before, pos + after + 1)):
            valid = 0 <= column < SEQ and bool(tokens.attention_mask[seq, column])
            assert windows.token_ids[e, w] == (tokens.input_ids[seq, column] if valid else -1)
            expected = codes[index[seq, column]] if valid and index[seq, column] >= 0 else 0.0
            torch.testing.assert_close(windows.activations[e, w], torch.as_tensor(expected), rtol=1e-5, atol=1e-6)
        assert windows.activations[e, before] == pytest.approx(float(codes[row]), rel=1e-5)


def test_latent_codes_equal_encode() -> None:
    cc = crosscoder()
    x = torch.randn(6, 5, 2, D)
    latents = torch.tensor([0, 3, 3, 7, 23, 11])
    with torch.no_grad():
        expected = cc.encode(x)[torch.arange(6), :, latents]
        torch.testing.assert_close(latent_codes(cc, x, latents), expected, rtol=1e-5, atol=1e-6)


def test_turn_roles_follow_the_chat_template_markers() -> None:
    words = {1: "<bos>", 2: "<start_of_turn>", 3: "us", 4: "er", 5: "\n", 6: "hi", 7: "<end_of_turn>", 8: "model"}
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 2, 8, 6, 6, 0], [1, 6, 6, 2, 3, 4, 0, 0, 0, 0, 0, 0]])
    mask = (ids > 0).long()
    tokens = TokenTable(ids, mask, torch.tensor([1, 0], dtype=torch.int8), torch.zeros(0, dtype=torch.long),
                        torch.zeros(0, dtype=torch.long))
    roles, names = turn_roles(tokens, lambda i: words.get(i, "?"))
    assert names == ["user", "model"]
    assert roles[0].tolist() == [-1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, -1]
    assert roles[1].tolist() == [-1] * 12  # web sequences have no turns
