"""On-disk cache of paired activations, written once and read back as shuffled batches.

Format: one directory holding

- ``shard-00000.safetensors``, ``shard-00001.safetensors``, ...: training tokens, one tensor named
  ``activations`` of shape ``[n, 2, d_model]`` each (index 0 base, 1 chat), raw (unnormalised) residuals
  with BOS and padding already removed, in the order the shuffle buffer served them;
- ``val.safetensors``: the held-out tokens, same layout (optional);
- ``val_tokens.safetensors``: where each held-out row was read (optional): the tensors of a
  `crosscoder_pl.data.activations.TokenTable` (``input_ids``, ``attention_mask`` ``[n_seq, seq]``, ``source``
  ``[n_seq]`` 0 web / 1 chat / -1 unknown, ``seq``, ``pos`` ``[n]``), so dashboards can show tokens in context;
- ``probes.safetensors``: ``input_ids`` and ``attention_mask`` ``[n_probes, seq]`` of the end-of-training
  analyses (written by `crosscoder_pl.data.datamodule.write_activation_cache`);
- ``meta.json``: ``{"format": 1, "d_model": int, "dtype": "float32" | "bfloat16" | ...,
  "shards": [{"file": str, "n_tokens": int}, ...], "val": {"file": str, "n_tokens": int} | null,
  "val_tokens": {"file": str, "n_tokens": int} | null (absent in older caches), "source": {...}}`` where
  ``source`` records provenance (model ids, layer, data config). It is written
  last: a directory without it is an unfinished cache.

Reading: each pass shuffles the shard order and the tokens within each shard with ``seed`` (+ pass
number); each rank and DataLoader worker reads a disjoint subset of shards.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from crosscoder_pl.data.activations import TokenTable, with_tokens
from torch.utils.data import IterableDataset, get_worker_info
from tqdm import tqdm

log = logging.getLogger(__name__)

TENSOR = "activations"
FORMAT = 1


def _save(tensor: torch.Tensor, path: Path) -> dict:
    save_file({TENSOR: tensor.contiguous()}, str(path))
    return {"file": path.name, "n_tokens": len(tensor)}


def write_cache(
    out_dir: str | Path,
    batches: Iterable[torch.Tensor],
    n_tokens: int,
    tokens_per_shard: int = 2**16,
    val: torch.Tensor | None = None,
    source: dict | None = None,
    dtype: torch.dtype = torch.float32,
    val_tokens: TokenTable | None = None,
) -> Path:
    """Write the first ``n_tokens`` rows of ``batches`` (each ``[b, 2, d_model]``) and ``val`` as a cache;
    ``val_tokens``: where each row of ``val`` was read (kept with it)."""
    if val_tokens is not None and (val is None or len(val_tokens) != len(val)):
        raise ValueError(f"val_tokens describes {len(val_tokens)} rows but val has {0 if val is None else len(val)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    pending: torch.Tensor | None = None
    written = d_model = 0

    def flush(rows: torch.Tensor) -> None:
        shards.append(_save(rows, out / f"shard-{len(shards):05d}.safetensors"))

    with tqdm(total=n_tokens, unit="tok", desc="activation cache") as progress:
        for batch in batches:
            batch = batch[: n_tokens - written].to("cpu", dtype)
            d_model = batch.shape[-1]
            pending = batch if pending is None else torch.cat([pending, batch])
            written += len(batch)
            progress.update(len(batch))
            while len(pending) >= tokens_per_shard:
                flush(pending[:tokens_per_shard])
                pending = pending[tokens_per_shard:]
            if written >= n_tokens:
                break
    if pending is not None and len(pending):
        flush(pending)
    if written < n_tokens:
        log.warning("The stream ended after %d of the %d tokens requested for the cache at %s", written, n_tokens, out)
    if not shards:
        raise ValueError(f"No activations to cache at {out}: the stream was empty")
    meta = {
        "format": FORMAT,
        "d_model": d_model,
        "dtype": str(dtype).removeprefix("torch."),
        "shards": shards,
        "val": None if val is None else _save(val.to("cpu", dtype), out / "val.safetensors"),
        "val_tokens": None if val_tokens is None else _save_tokens(val_tokens, out / "val_tokens.safetensors"),
        "source": source or {},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    log.info("Cached %d tokens in %d shards at %s", written, len(shards), out)
    return out


def _save_tokens(tokens: TokenTable, path: Path) -> dict:
    save_file(tokens.tensors(), str(path))
    return {"file": path.name, "n_tokens": len(tokens)}


def read_meta(path: str | Path) -> dict:
    """The ``meta.json`` of the cache at ``path``."""
    meta_file = Path(path) / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file} not found: {path} is not a finished activation cache (see write_cache)")
    return json.loads(meta_file.read_text())


def load_tensor(path: str | Path, file: str) -> torch.Tensor:
    """One stored tensor ``[n, 2, d_model]`` of the cache, in its stored dtype, on the CPU."""
    return load_file(str(Path(path) / file))[TENSOR]


def load_val(path: str | Path) -> torch.Tensor:
    """The held-out tokens of the cache, float32 ``[n, 2, d_model]``, carrying their `TokenTable` when stored."""
    meta = read_meta(path)
    if meta["val"] is None:
        raise ValueError(f"The activation cache at {path} has no held-out set (written without val=)")
    val = load_tensor(path, meta["val"]["file"]).float()
    if meta.get("val_tokens"):
        with_tokens(val, TokenTable.from_tensors(load_file(str(Path(path) / meta["val_tokens"]["file"]))))
    return val


class CachedActivations(IterableDataset):
    """Float32 batches ``[batch_size, 2, d_model]`` read from a cache; only full batches.

    Each ``iter()`` is one pass over this reader's shards, reshuffled per pass (with DataLoader workers,
    keep them persistent so the pass count advances).
    """

    def __init__(self, path: str | Path, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.path = Path(path)
        self.files = [shard["file"] for shard in read_meta(path)["shards"]]
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.passes = 0

    def my_files(self) -> list[str]:
        """This reader's shards for the current pass: a disjoint part of a seeded permutation of all shards."""
        worker = get_worker_info()
        n_workers, worker_id = (1, 0) if worker is None else (worker.num_workers, worker.id)
        readers = self.world_size * n_workers
        if len(self.files) < readers:
            raise ValueError(
                f"The cache at {self.path} has {len(self.files)} shards, fewer than its {readers} readers "
                f"(world_size={self.world_size} x workers={n_workers}); rewrite it with a smaller tokens_per_shard"
            )
        generator = torch.Generator().manual_seed(self.seed + self.passes)
        order = torch.randperm(len(self.files), generator=generator).tolist()
        return [self.files[i] for i in order[self.rank * n_workers + worker_id :: readers]]

    def __iter__(self) -> Iterator[torch.Tensor]:
        files = self.my_files()
        generator = torch.Generator().manual_seed(self.seed + self.passes)
        self.passes += 1
        rest = None
        for file in files:
            rows = load_tensor(self.path, file)
            rows = rows[torch.randperm(len(rows), generator=generator)].float()
            if rest is not None:
                rows = torch.cat([rest, rows])
            n_full = len(rows) // self.batch_size * self.batch_size
            yield from rows[:n_full].split(self.batch_size)
            rest = rows[n_full:]
