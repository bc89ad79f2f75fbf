"""Exact resume: the data stream's position in the checkpoint, a killed run continued in its own directory."""

from __future__ import annotations

import io
import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from test_app import compose_train
from test_data_datamodule import datamodule

from crosscoder_pl.config import CachedDataConfig
from crosscoder_pl.data.cache import write_cache
from crosscoder_pl.data.cached import CachedActivationDataModule, CachePasses
from crosscoder_pl.data.datamodule import ActivationStream
from crosscoder_pl.training import (
    _instantiate_logger,
    resume_checkpoint,
    save_run_config,
    wandb_run_id,
)

ROOT = Path(__file__).resolve().parents[1]


def weights_only_roundtrip(state: dict) -> dict:
    """``state`` through torch.save and the weights_only loader, as a checkpoint holds it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def stream(root: Path, memo_gb: float = 0.0) -> ActivationStream:
    dm = datamodule(root, batch_size=128, memo_gb=memo_gb)  # about 45 batches a pass
    dm.train_dataloader()
    return dm.stream


@pytest.mark.parametrize("consumed", [0, 1, 7, 23, 50])  # 50: in the second pass
@pytest.mark.parametrize("prefetched", [0, 1, 2])
def test_a_restored_stream_serves_the_same_batches(tmp_path: Path, consumed: int, prefetched: int) -> None:
    uninterrupted = stream(tmp_path)
    reference = list(islice(iter(uninterrupted), consumed + prefetched + 12))
    first = stream(tmp_path)
    served = iter(first)
    for _ in range(prefetched):  # the trainer draws ahead of the batch it trains on (Lightning: one batch)
        next(served)
    for _ in range(consumed):
        next(served)
        first.consumed()
    list(islice(iter(first), 3))  # a side pass (the scale estimate's) must not move the tracked position
    assert first._tracked.pass_index == (consumed + prefetched > 48)
    state = weights_only_roundtrip(first.state_dict())
    resumed = stream(tmp_path)
    resumed.load_state_dict(state)
    again = list(islice(iter(resumed), prefetched + 12))
    assert all(torch.equal(a, b) for a, b in zip(again, reference[consumed:], strict=True))
    assert resumed.stats.state_dict() == uninterrupted.stats.state_dict()  # the same rows counted, side pass apart
    assert resumed.passes == first.passes


@pytest.mark.parametrize("consumed", [20, 50, 100])  # in the memo-filling pass, the second, the third
def test_a_restored_stream_with_an_activation_memo_serves_the_same_batches(tmp_path: Path, consumed: int) -> None:
    uninterrupted = stream(tmp_path, memo_gb=1.0)
    reference = list(islice(iter(uninterrupted), consumed + 1 + 12))
    first = stream(tmp_path, memo_gb=1.0)
    served = iter(first)
    next(served)  # Lightning's prefetch
    for _ in range(consumed):
        next(served)
        first.consumed()
    state = weights_only_roundtrip(first.state_dict())
    resumed = stream(tmp_path, memo_gb=1.0)
    resumed.load_state_dict(state)
    again = list(islice(iter(resumed), 1 + 12))
    # Bit for bit: the memo is refilled from the first pass's own groups of texts, not from the later passes'.
    assert all(torch.equal(a, b) for a, b in zip(again, reference[consumed:], strict=True))
    assert len(resumed.memo) == len(uninterrupted.memo) and resumed.memo.bytes == uninterrupted.memo.bytes
    assert resumed.stats.state_dict() == uninterrupted.stats.state_dict()


def test_the_state_holds_tensors_and_plain_values_only(tmp_path: Path) -> None:
    dm = datamodule(tmp_path)
    dm.setup("fit")
    batches = iter(dm.train_dataloader())
    next(batches)
    state = dm.state_dict()
    assert set(state) == {"stream", "world_size", "rank_split", "settings"}
    assert weights_only_roundtrip(state)["stream"]["pass"] == 0


def test_a_position_saved_under_other_data_settings_is_not_continued(tmp_path: Path) -> None:
    dm = datamodule(tmp_path)
    dm.setup("fit")
    batches = iter(dm.train_dataloader())
    next(batches)
    state = weights_only_roundtrip(dm.state_dict())
    other = datamodule(tmp_path, buffer_tokens=512)
    other.load_state_dict(state)
    with pytest.warns(UserWarning, match=r"other settings \(buffer_tokens\).*starts afresh"):
        other.train_dataloader()
    assert other.stream._resume is None
    same = datamodule(tmp_path)
    same.load_state_dict(state)
    same.train_dataloader()
    assert same.stream._resume is not None


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


def kill_then_resume(args: list[str], run_dir: Path) -> subprocess.CompletedProcess:
    """Start ``args`` in ``run_dir``, SIGKILL it at a random moment after its first checkpoint, then run
    ``args resume=run_dir`` to the end; returns the resumed run (asserted successful and restored)."""
    first = subprocess.Popen([*args, f"hydra.run.dir={run_dir}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(run_dir / "checkpoints" / "last.ckpt", first)
        time.sleep(random.uniform(0.0, 1.5))  # somewhere after the first checkpoint, or in the end-of-training analyses
        first.send_signal(signal.SIGKILL)
    finally:
        first.communicate()
    step = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["global_step"]
    print(f"killed after the checkpoint of step {step}")
    resumed = subprocess.run([*args, f"resume={run_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                             check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states" in resumed.stdout + resumed.stderr
    return resumed


def test_sigkill_then_resume_gives_the_uninterrupted_weights(tiny_run: Path, tmp_path: Path) -> None:
    """A real `train.py +experiment=tiny` killed with SIGKILL at a random moment after its first checkpoint,
    then resumed with resume=DIR, ends with the bytes of the uninterrupted run (`tiny_run`, checkpointed less
    often: checkpointing does not disturb the stream either)."""
    run_dir = tmp_path / "run"
    args = [sys.executable, "train.py", "+experiment=tiny", "callbacks.checkpoint.every_n_train_steps=4"]
    kill_then_resume(args, run_dir)  # killed in steps 4..30 or in the end-of-training analyses
    assert (run_dir / "artifact" / "model.safetensors").read_bytes() == (tiny_run / "model.safetensors").read_bytes()
    assert (run_dir / "artifact" / "metrics.json").is_file()
    mixes = [json.loads((d / "config.json").read_text())["metadata"]["realised_data_mix"] for d in (run_dir / "artifact", tiny_run)]
    assert mixes[0] == mixes[1] and "skipped rows: none" in mixes[0]  # the document and token counts continued too


def _cfg(output_dir: Path, *overrides: str):
    cfg = compose_train("+experiment=tiny", f"hydra.runtime.output_dir={output_dir}", *overrides)
    with open_dict(cfg):
        cfg.output_dir = str(output_dir)  # what ${hydra:runtime.output_dir} resolves to in a run
    return cfg


def test_resume_continues_the_runs_last_checkpoint_and_refuses_another_config(tmp_path: Path) -> None:
    save_run_config(_cfg(tmp_path))
    assert resume_checkpoint(_cfg(tmp_path, f"resume={tmp_path}")) is None  # killed before its first checkpoint
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert resume_checkpoint(_cfg(tmp_path, f"resume={tmp_path}")) == str(tmp_path / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match=r"crosscoder\.k: 8 -> 4"):
        resume_checkpoint(_cfg(tmp_path, f"resume={tmp_path}", "crosscoder.k=4"))
    with pytest.raises(ValueError, match="drop ckpt_path"):
        resume_checkpoint(_cfg(tmp_path, f"resume={tmp_path}", f"ckpt_path={tmp_path / 'other.ckpt'}"))
    with pytest.raises(ValueError, match="resume sets hydra.run.dir"):
        resume_checkpoint(_cfg(tmp_path / "elsewhere", f"resume={tmp_path}"))


def test_ckpt_path_last_in_a_new_directory_says_how_to_resume(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="resume=outputs/<run_name>/<date_time>"):
        resume_checkpoint(_cfg(tmp_path, "ckpt_path=last"))


def test_the_wandb_run_id_is_kept_in_the_output_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_id = wandb_run_id(tmp_path)
    assert wandb_run_id(tmp_path) == run_id == (tmp_path / "wandb_run_id").read_text().strip()
    cfg = _cfg(tmp_path, "logger=wandb")
    logger = _instantiate_logger(cfg.logger.wandb, str(tmp_path))
    assert logger._wandb_init["id"] == run_id and logger._wandb_init["resume"] == "allow"


# ------------------------------------------------------------------------------------------------ data=cached
@pytest.fixture()
def cache(tmp_path: Path) -> Path:
    """3 shards of 100 random tokens: 9 batches of 32 a pass, each pass in its own seeded order."""
    acts = torch.randn(300, 2, 4, generator=torch.Generator().manual_seed(0))
    return write_cache(tmp_path / "acts", [acts], 300, tokens_per_shard=100, val=torch.zeros(10, 2, 4))


def cache_module(path: Path, **overrides) -> CachedActivationDataModule:
    return CachedActivationDataModule(CachedDataConfig(**({"path": str(path), "batch_size": 32, "seed": 3} | overrides)))


def trainer_order(dm: CachedActivationDataModule) -> tuple[CachePasses, list[torch.Tensor], Iterator[torch.Tensor]]:
    """The trainer's iterator after Lightning's first fetch (that batch), with the scale estimate's side pass then."""
    dm.train_dataloader()
    served = iter(dm.reader)
    first = next(served)
    list(islice(iter(dm.reader), 3))  # a side pass: takes a pass number, must not move the tracked position
    return dm.reader, [first], served


