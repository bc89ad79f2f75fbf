"""dictionary_learning / crosscoder_learning checkpoints in and out, against a direct computation of their forward.

The reference below is written from their ``BatchTopKCrossCoder`` (CROSSCODER code normalisation, threshold mode):
normalise ``(x - mean) * global_scale``, ``f = relu(sum_l x_l W_enc[l] + b_enc)``, keep ``f_j`` where
``f_j * sum_l ||W_dec[l, j]|| > threshold``, decode ``(f W_dec[l] + b_dec[l]) / (global_scale + 1e-8) + mean``;
their plain ``CrossCoder`` (the L1 crosscoder) keeps every ``f``. Their library is not a dependency (its package
needs nnsight; PyPI's ``dictionary-learning`` is the original without crosscoders): where science-of-finetuning's
fork is importable, `test_their_own_plain_crosscoder_class_both_ways` runs their real class too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file, save_file

from crosscoder_pl import CrossCoder
from crosscoder_pl.interop import load_dictionary_learning, save_dictionary_learning

ROOT = Path(__file__).resolve().parents[1]
L, D, F = 2, 16, 48


def their_state(normaliser: bool = True, threshold: float = 0.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in their shapes and buffer dtypes; threshold set later from the scores when 0."""
    g = torch.Generator().manual_seed(seed)
    state = {
        "target_rms": torch.tensor(1.0),
        "activation_mean": torch.randn(L, D, generator=g) if normaliser else torch.full((L, D), float("nan")),
        "activation_std": (torch.rand(L, D, generator=g) + 0.5) * torch.tensor([[1.0], [7.0]]) if normaliser
        else torch.full((L, D), float("nan")),
        "encoder.weight": torch.randn(L, D, F, generator=g) / D**0.5,
        "encoder.bias": torch.randn(F, generator=g) * 0.1,
        "decoder.weight": torch.randn(L, F, D, generator=g) * torch.rand(L, F, 1, generator=g),
        "decoder.bias": torch.randn(L, D, generator=g),
        "code_normalization_id": torch.tensor(1),
        "k": torch.tensor(8, dtype=torch.int32),
        "threshold": torch.tensor(threshold),
    }
    if normaliser:  # their formula (keep_relative_variance): target_rms / sqrt(sum of variances + 1e-8)
        state["activation_global_scale"] = 1.0 / torch.sqrt(state["activation_std"].pow(2).sum(-1) + 1e-8)
    else:
        state["activation_global_scale"] = torch.ones(L)
    return state


def has_normaliser(state: dict[str, torch.Tensor]) -> bool:
    if "activation_mean" not in state:  # crosscoder_learning has no normaliser
        return False
    return not bool(torch.isnan(state["activation_mean"]).any() or torch.isnan(state["activation_std"]).any())


