"""Causal validation and splice-in evaluation on tiny random Gemma-2 models (CPU, seconds)."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from crosscoder_pl.analysis.causal import (
    CSV_COLUMNS,
    CausalResult,
    causal_validation,
    most_frequent,
    pearson,
)
from crosscoder_pl.analysis.decoder_norms import decoder_cosine, delta_norm
from crosscoder_pl.analysis.probes import (
    clean_run,
    content_mask,
    kl_per_position,
    next_token_logprobs,
)
from crosscoder_pl.analysis.splice import splice_evaluation
from crosscoder_pl.crosscoder import CrossCoder

D, VOCAB, LAYER, BOS, PAD = 32, 64, 1, 2, 0


def tiny_pair(identical: bool) -> SimpleNamespace:
    """A random 3-layer Gemma-2 "base" and a "chat" copy of it with perturbed weights (or an exact copy).

    ``initializer_range=0.3`` makes next-token distributions peaked, so probes sampled from the model have a
    clean CE well below the zero-ablation CE.
    """
    config = Gemma2Config(
        hidden_size=D,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        attn_implementation="eager",
        initializer_range=0.3,
    )
    torch.manual_seed(0)
    base = Gemma2ForCausalLM(config).eval()
    chat = Gemma2ForCausalLM(config).eval()
    chat.load_state_dict(base.state_dict())
    if not identical:
        with torch.no_grad():
            for param in chat.parameters():
                param.add_(0.05 * torch.randn_like(param))
    return SimpleNamespace(base=base, chat=chat, layer=LAYER, base_id="tiny/base", chat_id="tiny/chat")


@torch.inference_mode()
def probes(model: torch.nn.Module, n: int = 6, seq: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Probes sampled from ``model`` after BOS; row 1 left-padded by 3, row 2 right-padded by 4."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.full((n, 1), BOS)
    for _ in range(seq - 1):
        probs = model(input_ids=ids).logits[:, -1].softmax(-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    mask = torch.ones_like(ids)
    ids[1] = ids[1].roll(3)
    mask[1, :3] = 0
    mask[2, -4:] = 0
    return torch.where(mask.bool(), ids, PAD), mask


def crosscoder(tied_decoders: bool) -> CrossCoder:
    """Random folded crosscoder (eval mode, threshold 0, unequal per-model scales); latent 0 never fires;
    decoders large enough to matter."""
    torch.manual_seed(2)
    cc = CrossCoder(D, 8, k=2, threshold=0.0, scales=[0.5, 3.0]).fold()  # unequal: raw and normalised decoders differ
    with torch.no_grad():
        cc.W_dec.mul_(100)
        if tied_decoders:
            cc.W_dec[:, 1] = cc.W_dec[:, 0]
        cc.b_enc[0] = -1e4
    return cc.eval()


def test_content_mask_drops_bos_and_padding() -> None:
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, -4:] = 0
    content = content_mask(mask)
    assert content[0].tolist() == [False] + [True] * 9
    assert content[1].tolist() == [False] * 4 + [True] * 6
    assert content[2].tolist() == [False] + [True] * 5 + [False] * 4


def test_identical_models_and_decoders_give_pearson_one() -> None:
    pair = tiny_pair(identical=True)
    ids, mask = probes(pair.base)
    result = causal_validation(crosscoder(tied_decoders=True), pair, ids, mask, torch.arange(1, 8), latents_per_batch=3)
    defined = ~result.pearson.isnan()
    assert defined.sum() >= 3
    assert torch.equal(result.kl[:, 0], result.kl[:, 1])
    assert result.pearson[defined] == pytest.approx(torch.ones(int(defined.sum())), abs=1e-5)
    assert result.decoder_cosine == pytest.approx(torch.ones(7), abs=1e-6)


def test_latent_that_never_fires_changes_nothing() -> None:
    pair = tiny_pair(identical=False)
    ids, mask = probes(pair.base)
    result = causal_validation(crosscoder(tied_decoders=False), pair, ids, mask, torch.tensor([0, 3]))
    assert result.n_probes_active.tolist()[0] == 0 and result.n_probes_active.tolist()[1] > 0
    assert torch.count_nonzero(result.kl[0]) == 0
    assert math.isnan(result.pearson[0])
    assert result.summary()["n_pearson_nan"] >= 1


def test_packing_matches_one_latent_one_probe_by_hand() -> None:
    cc, pair = crosscoder(tied_decoders=False), tiny_pair(identical=False)
    ids, mask = probes(pair.base)
    packed = causal_validation(cc, pair, ids, mask, torch.arange(8), latents_per_batch=8)
    single = causal_validation(cc, pair, ids, mask, torch.arange(8), latents_per_batch=1)
    assert torch.allclose(packed.kl, single.kl, rtol=1e-4, atol=1e-9)

    # The chat model on probe 1 (left-padded), for its most affected latent, without any packing.
    j = int(packed.kl[:, 1, 1].argmax())
    assert packed.kl[j, 1, 1] > 0
    with torch.inference_mode():
        clean = clean_run(pair, ids[1:2], mask[1:2])
        content = content_mask(mask[1:2])
        codes = torch.where(content[..., None], cc.encode(clean.residual), 0.0)
        delta = codes[..., j, None] * cc.W_dec[j, 1]
        ablated = next_token_logprobs(pair.chat, LAYER, ids[1:2], mask[1:2], lambda h: h - delta)
        reference = next_token_logprobs(pair.chat, LAYER, ids[1:2], mask[1:2], lambda h: h)
        kl = kl_per_position(reference, ablated)[content].mean()
    assert packed.kl[j, 1, 1] == pytest.approx(float(kl), rel=1e-4)


def test_pearson_and_most_frequent() -> None:
    a = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    b = torch.tensor([[2.0, 4.0, 7.0], [0.0, 1.0, 2.0]])
    r = pearson(a, b)
    assert r[0] == pytest.approx(0.9933, abs=1e-4) and math.isnan(r[1])
    frequency = torch.tensor([0.1, 0.5, 0.3, 0.9])
    assert most_frequent(torch.tensor([0, 1, 2]), frequency, 2).tolist() == [1, 2]


def test_splice_identity_recovers_everything_and_zero_recovers_nothing(monkeypatch) -> None:
    cc, pair = crosscoder(tied_decoders=False), tiny_pair(identical=False)
    ids, mask = probes(pair.base)
    content = content_mask(mask)
    # nan outside content positions: if BOS or padding were spliced, every figure would be nan.
    monkeypatch.setattr(cc, "forward", lambda x: torch.where(content[..., None, None], x, torch.nan))
    identity = splice_evaluation(cc, pair, ids, mask)
    monkeypatch.setattr(cc, "forward", lambda x: torch.zeros_like(x))
    zero = splice_evaluation(cc, pair, ids, mask)
    for model in ("base", "chat"):
        assert identity[model]["frac_recovered"] == pytest.approx(1.0)
        assert identity[model]["ce_increase"] == pytest.approx(0.0, abs=1e-6)
        assert identity[model]["kl_splice"] == pytest.approx(0.0, abs=1e-6)
        assert zero[model]["frac_recovered"] == 0.0
        assert zero[model]["ce_splice"] == zero[model]["ce_zero"] > zero[model]["ce_clean"]


def test_splice_with_a_real_crosscoder_is_finite() -> None:
    pair = tiny_pair(identical=False)
    ids, mask = probes(pair.base)
    result = splice_evaluation(crosscoder(tied_decoders=False), pair, ids, mask)
    for figures in result.values():
        assert all(math.isfinite(v) for v in figures.values())
        assert figures["kl_splice"] >= 0


def test_pearson_counts_only_the_probes_where_the_latent_fires() -> None:
    base = torch.tensor([[1.0, 2.0, 3.0, 0.0, 0.0, 0.0]])
    chat = torch.tensor([[3.0, 2.0, 1.0, 0.0, 0.0, 0.0]])
    active = torch.tensor([[True, True, True, False, False, False]])
    assert pearson(base, chat, active).item() == pytest.approx(-1.0)
    assert pearson(base, chat).item() > 0  # the shared zeros alone would make them look alike
    assert pearson(base, chat, active & torch.tensor([True, True, False, False, False, False])).isnan().all()


def direct_pearson(a: list[float], b: list[float]) -> float:
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def test_pearson_matches_the_direct_formula_on_masked_rows() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(5, 7, generator=g) * 3 + 1, torch.rand(5, 7, generator=g) * 0.1
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 1, 0, 1], [0, 0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0],
                         [1, 0, 0, 0, 0, 0, 0]]).bool()
    got = pearson(a, b, mask)
    for i in range(3):
        keep = mask[i]
        assert got[i].item() == pytest.approx(direct_pearson(a[i][keep].tolist(), b[i][keep].tolist()), abs=1e-5)
    assert got[3].isnan() and got[4].isnan()  # 2 and 1 probes: fewer than 3
    unmasked = pearson(a, b)
    for i in range(5):
        assert unmasked[i].item() == pytest.approx(direct_pearson(a[i].tolist(), b[i].tolist()), abs=1e-5)
    assert pearson(a, -2 * a + 1).tolist() == pytest.approx([-1.0] * 5, abs=1e-6)  # sign and scale
    constant = pearson(torch.ones(1, 4), torch.arange(4.0)[None])
    assert constant.isnan().all() and pearson(torch.arange(4.0)[None], torch.ones(1, 4)).isnan().all()


def test_summary_rows_and_medians_on_a_planted_result() -> None:
    kl = torch.arange(4 * 2 * 3, dtype=torch.float32).reshape(4, 2, 3)
    result = CausalResult(
        latents=torch.tensor([10, 11, 12, 13]),
        delta_norm=torch.tensor([0.5, 0.45, 0.55, 0.5]),
        decoder_cosine=torch.tensor([0.2, 0.99, 0.4, 0.6]),
        kl=kl,
        n_probes_active=torch.tensor([3, 1, 2, 3]),
        pearson=torch.tensor([0.9, float("nan"), 0.1, 0.5]),
    )
    assert result.summary() == pytest.approx({
        "n_latents_tested": 4,
        "n_pearson_nan": 1,
        "median_pearson": 0.5,
        "median_decoder_cosine": 0.4,  # over the latents with a defined Pearson (0.2, 0.4, 0.6)
        "median_decoder_cosine_all_tested": 0.5,  # (0.4 + 0.6) / 2
        "mean_kl_base": float(kl[:, 0].mean()),
        "mean_kl_chat": float(kl[:, 1].mean()),
    })
    rows = result.rows()
    assert [row["latent"] for row in rows] == [10, 11, 12, 13]
    assert rows[1]["mean_kl_base"] == pytest.approx(7.0) and rows[1]["mean_kl_chat"] == pytest.approx(10.0)
    assert rows[2]["n_probes"] == 3 and rows[2]["n_probes_active"] == 2 and math.isnan(rows[1]["pearson"])
    assert rows[3]["decoder_cosine"] == pytest.approx(0.6) and rows[2]["delta_norm"] == pytest.approx(0.55)
    assert list(rows[0]) == list(CSV_COLUMNS)


def test_most_frequent_orders_by_frequency_and_keeps_ties_in_order() -> None:
    frequency = torch.tensor([0.1, 0.5, 0.3, 0.9, 0.3, 0.0])
    assert most_frequent(torch.tensor([0, 1, 2, 4, 5]), frequency, 3).tolist() == [1, 2, 4]
    assert most_frequent(torch.tensor([4, 2, 0]), frequency, 10).tolist() == [4, 2, 0]
    assert most_frequent(torch.tensor([3, 5]), frequency, 1).tolist() == [3]


def test_every_kl_matches_the_direct_computation() -> None:
    """All (latent, model, probe) KLs against full-vocabulary forwards, one latent and probe at a time."""
    cc, pair = crosscoder(tied_decoders=False), tiny_pair(identical=False)
    ids, mask = probes(pair.base)
    latents = torch.tensor([1, 3, 6])
    result = causal_validation(cc, pair, ids, mask, latents, latents_per_batch=2)
    content = content_mask(mask)
    with torch.inference_mode():
        clean = clean_run(pair, ids, mask)
        codes = torch.where(content[..., None], cc.encode(clean.residual), 0.0)  # [P, S, F]
        expected = torch.zeros(3, 2, ids.shape[0])
        for i, j in enumerate(latents.tolist()):
            for m, model in enumerate((pair.base, pair.chat)):
                reference = next_token_logprobs(model, LAYER, ids, mask, lambda h: h)
                delta = codes[..., j, None] * cc.W_dec[j, m]
                ablated = next_token_logprobs(model, LAYER, ids, mask, lambda h, d=delta: h - d)
                per_position = kl_per_position(reference, ablated)
                expected[i, m] = torch.stack([per_position[p][content[p]].mean() for p in range(ids.shape[0])])
    assert torch.allclose(result.kl, expected, rtol=1e-3, atol=1e-7)
    assert (expected > 0).sum() >= 6  # not a trivial all-zero case
    active = (codes[..., latents] > 0).any(1).T  # [L, P]: probes where each latent fires
    assert result.n_probes_active.tolist() == active.sum(-1).tolist()
    expected_pearson = pearson(expected[:, 0], expected[:, 1], active)
    assert result.pearson.tolist() == pytest.approx(expected_pearson.tolist(), abs=1e-3, nan_ok=True)
    assert result.latents.tolist() == [1, 3, 6]
    assert result.delta_norm.tolist() == pytest.approx(delta_norm(cc)[latents].tolist())
    assert result.decoder_cosine.tolist() == pytest.approx(decoder_cosine(cc)[latents].tolist())


def test_causal_refuses_a_model_whose_logits_are_not_its_head(monkeypatch) -> None:
    """Both models are checked before any forward: a head that rescales its logits would be scored wrongly."""
    from types import SimpleNamespace as NS

    cc, pair = crosscoder(tied_decoders=False), tiny_pair(identical=False)
    ids, mask = probes(pair.base)
    forward = pair.chat.forward
    monkeypatch.setattr(pair.chat, "forward", lambda **kw: NS(logits=2 * forward(**kw).logits))
    with pytest.raises(ValueError, match="Gemma2ForCausalLM: its logits are not lm_head"):
        causal_validation(cc, pair, ids, mask, torch.arange(1, 3))


def test_latents_per_batch_bounds_each_forward_and_none_uses_the_budget(monkeypatch) -> None:
    """At most ``latents_per_batch * n_probes`` (latent, probe) sequences per ablation forward; None: as many as
    the memory budget allows (here all of them in one forward per model). The KLs do not depend on it."""
    import crosscoder_pl.analysis.causal as causal

    sizes: list[int] = []
    final_hidden = causal.final_hidden
    monkeypatch.setattr(causal, "final_hidden", lambda model, layer, ids, *a: sizes.append(ids.shape[0])
                        or final_hidden(model, layer, ids, *a))
    cc, pair = crosscoder(tied_decoders=False), tiny_pair(identical=False)
    ids, mask = probes(pair.base)
    packed = causal_validation(cc, pair, ids, mask, torch.arange(8), latents_per_batch=2, memory_budget_mb=1e6)
    n_pairs = int(packed.n_probes_active.sum())
    assert n_pairs > 2 * 12
    rows = 2 * ids.shape[0]
    assert sizes == [min(rows, n_pairs - start) for start in range(0, n_pairs, rows) for _ in range(2)]
    sizes.clear()
    budget = causal_validation(cc, pair, ids, mask, torch.arange(8), latents_per_batch=None, memory_budget_mb=1e6)
    assert sizes == [n_pairs, n_pairs]
    torch.testing.assert_close(budget.kl, packed.kl, rtol=1e-4, atol=1e-7)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"latents_per_batch must be >= 1 .*got {bad}"):
            causal_validation(cc, pair, ids, mask, torch.arange(8), latents_per_batch=bad)


def test_latent_codes_are_encoded_a_few_probes_at_a_time() -> None:
    """Calibrated crosscoder: token by token, so the grouping of probes changes nothing. Uncalibrated: the
    (warned) BatchTopK fallback ranks the tokens of each group of PROBES_PER_ENCODE probes together."""
    import warnings

    from crosscoder_pl.analysis.causal import PROBES_PER_ENCODE, _latent_codes

    torch.manual_seed(0)
    residual = torch.randn(2 * PROBES_PER_ENCODE + 3, 5, 2, D) * 10
    content = torch.rand(residual.shape[:2]) > 0.2
    latents = torch.tensor([5, 1, 2])
    cc = crosscoder(tied_decoders=False)
    expected = torch.where(content[..., None], cc.encode(residual), 0.0)[..., latents]
    assert torch.equal(_latent_codes(cc, residual, content, latents), expected)
    assert expected.count_nonzero() > 10

    torch.manual_seed(2)
    uncalibrated = CrossCoder(D, 8, k=2, scales=[0.5, 3.0]).fold().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = _latent_codes(uncalibrated, residual, content, latents)
        groups = [uncalibrated.encode(r) for r in residual.split(PROBES_PER_ENCODE)]
    expected = torch.where(content[..., None], torch.cat(groups), 0.0)[..., latents]
    assert PROBES_PER_ENCODE == 8 and torch.equal(got, expected)


def test_most_frequent_keeps_ties_in_candidate_order_for_many_candidates() -> None:
    frequency = torch.zeros(40)
    frequency[[3, 7]] = 1.0
    candidates = torch.arange(39, -1, -1)  # 40 candidates, 38 tied at 0: a stable sort is needed
    expected = [7, 3] + [c for c in range(39, -1, -1) if c not in (3, 7)][:28]
    assert most_frequent(candidates, frequency, 30).tolist() == expected


def test_kl_per_position_is_the_direct_sum_and_never_negative() -> None:
    torch.manual_seed(0)
    clean = torch.randn(3, 5, 11).log_softmax(-1)
    edited = torch.randn(3, 5, 11).log_softmax(-1)
    direct = (clean.exp() * (clean - edited)).sum(-1)
    torch.testing.assert_close(kl_per_position(clean, edited), direct)
    # Equal distributions up to one rounding: the raw sum can land below 0; a KL cannot.
    nudged = (clean + 1e-7 * torch.randn_like(clean)).log_softmax(-1)
    assert (kl_per_position(clean, nudged) >= 0).all()
    assert (kl_per_position(clean, clean) == 0).all()