@pytest.mark.parametrize("consumed", [0, 1, 8, 9, 20])  # 8: the last batch of pass 0; 9, 20: later passes
@pytest.mark.parametrize("prefetched", [0, 1, 2])
def test_a_restored_cache_reader_serves_the_same_batches(cache: Path, consumed: int, prefetched: int) -> None:
    _, first, rest = trainer_order(cache_module(cache))
    reference = first + list(islice(rest, consumed + prefetched + 30))
    dm = cache_module(cache)
    reader, drawn, served = trainer_order(dm)
    for step in range(consumed):  # the trainer takes the oldest batch drawn, drawing one when none is ahead
        if len(drawn) == step:
            drawn.append(next(served))
        reader.consumed()
    while len(drawn) < consumed + prefetched:  # and draws ahead of what it trains on (Lightning: one batch)
        drawn.append(next(served))
    assert all(torch.equal(a, b) for a, b in zip(drawn, reference, strict=False))
    resumed = cache_module(cache)
    resumed.load_state_dict(weights_only_roundtrip(dm.state_dict()))
    resumed.train_dataloader()
    again = list(islice(iter(resumed.reader), len(drawn) - consumed + 30))
    assert all(torch.equal(a, b) for a, b in zip(again, reference[consumed : consumed + len(again)], strict=True))
    assert resumed.reader.passes >= reader.passes


