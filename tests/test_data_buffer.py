import pytest
import torch

from crosscoder_pl.data.buffer import shuffled_batches


def tagged_sequences(n_seq: int, seq_len: int, d_model: int = 4) -> list[torch.Tensor]:
    """Chunks ``[seq_len, 2, d_model]`` whose base rows hold the sequence id and chat rows the id + 1000."""
    chunks = []
    for i in range(n_seq):
        chunk = torch.full((seq_len, 2, d_model), float(i))
        chunk[:, 1] += 1000
        chunks.append(chunk)
    return chunks


def test_serves_only_full_batches_mixed_across_sequences() -> None:
    n_seq, seq_len, batch_size = 60, 37, 16
    batches = list(shuffled_batches(tagged_sequences(n_seq, seq_len), batch_size, capacity=256, seed=0))
    total = n_seq * seq_len
    assert len(batches) == total // batch_size  # everything but the final partial batch
    assert all(batch.shape == (batch_size, 2, 4) for batch in batches)
    served = torch.cat(batches)
    assert torch.equal(served[:, 1], served[:, 0] + 1000)  # base and chat rows of a token stay together
    assert (torch.bincount(served[:, 0, 0].long(), minlength=n_seq) <= seq_len).all()  # no token served twice
    distinct = [len(batch[:, 0, 0].unique()) for batch in batches]
    assert min(distinct) >= 3 and sum(distinct) / len(distinct) >= 7  # unshuffled: 1 or 2 per batch


def test_short_or_empty_streams_serve_nothing() -> None:
    assert list(shuffled_batches([], batch_size=8, capacity=64)) == []
    assert list(shuffled_batches([torch.zeros(7, 2, 4), torch.zeros(0, 2, 4)], batch_size=8, capacity=64)) == []


def test_capacity_below_two_batches_is_rejected() -> None:
    with pytest.raises(ValueError, match="capacity=100 .*batch_size=64"):
        next(shuffled_batches(tagged_sequences(4, 10), batch_size=64, capacity=100))
