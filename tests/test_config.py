"""The typed configuration (crosscoder_pl.config): every shipped config reads into it, it is frozen, it mirrors what
it configures (keys, defaults, choices), and each impossible value is refused naming the key, the value and the fix.

Bad inputs already in tests/test_bad_inputs.py (max_steps 0, val_tokens 0, threads, mix sums, ...) are not repeated.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import get_args

import lightning as L
import pytest
import torch
from pydantic import ValidationError
from test_app import EXPERIMENT_ARGS, EXPERIMENTS, compose_train

from crosscoder_pl import CrossCoderModule
from crosscoder_pl.config import (
    AnalysisConfig,
    CachedDataConfig,
    ConfigError,
    CrossCoderConfig,
    EmbeddedSourceConfig,
    ModelPairConfig,
    RunConfig,
    StreamDataConfig,
    TextSourceConfig,
    TrainerConfig,
)
from crosscoder_pl.data.loaders import RANK_SPLITS
from crosscoder_pl.data.sources import SourceConfig
from crosscoder_pl.models.pair import DTYPES, load_model_pair
from crosscoder_pl.step import LOSSES, STEP_IMPLS

OUT = "hydra.runtime.output_dir=/tmp/x"


def typed(*overrides: str) -> RunConfig:
    return RunConfig.from_hydra(compose_train(*overrides, OUT))


# ------------------------------------------------------------------------------------------- shipped configs
@pytest.mark.parametrize("experiment", ["", *EXPERIMENTS])
def test_every_shipped_config_reads_into_the_typed_config(experiment: str) -> None:
    args = [f"+experiment={experiment}", *EXPERIMENT_ARGS.get(experiment, [])] if experiment else []
    cfg = compose_train(*args, OUT)
    run = RunConfig.from_hydra(cfg)
    assert isinstance(run.data, StreamDataConfig) and isinstance(run.trainer, TrainerConfig)
    # The typed values are the composed ones.
    assert run.crosscoder.k == cfg.crosscoder.k and run.trainer.max_steps == cfg.trainer.max_steps
    assert run.data.val_tokens == cfg.data.val_tokens and dict(run.data.mix) == dict(cfg.data.mix)
    assert run.analysis.causal.max_latents == cfg.analysis.causal.max_latents and run.seed == cfg.seed


@pytest.mark.parametrize("options", [["data=cached", "data.path=/tmp/acts"], ["model_pair=gemma2_2b"],
                                     ["+experiment=papergrade", "data=cached", "data.path=/tmp/acts"],
                                     ["model_pair=gemma2_2b_random"], ["data=papergrade"]])
def test_every_shipped_option_reads_into_the_typed_config(options: list[str]) -> None:
    run = typed(*options)
    if "data=cached" in options:
        assert isinstance(run.data, CachedDataConfig) and run.data.path == "/tmp/acts"
    if "data=papergrade" in options:
        assert run.data.web == TextSourceConfig(path="HuggingFaceFW/fineweb-edu", name="sample-10BT", field="text",
                                                split="train")
    if "model_pair=gemma2_2b_random" in options:  # a target of its own: a checked mapping
        assert run.model_pair["base"] == "random-gemma-2-2b:base"


@pytest.mark.parametrize("experiment", ["papergrade", "own_pair"])
def test_the_real_model_recipes_centre_and_drop_outliers(experiment: str) -> None:
    """Measured on Gemma-3-270M (README, "Real-model check"): centring and dropping the outliers (norm > 3x the
    median) gave the healthiest dictionary; the real-model recipes take both."""
    run = typed(f"+experiment={experiment}", *EXPERIMENT_ARGS.get(experiment, []))
    assert run.crosscoder.center is True
    assert (run.data.outlier_factor, run.data.drop_outliers) == (3.0, True)


def test_the_tiny_experiment_reads_as_written() -> None:
    """Known answers from conf/experiment/tiny.yaml, the defaults under it and the interpolations."""
    run = typed("+experiment=tiny")
    c, d = run.crosscoder, run.data
    assert (c.n_latents, c.k, c.k_start, c.k_anneal_steps, c.threshold_start) == (128, 8, 16, 10, 10)
    assert c.betas == (0.9, 0.999) and c.lr == 1e-3 and c.loss == "mse"
    assert (d.seq_len, d.batch_size, d.buffer_tokens, d.val_tokens) == (64, 256, 2048, 1024)
    assert (d.outlier_factor, d.drop_outliers) == (3.0, False)  # outliers counted, kept
    assert d.web == EmbeddedSourceConfig(source="web") and d.chat == EmbeddedSourceConfig(source="chat")
    assert isinstance(run.model_pair, ModelPairConfig)
    assert (run.model_pair.base, run.model_pair.layer, run.model_pair.seq_len) == ("embedded-tiny:base", 1, 64)
    assert (run.trainer.max_steps, run.trainer.val_check_interval, run.trainer.processes) == (30, 15, 1)


def test_the_typed_config_is_frozen() -> None:
    run = typed("+experiment=tiny")
    with pytest.raises(ValidationError, match="frozen"):
        run.crosscoder.k = 4  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        run.trainer = run.trainer  # type: ignore[misc]
    with pytest.raises(TypeError):  # mappings are read-only views, lists tuples
        run.data.mix["web"] = 1.0  # type: ignore[index]
    assert isinstance(run.crosscoder.betas, tuple)


def test_expansion_resolves_and_is_checked_again() -> None:
    run = typed("+experiment=own_pair", *EXPERIMENT_ARGS["own_pair"])
    assert run.crosscoder.n_latents is None and run.crosscoder.expansion == 4
    resolved = run.resolve(640)
    assert (resolved.crosscoder.n_latents, resolved.crosscoder.expansion) == (2560, None)
    assert run.crosscoder.n_latents is None  # a new object; the first is unchanged
    with pytest.raises(ConfigError, match=r"crosscoder.k=32 is larger than the dictionary \(crosscoder.n_latents=8\)"):
        run.resolve(2)


# ------------------------------------------------------------------------------------------- one source of rules
def _params(fn) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(fn).parameters)


@pytest.mark.parametrize(("group", "target", "own"), [
    (ModelPairConfig, load_model_pair, set()),
])
def test_each_group_takes_the_arguments_of_its_target_with_their_defaults(group, target, own) -> None:
    params = {k: p for k, p in _params(target).items() if k not in own}
    assert set(group.model_fields) == set(params)
    for name, f in group.model_fields.items():
        if params[name].default is not inspect.Parameter.empty:
            assert f.default == params[name].default or tuple(params[name].default) == f.default, name


def test_trainer_fields_default_as_lightning_does() -> None:
    params = _params(L.Trainer)
    for name, f in TrainerConfig.model_fields.items():
        if name != "others" and not f.is_required():
            assert f.default == params[name].default, name


def test_choices_are_those_of_the_code() -> None:
    def choices(group, name):
        return get_args(group.model_fields[name].annotation)

    assert choices(CrossCoderConfig, "loss") == LOSSES and choices(CrossCoderConfig, "step_impl") == STEP_IMPLS
    assert choices(StreamDataConfig, "rank_split") == RANK_SPLITS
    assert choices(ModelPairConfig, "dtype") == DTYPES
    assert list(TextSourceConfig.model_fields) == [f.name for f in dataclasses.fields(SourceConfig)]


def test_check_config_builds_nothing(monkeypatch) -> None:
    """The whole check runs on the config alone: nothing is instantiated (no model, tokenizer or dataset)."""
    from crosscoder_pl import training

    def refuse(*args, **kwargs):
        raise AssertionError("check_config instantiated something")

    monkeypatch.setattr(training, "instantiate", refuse)
    cfg = compose_train("+experiment=tiny", OUT)
    assert training.check_config(cfg) == RunConfig.from_hydra(cfg)


def test_a_missing_activation_cache_fails_at_start_up(tmp_path) -> None:
    from crosscoder_pl.data.cache import CacheError
    from crosscoder_pl.training import check_config

    with pytest.raises(CacheError, match=r"is not a finished activation cache \(meta.json: no such directory\)"):
        check_config(compose_train("data=cached", f"data.path={tmp_path / 'acts'}", OUT))


def test_the_module_is_checked_by_the_same_rules() -> None:
    with pytest.raises(ConfigError, match=r"crosscoder.metrics_window_steps=0 must be an integer >= 1"):
        CrossCoderModule(16, {"n_latents": 64, "k": 4, "metrics_window_steps": 0})
    with pytest.raises(ConfigError, match=r"crosscoder.k=True must be an integer >= 1 or null \(got a boolean\)"):
        CrossCoderModule(16, CrossCoderConfig(n_latents=64, k=True))
    module = CrossCoderModule(16, CrossCoderConfig(n_latents=64, k=4, betas=[0.8, 0.99], scales=[1.0, 2.0]))
    assert module.cfg.betas == (0.8, 0.99) and module.k_aux == 8  # the module keeps what it was given


def test_the_module_trains_exactly_the_run_config_it_receives() -> None:
    """One object from start-up to the step: the module holds the RunConfig's own group, not a rebuilt copy."""
    run = typed("+experiment=tiny", "crosscoder.k=8", "crosscoder.lr=3e-4", "crosscoder.loss=l2")
    module = CrossCoderModule(32, run.crosscoder)
    assert module.cfg is run.crosscoder  # n_latents given: nothing to resolve, the same object
    assert (module.crosscoder.k, module.crosscoder.n_latents) == (8, run.crosscoder.n_latents)


