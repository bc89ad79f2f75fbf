"""Latent scaling: the closed form matches least squares; undefined ratios are nan with a reason."""

import dataclasses
import math

import pytest
import torch

from crosscoder_pl.analysis.scaling import (
    ChatSpecificRule,
    LatentScaling,
    latent_betas,
    latent_scaling,
    sample_latents,
)
from crosscoder_pl.analysis.taxonomy import Taxonomy
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
    """``[target (r, eps, a), model]`` betas of latent j by lstsq on the flattened [tokens * d_model, 1] problem."""
    x = x.double()
    codes = cc.encode(x.float()).double()
    scales = cc.scales.double()[:, None]
    x_n, x_hat_n = x * scales, cc.decode(codes.float()).double() * scales
    w_n = cc.W_dec.double() * scales
    f = codes[:, j]
    design = (f[:, None] * w_n[j, 1]).reshape(-1, 1)  # beta * f_j(n) * d_chat
    betas = torch.empty(3, 2, dtype=torch.float64)
    for m in range(2):
        targets = (x_hat_n[:, m], x_n[:, m] - x_hat_n[:, m] + f[:, None] * w_n[j, m], x_n[:, m])
        for t, y in enumerate(targets):
            betas[t, m] = torch.linalg.lstsq(design, y.reshape(-1, 1)).solution.squeeze()
    return betas


def test_closed_form_matches_lstsq_for_both_targets_and_models() -> None:
    cc = random_crosscoder()
    x = torch.randn(300, 2, D) * torch.tensor([0.3, 2.0])[:, None]
    beta_r, beta_eps, beta_a = latent_betas(cc, x, torch.arange(F), chunk_tokens=64)
    fired = (cc.encode(x) > 0).any(0)
    assert fired.sum() >= F - 2
    for j in fired.nonzero().flatten().tolist():
        expected = lstsq_betas(cc, x, j)
        assert beta_r[j].double() == pytest.approx(expected[0].tolist(), rel=1e-4, abs=1e-6)
        assert beta_eps[j].double() == pytest.approx(expected[1].tolist(), rel=1e-4, abs=1e-6)
        assert beta_a[j].double() == pytest.approx(expected[2].tolist(), rel=1e-4, abs=1e-6)


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


def ratios(nu_r: list[float], nu_eps: list[float], nu_a: list[float] | None = None) -> LatentScaling:
    """A `LatentScaling` of latents 0..L-1 with these ratios (betas unused by the rule: ones)."""
    n = len(nu_r)
    nu_a = nu_a if nu_a is not None else [1.0] * n
    return LatentScaling(torch.arange(n), torch.ones(n, 2), torch.ones(n, 2), torch.ones(n, 2), torch.tensor(nu_r),
                         torch.tensor(nu_eps), torch.tensor(nu_a), [""] * n)


def test_chat_specific_rule() -> None:
    scaling = ratios([0.1, 0.1, 0.6, float("nan")], [0.1, 0.1, 0.1, 0.1])
    delta = torch.tensor([0.95, 0.5, 0.95, 0.95])
    assert scaling.chat_specific(delta, ChatSpecificRule()).tolist() == [True, False, False, False]


NAN, INF = float("nan"), float("inf")
# Latent j lives on axis e_j (latent 6's chat decoder cancels latent 5's on e_5). Per latent: base and chat
# decoder coefficients, and the reconstruction error added to x along that axis, per model.
# (base, chat, error base, error chat, fires)
PLANTED_BETAS = [
    (0.5, 2.0, -0.4, 1.0, True),  # nu_r = 0.25, nu_eps = 0.05 / 1.5
    (-0.5, 1.0, 0.0, 0.0, True),  # nu = -0.5: flipped in the base model
    (1.0, 0.0, 0.0, 0.0, True),  # zero chat decoder
    (1.0, 1.0, 0.0, 0.0, False),  # never fires
    (3.0, 1.0, 0.0, -1.5, True),  # chat beta_eps = -0.5
    (0.0, 1.0, 0.0, 0.0, True),  # chat reconstruction 0 on e_5 (cancelled by latent 6): chat beta_r = 0
    (1.0, -1.0, 0.0, 0.0, True),  # chat decoder -e_5; base decoder on e_6
    (2.0, 1.0, 0.0, -1.0, True),  # chat beta_eps = 0 exactly
    (0.0, 4.0, 0.0, 0.0, True),  # absent from the base model: nu = 0, -log nu = inf
]


