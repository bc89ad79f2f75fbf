"""Every experiment with every data option and model pair: it composes into a configuration whose nodes take
every key they are given and keep the recipe, or it fails at start-up naming the conflict."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from crosscoder_pl.config import target_keys
from crosscoder_pl.experiments import (
    check_experiment,
    declared_options,
    default_options,
    experiment_file,
)
from crosscoder_pl.training import check_config

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
DATA = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))
PAIRS = sorted(p.stem for p in (CONF / "model_pair").glob("*.yaml"))
# The combinations refused, and what the refusal must name.
REFUSED = {
    ("tiny", "cached", None): ["data.seq_len", "data=cached", "cache_activations.py +experiment=tiny"],
    ("tiny", None, "gemma2_2b"): ["model_pair.base=embedded-tiny:base", "model_pair=gemma2_2b"],
    ("tiny", None, "gemma3_270m_sharegpt"): ["model_pair.base=embedded-tiny:base", "model_pair=gemma3_270m_sharegpt"],
    ("tiny", None, "own_pair"): ["model_pair.base=embedded-tiny:base", "model_pair=own_pair"],
}


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def parameters(target: str) -> set[str]:
    params = target_keys(target)
    assert params is not None, target
    return params


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("data", [None, *DATA])
@pytest.mark.parametrize("pair", [None, *PAIRS])
def test_experiment_composes_or_names_the_conflict(experiment: str, data: str | None, pair: str | None) -> None:
    own = compose_train(f"+experiment={experiment}")  # the recipe with its own options
    args = [f"+experiment={experiment}", *([f"data={data}"] if data else []), *([f"model_pair={pair}"] if pair else [])]
    if data == "cached":
        args.append("data.path=/tmp/acts")
    cfg = compose_train(*args)
    expected = [names for (e, d, p), names in REFUSED.items()
                if e == experiment and (d is None or d == data) and (p is None or p == pair)]
    untaken = {g: set(cfg[g]) - {"_target_"} - parameters(cfg[g]._target_) for g in ("data", "model_pair")}
    # Choosing the pair option the recipe is built on (tiny: embedded, whose models it names) is no conflict.
    meant = {**default_options(), **declared_options(experiment_file(experiment))}["model_pair"]
    chosen = compose_train(f"model_pair={pair}") if pair and pair != meant else None
    models_replaced = chosen is not None and (cfg.model_pair.base, cfg.model_pair.chat) != (
        chosen.model_pair.base, chosen.model_pair.chat)
    try:
        check_experiment(cfg)
    except ValueError as err:
        message = str(err)
        assert f"+experiment={experiment}" in message
        for name in expected[0] if expected else []:
            assert name in message
        # Refused only where the run would otherwise fail later or silently leave the recipe or the chosen models.
        assert untaken["data"] or untaken["model_pair"] or models_replaced or cfg.data.batch_size != own.data.batch_size
        return
    assert not expected, f"{args} should be refused"
    assert not untaken["data"] and not untaken["model_pair"]  # every key is an argument of its target
    assert cfg.data.batch_size == own.data.batch_size  # the recipe's batch size, whatever feeds it
    assert not models_replaced  # the chosen models, not the recipe's


def test_tiny_with_cached_data_fails_in_check_config() -> None:
    cfg = compose_train("+experiment=tiny", "data=cached", "data.path=/tmp/acts")
    with pytest.raises(ValueError, match=r"\+experiment=tiny sets data\.seq_len.*which data=cached"):
        check_config(cfg)


def test_own_pair_with_cached_data_trains_on_the_cache_at_the_recipes_batch() -> None:
    """own_pair's extraction sizes live in its data option (data/own_pair), so data=cached replaces them whole: the
    cached data module gets only keys it takes, and the recipe's batch of 1,024 tokens."""
    cfg = compose_train("+experiment=own_pair", "data=cached", "data.path=/tmp/acts")
    check_experiment(cfg)
    assert cfg.data._target_ == "crosscoder_pl.data.cached.CachedActivationDataModule"
    assert set(cfg.data) - {"_target_"} <= parameters(cfg.data._target_)
    assert cfg.data.batch_size == 1024


def test_own_pair_reads_the_embedded_corpus_with_its_own_extraction_sizes() -> None:
    own, demo = compose_train("+experiment=own_pair"), compose_train()
    sizes = {"seq_len": 128, "batch_size": 1024, "text_batch_size": 16, "buffer_tokens": 32768, "val_tokens": 8192,
             "n_probes": 16, "probe_len": 64, "drop_outliers": True}  # and drops outliers, as measured on Gemma
    assert {key: own.data[key] for key in sizes} == sizes
    rest = lambda cfg: {k: v for k, v in cfg.data.items() if k not in sizes}  # noqa: E731
    assert rest(own) == rest(demo)  # the embedded corpus, held-out split and the rest as the demo's


def test_own_pair_takes_a_model_pair_option() -> None:
    cfg = compose_train("+experiment=own_pair", "model_pair=gemma3_270m_sharegpt")
    check_experiment(cfg)
    assert (cfg.model_pair.base, cfg.model_pair.chat, cfg.model_pair.layer) == (
        "gemma3_270m_sharegpt:base", "gemma3_270m_sharegpt:chat", 6)
    assert cfg.crosscoder.expansion == 4  # the experiment's sizes
