"""The papergrade dry run's configuration: the real Gemma-2-2B dimensions and the recipe's crosscoder (the run
itself, ~18 GB and minutes, is bench/bench_papergrade_dry_run.py, not a test)."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import Gemma2ForCausalLM

from crosscoder_pl.models.random_pair import gemma2_2b_config
from crosscoder_pl.training import check_config

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_dry_run_composes_with_the_papergrade_crosscoder_and_real_model_dims() -> None:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", ["+experiment=papergrade_dry_run", "hydra.runtime.output_dir=/tmp/x"])
        papergrade = compose("train", ["+experiment=papergrade", "hydra.runtime.output_dir=/tmp/x"])
    check_config(cfg)
    assert cfg.crosscoder.n_latents == papergrade.crosscoder.n_latents == 73_728
    assert (cfg.crosscoder.k, cfg.crosscoder.k_start) == (100, 1000)
    assert cfg.model_pair.layer == papergrade.model_pair.layer == 13 and cfg.model_pair.truncate
    config = gemma2_2b_config(cfg.model_pair.layer + 1)
    assert (config.hidden_size, config.vocab_size, config.num_hidden_layers) == (2304, 256_000, 14)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.intermediate_size) == (
        8, 4, 256, 9216)


def test_gemma2_2b_shape_has_its_published_parameter_count() -> None:
    with torch.device("meta"):  # no memory: shapes only
        model = Gemma2ForCausalLM(gemma2_2b_config())
    n = sum(p.numel() for p in model.parameters())  # tied embedding counted once
    assert n == pytest.approx(2.614e9, rel=0.002)  # Gemma-2-2B: 2.61B parameters
    with pytest.raises(ValueError, match="layers=27"):
        gemma2_2b_config(27)