def planted_betas() -> tuple[CrossCoder, torch.Tensor]:
    """Folded crosscoder (scales 1) whose codes are 1 on every token, and x = x̂ + the planted errors."""
    d, n = 16, len(PLANTED_BETAS)
    cc = CrossCoder(d, n, k=1, threshold=0.0, folded=True)
    e = torch.eye(d)
    with torch.no_grad():
        cc.W_enc.zero_()
        cc.b_enc.copy_(torch.tensor([1.0 if row[4] else -1.0 for row in PLANTED_BETAS]))
        cc.b_dec.copy_(torch.stack([3 * e[15], -2 * e[15]]))  # orthogonal to every decoder
        for j, (base, chat, *_rest) in enumerate(PLANTED_BETAS):
            cc.W_dec[j, 0] = base * e[6 if j == 6 else j]
            cc.W_dec[j, 1] = chat * e[5 if j == 6 else j]
    cc.eval()
    x = cc.decode(cc.encode(torch.zeros(12, 2, d))).detach()
    for j, (_b, _c, err_base, err_chat, _f) in enumerate(PLANTED_BETAS):
        x[:, 0] += err_base * e[j]
        x[:, 1] += err_chat * e[j]
    return cc, x


def test_planted_betas_ratios_and_notes() -> None:
    cc, x = planted_betas()
    result = latent_scaling(cc, x, torch.arange(len(PLANTED_BETAS)), chunk_tokens=5)
    beta_r = [[0.25, 1.0], [-0.5, 1.0], [NAN, NAN], [NAN, NAN], [3.0, 1.0], [0.0, 0.0], [0.0, 0.0], [2.0, 1.0],
              [0.0, 1.0]]
    beta_eps = [[0.05, 1.5], [-0.5, 1.0], [NAN, NAN], [NAN, NAN], [3.0, -0.5], [0.0, 1.0], [0.0, 1.0], [2.0, 0.0],
                [0.0, 1.0]]
    nu_r = [0.25, -0.5, NAN, NAN, 3.0, NAN, NAN, 2.0, 0.0]
    nu_eps = [0.05 / 1.5, -0.5, NAN, NAN, NAN, 0.0, 0.0, NAN, 0.0]
    close = dict(abs=1e-6, nan_ok=True)
    assert result.beta_r.flatten().tolist() == pytest.approx(sum(beta_r, []), **close)
    assert result.beta_eps.flatten().tolist() == pytest.approx(sum(beta_eps, []), **close)
    assert result.nu_r.tolist() == pytest.approx(nu_r, **close)
    assert result.nu_eps.tolist() == pytest.approx(nu_eps, **close)
    neg_log = [-math.log(v) if v > 0 else (INF if v == 0 else NAN) for v in nu_r]
    assert result.neg_log_nu_r.tolist() == pytest.approx(neg_log, **close)
    # Activation target x_m = x̂_m + error: beta_a = beta_r + error / chat coefficient. Latents 5 and 6 cancel on
    # e_5 in the chat reconstruction, so there the activation target (0) differs from the error target.
    beta_a = [[0.05, 1.5], [-0.5, 1.0], [NAN, NAN], [NAN, NAN], [3.0, -0.5], [0.0, 0.0], [0.0, 0.0], [2.0, 0.0],
              [0.0, 1.0]]
    nu_a = [0.05 / 1.5, -0.5, NAN, NAN, NAN, NAN, NAN, NAN, 0.0]
    assert result.beta_a.flatten().tolist() == pytest.approx([b for row in beta_a for b in row], **close)
    assert result.nu_a.tolist() == pytest.approx(nu_a, **close)
    assert result.notes == [
        "",
        "nu_r < 0: -log undefined; nu_eps < 0: -log undefined; nu_a < 0: -log undefined",
        "zero chat decoder",
        "never fired",
        "nu_eps: chat beta <= 0; nu_a: chat beta <= 0",
        "nu_r: chat beta <= 0; nu_a: chat beta <= 0",
        "nu_r: chat beta <= 0; nu_a: chat beta <= 0",
        "nu_eps: chat beta <= 0; nu_a: chat beta <= 0",
        "",
    ]


def test_neg_log_nu() -> None:
    nu = torch.tensor([0.25, 1.0, 4.0, 0.0, -0.5, NAN])
    scaling = ratios(nu.tolist(), nu.flip(0).tolist(), nu.tolist())
    expected = [math.log(4), 0.0, -math.log(4), INF, NAN, NAN]
    assert scaling.neg_log_nu_r.tolist() == pytest.approx(expected, abs=1e-6, nan_ok=True)
    assert scaling.neg_log_nu_eps.tolist() == pytest.approx(expected[::-1], abs=1e-6, nan_ok=True)
    assert scaling.neg_log_nu_a.tolist() == pytest.approx(expected, abs=1e-6, nan_ok=True)


