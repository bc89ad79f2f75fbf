"""CrossCoder.step: the training loss and everything reported about it, against a direct computation."""

from __future__ import annotations

import pytest
import torch

from crosscoder_pl import CrossCoder
from crosscoder_pl.step import token_loss

D, F, K = 8, 32, 3


def _cc(scales=(0.5, 4.0), seed: int = 0) -> CrossCoder:
    torch.manual_seed(seed)
    cc = CrossCoder(d_model=D, n_latents=F, k=K, scales=list(scales)).train()
    with torch.no_grad():
        cc.b_dec.normal_()
        cc.b_enc.uniform_(-0.1, 0.3)
        cc.W_dec.mul_(torch.rand(F, 2, 1) * 3)  # unequal decoder norms: the score is not f
    return cc


def _direct(cc: CrossCoder, x: torch.Tensor, k: int, dead: torch.Tensor, loss: str, aux_coef: float, k_aux: int):
    """The DESIGN formulas written out with loops and no shared helper."""
    s = cc.scales
    xn = torch.stack([x[:, 0] * s[0], x[:, 1] * s[1]], dim=1)
    f = torch.relu(xn[:, 0] @ cc.W_enc[0] + xn[:, 1] @ cc.W_enc[1] + cc.b_enc)
    norms = torch.stack([cc.W_dec[:, 0].norm(dim=-1), cc.W_dec[:, 1].norm(dim=-1)], dim=1)
    score = f * (norms[:, 0] + norms[:, 1])
    keep = torch.zeros(score.numel(), dtype=torch.bool)
    keep[score.flatten().argsort(descending=True)[: k * x.shape[0]]] = True
    codes = f * keep.view_as(f)
    x_hat = torch.stack([codes @ cc.W_dec[:, m] + cc.b_dec[m] for m in range(2)], dim=1)

    def per_token(e: torch.Tensor) -> torch.Tensor:
        if loss == "mse":
            return (e ** 2).sum(dim=(1, 2))
        return e[:, 0].norm(dim=-1) + e[:, 1].norm(dim=-1)

    recon = per_token(xn - x_hat).mean()
    unit = per_token(xn - xn.mean(0)).mean()
    r = (xn - x_hat).detach()
    dead_ids = dead.nonzero().flatten()
    aux_codes = torch.zeros_like(f)
    for n in range(x.shape[0]):
        dead_scores = score[n, dead_ids]
        top = dead_ids[dead_scores.argsort(descending=True)[:k_aux]]
        aux_codes[n, top] = f[n, top]
    e_hat = torch.stack([aux_codes @ cc.W_dec[:, m] for m in range(2)], dim=1)
    aux = per_token(r - e_hat).mean() / per_token(r - r.mean(0)).mean()
    return recon + aux_coef * aux * unit, recon, aux, unit, codes, x_hat


@pytest.mark.parametrize("loss", ["mse", "l2"])
def test_step_matches_a_direct_computation(loss: str) -> None:
    cc = _cc()
    x = torch.randn(40, 2, D) * torch.tensor([3.0, 0.2])[:, None] + 0.5
    dead = torch.zeros(F, dtype=torch.bool)
    dead[[1, 4, 7, 9, 20, 31]] = True
    out = cc.step(x, K, dead, loss=loss, aux_coef=0.25, k_aux=2)
    total, recon, aux, unit, codes, x_hat = _direct(cc, x, K, dead, loss, 0.25, 2)
    torch.testing.assert_close(out.codes, codes)
    torch.testing.assert_close(out.x_hat, x_hat)
    torch.testing.assert_close(out.recon, recon)
    torch.testing.assert_close(out.unit, unit)
    torch.testing.assert_close(out.aux, aux)
    torch.testing.assert_close(out.loss, total)
    assert 0 < out.aux.item() != pytest.approx(1.0)  # the dead latents did something


