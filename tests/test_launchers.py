"""Hydra launchers and sweepers from the ecosystem: submitit (local here, SLURM on a cluster) and Optuna."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from crosscoder_pl.config import ObjectiveConfig
from crosscoder_pl.metrics import sweep_objective

ROOT = Path(__file__).resolve().parents[1]
FAST = ["+experiment=tiny", "analysis.causal.enabled=false", "dashboard.enabled=false", "trainer.accelerator=cpu"]


def multirun(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "train.py", "-m", *FAST, *overrides], cwd=ROOT, capture_output=True,
                          text=True, timeout=400, env=env, check=False)


def val_metrics(job: Path) -> dict[str, float]:
    found: dict[str, float] = {}
    for row in csv.DictReader((job / "csv" / "version_0" / "metrics.csv").open()):
        found.update({k: float(v) for k, v in row.items() if k.startswith("val/") and v != ""})
    return found


def test_multirun_goes_through_submitits_local_launcher(tmp_path: Path) -> None:
    result = multirun("hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={tmp_path}",
                      "hydra.sweep.subdir=${hydra.job.num}", "crosscoder.k=4,8")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == ["0", "1"]
    for job, k in zip(jobs, (4, 8)):
        config = yaml.safe_load((job / "artifact" / "config.json").read_text())
        assert config["k"] == k
    # submitit ran them: one result pickle per job
    assert len(list((tmp_path / ".submitit").glob("*/*_result.pkl"))) == 2


def test_optuna_sweep_maximises_the_objective_train_returns(tmp_path: Path) -> None:
    result = multirun("hydra/sweeper=optuna_k_size", "hydra.sweeper.n_trials=2",
                      'hydra.sweeper.params={crosscoder.k:"choice(4,8)",crosscoder.n_latents:"128"}',
                      f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 2
    scores = [sweep_objective(val_metrics(job), ObjectiveConfig(max_dead_frac=0.1, penalty=10.0)) for job in jobs]
    assert all(math.isfinite(s) for s in scores)
    assert best["best_value"] == pytest.approx(max(scores), rel=1e-6)


def test_objective_is_variance_explained_under_a_dead_fraction_limit() -> None:
    metrics = {"val/ve_base": 0.8, "val/ve_chat": 0.6, "val/dead_frac": 0.05}
    objective = ObjectiveConfig(max_dead_frac=0.1, penalty=10)
    assert sweep_objective(metrics, objective) == pytest.approx(0.7)
    assert sweep_objective({**metrics, "val/dead_frac": 0.3}, objective) == pytest.approx(-1.3)
    assert math.isnan(sweep_objective({"val/ve_chat": 0.6}, objective))
    with pytest.raises(ValueError, match="objective.max_dead_frac=2 must be a number in"):
        ObjectiveConfig(max_dead_frac=2, penalty=10)


def test_slurm_launcher_composes_with_the_cluster_settings() -> None:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                "hydra.launcher.gpus_per_node=4", "hydra.launcher.tasks_per_node=4", "trainer.devices=4"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 4, 4)
    assert launcher.timeout_min > 0 and launcher.array_parallelism >= 1
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", ["hydra/sweeper=optuna_k_size"], return_hydra_config=True)
    assert cfg.hydra.sweeper.direction == "maximize"
    assert set(cfg.hydra.sweeper.params) == {"crosscoder.k", "crosscoder.n_latents"}