def their_pre_and_weight(state: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Their post-ReLU f ``[batch, F]`` and code normalisation ``[F]``, float64."""
    s = {k: v.double() for k, v in state.items()}
    if has_normaliser(state):
        x = (x - s["activation_mean"]) * s["activation_global_scale"][None, :, None]
    f = torch.relu(torch.einsum("bld,ldf->bf", x, s["encoder.weight"]) + s["encoder.bias"])
    return f, s["decoder.weight"].norm(dim=2).sum(0)


def their_encode(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    f, weight = their_pre_and_weight(state, x)
    return f * ((f * weight) > state["threshold"].double())


def their_decode(state: dict[str, torch.Tensor], f: torch.Tensor) -> torch.Tensor:
    s = {k: v.double() for k, v in state.items()}
    x = torch.einsum("bf,lfd->bld", f, s["decoder.weight"]) + s["decoder.bias"]
    if has_normaliser(state):
        x = x / (s["activation_global_scale"][None, :, None] + 1e-8) + s["activation_mean"]
    return x


def inputs(n: int = 256, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, L, D, generator=g, dtype=torch.float64) * torch.tensor([1.0, 6.0], dtype=torch.float64)[None, :, None]
            + 0.5)


def calibrate(state: dict[str, torch.Tensor], x: torch.Tensor) -> None:
    """A threshold between two distinct scores that keeps about 8 latents per token."""
    f, weight = their_pre_and_weight(state, x)
    scores = (f * weight).flatten().sort().values
    i = scores.numel() - 8 * x.shape[0]
    state["threshold"] = torch.tensor(float((scores[i] + scores[i + 1]) / 2))


def write_hub_layout(state: dict[str, torch.Tensor], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / "model.safetensors"))
    config = {"activation_dim": D, "dict_size": F, "num_layers": L, "k": 8, "norm_init_scale": 1.0,
              "target_rms": 1.0, "code_normalization": "CROSSCODER"}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def assert_same_forward(cc: CrossCoder, state: dict[str, torch.Tensor], x: torch.Tensor, tol: float = 1e-6) -> None:
    codes = cc.encode(x.to(cc.W_enc.dtype)).double()
    want = their_encode(state, x)
    assert torch.equal(codes != 0, want != 0)  # the same latents kept, token by token
    torch.testing.assert_close(codes, want, rtol=tol, atol=tol)
    torch.testing.assert_close(cc.decode(want.to(cc.W_dec.dtype)).double(), their_decode(state, want), rtol=tol, atol=tol)


def test_hub_layout_with_normaliser_reproduces_their_forward(tmp_path: Path) -> None:
    state = their_state(normaliser=True)
    x = inputs()
    calibrate(state, x)
    cc = load_dictionary_learning(write_hub_layout(state, tmp_path / "hub"), dtype=torch.float64)
    assert (cc.n_models, cc.d_model, cc.n_latents, cc.k) == (L, D, F, 8) and not cc.training
    assert_same_forward(cc, state, x)
    # Δnorm and the BatchTopK score live in their normalised space: the decoder norms are theirs.
    torch.testing.assert_close(cc.decoder_norms(), state["decoder.weight"].double().norm(dim=2).T, rtol=1e-9, atol=0)
    l0 = (cc.encode(x) != 0).sum(-1).double().mean()
    assert 4 < float(l0) < 12
    # The default float32 load agrees to float32 precision (same kept set on these inputs).
    cc32 = load_dictionary_learning(tmp_path / "hub")
    assert cc32.W_enc.dtype == torch.float32
    assert_same_forward(cc32, state, x, tol=2e-4)


def test_training_layout_without_normaliser_and_compiled_keys(tmp_path: Path) -> None:
    state = their_state(normaliser=False)
    x = inputs(seed=3)
    calibrate(state, x)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({f"_orig_mod.{k}": v for k, v in state.items()}, run / "model_final.pt")
    (run / "config.json").write_text(json.dumps({"trainer": {"dict_class": "BatchTopKCrossCoder", "layer": 13,
                                                             "lm_name": "google/gemma-2-2b", "k": 8,
                                                             "code_normalization": "CROSSCODER"}}))
    cc = load_dictionary_learning(run, dtype=torch.float64)
    assert_same_forward(cc, state, x)
    assert torch.equal(cc.scales, torch.ones(L))
    assert cc.metadata["layer"] == 13 and cc.metadata["lm_name"] == "google/gemma-2-2b"
    # A weights file given directly, and the latest step checkpoint of a directory without a final model.
    assert_same_forward(load_dictionary_learning(run / "model_final.pt", dtype=torch.float64), state, x)
    steps = tmp_path / "steps"
    steps.mkdir()
    torch.save(their_state(normaliser=False, seed=5), steps / "checkpoint_100.pt")
    torch.save(state, steps / "checkpoint_2000.pt")
    assert_same_forward(load_dictionary_learning(steps, dtype=torch.float64), state, x)


def test_uncalibrated_threshold_keeps_every_positive_pre_activation(tmp_path: Path) -> None:
    state = their_state(threshold=-1.0)
    x = inputs(64)
    with pytest.warns(UserWarning, match="never calibrated"):
        cc = load_dictionary_learning(write_hub_layout(state, tmp_path / "hub"), dtype=torch.float64)
    f, _ = their_pre_and_weight(state, x)
    torch.testing.assert_close(cc.encode(x), f, rtol=1e-9, atol=1e-9)
    assert_same_forward(cc, state, x)


@pytest.mark.parametrize(("code_id", "name"), [(2, "SAE"), (3, "MIXED"), (4, "NONE"), (5, "DECOUPLED")])
def test_other_code_normalisations_are_refused_by_name(tmp_path: Path, code_id: int, name: str) -> None:
    state = their_state()
    state["code_normalization_id"] = torch.tensor(code_id)
    with pytest.raises(ValueError, match=f"code normalisation {name}"):
        load_dictionary_learning(write_hub_layout(state, tmp_path / "hub"))


def test_encoder_over_a_subset_of_layers_and_missing_weights_are_refused(tmp_path: Path) -> None:
    directory = write_hub_layout(their_state(), tmp_path / "hub")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "encoder_layers": [1, 0]}))
    with pytest.raises(ValueError, match=r"encodes from layers \[1, 0\]"):
        load_dictionary_learning(directory)
    with pytest.raises(FileNotFoundError, match="no dictionary_learning weights"):
        load_dictionary_learning(tmp_path)


def ours(seed: int = 0, centred: bool = True) -> CrossCoder:
    torch.manual_seed(seed)
    means = torch.randn(2, D) * 3 if centred else None  # activation means folded into the biases
    cc = CrossCoder(D, F, 8, scales=[0.25, 2.0], means=means, threshold=0.0,
                    metadata={"base_model": "b", "chat_model": "c", "layer": 1})
    with torch.no_grad():
        cc.b_enc.normal_(0, 0.1)
        cc.b_dec.normal_()
        cc.W_dec.mul_(torch.rand(F, 2, 1) * 10)
    folded = cc.fold().eval()
    with torch.no_grad():
        scores = folded.scores(folded.pre_acts(inputs())).flatten().sort().values
    i = scores.numel() - 8 * 256  # between two distinct scores: no entry sits on the threshold
    folded.threshold.fill_(float((scores[i] + scores[i + 1]) / 2))
    return folded


@pytest.mark.parametrize(("layout", "centred"), [("hub", True), ("training", True), ("hub", False)])
def test_export_runs_identically_in_their_forward_and_reloads(tmp_path: Path, layout: str, centred: bool) -> None:
    cc = ours(centred=centred)
    directory = save_dictionary_learning(cc, tmp_path / layout, layout=layout)
    if layout == "hub":
        state = load_file(str(directory / "model.safetensors"))
        config = json.loads((directory / "config.json").read_text())
        assert config == {"activation_dim": D, "dict_size": F, "num_layers": 2, "k": 8,
                          "code_normalization": "CROSSCODER", "target_rms": 1.0}
    else:
        state = torch.load(directory / "model_final.pt", weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items() if "coder" in k} == {
        "encoder.weight": (2, D, F), "encoder.bias": (F,), "decoder.weight": (2, F, D), "decoder.bias": (2, D)}
    assert state["k"].dtype == torch.int32 and int(state["k"]) == 8 and int(state["code_normalization_id"]) == 1
    assert torch.equal(state["activation_mean"], cc.means)  # our means are their normaliser's mean
    x = inputs()
    # Their forward on the exported weights = ours (float32 weights: float32 precision; same latents kept).
    codes = cc.encode(x.float()).double()
    theirs = their_encode(state, x)
    assert torch.equal(codes != 0, theirs != 0)
    torch.testing.assert_close(codes, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cc.decode(theirs.float()).double(), their_decode(state, theirs), rtol=1e-5, atol=1e-4)
    # And back: the same crosscoder, metadata included.
    back = load_dictionary_learning(directory)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "scales", "threshold", "means"):
        torch.testing.assert_close(getattr(back, name), getattr(cc, name), rtol=1e-6, atol=2e-6)
    assert torch.equal(back.encode(x.float()) != 0, cc.encode(x.float()) != 0)
    assert back.metadata["base_model"] == "b" and back.metadata["layer"] == 1
    torch.testing.assert_close(back.decoder_norms(), cc.decoder_norms(), rtol=1e-6, atol=0)


TINY_PAIR = ["model_pair=embedded", "data=embedded", "model_pair.base=embedded-tiny:base",
             "model_pair.chat=embedded-tiny:chat", "model_pair.layer=1", "data.seq_len=64", "data.batch_size=256",
             "data.text_batch_size=16", "data.buffer_tokens=2048", "data.val_tokens=1024", "data.n_probes=8",
             "data.probe_len=32", "analysis.chunk_tokens=512", "analysis.causal.max_latents=4",
             "analysis.causal.latents_per_batch=2"]


@pytest.mark.parametrize("sparsity", ["batchtopk", "l1"])
def test_analyze_turns_an_imported_checkpoint_into_a_complete_artifact(tmp_path: Path, sparsity: str) -> None:
    """BatchTopK: their hub layout. L1: their plain CrossCoder's weights alone (no config.json), which only
    sparsity=l1 on the command line tells apart."""
    g = torch.Generator().manual_seed(0)
    d, n = 32, 64  # the tiny embedded pair's d_model
    state = {"encoder.weight": torch.randn(2, d, n, generator=g) / d**0.5, "encoder.bias": torch.full((n,), -0.2),
             "decoder.weight": torch.randn(2, n, d, generator=g) * 0.2, "decoder.bias": torch.zeros(2, d),
             "code_normalization_id": torch.tensor(1), "k": torch.tensor(8, dtype=torch.int32),
             "threshold": torch.tensor(0.3), "target_rms": torch.tensor(1.0),
             "activation_mean": torch.zeros(2, d), "activation_std": torch.ones(2, d) / d**0.5,
             "activation_global_scale": torch.tensor([0.3, 0.3])}
    checkpoint = tmp_path / "theirs"
    checkpoint.mkdir()
    told = []
    if sparsity == "batchtopk":
        save_file(state, str(checkpoint / "model.safetensors"))
        (checkpoint / "config.json").write_text(json.dumps({"activation_dim": d, "dict_size": n, "num_layers": 2, "k": 8}))
    else:
        del state["k"], state["threshold"]
        torch.save(state, checkpoint / "model_final.pt")
        told = ["sparsity=l1"]
    artifact = tmp_path / "artifact"
    result = subprocess.run([sys.executable, "analyze.py", f"checkpoint={checkpoint}", f"artifact={artifact}",
                             *TINY_PAIR, *told, f"hydra.run.dir={tmp_path / 'run'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    files = {p.name for p in artifact.iterdir()}
    assert {"README.md", "config.json", "model.safetensors", "taxonomy.json", "latents.csv", "causal_validation.csv",
            "cosine_vs_causal.png", "metrics.json", "train_config.yaml"} <= files
    cc = CrossCoder.from_pretrained(artifact)
    if sparsity == "batchtopk":
        assert_same_forward(cc, state, inputs_of(d), tol=2e-4)
    else:
        assert_same_plain_forward(cc, state, inputs_of(d), tol=1e-5)
        assert "sparsity: l1" in (artifact / "train_config.yaml").read_text()
    metrics = json.loads((artifact / "metrics.json").read_text())
    assert metrics["artifact"]["base_model"] == "embedded-tiny:base" and metrics["artifact"]["n_latents"] == n
    assert "dictionary_learning" in (artifact / "README.md").read_text()
    # The new artifact re-runs like any other.
    again = subprocess.run([sys.executable, "analyze.py", f"artifact={artifact}", f"hydra.run.dir={tmp_path / 'again'}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    validation = json.loads((artifact / "metrics.json").read_text())["validation"]
    # The same figures up to float summation order (one CI run saw a relative 2e-6 on a VE of -64).
    assert validation["variance_explained"] == pytest.approx(metrics["validation"]["variance_explained"], rel=1e-5)
    assert {k: v for k, v in validation.items() if k != "variance_explained"} == pytest.approx(
        {k: v for k, v in metrics["validation"].items() if k != "variance_explained"}, rel=1e-5)


def inputs_of(d: int, n: int = 128) -> torch.Tensor:
    return torch.randn(n, 2, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def test_crosscoder_learning_layout_embedding_bag_decoder_and_uncalibrated_batch_topk(tmp_path: Path) -> None:
    """crosscoder_learning: config names num_encoder_layers, decoder per layer ([F, D] each), no normaliser, and a
    negative threshold means BatchTopK (their encode's fallback)."""
    state = their_state(normaliser=False, threshold=-1.0)
    decoder = state.pop("decoder.weight")
    for name in ("target_rms", "activation_mean", "activation_std", "activation_global_scale"):
        state.pop(name)
    state |= {f"decoder.layers.{i}.weight": decoder[i] for i in range(L)}
    directory = tmp_path / "cl"
    directory.mkdir()
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"activation_dim": D, "dict_size": F, "num_encoder_layers": L,
                                                       "k": 8, "decoder_type": "embedding_bag",
                                                       "code_normalization": "CROSSCODER"}))
    with pytest.warns(UserWarning, match="BatchTopK"):
        cc = load_dictionary_learning(directory, dtype=torch.float64)
    x = inputs(64)
    reference = {**state, "decoder.weight": decoder}
    f, weight = their_pre_and_weight(reference, x)
    scores = (f * weight).flatten()
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[scores.topk(8 * x.shape[0]).indices] = True
    want = f * keep.view_as(f)
    with pytest.warns(UserWarning, match="not calibrated"):
        codes = cc.encode(x)
    torch.testing.assert_close(codes, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(cc.decode(want), their_decode(reference, want), rtol=1e-9, atol=1e-9)
    (directory / "config.json").write_text(json.dumps({"num_encoder_layers": L, "encoder_layers_indices": [0]}))
    with pytest.raises(ValueError, match=r"encodes from layers \[0\]"):
        load_dictionary_learning(directory)


# ----------------------------------------------------------------------------------------------------------------
# Their plain CrossCoder (the L1 crosscoder): BatchTopKCrossCoder's weights and normaliser without the buffers k and
# threshold; encode = relu(sum_l x'_l W_enc[l] + b_enc), every code kept; decode as BatchTopK's.

# The constructor's arguments as dictionary_learning's PyTorchModelHubMixin writes them for a plain CrossCoder.
PLAIN_HUB_CONFIG = {"activation_dim": D, "activation_mean": None, "activation_std": None, "code_normalization": "CROSSCODER",
                    "code_normalization_alpha_cc": 0.1, "code_normalization_alpha_sae": 1.0, "dict_size": F,
                    "encoder_layers": None, "init_with_transpose": True, "latent_processor": None, "norm_init_scale": None,
                    "num_decoder_layers": None, "num_layers": L, "same_init_for_all_layers": False, "target_rms": None}


def plain_state(normaliser: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    state = their_state(normaliser=normaliser, seed=seed)
    del state["k"], state["threshold"]
    return state


def their_plain_encode(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return their_pre_and_weight(state, x)[0]


def write_plain_hub(state: dict[str, torch.Tensor], directory: Path, config: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(PLAIN_HUB_CONFIG if config is None else config))
    return directory


def assert_same_plain_forward(cc: CrossCoder, state: dict[str, torch.Tensor], x: torch.Tensor, tol: float) -> None:
    assert cc.sparsity == "l1" and cc.k is None and cc.encodes_alone and not cc.training
    want = their_plain_encode(state, x)
    torch.testing.assert_close(cc.encode(x.to(cc.W_enc.dtype)).double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(cc.decode(want.to(cc.W_dec.dtype)).double(), their_decode(state, want), rtol=tol, atol=tol)


@pytest.mark.parametrize("normaliser", [True, False])
def test_plain_crosscoder_hub_layout_reproduces_their_forward(tmp_path: Path, normaliser: bool) -> None:
    state = plain_state(normaliser=normaliser)
    x = inputs()
    cc = load_dictionary_learning(write_plain_hub(state, tmp_path / "hub"))
    assert cc.W_enc.dtype == torch.float32 and (cc.n_models, cc.d_model, cc.n_latents) == (L, D, F)
    assert_same_plain_forward(cc, state, x, tol=1e-5)
    assert cc.config()["architecture"] == "L1CrossCoder"
    assert cc.metadata["imported_from"].startswith("dictionary_learning CrossCoder (CROSSCODER")
    cc64 = load_dictionary_learning(tmp_path / "hub", dtype=torch.float64)
    assert_same_plain_forward(cc64, state, x, tol=1e-9)
    # The L1 penalty's weights and Δnorm live in their normalised space: the decoder norms are theirs.
    torch.testing.assert_close(cc64.decoder_norms(), state["decoder.weight"].double().norm(dim=2).T, rtol=1e-9, atol=0)
    assert bool((cc.encode(x.float()) == 0).any()) and bool((cc.encode(x.float()) > 0).any())


def test_plain_crosscoder_training_layout_with_compiled_keys(tmp_path: Path) -> None:
    state = plain_state(normaliser=True, seed=4)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({f"_orig_mod.{k}": v for k, v in state.items()}, run / "model_final.pt")
    (run / "config.json").write_text(json.dumps({"trainer": {
        "dict_class": "CrossCoder", "trainer_class": "CrossCoderTrainer", "layer": 13, "lm_name": "google/gemma-2-2b",
        "l1_penalty": 0.041, "code_normalization": "CROSSCODER", "target_rms": 1.0}}))
    cc = load_dictionary_learning(run)
    assert_same_plain_forward(cc, state, inputs(seed=3), tol=1e-5)
    assert cc.metadata["layer"] == 13 and cc.metadata["lm_name"] == "google/gemma-2-2b"
    # Their trainer's class names alone say it (a config without the dict_class key, as older runs).
    (run / "config.json").write_text(json.dumps({"trainer": {"trainer_class": "CrossCoderTrainer"}}))
    assert load_dictionary_learning(run / "model_final.pt").sparsity == "l1"


def test_crosscoder_learning_plain_crosscoders(tmp_path: Path) -> None:
    """The 2024 hf_hub class (the paper's public L1 crosscoder: four weights, a constructor config without k),
    the main branch (dict_class in config.json, the normaliser) and the embedding_bag branch (num_encoder_layers,
    a decoder per layer, code_normalization_id)."""
    x = inputs(64)
    legacy = {k: v for k, v in plain_state(normaliser=False).items() if "coder" in k}
    config = {"activation_dim": D, "dict_size": F, "num_layers": L, "same_init_for_all_layers": False,
              "norm_init_scale": None, "init_with_transpose": True, "encoder_layers": None}
    cc = load_dictionary_learning(write_plain_hub(legacy, tmp_path / "hf_hub", config))
    assert_same_plain_forward(cc, legacy, x, tol=1e-5)
    assert torch.equal(cc.scales, torch.ones(L)) and not cc.means.any()
    # The paper's hub repos carry the training directory's config as trainer_config.json.
    (tmp_path / "hf_hub" / "trainer_config.json").write_text(json.dumps({"trainer": {"dict_class": "CrossCoder", "layer": 13}}))
    assert load_dictionary_learning(tmp_path / "hf_hub").metadata["layer"] == 13

    state = plain_state(normaliser=True, seed=2)
    main = write_plain_hub(state, tmp_path / "main", {**PLAIN_HUB_CONFIG, "dict_class": "CrossCoder"})
    assert_same_plain_forward(load_dictionary_learning(main), state, x, tol=1e-5)

    state = plain_state(normaliser=False, seed=3)
    bag = {k: v for k, v in state.items() if k in ("encoder.weight", "encoder.bias", "decoder.bias", "code_normalization_id")}
    bag |= {f"decoder.layers.{i}.weight": state["decoder.weight"][i] for i in range(L)}
    config = {"activation_dim": D, "dict_size": F, "num_encoder_layers": L, "decoder_type": "embedding_bag",
              "encoder_layers_indices": None, "num_decoder_output_layers": None, "code_normalization": "CROSSCODER"}
    assert_same_plain_forward(load_dictionary_learning(write_plain_hub(bag, tmp_path / "bag", config)), state, x, tol=1e-5)


def test_a_checkpoint_that_does_not_say_its_class_is_refused_until_told(tmp_path: Path) -> None:
    state = plain_state()
    bare = tmp_path / "bare"
    bare.mkdir()
    torch.save(state, bare / "model_final.pt")  # weights alone: no k, and nothing naming a class
    with pytest.raises(ValueError, match=r"cannot tell their plain CrossCoder \(L1\) from a BatchTopKCrossCoder") as err:
        load_dictionary_learning(bare)
    for looked_at in ("'k' and 'threshold'", "dict_class, trainer.dict_class, trainer.trainer_class and k",
                      "no config.json", "sparsity='l1'", "sparsity=l1"):
        assert looked_at in str(err.value)
    assert_same_plain_forward(load_dictionary_learning(bare, sparsity="l1"), state, inputs(64), tol=1e-5)
    # A config.json that names nothing is no better.
    (bare / "config.json").write_text(json.dumps({"trainer": {"lr": 1e-4}}))
    with pytest.raises(ValueError, match=r"cannot tell .* none of these \(keys: trainer\)"):
        load_dictionary_learning(bare)


def test_marks_of_both_classes_or_an_unknown_class_are_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    torch.save(their_state(), run / "model_final.pt")  # BatchTopK's buffers k and threshold ...
    (run / "config.json").write_text(json.dumps({"trainer": {"dict_class": "CrossCoder"}}))  # ... named CrossCoder
    with pytest.raises(ValueError, match=r"marks of both classes: its weights have the buffer 'k' \(BatchTopKCrossCoder\)"
                                         r".*dict_class is 'CrossCoder' \(CrossCoder\)"):
        load_dictionary_learning(run)
    (run / "config.json").write_text(json.dumps({"trainer": {"dict_class": "BatchTopKCrossCoder"}}))
    with pytest.raises(ValueError, match=r"sparsity='l1' \(CrossCoder\) was given, but its weights have the buffer 'k'"):
        load_dictionary_learning(run, sparsity="l1")
    assert load_dictionary_learning(run, sparsity="batchtopk").sparsity == "batchtopk"
    (run / "config.json").write_text(json.dumps({"trainer": {"dict_class": "BatchTopKSAE"}}))
    with pytest.raises(ValueError, match=r"dict_class is 'BatchTopKSAE'; only their CrossCoder and BatchTopKCrossCoder"):
        load_dictionary_learning(run)
    with pytest.raises(ValueError, match=r"sparsity='topk' is not one of"):
        load_dictionary_learning(run, sparsity="topk")


def test_plain_crosscoder_variants_without_an_equivalent_are_refused(tmp_path: Path) -> None:
    state = plain_state()
    state["code_normalization_id"] = torch.tensor(2)
    with pytest.raises(ValueError, match="code normalisation SAE: their plain CrossCoder's encode and decode do not read it"):
        load_dictionary_learning(write_plain_hub(state, tmp_path / "sae"))
    directory = write_plain_hub(plain_state(), tmp_path / "processed", {**PLAIN_HUB_CONFIG, "latent_processor": "relu"})
    with pytest.raises(ValueError, match="latent_processor"):
        load_dictionary_learning(directory)
    state = plain_state()
    state["decoder.weight"] = torch.cat([state["decoder.weight"], state["decoder.weight"][:1]])  # num_decoder_layers=3
    with pytest.raises(ValueError, match="num_decoder_layers != num_layers"):
        load_dictionary_learning(write_plain_hub(state, tmp_path / "three"))


def ours_l1(seed: int = 0) -> CrossCoder:
    torch.manual_seed(seed)
    cc = CrossCoder(D, F, None, scales=[0.25, 2.0], means=torch.randn(2, D) * 3, sparsity="l1",
                    metadata={"base_model": "b", "chat_model": "c", "layer": 1})
    with torch.no_grad():
        cc.b_enc.normal_(0, 0.1)
        cc.b_dec.normal_()
        cc.W_dec.mul_(torch.rand(F, 2, 1) * 10)
    return cc.fold().eval()


@pytest.mark.parametrize("layout", ["hub", "training"])
def test_l1_export_runs_identically_in_their_forward_and_reloads(tmp_path: Path, layout: str) -> None:
    cc = ours_l1()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no threshold to warn about
        directory = save_dictionary_learning(cc, tmp_path / layout, layout=layout)
    config = json.loads((directory / "config.json").read_text())
    if layout == "hub":
        state = load_file(str(directory / "model.safetensors"))
        assert config == {"activation_dim": D, "dict_size": F, "num_layers": 2, "code_normalization": "CROSSCODER",
                          "target_rms": 1.0, "dict_class": "CrossCoder"}
    else:
        state = torch.load(directory / "model_final.pt", weights_only=True)
        assert config["trainer"]["dict_class"] == "CrossCoder" and config["trainer"]["trainer_class"] == "CrossCoderTrainer"
        assert "k" not in config["trainer"] and config["trainer"]["layer"] == 1
    # Their plain CrossCoder's buffers exactly (its load_state_dict is strict): no k, no threshold.
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "encoder.weight": (2, D, F), "encoder.bias": (F,), "decoder.weight": (2, F, D), "decoder.bias": (2, D),
        "code_normalization_id": (), "target_rms": (), "activation_mean": (2, D), "activation_std": (2, D),
        "activation_global_scale": (2,)}
    assert state["code_normalization_id"].dtype == torch.int64 and int(state["code_normalization_id"]) == 1
    x = inputs()
    theirs = their_plain_encode(state, x)
    torch.testing.assert_close(cc.encode(x.float()).double(), theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cc.decode(theirs.float()).double(), their_decode(state, theirs), rtol=1e-5, atol=1e-5)
    back = load_dictionary_learning(directory)
    assert back.sparsity == "l1" and back.k is None
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "scales", "means"):
        torch.testing.assert_close(getattr(back, name), getattr(cc, name), rtol=1e-6, atol=2e-6)
    assert back.metadata["base_model"] == "b" and back.metadata["layer"] == 1


def their_library() -> ModuleType:
    """science-of-finetuning's dictionary_learning (or crosscoder_learning) when installed: the real classes."""
    dictionary = pytest.importorskip("dictionary_learning.dictionary")
    if not hasattr(dictionary, "CrossCoder") or not hasattr(dictionary, "NormalizableMixin"):
        pytest.skip("the installed dictionary_learning has no CrossCoder with an activation normaliser (PyPI's "
                    "dictionary-learning is the original without crosscoders; science-of-finetuning's fork has them)")
    return dictionary


def test_their_own_plain_crosscoder_class_both_ways(tmp_path: Path) -> None:
    """Skipped unless their library is importable: their CrossCoder's files load here with its codes and
    reconstructions to 1e-5, and our exports load back into their CrossCoder."""
    dictionary = their_library()
    g = torch.Generator().manual_seed(7)
    theirs = dictionary.CrossCoder(D, F, L, activation_mean=torch.randn(L, D, generator=g),
                                   activation_std=torch.rand(L, D, generator=g) + 0.5).eval()
    with torch.no_grad():
        for tensor in (theirs.encoder.bias, theirs.decoder.bias, theirs.decoder.weight):
            tensor.normal_(0, 0.3, generator=g)
    theirs.save_pretrained(tmp_path / "hub")
    (tmp_path / "run").mkdir()
    torch.save(theirs.state_dict(), tmp_path / "run" / "model_final.pt")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"trainer": {"dict_class": "CrossCoder"}}))
    x = inputs().float()
    with torch.no_grad():
        f = theirs.encode(x)
        x_hat = theirs.decode(f)
    assert bool((f == 0).any()) and bool((f > 0).any())
    for source in (tmp_path / "hub", tmp_path / "run"):
        cc = load_dictionary_learning(source)
        torch.testing.assert_close(cc.encode(x), f, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cc.decode(f), x_hat, rtol=1e-5, atol=1e-5)
    for layout, load in (("hub", lambda d: dictionary.CrossCoder.from_pretrained(str(d), from_hub=True)),
                         ("training", lambda d: dictionary.CrossCoder.from_pretrained(str(d / "model_final.pt")))):
        back = load(save_dictionary_learning(cc, tmp_path / f"export_{layout}", layout=layout)).eval()
        assert type(back) is dictionary.CrossCoder and back.has_activation_normalizer
        with torch.no_grad():
            torch.testing.assert_close(back.encode(x), f, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(back.decode(f), x_hat, rtol=1e-5, atol=1e-5)