@pytest.mark.parametrize("loss", ["mse", "l2"])
def test_step_gradients_match_a_direct_computation(loss: str) -> None:
    x = torch.randn(24, 2, D) * 2
    dead = torch.arange(F) % 3 == 0
    grads = []
    for use_step in (True, False):
        cc = _cc(seed=3)
        if use_step:
            cc.step(x, K, dead, loss=loss, aux_coef=0.5, k_aux=3).loss.backward()
        else:
            _direct(cc, x, K, dead, loss, 0.5, 3)[0].backward()
        grads.append([p.grad.clone() for p in (cc.W_enc, cc.b_enc, cc.W_dec, cc.b_dec)])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_l2_is_the_unsquared_norm_per_model_summed() -> None:
    err = torch.tensor([[[3.0, 4.0], [0.0, 1.0]], [[1.0, 0.0], [6.0, 8.0]]])  # [2 tokens, 2 models, 2]
    assert token_loss(err, "l2").tolist() == [6.0, 11.0]
    assert token_loss(err, "mse").tolist() == [26.0, 101.0]
    with pytest.raises(ValueError, match="loss='l1'"):
        token_loss(err, "l1")


@pytest.mark.parametrize("loss", ["mse", "l2"])
def test_auxk_weight_means_the_same_under_both_losses(loss: str) -> None:
    """With dead latents that reproduce a planted share of the residual, the AuxK term relative to the
    reconstruction unit is aux_coef times the same dimensionless error under either loss option."""
    cc = _cc()
    x = torch.randn(64, 2, D)
    no_dead = cc.step(x, K, torch.zeros(F, dtype=torch.bool), loss=loss, aux_coef=1.0, k_aux=4)
    assert float(no_dead.aux) == 0.0 and torch.equal(no_dead.loss, no_dead.recon)
    all_dead = cc.step(x, K, torch.ones(F, dtype=torch.bool), loss=loss, aux_coef=1 / 32, k_aux=4)
    # the term is aux_coef * (normalised error) * (the loss of predicting the mean), in recon's units
    torch.testing.assert_close(all_dead.loss - all_dead.recon, all_dead.aux * all_dead.unit / 32)
    # aux is normalised: scaling every activation by 10 leaves it unchanged under either loss
    cc10 = _cc()
    with torch.no_grad():
        cc10.W_dec.mul_(10)
        cc10.b_dec.mul_(10)
        cc10.W_enc.div_(10)
    scaled = cc10.step(x * 10, K, torch.ones(F, dtype=torch.bool), loss=loss, aux_coef=1 / 32, k_aux=4)
    torch.testing.assert_close(scaled.aux, all_dead.aux, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scaled.loss / scaled.unit, all_dead.loss / all_dead.unit, rtol=1e-4, atol=1e-6)


def test_folded_crosscoder_refuses_to_train() -> None:
    with pytest.raises(RuntimeError, match="folded"):
        _cc().fold().step(torch.randn(4, 2, D), K)


def test_min_kept_is_the_smallest_positive_kept_score() -> None:
    cc = _cc()
    f = torch.zeros(4, F)
    f[0, 3], f[1, 5], f[2, 7] = 2.0, 0.5, 1.0  # 3 positive entries; k * batch = 8 keeps zeros too
    codes, min_kept = cc.batch_topk(f, 2)
    norms = cc.decoder_norms().sum(-1).detach()
    assert float(min_kept) == pytest.approx(min(2.0 * norms[3], 0.5 * norms[5], 1.0 * norms[7]).item())
    assert int((codes > 0).sum()) == 3
    _, none_positive = cc.batch_topk(torch.zeros(4, F), 2)
    assert none_positive.item() == float("inf")


def test_step_defaults_are_the_recipe_auxk() -> None:
    """Defaults: AuxK weight 1/32 (Gao et al. 2024) and one dead latent per token."""
    cc = _cc()
    x = torch.randn(32, 2, D) * 2
    dead = torch.arange(F) % 2 == 0
    out = cc.step(x, K, dead)
    total, recon, aux, unit, codes, x_hat = _direct(cc, x, K, dead, "mse", 1 / 32, 1)
    torch.testing.assert_close(out.aux, aux)
    torch.testing.assert_close(out.loss, total)
    assert out.aux.item() != pytest.approx(_direct(cc, x, K, dead, "mse", 1 / 32, 2)[2].item())  # k_aux matters