def test_a_checkpoint_holds_plain_values_that_rebuild_the_same_config(tmp_path) -> None:
    """``expansion`` resolved once (d_model 16 -> 64 latents); the hyperparameters load with ``weights_only``
    (plain values only) and read back into an equal configuration."""
    cfg = CrossCoderConfig(expansion=4, k=4, betas=[0.8, 0.99], scales=[1.0, 2.0], loss="l2")
    module = CrossCoderModule(16, cfg)
    assert module.cfg.n_latents == 64 and module.cfg.expansion is None
    path = tmp_path / "module.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": L.__version__}, path)
    loaded = CrossCoderModule.load_from_checkpoint(path, weights_only=True)
    assert loaded.cfg == module.cfg and loaded.cfg.betas == (0.8, 0.99)
    assert torch.equal(loaded.crosscoder.W_dec, module.crosscoder.W_dec)


def test_analysis_settings_name_the_valid_keys() -> None:
    settings = {"chunk_tokens": 8, "memory_budget_mb": None, "taxonomy": {"enabled": False, "base_only_max": 0.1,
                "chat_only_min": 0.9, "shared_min": 0.4, "shared_max": 0.6, "colour": 1},
                "scaling": {"enabled": False}, "causal": {"enabled": False, "max_latents": 1, "latents_per_batch": None},
                "splice": {"enabled": False}}
    with pytest.raises(ConfigError) as err:
        AnalysisConfig.read(settings)
    message = str(err.value)
    assert "unknown key analysis.taxonomy.colour" in message and "missing key analysis.scaling.max_chat_only" in message
    assert "analysis.taxonomy takes: enabled, base_only_max, chat_only_min, shared_min, shared_max" in message