def test_a_cache_position_is_kept_under_the_same_settings_only(cache: Path) -> None:
    dm = cache_module(cache)
    assert dm.state_dict() == {}  # nothing read yet
    reader, _, served = trainer_order(dm)
    next(served)
    reader.consumed()
    state = weights_only_roundtrip(dm.state_dict())
    assert set(state) == {"reader", "world_size", "rank_split", "settings"}
    assert state["reader"] == {"passes": 2, "continue_at": [[0, 1], [0, 2]]}  # pass 1 went to the side pass
    other = cache_module(cache, batch_size=16)
    other.load_state_dict(state)
    with pytest.warns(UserWarning, match=r"other settings \(batch_size\).*starts afresh"):
        other.train_dataloader()
    assert other.reader._plan == [] and other.reader.passes == 0
    same = cache_module(cache)
    same.load_state_dict(state)
    same.train_dataloader()
    assert same.reader._plan == [(0, 1)] and same.reader.passes == 2
    old = cache_module(cache)  # a checkpoint written before the position was kept
    old.load_state_dict({"position_saved": False})
    with pytest.warns(UserWarning, match="does not hold the cache reader's position"):
        old.train_dataloader()


CACHED_RUN = ["data=cached", "data.batch_size=64", "model_pair.base=embedded-tiny:base",
              "model_pair.chat=embedded-tiny:chat", "model_pair.layer=1", "crosscoder.n_latents=64", "crosscoder.k=4",
              "crosscoder.k_start=8", "crosscoder.k_anneal_steps=10", "crosscoder.scale_tokens=256",
              "trainer.max_steps=120", "trainer.val_check_interval=40", "callbacks.checkpoint.every_n_train_steps=5",
              "analysis.causal.enabled=false", "analysis.splice.enabled=false"]


def test_sigkill_then_resume_from_a_cache_gives_the_uninterrupted_weights(tmp_path: Path) -> None:
    """The same with ``data=cached``: a cache of 2,048 tokens written by cache_activations.py (32 batches a pass,
    so the 120 steps cross passes), a run killed with SIGKILL at a random moment after its first checkpoint."""
    acts = tmp_path / "acts"
    written = subprocess.run(
        [sys.executable, "cache_activations.py", *CACHED_RUN[2:5], "data.seq_len=64", "data.val_tokens=256",
         "data.batch_size=256", "data.buffer_tokens=2048", "data.n_probes=4", f"out={acts}", "n_tokens=2048",
         "tokens_per_shard=512", f"hydra.run.dir={tmp_path / 'cache_run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert written.returncode == 0, written.stderr[-3000:]
    args = [sys.executable, "train.py", *CACHED_RUN, f"data.path={acts}"]
    whole = subprocess.run([*args, f"hydra.run.dir={tmp_path / 'whole'}"], cwd=ROOT, capture_output=True, text=True,
                           timeout=600, check=False)
    assert whole.returncode == 0, whole.stderr[-3000:]
    run_dir = tmp_path / "run"
    resumed = kill_then_resume(args, run_dir)
    assert "not an exact resume" not in resumed.stderr and "starts afresh" not in resumed.stderr
    weights = [(d / "artifact" / "model.safetensors").read_bytes() for d in (run_dir, tmp_path / "whole")]
    assert weights[0] == weights[1]