def test_step_options_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        _cc().step(torch.randn(4, 2, D), K, None, "l2")


def test_step_output_is_frozen() -> None:
    import dataclasses

    out = _cc().step(torch.randn(4, 2, D), K)
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.loss = torch.zeros(())


def test_no_auxk_without_dead_latents_or_weight() -> None:
    """``dead=None`` and ``aux_coef=0`` both switch AuxK off: aux is 0 and the loss is the reconstruction term."""
    cc = _cc()
    x = torch.randn(16, 2, D)
    all_dead = torch.ones(F, dtype=torch.bool)
    assert cc.step(x, K, all_dead, aux_coef=0.5).aux.item() > 0  # with dead latents and a weight there is a term
    for out in (cc.step(x, K, None, aux_coef=0.5), cc.step(x, K), cc.step(x, K, all_dead, aux_coef=0.0)):
        assert float(out.aux) == 0.0
        assert torch.equal(out.loss, out.recon)


def test_auxk_normalisation_below_one_is_not_clamped() -> None:
    """Small activations: the residual's spread (AuxK's denominator) is far below 1 and is used as is."""
    cc = _cc()
    with torch.no_grad():
        cc.b_dec.zero_()
        cc.W_dec.mul_(1e-2)
    x = torch.randn(32, 2, D) * 1e-2
    dead = torch.arange(F) % 2 == 1
    out = cc.step(x, K, dead, aux_coef=0.5, k_aux=2)
    xn = cc.normalise(x)
    r = (xn - out.x_hat).detach()
    assert float((r - r.mean(0)).pow(2).sum((1, 2)).mean()) < 0.1  # the denominator is small
    torch.testing.assert_close(out.aux, _direct(cc, x, K, dead, "mse", 0.5, 2)[2])


def test_auxk_on_a_batch_of_identical_tokens_is_finite() -> None:
    """Every token the same: the residual has no spread, AuxK's denominator is clamped, nothing is nan or inf."""
    cc = _cc()
    x = torch.randn(1, 2, D).expand(8, 2, D).contiguous()
    out = cc.step(x, K, torch.ones(F, dtype=torch.bool), aux_coef=0.5)
    assert torch.isfinite(out.aux) and torch.isfinite(out.loss)
    assert float(out.unit) == 0.0 and torch.equal(out.loss, out.recon)


def test_loss_option_is_compared_by_value() -> None:
    """A loss name read from a config file is an equal string, not necessarily the same object."""
    err = torch.tensor([[[3.0, 4.0], [0.0, 1.0]]])
    mse = "".join(["m", "s", "e"])
    assert token_loss(err, mse).tolist() == [26.0]


def test_min_kept_ignores_nan_scores() -> None:
    """A NaN score is not a positive kept score: the threshold input is the smallest real one."""
    cc = _cc()
    f = torch.zeros(4, F)
    f[0, 3], f[1, 5] = 2.0, float("nan")
    _, min_kept = cc.batch_topk(f, 1)
    norms = cc.decoder_norms().sum(-1).detach()
    assert float(min_kept) == pytest.approx(float(2.0 * norms[3]))


@pytest.mark.parametrize("impl", ["sparse", "dense"])
def test_auxk_with_fewer_tokens_than_k_aux(impl: str) -> None:
    """k_aux is a number of dead latents per token: a batch of 2 tokens still gets k_aux = 4 of its 16 dead latents."""
    cc = _cc()
    x = torch.randn(2, 2, D) * 2
    dead = torch.arange(F) % 2 == 0
    out = cc.step(x, K, dead, aux_coef=0.5, k_aux=4, impl=impl)
    total, _, aux, *_ = _direct(cc, x, K, dead, "mse", 0.5, 4)
    torch.testing.assert_close(out.aux, aux)
    torch.testing.assert_close(out.loss, total)
    assert out.aux.item() != pytest.approx(_direct(cc, x, K, dead, "mse", 0.5, 2)[2].item())
