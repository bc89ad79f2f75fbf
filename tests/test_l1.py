"""The L1 crosscoder (``sparsity="l1"``): its codes, loss, gradients, warm-up, config and artifact, each against a
direct computation or a known answer."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from crosscoder_pl import CrossCoder
from crosscoder_pl.config import ConfigError, CrossCoderConfig
from tests.threaded_ranks import run_ranks

D, F = 8, 32


def _cc(seed: int = 0, scales=(0.5, 4.0)) -> CrossCoder:
    torch.manual_seed(seed)
    cc = CrossCoder(d_model=D, n_latents=F, k=None, scales=list(scales), sparsity="l1").train()
    with torch.no_grad():
        cc.means.normal_()
        cc.b_dec.normal_()
        cc.b_enc.uniform_(-0.1, 0.3)
        cc.W_dec.mul_(torch.rand(F, 2, 1) * 3)  # unequal decoder norms: the penalty is not sum f
    return cc


def _x(n: int = 40, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, D, generator=g) * torch.tensor([3.0, 0.2])[:, None] + 0.5


def _direct(cc: CrossCoder, x: torch.Tensor, coef: float, loss: str) -> tuple[torch.Tensor, ...]:
    """Lindsey et al.'s loss written out per model, with no shared helper."""
    xn = torch.stack([(x[:, m] - cc.means[m]) * cc.scales[m] for m in range(2)], dim=1)
    f = torch.relu(xn[:, 0] @ cc.W_enc[0] + xn[:, 1] @ cc.W_enc[1] + cc.b_enc)
    x_hat = torch.stack([f @ cc.W_dec[:, m] + cc.b_dec[m] for m in range(2)], dim=1)
    err = xn - x_hat
    if loss == "mse":
        recon = (err ** 2).sum(dim=(1, 2)).mean()
    else:
        recon = (err[:, 0].norm(dim=-1) + err[:, 1].norm(dim=-1)).mean()
    weight = cc.W_dec[:, 0].norm(dim=-1) + cc.W_dec[:, 1].norm(dim=-1)
    l1 = (f * weight).sum(-1).mean()
    return recon + coef * l1, recon, l1, f


def _direct_unit(cc: CrossCoder, x: torch.Tensor) -> torch.Tensor:
    """The loss of predicting the batch mean (mse): what StepOutput.unit reports."""
    xn = torch.stack([(x[:, m] - cc.means[m]) * cc.scales[m] for m in range(2)], dim=1)
    return ((xn - xn.mean(0)) ** 2).sum(dim=(1, 2)).mean()


@pytest.mark.parametrize("loss", ["mse", "l2"])
def test_l1_step_and_gradients_match_a_direct_computation(loss: str) -> None:
    cc, x = _cc(), _x()
    out = cc.step(x, None, torch.ones(F, dtype=torch.bool), loss=loss, l1_coef=0.7, impl="sparse")
    ref = copy.deepcopy(cc)
    total, recon, l1, f = _direct(ref, x, 0.7, loss)
    torch.testing.assert_close(out.loss, total)
    torch.testing.assert_close(out.recon, recon)
    torch.testing.assert_close(out.l1, l1.detach())
    if loss == "mse":
        torch.testing.assert_close(out.unit, _direct_unit(ref, x).detach())
    assert float(out.aux) == 0.0  # no AuxK, dead latents or not
    assert torch.isinf(out.min_kept)  # nothing for a threshold to track
    torch.testing.assert_close(out.codes, f.detach())  # every positive code kept
    assert 0 < int((out.codes > 0).sum()) < out.codes.numel()
    ours = torch.autograd.grad(out.loss, list(cc.parameters()))
    theirs = torch.autograd.grad(total, list(ref.parameters()))
    for (name, _), a, b in zip(cc.named_parameters(), ours, theirs):
        torch.testing.assert_close(a, b, msg=name)


def test_l1_coefficient_zero_is_the_reconstruction_alone() -> None:
    cc, x = _cc(), _x()
    for out in (cc.step(x, None, l1_coef=0.0), cc.step(x, None)):  # 0 is also the default
        assert float(out.l1) > 0
        torch.testing.assert_close(out.loss, out.recon)


