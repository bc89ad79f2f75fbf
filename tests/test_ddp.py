"""Data-parallel training is the single-process run, split: one process vs two (DDP, gloo, CPU).

The two runs see the same global batches (per-device batch halved, ``data.rank_split=batch``) and seed, with
``k < n_latents`` (BatchTopK keeps 4 of 128 latents per token on average, annealed from 8) and AuxK acting (a
512-token dead window: most latents are dead after a few steps). The step's selection is global (the ``k * 256``
highest scores of the global batch, crosscoder_pl/distributed.py) and so are its batch means (the unit term,
AuxK's baseline, the reconstruction mean), so the two runs keep the same entries, reach the same threshold and
dead-latent counters, and every difference left is float summation order. The selection itself is tested
without processes in tests/test_global_topk.py (both step implementations, a rank holding every winner, ties).
"""

import csv
import os
import subprocess
import sys
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_data_datamodule import datamodule

from crosscoder_pl.data.loaders import RankSlice

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 256
DEAD_AFTER = 512
# float32 with the gradients and batch sums added in another order, 30 Adam steps of lr 1e-3: measured max |Δ| 6e-8
# (weights, |w| <= 1.6), 1e-11 (threshold EMA), 0 (threshold, 0.22); the integer state is equal.
ATOL, RTOL = 1e-6, 1e-4


def train(out: Path, devices: int) -> subprocess.CompletedProcess:
    overrides = [
        "+experiment=tiny", f"hydra.run.dir={out}", "trainer.accelerator=cpu", f"trainer.devices={devices}",
        f"trainer.strategy={'ddp' if devices > 1 else 'auto'}", f"data.batch_size={GLOBAL_BATCH // devices}",
        "data.rank_split=batch", "crosscoder.k=4", "crosscoder.k_start=8", "crosscoder.k_anneal_steps=5",
        "crosscoder.threshold_start_step=5", f"crosscoder.dead_after_tokens={DEAD_AFTER}", "crosscoder.aux_coef=0.5",
        "crosscoder.lr=1e-3",
        "analysis.causal.enabled=false", "dashboard.enabled=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "train.py", *overrides], cwd=ROOT, capture_output=True, text=True,
                          check=False,
                          timeout=300, env=env)


def last_metrics(run: Path, prefix: str = "val/") -> dict[str, float]:
    """The last logged value of every metric named ``prefix...`` in the run's CSV log."""
    rows = list(csv.DictReader((run / "csv" / "version_0" / "metrics.csv").open()))
    found: dict[str, float] = {}
    for row in rows:
        found.update({k: float(v) for k, v in row.items() if k.startswith(prefix) and v != ""})
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    out = {}
    for devices in (1, 2):
        run = tmp_path_factory.mktemp(f"devices{devices}")
        result = train(run, devices)
        assert result.returncode == 0, result.stderr[-4000:]
        out[devices] = run
    return out


def test_two_processes_train_the_single_process_weights_and_state(runs: dict[int, Path]) -> None:
    one, two = (torch.load(runs[d] / "checkpoints" / "last.ckpt", weights_only=True) for d in (1, 2))
    assert one["global_step"] == two["global_step"] == 30
    a, b = one["state_dict"], two["state_dict"]
    assert a.keys() == b.keys()
    for name in a:
        if a[name].is_floating_point():
            torch.testing.assert_close(b[name], a[name], atol=ATOL, rtol=RTOL, msg=name)
        else:  # all-reduced integer state: dead-latent counters, threshold update count, flags
            assert torch.equal(b[name], a[name]), name
    assert (a["crosscoder.threshold"] > 0).item()  # calibrated: the threshold test compares something
    assert int(a["threshold_updates"]) == 25  # steps 5..29, each from the global batch's smallest kept score
    assert int((a["tokens_since_fired"] >= DEAD_AFTER).sum()) > 0  # dead latents: AuxK acted


def test_two_processes_log_the_single_process_training_loss_and_l0(runs: dict[int, Path]) -> None:
    one, two = last_metrics(runs[1], "train/l"), last_metrics(runs[2], "train/l")
    assert one.keys() == two.keys() == {"train/loss", "train/loss_recon", "train/loss_aux", "train/l0"}
    assert one["train/loss_aux"] > 0
    for key in one:  # the global batch's values on every rank (rank 0 logs)
        assert two[key] == pytest.approx(one[key], rel=1e-5), key


def test_two_processes_log_the_single_process_validation_metrics(runs: dict[int, Path]) -> None:
    one, two = last_metrics(runs[1]), last_metrics(runs[2])
    assert {"val/ve_base", "val/ve_chat", "val/l0", "val/dead_frac", "val/tokens"} <= one.keys()
    assert one.keys() == two.keys()
    assert two["val/tokens"] == one["val/tokens"] == 1024  # synchronised: both ranks' halves counted
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-5), key


def test_the_artifact_is_written_once_with_the_same_weights(runs: dict[int, Path]) -> None:
    for d in (1, 2):
        assert sorted(p.name for p in runs[d].iterdir() if ".artifact" in p.name) == []  # no partial directory
    logs = [p for p in runs[2].glob("*.log") if "writing the artifact" in p.read_text()]
    assert [p.name for p in logs] == ["train.log"]  # rank 0 only (rank 1 logs to train_ddp_process_1.log)
    a, b = (load_file(str(runs[d] / "artifact" / "model.safetensors")) for d in (1, 2))
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=ATOL, rtol=RTOL, msg=name)


def _fake_trainer(rank: int, world_size: int) -> SimpleNamespace:
    return SimpleNamespace(global_rank=rank, world_size=world_size)


def test_rank_batches_are_disjoint_slices_of_the_single_process_batches(tmp_path: Path) -> None:
    def stream(world_size: int, rank: int, split: str) -> list[torch.Tensor]:
        dm = datamodule(tmp_path, batch_size=32 // world_size, rank_split=split)
        dm.trainer = _fake_trainer(rank, world_size)
        return list(islice(dm.train_dataloader(), 4))

    single = stream(1, 0, "batch")
    ranks = [stream(2, r, "batch") for r in (0, 1)]
    for step, whole in enumerate(single):
        assert ranks[0][step].shape == ranks[1][step].shape == (16, 2, 32)
        assert torch.equal(torch.cat([ranks[0][step], ranks[1][step]]), whole)
    # "documents": each rank reads its own documents, so its batches are not slices of the single stream.
    own = stream(2, 1, "documents")
    assert not torch.equal(own[0], ranks[1][0])


def test_rank_slice_splits_each_global_batch() -> None:
    batches = [torch.arange(6.0).view(6, 1, 1) + 10 * i for i in range(2)]
    parts = [list(RankSlice(batches, rank, 3)) for rank in range(3)]
    for i, whole in enumerate(batches):
        assert torch.equal(torch.cat([p[i] for p in parts]), whole)
    with pytest.raises(ValueError, match="rank=3"):
        RankSlice(batches, 3, 3)


def test_heldout_batches_are_read_once_across_ranks_even_when_uneven(tmp_path: Path) -> None:
    dm = datamodule(tmp_path, batch_size=16, val_tokens=64)
    dm.setup("fit")
    whole = torch.cat(list(dm.val_dataloader()))
    parts = []
    for rank in (0, 1, 2):  # 4 batches over 3 ranks: Lightning's sampler would repeat 2 of them
        dm.trainer = _fake_trainer(rank, 3)
        parts.append(list(dm.val_dataloader()))
    assert [len(p) for p in parts] == [2, 1, 1]
    assert torch.equal(torch.cat([parts[0][0], parts[1][0], parts[2][0], parts[0][1]]), whole)