def test_chat_specific_rule_boundaries_and_defaults() -> None:
    """Δ >= 0.9 (inclusive), nu_eps < 0.2 and nu_r < 0.5 (strict); the defaults are those of Minder et al."""
    assert ChatSpecificRule() == ChatSpecificRule(0.9, 0.2, 0.5)
    scaling = ratios([0.1, 0.1, 0.5, 0.49, 0.1, 0.1], [0.1, 0.2, 0.1, 0.19, 0.3, 0.1])
    delta = torch.tensor([0.9, 0.95, 0.95, 0.95, 0.95, 0.89])
    assert scaling.chat_specific(delta, ChatSpecificRule()).tolist() == [True, False, False, True, False, False]
    loose = ChatSpecificRule(chat_only_min=0.85, nu_eps_max=0.35, nu_r_max=0.6)
    assert scaling.chat_specific(delta, loose).tolist() == [True, True, True, True, True, True]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ChatSpecificRule().nu_r_max = 0.9


def test_sample_latents_takes_all_when_few_and_a_seeded_sample_otherwise() -> None:
    classes = torch.tensor([0, 3, 0, 0, 3, 0, 0, 3, 0, 0, 0])  # 8 shared (class 0), 3 base-only (class 3), no dead
    taxonomy = Taxonomy(torch.zeros(11), torch.zeros(11), torch.zeros(11), classes, n_tokens=1)
    shared = [0, 2, 3, 5, 6, 8, 9, 10]
    for max_count in (8, 9, 100):  # all of them, sorted, without drawing from the generator
        generator = torch.Generator().manual_seed(7)
        assert sample_latents(taxonomy, "shared", max_count, generator).tolist() == shared
        assert torch.equal(generator.get_state(), torch.Generator().manual_seed(7).get_state())
    sample = sample_latents(taxonomy, "shared", 5, torch.Generator().manual_seed(7))
    expected = torch.tensor(shared)[torch.randperm(8, generator=torch.Generator().manual_seed(7))[:5]].sort().values
    assert sample.tolist() == expected.tolist() and len(set(sample.tolist())) == 5
    assert sample_latents(taxonomy, "dead", 3, torch.Generator()).tolist() == []


def test_reliability_filter_bounds_are_inclusive_and_apply_to_both_ratios() -> None:
    """The reference keeps -0.1 <= nu_r <= 2 and -0.1 <= nu_eps <= 2 (nan dropped) before ranking chat-only latents."""
    rule = ChatSpecificRule()
    assert (rule.nu_min, rule.nu_max) == (-0.1, 2.0)
    nu_r = [-0.1, 2.0, -0.1001, 2.0001, 0.1, 0.1, NAN, -1.2]
    nu_eps = [0.1, 0.1, 0.1, 0.1, -6.6, 2.5, 0.1, 0.1]
    scaling = ratios(nu_r, nu_eps)
    assert scaling.in_range(rule).tolist() == [True, True, False, False, False, False, False, False]
    wide = ChatSpecificRule(nu_min=-10.0, nu_max=10.0)
    assert scaling.in_range(wide).tolist() == [True, True, True, True, True, True, False, True]
    notes = scaling.filter_notes(rule)
    assert notes[:2] == ["", ""] and notes[6] == ""  # nan: no extra note (its own note says why it is nan)
    assert notes[3] == "nu_r=2 outside [-0.1, 2]: unreliable fit"
    assert notes[4] == "nu_eps=-6.6 outside [-0.1, 2]: unreliable fit"
    assert notes[7] == "nu_r=-1.2 outside [-0.1, 2]: unreliable fit"


def test_negative_nu_outside_the_filter_is_not_chat_specific() -> None:
    """nu_r = -1.2 or nu_eps = -6.6 passes "nu < threshold" but is an unreliable fit, not a very chat-specific latent;
    a small negative nu inside the filter (noise around 0) still counts."""
    scaling = ratios([-1.2, 0.1, -0.05, 0.1], [0.1, -6.6, -0.05, 0.1])
    delta = torch.full((4,), 0.95)
    assert scaling.chat_specific(delta, ChatSpecificRule()).tolist() == [False, False, True, True]
    unfiltered = ChatSpecificRule(nu_min=-math.inf, nu_max=math.inf)
    assert scaling.chat_specific(delta, unfiltered).tolist() == [True, True, True, True]