def test_l1_encode_is_the_relu_in_both_modes_and_survives_fold_and_save(tmp_path: Path) -> None:
    cc, x = _cc(), _x()
    f = torch.relu(cc.pre_acts(x))
    torch.testing.assert_close(cc.encode(x), f)
    cc.eval()
    assert cc.encodes_alone and not cc.threshold_calibrated
    torch.testing.assert_close(cc.encode(x[:1]), f[:1])  # one token alone: the same codes
    x_hat = cc(x)
    cc.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["architecture"], config["sparsity"], config["k"]) == ("L1CrossCoder", "l1", None)
    assert "threshold" not in config["encode"]
    loaded = CrossCoder.from_pretrained(tmp_path)
    assert loaded.sparsity == "l1" and loaded.k is None
    torch.testing.assert_close(loaded.encode(x), f, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loaded(x), x_hat, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"k": 4, "sparsity": "l1"}, "k=4: an L1 crosscoder keeps every positive code"),
    ({"k": None}, "k must be a positive integer, got None"),
    ({"k": 4, "sparsity": "topk"}, "sparsity='topk' is not one of"),
])
def test_crosscoder_refuses_a_k_that_does_not_fit_its_sparsity(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CrossCoder(d_model=D, n_latents=F, **kwargs)


def test_two_ranks_compute_the_single_process_l1_step() -> None:
    cc, x = _cc(2), _x(64)
    sizes = [20, 44]

    def rank(reducer) -> dict:
        part = slice(None) if reducer is None else (slice(0, 20) if reducer.rank == 0 else slice(20, 64))
        model = copy.deepcopy(cc)
        out = model.step(x[part], None, loss="mse", l1_coef=0.3, reducer=reducer)
        grads = torch.autograd.grad(out.loss, list(model.parameters()))
        return {"grads": grads, "n": out.n_tokens,
                **{k: getattr(out, k).detach() for k in ("loss", "recon", "l1", "unit")}}

    one = rank(None)
    ranks = run_ranks(len(sizes), rank)
    for r in ranks:
        assert r["n"] == 64
        for name in ("loss", "recon", "l1", "unit"):
            torch.testing.assert_close(r[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    for i, (name, _) in enumerate(cc.named_parameters()):
        mean = torch.stack([r["grads"][i] for r in ranks]).mean(0)
        torch.testing.assert_close(mean, one["grads"][i], rtol=1e-5, atol=1e-6, msg=name)


BATCHTOPK = {"n_latents": 64, "k": 8}
L1 = {"n_latents": 64, "sparsity": "l1", "l1_coef": 2.0, "step_impl": "dense", "aux_coef": 0.0}


@pytest.mark.parametrize(("values", "message"), [
    ({**L1, "k": 8}, r"crosscoder.k=8: not used by crosscoder.sparsity=l1; set crosscoder.k=null"),
    ({**L1, "step_impl": "sparse"}, r"crosscoder.step_impl=sparse: not used by .* set crosscoder.step_impl=dense"),
    ({**L1, "aux_coef": 0.03125}, r"crosscoder.aux_coef=0.03125: .* set crosscoder.aux_coef=0.0"),
    ({**L1, "k_anneal_steps": 10, "k_start": 16},
     r"crosscoder.k_start=16, crosscoder.k_anneal_steps=10: not used .* crosscoder=embedded_l1"),
    ({**L1, "l1_coef": None}, r"crosscoder.l1_coef is null, and crosscoder.sparsity=l1 needs it"),
    ({**BATCHTOPK, "l1_coef": 1.0}, r"crosscoder.l1_coef=1.0: not used by crosscoder.sparsity=batchtopk"),
    ({"n_latents": 64}, r"crosscoder.k is null, and crosscoder.sparsity=batchtopk needs it"),
])
def test_config_refuses_keys_of_the_other_sparsity(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CrossCoderConfig.read(values)


def test_config_takes_either_sparsity() -> None:
    assert CrossCoderConfig.read(L1).sparsity == "l1"
    assert CrossCoderConfig.read(BATCHTOPK).sparsity == "batchtopk"


@pytest.mark.parametrize("overrides", [["crosscoder=embedded_l1"], ["+experiment=papergrade", "crosscoder=papergrade_l1"]])
def test_the_l1_presets_compose_into_a_valid_run(overrides: list[str]) -> None:
    from test_app import compose_train

    from crosscoder_pl.training import check_config

    run = check_config(compose_train(*overrides, "hydra.runtime.output_dir=/tmp/x"))
    assert run.crosscoder.sparsity == "l1" and run.crosscoder.k is None and run.crosscoder.l1_coef > 0


def test_the_sparsity_keys_can_be_set_on_the_command_line_over_a_batchtopk_recipe() -> None:
    """Every L1 key exists in the crosscoder group's YAML, so an override needs no ``+`` (Hydra refuses new keys)."""
    from test_app import compose_train

    from crosscoder_pl.training import check_config

    l1 = ["crosscoder.sparsity=l1", "crosscoder.l1_coef=3", "crosscoder.l1_warmup_frac=0.1", "crosscoder.k=null",
          "crosscoder.k_start=null", "crosscoder.k_anneal_steps=0", "crosscoder.aux_coef=0", "crosscoder.step_impl=dense"]
    run = check_config(compose_train("+experiment=own_pair", *l1, "model_pair.base=embedded-tiny:base",
                                     "model_pair.chat=embedded-tiny:chat",
                                     "hydra.runtime.output_dir=/tmp/x"))
    assert (run.crosscoder.sparsity, run.crosscoder.l1_coef, run.crosscoder.l1_warmup_frac) == ("l1", 3.0, 0.1)


class CoefRecorder(L.Callback):
    """The L1 coefficient each optimiser step used (read at the start of the next batch, as Lightning logs)."""

    def __init__(self) -> None:
        self.coef: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.coef.append(pl_module.l1_coef_now())


def test_an_l1_module_learns_planted_atoms_sparsely_with_the_warmup() -> None:
    from planted import make_planted
    from test_module import fit, module_of

    planted = make_planted(d_model=32, n_shared=24, n_base=6, n_chat=6, model_scale=(1.0, 10.0))
    module = module_of(d_model=32, n_latents=72, sparsity="l1", l1_coef=0.2, l1_warmup_frac=0.1, k=None,
                       aux_coef=0.0, step_impl="dense", lr=3e-3, scale_tokens=2048)
    recorder = CoefRecorder()
    held_out = planted.sample(4000, active=3, seed=2)
    fit(module, planted.sample(40_000, active=3, seed=1), steps=300, val=held_out, callbacks=[recorder])
    assert recorder.coef[:3] == pytest.approx([0.0, 0.2 / 30, 0.4 / 30])  # 10% of 300 steps: 30 warm-up steps
    assert recorder.coef[-1] == pytest.approx(0.2)
    cc = module.crosscoder.eval()
    assert float(cc.threshold) == -1.0  # never calibrated: an L1 crosscoder has no threshold
    x_n = cc.normalise(held_out)
    codes = cc.encode(held_out)
    ve = 1 - (x_n - cc.decode(codes, normalised=True)).pow(2).sum() / (x_n - x_n.mean(0)).pow(2).sum()
    l0 = float((codes > 0).sum(-1).float().mean())
    assert ve > 0.99, ve
    # The penalty made the codes sparse: 3 planted atoms per token; measured 6.3 (51 with λ = 1e-9).
    assert l0 < 12, l0


def test_train_py_writes_a_complete_l1_artifact_that_analyze_py_rewrites(tmp_path: Path) -> None:
    from test_app import ARTIFACT_FILES, run

    out = tmp_path / "run"
    tiny_l1 = ["+experiment=tiny", "crosscoder=embedded_l1", "crosscoder.n_latents=128", "crosscoder.k=null",
               "crosscoder.k_start=null", "crosscoder.k_anneal_steps=0", "crosscoder.l1_coef=0.5"]
    result = run("train.py", *tiny_l1, f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    artifact = out / "artifact"
    assert ARTIFACT_FILES <= {p.name for p in artifact.iterdir()}
    assert (artifact / "dashboard" / "index.html").is_file()  # token-by-token examples: L1 codes encode alone
    metrics = json.loads((artifact / "metrics.json").read_text())
    assert metrics["artifact"]["sparsity"] == "l1" and metrics["artifact"]["k"] is None
    card = (artifact / "README.md").read_text()
    assert "L1 crosscoder trained on layer 1" in card and "- L1 penalty λ = 0.5" in card
    assert "BatchTopK k" not in card and "aux_coef" not in card
    cc = CrossCoder.from_pretrained(artifact)
    assert cc.sparsity == "l1" and not cc.training
    result = run("analyze.py", f"artifact={artifact}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((artifact / "metrics.json").read_text())["validation"] == metrics["validation"]


def test_a_batchtopk_crosscoder_encodes_alone_only_once_calibrated_and_says_so_in_its_config() -> None:
    cc = CrossCoder(d_model=D, n_latents=F, k=3).eval()
    assert cc.encodes_alone is False  # eval-mode encode still falls back to BatchTopK over the batch
    cc.threshold.fill_(0.5)
    assert cc.encodes_alone is True
    assert "keep f where f * sum_m(||W_dec[:, m]|| * scales[m]) > threshold" in cc.config()["encode"]
    assert cc.config()["architecture"] == "BatchTopKCrossCoder" and cc.config()["sparsity"] == "batchtopk"


def test_a_sparsity_read_from_a_file_is_compared_by_value() -> None:
    """A sparsity string built at run time (read from a config file, not an interned literal) means the same."""
    l1 = CrossCoder(d_model=D, n_latents=F, k=None, sparsity="".join(["l", "1"])).eval()
    x = _x()
    torch.testing.assert_close(l1.encode(x), torch.relu(l1.pre_acts(x)))
    assert l1.encodes_alone and "threshold" not in l1.config()["encode"]
    out = l1.train().step(x, None, l1_coef=0.5)  # the L1 step, not BatchTopK's (which would need k)
    assert out.l1 is not None and torch.isinf(out.min_kept)
    topk = CrossCoder(d_model=D, n_latents=F, k=3, sparsity="".join(["batch", "topk"]))
    assert "> threshold" in topk.config()["encode"]
    with pytest.raises(ValueError, match="k must be a positive integer, got None"):
        CrossCoder(d_model=D, n_latents=F, k=None, sparsity="".join(["batch", "topk"]))
    with pytest.raises(ValueError, match="an L1 crosscoder keeps every positive code"):
        CrossCoder(d_model=D, n_latents=F, k=3, sparsity="".join(["l", "1"]))
