"""The activation cache is written atomically with a manifest, and a partial, mixed or corrupted one is refused."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from crosscoder_pl.data.cache import (
    CachedActivations,
    CacheError,
    load_val,
    read_meta,
    verify_cache,
    write_cache,
)


def rows(n: int, start: int = 0) -> torch.Tensor:
    """``[n, 2, 4]`` rows numbered ``start, start + 1, ...`` (row i is all i)."""
    return torch.arange(start, start + n, dtype=torch.float32)[:, None, None].expand(n, 2, 4).contiguous()


def write(path: Path, n: int = 300, start: int = 0, **kwargs) -> Path:
    return write_cache(path, rows(n, start).split(64), n_tokens=n, tokens_per_shard=100, val=rows(20, -20), **kwargs)


def test_the_manifest_records_shapes_dtype_tokens_and_sha256(tmp_path: Path) -> None:
    out = write(tmp_path / "acts", extra={"probes.safetensors": {"input_ids": torch.ones(3, 5, dtype=torch.long)}})
    meta = read_meta(out)
    assert meta["format"] == 2 and meta["dtype"] == "float32" and meta["d_model"] == 4 and meta["n_tokens"] == 300
    assert [(s["n_tokens"], s["shape"]) for s in meta["shards"]] == [(100, [100, 2, 4])] * 3
    for entry in [*meta["shards"], meta["val"], meta["files"]["probes.safetensors"]]:
        data = (out / entry["file"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acts"]  # no staging directory left behind
    assert verify_cache(out) == meta


def test_files_get_the_umask_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        out = write(tmp_path / "acts")
    finally:
        os.umask(old)
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {"0o644"}
    assert oct(out.stat().st_mode & 0o777) == "0o755"


def test_rewriting_in_place_replaces_the_whole_cache(tmp_path: Path) -> None:
    write(tmp_path / "acts", n=900)  # 9 shards
    write(tmp_path / "acts", n=250, start=1000)  # 3 shards: the 6 others must not survive
    assert sorted(p.name for p in (tmp_path / "acts").glob("shard-*")) == [f"shard-0000{i}.safetensors" for i in range(3)]
    served = torch.cat(list(CachedActivations(tmp_path / "acts", batch_size=50)))
    assert sorted(served[:, 0, 0].tolist()) == list(range(1000, 1250))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acts"]


def test_a_failed_write_keeps_the_previous_cache(tmp_path: Path) -> None:
    out = write(tmp_path / "acts")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def failing():
        yield rows(150)
        raise RuntimeError("the language model crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        write_cache(out, failing(), n_tokens=300, tokens_per_shard=100)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acts"]


def test_a_directory_that_is_not_a_cache_is_not_replaced(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("years of work")
    with pytest.raises(CacheError, match="not a finished activation cache.*refusing to replace"):
        write(tmp_path / "notes")
    assert (tmp_path / "notes" / "thesis.tex").read_text() == "years of work"


def test_a_partial_cache_is_refused_with_how_to_rebuild(tmp_path: Path) -> None:
    out = write(tmp_path / "acts")
    (out / "meta.json").unlink()  # as a writer of the old layout killed before its last file
    with pytest.raises(CacheError, match=r"interrupted.*python cache_activations.py out="):
        read_meta(out)
    with pytest.raises(CacheError, match="no such directory"):
        read_meta(tmp_path / "absent")


def test_a_mixed_cache_is_refused(tmp_path: Path) -> None:
    out = write(tmp_path / "acts")
    (out / "shard-00007.safetensors").write_bytes((out / "shard-00000.safetensors").read_bytes())
    with pytest.raises(CacheError, match=r"does not list \(shard-00007.safetensors\).*mixed"):
        CachedActivations(out, batch_size=50)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_shard_is_refused_before_it_is_trained_on(tmp_path: Path, damage: str) -> None:
    out = write(tmp_path / "acts")
    shard = out / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[-5] ^= 0xFF  # inside the tensor bytes: same size, other values
        shard.write_bytes(bytes(data))
        dataset = CachedActivations(out, batch_size=50)  # sizes agree: found when the shard is read
        with pytest.raises(CacheError, match="shard-00001.safetensors does not match the sha256.*corrupted"):
            list(dataset)
        with pytest.raises(CacheError, match="corrupted"):
            verify_cache(out)
    else:
        shard.write_bytes(bytes(data[:100])) if damage == "truncate" else shard.unlink()
        with pytest.raises(CacheError, match="truncated" if damage == "truncate" else "lacks shard-00001"):
            CachedActivations(out, batch_size=50)


def test_a_corrupted_heldout_set_is_refused(tmp_path: Path) -> None:
    out = write(tmp_path / "acts")
    val = out / "val.safetensors"
    data = bytearray(val.read_bytes())
    data[-1] ^= 0x01
    val.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="val.safetensors does not match the sha256"):
        load_val(out)


def test_a_manifest_of_another_format_or_unreadable_is_refused(tmp_path: Path) -> None:
    out = write(tmp_path / "acts")
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps(meta | {"format": 99}))
    with pytest.raises(CacheError, match="unknown cache format 99"):
        read_meta(out)
    (out / "meta.json").write_text("{not json")
    with pytest.raises(CacheError, match="not a readable cache manifest"):
        read_meta(out)


def test_format_1_caches_without_checksums_are_still_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = write(tmp_path / "acts")
    meta = json.loads((out / "meta.json").read_text())
    old = {"format": 1, "d_model": 4, "dtype": "float32", "val": {"file": "val.safetensors", "n_tokens": 20},
           "shards": [{"file": s["file"], "n_tokens": s["n_tokens"]} for s in meta["shards"]], "source": {}}
    (out / "meta.json").write_text(json.dumps(old))
    assert len(torch.cat(list(CachedActivations(out, batch_size=50)))) == 300
    assert "cannot be verified" in caplog.text
