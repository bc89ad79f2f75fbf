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
- ``chat_probes.safetensors``: ``input_ids`` and ``attention_mask`` ``[n_chats, seq]`` of held-out chats, for the
  base→chat patching (optional: caches written before it have none, and the patching is then skipped);
- ``meta.json``, the manifest: ``{"format": 2, "d_model": int, "dtype": "float32" | "bfloat16" | ...,
  "n_tokens": int, "shards": [{"file": str, "n_tokens": int, "shape": [...], "bytes": int, "sha256": str}, ...],
  "val": {...same...} | null, "val_tokens": {...} | null, "files": {"probes.safetensors": {...}},
  "source": {...}, "stats": {...}}`` where ``source`` records provenance (model ids, layer, data config, e.g.
  ``outlier_factor`` and ``drop_outliers``) and ``stats`` what the writer's stream reported once the shards were
  written (e.g. its outlier counts; optional).

Atomic: `write_cache` writes everything into a hidden sibling (``.<name>.partial-XXXX``), the manifest last,
then renames it into place (an existing cache at the path is set aside and deleted only after the rename), so
a cache is whole or absent, never a mix of two writes. `read_meta` refuses a directory without a manifest (a
partial cache), a listed file that is missing or of another size, and a shard file the manifest does not list
(a mixed cache); each shard's sha256 is checked when it is read (`load_tensor`), before it is trained on, and
`verify_cache` checks them all. Every error says how to rebuild. Caches of format 1 (no checksums) are read
with a warning.

Reading: each pass shuffles the shard order and the tokens within each shard with ``seed`` (+ pass
number); each rank and DataLoader worker reads a disjoint subset of shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import IterableDataset, get_worker_info
from tqdm import tqdm

from crosscoder_pl.data.activations import TokenTable, with_tokens
from crosscoder_pl.files import dir_mode, file_mode, replace_dir

log = logging.getLogger(__name__)

TENSOR = "activations"
FORMAT = 2
META = "meta.json"
PROBES = "probes.safetensors"  # the probe batch of the end-of-training analyses (written with the cache)
CHAT_PROBES = "chat_probes.safetensors"  # held-out chats of the base→chat patching (written with the cache)
REBUILD = ("rebuild it: python cache_activations.py out={path} (with the overrides it was written with; they are "
           "in its meta.json \"source\"), or point data.path at another cache")


class CacheError(ValueError):
    """An activation cache that is partial, mixed, corrupted or of an unknown format."""


