"""W&B, offline: the artifact directory is logged as a W&B artifact of type model, the card's figures in the run
summary. Read back from the offline run's transaction log (``run-<id>.wandb``, LevelDB log format of protobuf
``Record``s), which ``wandb sync`` would upload."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from wandb.proto import wandb_internal_pb2

from crosscoder_pl.loggers import card_summary

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 32768  # the log's block size; records never straddle a block's 7-byte tail
HEADER = 7  # ":W&B" + magic (2 bytes) + version (1 byte)


def records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer: zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # FULL, FIRST
            pending = chunk
        elif kind in (3, 4):  # MIDDLE, LAST
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_training_logs_the_artifact_and_the_card_figures_offline(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_CACHE_DIR": str(tmp_path / "cache"),
           "WANDB_DATA_DIR": str(tmp_path / "data"), "WANDB_CONFIG_DIR": str(tmp_path / "config")}
    env.pop("WANDB_API_KEY", None)
    result = subprocess.run([sys.executable, "train.py", "+experiment=tiny", "logger=wandb", "trainer.max_steps=16",
                             "crosscoder.k_anneal_steps=4", "trainer.val_check_interval=8", f"hydra.run.dir={out}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (log,) = out.glob("wandb/offline-run-*/run-*.wandb")
    logged = list(records(log))
    artifacts = [r.artifact for r in logged if r.WhichOneof("record_type") == "artifact"]
    assert len(artifacts) == 1
    artifact = artifacts[0]
    run_id = log.stem.removeprefix("run-")
    assert (artifact.type, artifact.name, list(artifact.aliases)) == ("model", f"crosscoder-{run_id}", ["latest"])
    directory = out / "artifact"
    files = {str(p.relative_to(directory)): p for p in directory.rglob("*") if p.is_file()}
    manifest = {entry.path: entry.digest for entry in artifact.manifest.contents}
    assert set(manifest) == set(files)  # the whole directory, nothing else
    for name, path in files.items():  # byte for byte (W&B's digest: base64 of the md5)
        assert manifest[name] == base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode(), name
    summary: dict[str, float] = {}
    for r in logged:
        if r.WhichOneof("record_type") == "summary":
            summary.update({u.key: json.loads(u.value_json) for u in r.summary.update})
    metrics = json.loads((directory / "metrics.json").read_text())
    want = card_summary(metrics)
    assert {"card/ve_base", "card/ve_chat", "card/l0", "card/dead_fraction", "card/taxonomy/shared",
            "card/median_causal_pearson"} <= set(want)
    for key, value in want.items():
        assert summary[key] == value, key
    assert want["card/ve_chat"] == metrics["validation"]["variance_explained"]["chat"]
    assert sum(v for k, v in want.items() if k.startswith("card/taxonomy/")) == metrics["artifact"]["n_latents"]
