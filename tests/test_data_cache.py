from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from crosscoder_pl.data.cache import (
    CachedActivations,
    load_tensor,
    load_val,
    read_meta,
    write_cache,
)


def numbered(n: int, d_model: int = 8) -> torch.Tensor:
    """Random ``[n, 2, d_model]`` rows whose first entry is the row number."""
    rows = torch.randn(n, 2, d_model, generator=torch.Generator().manual_seed(0))
    rows[:, 0, 0] = torch.arange(n, dtype=torch.float32)
    return rows


def test_round_trip_is_bit_equal(tmp_path: Path) -> None:
    rows, val = numbered(950), torch.randn(30, 2, 8)
    write_cache(tmp_path, rows.split(64), n_tokens=900, tokens_per_shard=100, val=val, source={"layer": 1})
    meta = read_meta(tmp_path)
    assert [s["n_tokens"] for s in meta["shards"]] == [100] * 9
    assert meta["d_model"] == 8 and meta["dtype"] == "float32" and meta["source"] == {"layer": 1}
    stored = torch.cat([load_tensor(tmp_path, s["file"]) for s in meta["shards"]])
    assert torch.equal(stored, rows[:900])
    assert torch.equal(load_val(tmp_path), val)


def test_last_shard_holds_the_remainder(tmp_path: Path) -> None:
    write_cache(tmp_path, numbered(250).split(40), n_tokens=10_000, tokens_per_shard=100)
    assert [s["n_tokens"] for s in read_meta(tmp_path)["shards"]] == [100, 100, 50]


@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 0), (2, 2)])
def test_readers_are_disjoint_and_cover_the_cache(tmp_path: Path, world_size: int, num_workers: int) -> None:
    rows = numbered(800)
    write_cache(tmp_path, [rows], n_tokens=800, tokens_per_shard=100)
    served = []
    for rank in range(world_size):
        reader = CachedActivations(tmp_path, batch_size=1, seed=3, rank=rank, world_size=world_size)
        served += list(DataLoader(reader, batch_size=None, num_workers=num_workers))
    served = torch.cat(served)
    assert torch.equal(served[served[:, 0, 0].argsort()], rows)
    assert not torch.equal(served, rows)  # shuffled


def test_serves_full_batches_across_shard_boundaries(tmp_path: Path) -> None:
    write_cache(tmp_path, [numbered(250)], n_tokens=250, tokens_per_shard=100)
    batches = list(CachedActivations(tmp_path, batch_size=30))
    assert len(batches) == 8 and all(b.shape == (30, 2, 8) for b in batches)


def test_too_few_shards_for_the_readers_is_rejected(tmp_path: Path) -> None:
    write_cache(tmp_path, [numbered(100)], n_tokens=100, tokens_per_shard=100)
    with pytest.raises(ValueError, match="1 shards, fewer than its 2 readers"):
        next(iter(CachedActivations(tmp_path, batch_size=10, world_size=2)))