class NoHeldoutChats(LookupError):
    """A data module has no held-out chats to give (no chat source, none held out, or a cache without them)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _save_tensors(tensors: Mapping[str, torch.Tensor], path: Path, n_tokens: int) -> dict:
    """Write ``tensors`` to ``path`` (mode as any new file) and return its manifest entry."""
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(path))
    os.chmod(path, file_mode())  # safetensors writes 0600
    shape = list(next(iter(tensors.values())).shape)
    return {"file": path.name, "n_tokens": n_tokens, "shape": shape, "bytes": path.stat().st_size,
            "sha256": _sha256(path)}


def _save(tensor: torch.Tensor, path: Path) -> dict:
    return _save_tensors({TENSOR: tensor}, path, len(tensor))


def write_cache(
    out_dir: str | Path,
    batches: Iterable[torch.Tensor],
    n_tokens: int,
    tokens_per_shard: int = 2**16,
    val: torch.Tensor | None = None,
    source: dict | None = None,
    dtype: torch.dtype = torch.float32,
    val_tokens: TokenTable | None = None,
    extra: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    stats: Callable[[], Mapping[str, Any]] | None = None,
) -> Path:
    """Write the first ``n_tokens`` rows of ``batches`` (each ``[b, 2, d_model]``) and ``val`` as a cache;
    ``val_tokens``: where each row of ``val`` was read (kept with it); ``extra``: more files, name -> tensors
    (e.g. the probe batch); ``stats``: called once the batches are read, its plain values kept in the manifest.
    Atomic: see the module docstring."""
    if val_tokens is not None and (val is None or len(val_tokens) != len(val)):
        raise ValueError(f"val_tokens describes {len(val_tokens)} rows but val has {0 if val is None else len(val)}")
    final = Path(out_dir)
    _check_replaceable(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        os.chmod(out, dir_mode())  # mkdtemp makes it private (0700)
        return _write_into(out, final, batches, n_tokens, tokens_per_shard, val, source, dtype, val_tokens, extra,
                           stats)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # not reached on SIGKILL: the hidden .partial directory stays, unused
        raise


def _check_replaceable(final: Path) -> None:
    """A cache may replace an earlier cache or an empty directory, never anything else."""
    if final.is_dir() and any(final.iterdir()) and not (final / META).is_file():
        raise CacheError(
            f"{final} exists and is not a finished activation cache (no {META}): refusing to replace it. Remove it "
            "if it is a cache whose writing was interrupted, or choose another out="
        )
    if final.exists() and not final.is_dir():
        raise CacheError(f"{final} exists and is a file, not a cache directory: choose another out=")


def _write_into(out: Path, final: Path, batches: Iterable[torch.Tensor], n_tokens: int, tokens_per_shard: int,
                val: torch.Tensor | None, source: dict | None, dtype: torch.dtype, val_tokens: TokenTable | None,
                extra: Mapping[str, Mapping[str, torch.Tensor]] | None,
                stats: Callable[[], Mapping[str, Any]] | None = None) -> Path:
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
        log.warning("The stream ended after %d of the %d tokens requested for the cache at %s", written, n_tokens, final)
    if not shards:
        raise ValueError(f"No activations to cache at {final}: the stream was empty")
    meta = {
        "format": FORMAT,
        "d_model": d_model,
        "dtype": str(dtype).removeprefix("torch."),
        "n_tokens": written,
        "shards": shards,
        "val": None if val is None else _save(val.to("cpu", dtype), out / "val.safetensors"),
        "val_tokens": None if val_tokens is None else _save_tokens(val_tokens, out / "val_tokens.safetensors"),
        "files": {name: _save_tensors(tensors, out / name, len(next(iter(tensors.values()))))
                  for name, tensors in (extra or {}).items()},
        "source": source or {},
        "stats": dict(stats()) if stats is not None else {},
    }
    (out / META).write_text(json.dumps(meta, indent=2))  # last: the manifest makes the directory a cache
    os.chmod(out / META, file_mode())
    replace_dir(out, final)
    log.info("Cached %d tokens in %d shards at %s", written, len(shards), final)
    return final


def _save_tokens(tokens: TokenTable, path: Path) -> dict:
    return _save_tensors(tokens.tensors(), path, len(tokens))


def _entries(meta: Mapping) -> list[dict]:
    """Every file entry of a manifest."""
    entries = list(meta.get("shards") or [])
    entries += [meta[key] for key in ("val", "val_tokens") if meta.get(key)]
    return entries + list((meta.get("files") or {}).values())


def read_meta(path: str | Path) -> dict:
    """The manifest (``meta.json``) of the cache at ``path``, after checking that the directory holds exactly the
    files it lists, at their recorded sizes (checksums: `load_tensor`, `verify_cache`)."""
    root = Path(path)
    meta_file = root / META
    rebuild = REBUILD.format(path=path)
    if not meta_file.is_file():
        found = "no such directory" if not root.is_dir() else (
            "it has shard files but no manifest: its writing was interrupted, or it predates atomic caches"
            if any(root.glob("shard-*.safetensors")) else "no manifest")
        raise CacheError(f"{path} is not a finished activation cache ({META}: {found}); {rebuild}")
    try:
        meta = json.loads(meta_file.read_text())
        missing = [key for key in ("format", "d_model", "dtype", "shards") if key not in meta]
        if missing or not meta["shards"]:
            raise KeyError(f"no {', '.join(missing) or 'shards'}")
        entries = _entries(meta)
        files = {entry["file"] for entry in entries}
    except (ValueError, TypeError, KeyError) as err:
        raise CacheError(f"{meta_file} is not a readable cache manifest ({err}); {rebuild}") from err
    if meta.get("format") not in (1, FORMAT):
        raise CacheError(f"{meta_file}: unknown cache format {meta.get('format')!r} (this version reads 1 and {FORMAT}); "
                         f"{rebuild}")
    for entry in entries:
        file = root / entry["file"]
        if not file.is_file():
            raise CacheError(f"the activation cache at {path} lacks {entry['file']}, listed in its manifest; {rebuild}")
        if "bytes" in entry and file.stat().st_size != entry["bytes"]:
            raise CacheError(f"{file} has {file.stat().st_size} bytes, its manifest says {entry['bytes']}: the file is "
                             f"truncated or was replaced; {rebuild}")
    strays = sorted(p.name for p in root.glob("shard-*.safetensors") if p.name not in files)
    if strays:
        raise CacheError(f"the activation cache at {path} holds shards its manifest does not list ({', '.join(strays[:5])}"
                         f"{', ...' if len(strays) > 5 else ''}): files of two writes are mixed; {rebuild}")
    if meta["format"] == 1:
        log.warning("the activation cache at %s predates checksums (format 1): its shards cannot be verified", path)
    return meta


def _entry(meta: Mapping, file: str) -> dict:
    return next((entry for entry in _entries(meta) if entry["file"] == file), {})


def _check_sha256(path: Path, entry: Mapping) -> None:
    expected = entry.get("sha256")
    if expected is not None and _sha256(path) != expected:
        raise CacheError(f"{path} does not match the sha256 in its manifest: the file is corrupted; "
                         f"{REBUILD.format(path=path.parent)}")


def verify_cache(path: str | Path) -> dict:
    """Check every file of the cache at ``path`` against its manifest (sizes and sha256); returns the manifest."""
    meta = read_meta(path)
    for entry in _entries(meta):
        _check_sha256(Path(path) / entry["file"], entry)
    return meta


def load_tensor(path: str | Path, file: str, meta: Mapping | None = None) -> torch.Tensor:
    """One stored tensor ``[n, 2, d_model]`` of the cache, in its stored dtype, on the CPU, its sha256 checked."""
    return load_checked(path, file, meta)[TENSOR]


def load_checked(path: str | Path, file: str, meta: Mapping | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one file of the cache, after checking its sha256 against the manifest."""
    meta = read_meta(path) if meta is None else meta
    _check_sha256(Path(path) / file, _entry(meta, file))
    return load_file(str(Path(path) / file))


