"""run_analyses and the end-of-training callback write the whole artifact; the card states the figures."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from test_analysis_causal import LAYER, VOCAB, D, tiny_pair

from crosscoder_pl.artifact.writer import run_analyses
from crosscoder_pl.callbacks.artifact import WriteArtifact
from crosscoder_pl.config import AnalysisConfig
from crosscoder_pl.crosscoder import CrossCoder

BOS = 2
CONF = Path(__file__).parents[1] / "conf" / "analysis" / "default.yaml"
FILES = (
    "taxonomy.json",
    "latents.csv",
    "delta_norm_histogram.png",
    "causal_validation.csv",
    "cosine_vs_causal.png",
    "metrics.json",
    "README.md",
)


def settings() -> dict:
    """``conf/analysis/default.yaml`` with the causal analysis cut to test size."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONF))
    cfg["causal"].update(max_latents=6, latents_per_batch=6)
    return cfg


def inputs(pair: SimpleNamespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Held-out activations ``[tokens, 2, D]`` (BOS dropped) and a right-padded probe batch ``[6, 12]``."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (14, 12), generator=generator)
    ids[:, 0] = BOS
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0
    with torch.inference_mode():
        residuals = [
            model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[LAYER + 1]
            for model in (pair.base, pair.chat)
        ]
    paired = torch.stack(residuals, dim=2)[8:, 1:].reshape(-1, 2, D)  # probes are rows 0-5
    return paired, ids[:6], mask[:6]


def crosscoder(paired: torch.Tensor) -> CrossCoder:
    """Random crosscoder with unequal scales and a few planted chat-only and base-only latents."""
    torch.manual_seed(1)
    scales = (D**0.5 / paired.norm(dim=-1).mean(0)).tolist()
    metadata = {"k_start": 16, "lr": 1e-4, "train_tokens": 1000}
    cc = CrossCoder(D, 48, k=4, scales=scales, threshold=0.0, metadata=metadata)
    with torch.no_grad():
        cc.W_dec.mul_(20)
        cc.W_dec[:4, 0] *= 0.01  # chat-only
        cc.W_dec[4:6, 1] *= 0.01  # base-only
        cc.W_enc.mul_(10)
        cc.b_enc.sub_(1.0)
    return cc


def test_run_analyses_writes_the_artifact(tmp_path: Path) -> None:
    pair = tiny_pair(identical=False)
    paired, ids, mask = inputs(pair)
    cc = crosscoder(paired)
    metrics = run_analyses(cc, pair, paired, ids, mask, tmp_path, AnalysisConfig.read(settings()), cc.metadata, "python train.py seed=1")
    for name in FILES:
        assert (tmp_path / name).stat().st_size > 0, name
    assert cc.training, "the caller's crosscoder keeps its mode"

    counts = json.loads((tmp_path / "taxonomy.json").read_text())
    assert sum(counts.values()) == cc.n_latents and counts["chat_only"] + counts["base_only"] > 0
    lines = (tmp_path / "latents.csv").read_text().splitlines()
    assert lines[0].startswith("latent,delta_norm,decoder_cosine,firing_frequency,nu_r,nu_eps") and len(lines) == 49

    causal = metrics["causal"]
    assert causal["n_latents_tested"] > causal["n_pearson_nan"]
    card = (tmp_path / "README.md").read_text()
    assert f"{causal['median_pearson']:.4f}" in card and f"{causal['median_decoder_cosine']:.4f}" in card
    assert json.dumps(counts, indent=2) in card
    assert "- tiny/base\n- tiny/chat" in card and "BatchTopK k = 4 (annealed from 16)" in card
    assert "python train.py seed=1" in card and "arxiv:2504.02922" in card

    saved = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=_no_nan)
    assert set(saved["timings_s"]) == {"validation", "taxonomy", "scaling", "diagnostics", "chat_specific_tokens",
                                       "causal", "splice"}
    diagnostics = saved["diagnostics"]
    assert {"rules", "complete_shrinkage", "latent_decoupling", "twins"} <= set(diagnostics)
    assert diagnostics["complete_shrinkage"]["n_chat_only"] <= counts["chat_only"]
    assert "## Sparsity-artifact diagnostics" in card and f"{diagnostics['twins']['n_pairs']} chat-only latents" in card
    header = lines[0].split(",")
    assert {"nu_a", "neg_log_nu_a", "nu_in_range", "twin_latent", "twin_cosine", "template_share"} <= set(header)
    assert math.isfinite(saved["splice"]["chat"]["ce_splice"])
    assert saved["validation"]["variance_explained"].keys() == {"base", "chat"}


def test_disabled_analyses_and_bad_settings(tmp_path: Path) -> None:
    pair = tiny_pair(identical=False)
    paired, ids, mask = inputs(pair)
    cfg = settings()
    for group in ("scaling", "causal", "splice", "diagnostics"):
        cfg[group]["enabled"] = False
    metrics = run_analyses(crosscoder(paired), pair, paired, ids, mask, tmp_path, AnalysisConfig.read(cfg), {}, "cmd")
    assert not (tmp_path / "causal_validation.csv").exists() and "causal" not in metrics
    assert "diagnostics" not in metrics and "Sparsity-artifact" not in (tmp_path / "README.md").read_text()
    assert ",class,chat_specific" in (tmp_path / "latents.csv").read_text().splitlines()[0]

    bad = {**settings(), "extra": 1, "splice": {}}
    with pytest.raises(ValueError, match=r"unknown key analysis\.extra; missing key analysis\.splice\.enabled"):
        AnalysisConfig.read(bad)
    cfg["taxonomy"]["enabled"], cfg["causal"]["enabled"] = False, True
    with pytest.raises(ValueError, match="enable analysis.taxonomy"):
        run_analyses(crosscoder(paired), pair, paired, ids, mask, tmp_path, AnalysisConfig.read(cfg), {}, "cmd")


def test_callback_runs_on_rank_zero_only(tmp_path: Path) -> None:
    pair = tiny_pair(identical=False)
    paired, ids, mask = inputs(pair)
    datamodule = SimpleNamespace(model_pair=pair, heldout_activations=lambda: paired, probe_batch=lambda: (ids, mask))
    cc = crosscoder(paired)
    dead = torch.arange(cc.n_latents) < 12  # 12 of 48 latents past the dead window
    module = SimpleNamespace(crosscoder=cc, tokens_since_fired=dead.long() * 200, cfg=SimpleNamespace(dead_after_tokens=100))
    cfg = settings()
    cfg["causal"]["enabled"] = False  # covered above; keeps the test short
    callback = WriteArtifact(tmp_path / "artifact", AnalysisConfig.read(cfg), {"seed": 0}, command="python train.py")
    callback.on_fit_end(SimpleNamespace(is_global_zero=False, datamodule=datamodule, global_step=9), module)
    assert not (tmp_path / "artifact").exists()
    callback.on_fit_end(SimpleNamespace(is_global_zero=True, datamodule=datamodule, global_step=9), module)
    written = {path.name for path in (tmp_path / "artifact").iterdir()}
    weights = {"config.json", "model.safetensors", "train_config.yaml"}
    assert written == set(FILES) - {"causal_validation.csv", "cosine_vs_causal.png"} | weights
    assert CrossCoder.from_pretrained(tmp_path / "artifact").metadata["training_dead_fraction"] == {
        "fraction": 0.25, "window_tokens": 100, "step": 9}
    assert "annealed from 16" in (tmp_path / "artifact" / "README.md").read_text()


def _no_nan(token: str) -> float:
    raise AssertionError(f"metrics.json is not strict JSON: {token}")
