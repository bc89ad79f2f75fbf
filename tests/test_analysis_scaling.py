"""Latent scaling: the closed form matches least squares; undefined ratios are nan with a reason."""

import pytest
import torch

from crosscoder_pl.analysis.scaling import ChatSpecificRule, LatentScaling, latent_betas, latent_scaling
from crosscoder_pl.crosscoder import CrossCoder

D, F = 8, 12


def random_crosscoder() -> CrossCoder:
    """Folded, with unequal scales, so that working in the normalised space matters."""
    torch.manual_seed(0)
    cc = CrossCoder(D, F, k=2, scales=[3.0, 0.5], threshold=0.0)
    with torch.no_grad():
        cc.W_dec.mul_(torch.rand(F, 2, 1) * 10)
        cc.b_dec.normal_()
    return cc.fold().eval()


def lstsq_betas(cc: CrossCoder, x: torch.Tensor, j: int) -> torch.Tensor:
    """``[target (r, eps), model]`` betas of latent j by lstsq on the flattened [tokens * d_model, 1] problem."""
    x = x.double()
    codes = cc.encode(x.float()).double()
    scales = cc.scales.double()[:, None]
    x_n, x_hat_n = x * scales, cc.decode(codes.float()).double() * scales
    w_n = cc.W_dec.double() * scales
    f = codes[:, j]
    design = (f[:, None] * w_n[j, 1]).reshape(-1, 1)  # beta * f_j(n) * d_chat
    betas = torch.empty(2, 2, dtype=torch.float64)
    for m in range(2):
        targets = (x_hat_n[:, m], x_n[:, m] - x_hat_n[:, m] + f[:, None] * w_n[j, m])
        for t, y in enumerate(targets):
            betas[t, m] = torch.linalg.lstsq(design, y.reshape(-1, 1)).solution.squeeze()
    return betas


def test_closed_form_matches_lstsq_for_both_targets_and_models() -> None:
    cc = random_crosscoder()
    x = torch.randn(300, 2, D) * torch.tensor([0.3, 2.0])[:, None]
    beta_r, beta_eps = latent_betas(cc, x, torch.arange(F), chunk_tokens=64)
    fired = (cc.encode(x) > 0).any(0)
    assert fired.sum() >= F - 2
    for j in fired.nonzero().flatten().tolist():
        expected = lstsq_betas(cc, x, j)
        assert beta_r[j].double() == pytest.approx(expected[0].tolist(), rel=1e-4, abs=1e-6)
        assert beta_eps[j].double() == pytest.approx(expected[1].tolist(), rel=1e-4, abs=1e-6)


def test_chunking_does_not_change_betas() -> None:
    cc = random_crosscoder()
    x = torch.randn(100, 2, D)
    one = latent_betas(cc, x, torch.tensor([0, 3, 5]), chunk_tokens=100)
    many = latent_betas(cc, x, torch.tensor([0, 3, 5]), chunk_tokens=7)
    for a, b in zip(one, many):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7, equal_nan=True)


def planted_signs() -> CrossCoder:
    """Orthonormal decoders; latents 0, 1, 3 always fire with f = 1, latent 2 never.

    latent 0: chat decoder e0, base -e0; latent 1 pushes the chat reconstruction to -2 e0 along with it.
    latent 3: chat decoder e2, base decoder -e2 (nothing else along e2): beta_r base = -1, chat = +1.
    """
    cc = CrossCoder(D, 4, k=1, threshold=0.0, folded=True)
    e = torch.eye(D)
    with torch.no_grad():
        cc.W_enc.zero_()
        cc.b_enc.copy_(torch.tensor([1.0, 1.0, -1.0, 1.0]))
        cc.b_dec.zero_()
        decoders = [(-e[0], e[0]), (e[1], -3 * e[0]), (e[3], e[3]), (-e[2], e[2])]  # (base, chat)
        cc.W_dec.copy_(torch.stack([torch.stack(pair) for pair in decoders]))
    return cc.eval()


def test_undefined_ratios_are_nan_with_a_reason() -> None:
    cc = planted_signs()
    x = cc.decode(cc.encode(torch.zeros(20, 2, D)))  # exact reconstructions: error target = f_j W_dec[j, m]
    result = latent_scaling(cc, x, torch.arange(4))
    assert result.beta_r[0, 1] == pytest.approx(-2.0)
    assert result.nu_r[0].isnan() and "nu_r: chat beta <= 0" in result.notes[0]
    assert result.beta_r[2].isnan().all() and result.notes[2] == "never fired"
    assert result.nu_r[3] == pytest.approx(-1.0)
    assert result.neg_log_nu_r[3].isnan() and "nu_r < 0: -log undefined" in result.notes[3]
    assert result.notes[1] == ""
    assert result.nu_eps[1] == pytest.approx(0.0) and result.neg_log_nu_eps[1] == float("inf")


def test_chat_specific_rule() -> None:
    scaling = LatentScaling(
        latents=torch.tensor([0, 1, 2, 3]),
        beta_r=torch.ones(4, 2),
        beta_eps=torch.ones(4, 2),
        nu_r=torch.tensor([0.1, 0.1, 0.6, float("nan")]),
        nu_eps=torch.tensor([0.1, 0.1, 0.1, 0.1]),
        notes=[""] * 4,
    )
    delta = torch.tensor([0.95, 0.5, 0.95, 0.95])
    assert scaling.chat_specific(delta, ChatSpecificRule()).tolist() == [True, False, False, False]