def load_val(path: str | Path) -> torch.Tensor:
    """The held-out tokens of the cache, float32 ``[n, 2, d_model]``, carrying their `TokenTable` when stored."""
    meta = read_meta(path)
    if meta["val"] is None:
        raise ValueError(f"The activation cache at {path} has no held-out set (written without val=)")
    val = load_tensor(path, meta["val"]["file"], meta).float()
    if meta.get("val_tokens"):
        with_tokens(val, TokenTable.from_tensors(load_checked(path, meta["val_tokens"]["file"], meta)))
    return val


class CachedActivations(IterableDataset):
    """Float32 batches ``[batch_size, 2, d_model]`` read from a cache; only full batches.

    Each ``iter()`` is one pass over this reader's shards, reshuffled per pass (with DataLoader workers,
    keep them persistent so the pass count advances).
    """

    def __init__(self, path: str | Path, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.path = Path(path)
        self.meta = read_meta(path)
        self.files = [shard["file"] for shard in self.meta["shards"]]
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
            rows = load_tensor(self.path, file, self.meta)
            rows = rows[torch.randperm(len(rows), generator=generator)].float()
            if rest is not None:
                rows = torch.cat([rest, rows])
            n_full = len(rows) // self.batch_size * self.batch_size
            yield from rows[:n_full].split(self.batch_size)
            rest = rows[n_full:]
