"""The own_pair experiment: sizes derived from the pair, an identical pair end to end, the card's models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_app import compose_train, run

from crosscoder_pl.analysis.card import render_card
from crosscoder_pl.config import RunConfig
from crosscoder_pl.crosscoder import CrossCoder
from crosscoder_pl.training import check_config

TINY = ["model_pair.base=embedded-tiny:chat", "model_pair.chat=embedded-tiny:chat"]  # an identical pair
SMALL = ["data.seq_len=64", "data.batch_size=256", "data.text_batch_size=16", "data.buffer_tokens=2048",
         "data.val_tokens=1024", "data.n_probes=8", "data.probe_len=32", "crosscoder.k=8", "crosscoder.k_start=16",
         "crosscoder.k_anneal_steps=10", "crosscoder.dead_after_tokens=5000", "crosscoder.scale_tokens=512",
         "crosscoder.metrics_window_steps=10", "trainer.max_steps=30", "trainer.val_check_interval=15",
         "callbacks.checkpoint.every_n_train_steps=15", "analysis.chunk_tokens=512", "analysis.causal.max_latents=4"]


def test_expansion_gives_the_dictionary_size() -> None:
    cfg = compose_train("+experiment=own_pair", *TINY, "hydra.runtime.output_dir=/tmp/x")
    run = RunConfig.from_hydra(cfg)
    resolved = run.resolve(640).crosscoder
    assert resolved.n_latents == 4 * 640 and resolved.expansion is None
    assert run.crosscoder.expansion == 4  # the run's config keeps the recipe
    plain = RunConfig.from_hydra(compose_train("hydra.runtime.output_dir=/tmp/x")).resolve(640)
    assert plain.crosscoder.n_latents == 1024  # no expansion: n_latents as given


def test_expansion_and_n_latents_that_disagree_fail_naming_both() -> None:
    cfg = compose_train("+experiment=own_pair", *TINY, "crosscoder.n_latents=100")
    with pytest.raises(ValueError, match=r"crosscoder.n_latents=100 and crosscoder.expansion=4 \(d_model 640: 2560"):
        RunConfig.from_hydra(cfg).resolve(640)
    with pytest.raises(ValueError, match=r"crosscoder.expansion=0 must be an integer >= 1 or null: latents per d_model dimension"):
        RunConfig.from_hydra(compose_train("+experiment=own_pair", *TINY, "crosscoder.expansion=0"))


def test_own_pair_without_models_names_the_missing_key() -> None:
    with pytest.raises(ValueError, match=r"model_pair.base and model_pair.chat not set: .* model_pair.base=DIR"):
        check_config(compose_train("+experiment=own_pair"))


def test_card_lists_an_identical_pair_once() -> None:
    metrics = {"artifact": {"base_model": "m", "chat_model": "m", "layer": 1, "n_latents": 8, "d_model": 2, "k": 2,
                            "threshold": 0.1, "scales": [1.0, 1.0]},
               "validation": {"variance_explained": {"base": 0.9, "chat": 0.9}, "l0": 2.0, "dead_fraction": 0.0,
                              "n_tokens": 10}}
    front = render_card(metrics, {}, "python train.py").split("---")[1]
    assert yaml.safe_load(front)["base_model"] == ["m"]
    metrics["artifact"]["chat_model"] = "m-it"
    assert yaml.safe_load(render_card(metrics, {}, "x").split("---")[1])["base_model"] == ["m", "m-it"]


def test_identical_pair_end_to_end(tmp_path: Path) -> None:
    result = run("train.py", "+experiment=own_pair", *TINY, *SMALL, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    artifact = tmp_path / "artifact"
    cc = CrossCoder.from_pretrained(artifact)
    train_config = yaml.safe_load((artifact / "train_config.yaml").read_text())
    assert cc.n_latents == 4 * cc.d_model == train_config["crosscoder"]["n_latents"]
    n_layers = json.loads((Path(_tiny_chat_dir()) / "config.json").read_text())["num_hidden_layers"]
    assert cc.metadata["layer"] == n_layers // 2 == train_config["model_pair"]["layer"]
    counts = json.loads((artifact / "taxonomy.json").read_text())
    assert counts["base_only"] == counts["chat_only"] == 0  # one model twice: nothing is specific to either
    front = (artifact / "README.md").read_text().split("---")[1]
    assert yaml.safe_load(front)["base_model"] == ["embedded-tiny:chat"]


def _tiny_chat_dir() -> str:
    from crosscoder_pl.models.pair import resolve_model_name

    return resolve_model_name("embedded-tiny:chat")[0]
