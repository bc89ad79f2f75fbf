"""The application: config composition and validation, train.py / analyze.py end to end, sweeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, InstantiationException
from omegaconf import DictConfig

from crosscoder_pl import CrossCoder
from crosscoder_pl.training import check_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
# Experiments that need the user's own models: the tiny embedded pair stands in.
EXPERIMENT_ARGS = {"own_pair": ["model_pair.base=embedded-tiny:base", "model_pair.chat=embedded-tiny:chat"]}
ARTIFACT_FILES = {"README.md", "config.json", "model.safetensors", "taxonomy.json", "latents.csv",
                  "causal_validation.csv", "cosine_vs_causal.png", "metrics.json", "train_config.yaml"}


def compose_train(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("experiment", ["", *EXPERIMENTS])
def test_every_experiment_composes_and_passes_validation(experiment: str) -> None:
    args = [f"+experiment={experiment}", *EXPERIMENT_ARGS.get(experiment, [])] if experiment else []
    cfg = compose_train(*args, "hydra.runtime.output_dir=/tmp/x")
    check_config(cfg)  # raises on any impossible value


def test_papergrade_is_the_seed_recipe() -> None:
    cfg = compose_train("+experiment=papergrade")
    assert (cfg.model_pair.base, cfg.model_pair.chat, cfg.model_pair.layer) == ("google/gemma-2-2b", "google/gemma-2-2b-it", 13)
    assert cfg.model_pair.dtype == "bfloat16"
    c = cfg.crosscoder
    assert (c.n_latents, c.k, c.k_start, c.lr, c.lr_decay_frac) == (73728, 100, 1000, 1e-4, 0.2)
    assert cfg.trainer.gradient_clip_val == 1.0
    assert cfg.data.web.path == "HuggingFaceFW/fineweb-edu" and cfg.data.chat.path == "lmsys/lmsys-chat-1m"
    assert dict(cfg.data.mix) == {"web": 0.5, "chat": 0.5}
    tokens = cfg.trainer.max_steps * cfg.data.batch_size
    assert abs(tokens - 100_000_000) < cfg.data.batch_size  # 100M training tokens


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        (["crosscoder.k=5000"], ValueError, "k=5000 is larger than the dictionary"),
        (["crosscoder.k_start=4"], ValueError, "crosscoder.k_start=4 is smaller than crosscoder.k=32"),
        (["data.mix.chat=0.6"], ValueError, "chat=0.6"),
        (["+crosscoder.kk=3"], ValueError, r"unknown key crosscoder.kk \(did you mean crosscoder.k\?\)"),
        (["trainer.max_steps=0"], ValueError, "trainer.max_steps=0"),
        (["trainer.max_steps=400"], ValueError, "threshold starts at step 500"),
        (["crosscoder.metrics_window_steps=0"], ValueError, "crosscoder.metrics_window_steps=0 must be an integer >= 1"),
        (["trainer.val_check_interval=0"], ValueError, "trainer.val_check_interval=0 must be an integer >= 1"),
        (["trainer.val_check_interval=0.5"], ValueError, "val_check_interval=0.5 must be .*no epochs"),
        (["data.val_tokens=0"], ValueError, "data.val_tokens=0 must be an integer >= 1"),
        (["crosscoder.k_anneal_steps=-5"], ValueError, "crosscoder.k_anneal_steps=-5 must be an integer >= 0"),
        (["ckpt_path=https://example.com/last.ckpt"], ValueError, "is remote"),
        (["analysis.taxonomy.enabled=false"], ValueError, "enable analysis.taxonomy"),
    ],
)
def test_impossible_config_fails_before_any_model_loads(overrides, error, match) -> None:
    # Hydra wraps errors of a _target_ in an InstantiationException that repeats them and names the key.
    with pytest.raises((error, InstantiationException), match=match):
        check_config(compose_train(*overrides))


def test_unknown_key_fails_at_composition_with_its_name() -> None:
    with pytest.raises(ConfigCompositionException, match="kk"):
        compose_train("crosscoder.kk=3")


# tiny_run: the tiny experiment's artifact, trained once per session (conftest.py).


def test_train_writes_a_complete_loadable_artifact(tiny_run: Path) -> None:
    assert ARTIFACT_FILES <= {p.name for p in tiny_run.iterdir()}
    cc = CrossCoder.from_pretrained(tiny_run)
    assert cc.n_latents == 128 and cc.k == 8 and cc.threshold_calibrated
    assert cc.metadata["base_model"] == "embedded-tiny:base" and cc.metadata["layer"] == 1
    counts = json.loads((tiny_run / "taxonomy.json").read_text())
    assert set(counts) == {"shared", "dead", "unclassified", "base_only", "chat_only"}
    assert sum(counts.values()) == cc.n_latents
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    card = (tiny_run / "README.md").read_text()
    assert "embedded-tiny:base" in card and "python train.py +experiment=tiny" in card
    assert f"{metrics['validation']['variance_explained']['base']:.4f}" in card
    assert "in the last 5,000 training tokens (step 30)" in card
    outliers = metrics["outliers"]  # counted by default (data.outlier_factor=3.0), kept
    assert set(outliers) == {"training", "heldout"} and not outliers["training"]["dropped"]
    assert outliers["training"] == cc.metadata["outliers"]["training"] and outliers["training"]["tokens"] > 30 * 256
    assert f"| held-out set | {outliers['heldout']['tokens']:,} |" in card
    csv_logs = list(tiny_run.parent.glob("csv/version_*/metrics.csv"))
    header = csv_logs[0].read_text().splitlines()[0].split(",")
    assert {"train/ve_base", "train/ve_chat", "train/l0", "train/dead_frac", "train/k", "train/tokens_per_sec",
            "val/ve_base", "val/ve_chat", "data/web_share", "data/outlier_frac_base", "data/outlier_frac_chat",
            "data/outliers_chat"} <= set(header)


def test_analyze_reproduces_the_training_run_figures(tiny_run: Path) -> None:
    before = {name: (tiny_run / name).read_text() for name in ("taxonomy.json", "causal_validation.csv", "latents.csv")}
    for name in before:
        (tiny_run / name).unlink()  # analyze.py must write them again
    result = run("analyze.py", f"artifact={tiny_run}", f"hydra.run.dir={tiny_run.parent / 'analyze'}")
    assert result.returncode == 0, result.stderr[-3000:]
    after = {name: (tiny_run / name).read_text() for name in before}
    assert after == before


def test_multirun_sweep_gives_each_job_its_own_artifact(tmp_path: Path) -> None:
    result = run("train.py", "-m", "+experiment=tiny", "crosscoder.k=4,8", "trainer.max_steps=4", "crosscoder.k_anneal_steps=2",
                 "trainer.val_check_interval=4", "analysis.causal.enabled=false", "analysis.splice.enabled=false",
                 f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    ks = sorted(CrossCoder.from_pretrained(p).k for p in tmp_path.glob("*/artifact"))
    assert ks == [4, 8]


def test_papergrade_without_the_hub_fails_fast_naming_the_download() -> None:
    result = run("train.py", "+experiment=papergrade", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    assert "could not load 'google/gemma-2-2b'" in result.stderr and "HF_TOKEN" in result.stderr


def test_cache_then_train_from_cache(tmp_path: Path) -> None:
    tiny_pair = ["model_pair.base=embedded-tiny:base", "model_pair.chat=embedded-tiny:chat", "model_pair.layer=1"]
    result = run("cache_activations.py", *tiny_pair, "data.seq_len=64", "data.val_tokens=512", "data.batch_size=256",
                 "data.buffer_tokens=2048", "data.n_probes=4", f"out={tmp_path / 'acts'}", "n_tokens=4096",
                 f"hydra.run.dir={tmp_path / 'cache_run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    result = run("train.py", "data=cached", f"data.path={tmp_path / 'acts'}", "data.batch_size=256", *tiny_pair,
                 "crosscoder.n_latents=64", "crosscoder.k=4", "crosscoder.k_start=4", "crosscoder.k_anneal_steps=0", "crosscoder.scale_tokens=512",
                 "trainer.max_steps=6", "trainer.val_check_interval=6", "analysis.causal.max_latents=2",
                 f"hydra.run.dir={tmp_path / 'train_run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert ARTIFACT_FILES <= {p.name for p in (tmp_path / "train_run" / "artifact").iterdir()}


def test_sweeper_example_grids_existing_keys() -> None:
    cfg = compose_train("hydra/sweeper=grid_k_size")
    params = cfg.hydra.sweeper.params
    assert dict(params) == {"crosscoder.k": "16,32", "crosscoder.n_latents": "1024,2048"}
    for key in params:
        group, name = key.split(".")
        assert name in cfg[group]


def test_resume_from_last_checkpoint_continues_without_reinitialising(tmp_path: Path) -> None:
    common = ["+experiment=tiny", "crosscoder.k_anneal_steps=4"]
    first = run("train.py", *common, "trainer.max_steps=16", f"hydra.run.dir={tmp_path / 'a'}")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "data init from" in first.stdout + first.stderr
    second = run("train.py", *common, "trainer.max_steps=30", f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}",
                 f"hydra.run.dir={tmp_path / 'b'}")
    assert second.returncode == 0, second.stderr[-3000:]
    logs = second.stdout + second.stderr
    assert "Restored all states" in logs and "data init from" not in logs  # scales and b_dec come from the checkpoint
    resumed = CrossCoder.from_pretrained(tmp_path / "b" / "artifact")
    first_scales = CrossCoder.from_pretrained(tmp_path / "a" / "artifact").scales
    assert resumed.metadata["training_dead_fraction"]["step"] == 30
    assert torch.equal(resumed.scales, first_scales)


def test_same_seed_same_weights_whether_or_not_the_pair_was_built(tmp_path: Path) -> None:
    """The first run in an empty cache builds the corpus and the pair; the second finds them. Same bytes."""
    cache = {"CROSSCODER_PL_CACHE": str(tmp_path / "cache")}
    weights = []
    for name in ("cold", "warm"):
        result = run("train.py", "+experiment=tiny", "trainer.max_steps=12", "crosscoder.k_anneal_steps=4",
                     f"hydra.run.dir={tmp_path / name}", env=cache)
        assert result.returncode == 0, result.stderr[-3000:]
        weights.append((tmp_path / name / "artifact" / "model.safetensors").read_bytes())
    assert (tmp_path / "cache" / "models" / "embedded-tiny" / "build_report.json").exists()
    assert weights[0] == weights[1]