# ------------------------------------------------------------------------------------------- bad values
BAD = [  # overrides on +experiment=tiny, what the error must say
    # misspelt keys: named, with the closest valid one and the valid ones
    (["+crosscoder.n_latent=10"], r"unknown key crosscoder.n_latent \(did you mean crosscoder.n_latents\?\)\. crosscoder takes: k, n_latents"),
    (["+data.val_token=5"], r"unknown key data.val_token \(did you mean data.val_tokens\?\)"),
    (["+trainer.max_step=5"], r"unknown key trainer.max_step \(did you mean trainer.max_steps\?\)"),
    (["+seedd=1"], r"invalid top-level settings: unknown key seedd \(did you mean seed\?\)\. the top level takes: crosscoder, data"),
    (["data=papergrade", "+data.web.feild=text"], r"unknown key data.web.feild \(did you mean data.web.field\?\)"),
    (["+data.web.path=x"], r"unknown key data.web.path\. data.web takes: source"),
    (["+model_pair.revision=main"], r"unknown key model_pair.revision"),
    (["model_pair=gemma2_2b_random", "+model_pair.device=cpu"], r"unknown key model_pair.device: .*random_gemma2_pair takes"),
    # wrong types
    (["crosscoder.k=many"], r"crosscoder.k='many' must be an integer >= 1 or null \(got a string\): latents kept per token"),
    (["crosscoder.k=true"], r"crosscoder.k=True must be an integer >= 1 or null \(got a boolean\)"),
    (["crosscoder.k=8.5"], r"crosscoder.k=8.5 must be an integer >= 1 or null \(got a number\)"),
    (["crosscoder.lr=fast"], r"crosscoder.lr='fast' must be a number > 0 \(got a string\): Adam's learning rate"),
    (["crosscoder.lr=inf"], r"crosscoder.lr=inf must be a number > 0 \(got a non-finite number\)"),
    (["crosscoder.betas=[0.9]"], r"crosscoder.betas=\[0.9\] must be a list of 2 numbers in \[0, 1\) \(got a list of 1\)"),
    (["data.seq_len='64'"], r"data.seq_len='64' must be an integer >= 2 \(got a string\)"),
    (["trainer.val_check_interval=true"], r"trainer.val_check_interval=True must be an integer >= 1, a string, a mapping or null \(got a boolean\)"),
    (["data.mix={web:half,chat:0.5}"], r"data.mix=\{'web': 'half', 'chat': 0.5\} must be a mapping of numbers or a list of 2 numbers"),
    (["analysis.taxonomy.enabled=maybe"], r"analysis.taxonomy.enabled='maybe' must be true or false \(got a string\)"),
    # out of range or not a choice
    (["crosscoder.loss=l1"], r"crosscoder.loss='l1' must be one of 'mse', 'l2': the reconstruction loss"),
    (["crosscoder.betas=[0.9,1.0]"], r"crosscoder.betas=\[0.9, 1.0\] must be a list of 2 numbers in \[0, 1\): Adam's betas"),
    (["crosscoder.scales=[1.0,-1.0]"], r"crosscoder.scales=\[1.0, -1.0\] must be a list of 2 numbers > 0 or null"),
    (["crosscoder.threshold_start_step=-1"], r"crosscoder.threshold_start_step=-1 must be an integer >= 0 or null"),
    (["crosscoder.n_latents=null"], r"crosscoder.n_latents and crosscoder.expansion are both null: set one"),
    (["crosscoder.k_aux=0"], r"crosscoder.k_aux=0 must be an integer >= 1 or null"),
    (["data.seq_len=1"], r"data.seq_len=1 must be an integer >= 2: tokens per sequence"),
    (["data.heldout_fraction=0"], r"data.heldout_fraction=0 must be a number in \(0, 1\)"),
    (["data.padding_side=middle"], r"data.padding_side='middle' must be one of 'left', 'right'"),
    (["data.rank_split=tokens"], r"data.rank_split='tokens' must be one of 'batch', 'documents'"),
    (["data.num_workers=-1"], r"data.num_workers=-1 must be an integer >= 0"),
    (["data.buffer_tokens=300"], r"data.buffer_tokens=300 must be at least twice data.batch_size=256: .* set data.buffer_tokens=512"),
    (["data.web.source=chat"], r"data.web.source='chat' is the other half of the corpus: set data.web.source=web"),
    (["data.web.source=code"], r"data.web.source='code' must be one of 'web', 'chat'"),
    (["data.outlier_factor=0"], r"data.outlier_factor=0 must be a number > 0 or null: a token whose norm"),
    (["data.drop_outliers=yes"], r"data.drop_outliers='yes' must be true or false \(got a string\): drop the outlier"),
    (["data.drop_outliers=true", "data.outlier_factor=null"],
     r"data.drop_outliers=true but data.outlier_factor=null: .* set data.outlier_factor \(e.g. 3.0.*\) or "
     r"data.drop_outliers=false"),
    (["data=cached", "~data.seq_len", "~data.text_batch_size", "~data.buffer_tokens", "~data.val_tokens",
      "~data.n_probes", "~data.probe_len"], r"data.path=\?\?\? must be set: the activation cache written by python cache_activations.py"),
    (["trainer.devices=0"], r"trainer.devices=0 must be a count >= 1, -1 \(all\), 'auto'"),
    (["trainer.num_nodes=0"], r"trainer.num_nodes=0 must be an integer >= 1"),
    (["trainer.gradient_clip_val=-1.0"], r"trainer.gradient_clip_val=-1.0 must be a number >= 0 or null"),
    (["matmul_precision=low"], r"matmul_precision='low' must be one of 'highest', 'high', 'medium'"),
    (["seed=0.5"], r"seed=0.5 must be an integer \(got a number\)"),
    (["model_pair.layer=-1"], r"model_pair.layer=-1 must be an integer >= 0 or null"),
    (["model_pair.device=tpu"], r"model_pair.device='tpu' must be auto, cpu, cuda or cuda:N"),
    (["analysis.taxonomy.shared_min=0.05"], r"analysis.taxonomy.base_only_max=0.1, analysis.taxonomy.shared_min=0.05.*base_only_max < shared_min"),
    (["analysis.causal.max_latents=0"], r"analysis.causal.max_latents=0 must be an integer >= 1"),
    (["analysis.chunk_tokens=0"], r"analysis.chunk_tokens=0 must be an integer >= 1"),
    (["analysis.memory_budget_mb=-5"], r"analysis.memory_budget_mb=-5 must be a number > 0 or null"),
    (["objective.penalty=-1"], r"objective.penalty=-1 must be a number >= 0"),
    (["objective.max_dead_frac=2"], r"objective.max_dead_frac=2 must be a number in \[0, 1\]"),
]


@pytest.mark.parametrize(("overrides", "match"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_a_bad_value_names_the_key_the_value_and_the_fix(overrides: list[str], match: str) -> None:
    cfg = compose_train("+experiment=tiny", *overrides, OUT)
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_hydra(cfg)


@pytest.mark.parametrize(("center", "scale_by", "words"), [
    (True, "mean_norm", "per-model mean subtracted, per-model scalar sqrt(d_model)/mean||x - mean||"),
    (False, "mean_norm", "per-model scalar sqrt(d_model)/mean||x||"),
    (True, "std", "per-model mean subtracted, per-model scalar sqrt(d_model)/sqrt(mean||x - mean||^2)"),
])
def test_the_card_names_the_normalisation_the_run_used(center: bool, scale_by: str, words: str) -> None:
    from crosscoder_pl.training import normalisation

    assert normalisation(center, scale_by) == words
