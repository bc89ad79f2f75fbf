"""The sparse training step against the dense reference: same codes, loss and gradients; the exact two-stage
BatchTopK selection against the flat top-k, on adversarial inputs; the ``step_impl`` and ``threads`` settings.

Tolerances (float summation order is the only difference between the two steps): float32 rtol 1e-5 /
atol 1e-6, float64 rtol 1e-10 / atol 1e-12. The kept entries, their code values and ``min_kept`` are
compared bitwise.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from hydra import compose, initialize_config_dir

import crosscoder_pl.sparse as sparse
import crosscoder_pl.step as step_impls
from crosscoder_pl import CrossCoder, CrossCoderModule
from crosscoder_pl.sparse import SparseCodes, select_batch_topk
from crosscoder_pl.step import LOSSES

D, F, B = 8, 48, 40
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-6}, torch.float64: {"rtol": 1e-10, "atol": 1e-12}}


def _cc(dtype: torch.dtype = torch.float32, n_latents: int = F, seed: int = 0) -> CrossCoder:
    torch.manual_seed(seed)
    cc = CrossCoder(d_model=D, n_latents=n_latents, k=3, scales=[0.5, 4.0]).to(dtype).train()
    with torch.no_grad():
        cc.b_dec.normal_()
        cc.b_enc.uniform_(-0.1, 0.3)
        cc.W_dec.mul_(torch.rand(n_latents, 2, 1, dtype=dtype) * 3)  # unequal decoder norms: the score is not f
    return cc


def _run(cc: CrossCoder, x: torch.Tensor, impl: str, **kw):
    cc.zero_grad(set_to_none=True)
    out = cc.step(x, impl=impl, **kw)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in cc.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [3, 12])  # the final k and an annealing value
@pytest.mark.parametrize("k_aux", [0, 4, 12])  # 0: no dead latent; 12 of 16 dead: AuxK also picks f = 0 entries
@pytest.mark.parametrize("loss", LOSSES)
def test_sparse_step_equals_dense(loss: str, k_aux: int, k: int, dtype: torch.dtype) -> None:
    cc = _cc(dtype)
    x = (torch.randn(B, 2, D) * torch.tensor([3.0, 0.2])[:, None] + 0.5).to(dtype)
    with_dead = k_aux > 0
    dead = (torch.arange(F) % 3 == 0) & with_dead  # 16 dead latents, or none
    kw = {"k": k, "dead": dead, "loss": loss, "aux_coef": 0.5, "k_aux": max(k_aux, 1)}
    dense, dense_grads = _run(cc, x, "dense", **kw)
    sparse_out, sparse_grads = _run(cc, x, "sparse", **kw)

    # the same entries kept, with bitwise the same code values and the same threshold input
    assert torch.equal(sparse_out.active.rows, dense.active.rows)
    assert torch.equal(sparse_out.active.cols, dense.active.cols)
    assert torch.equal(sparse_out.active.values.detach(), dense.active.values.detach())
    assert torch.equal(sparse_out.codes.detach(), dense.codes.detach())
    assert torch.equal(sparse_out.min_kept, dense.min_kept)
    assert int((dense.codes > 0).sum()) == k * B  # every kept score positive: exactly k per token on average
    tol = TOL[dtype]
    for name in ("loss", "recon", "aux", "unit", "x_hat"):
        torch.testing.assert_close(getattr(sparse_out, name), getattr(dense, name), **tol)
    assert (float(dense.aux.detach()) > 0) == with_dead
    if with_dead:  # dead latents that are also kept: their gradients come through both paths
        assert bool(dead[dense.active.cols].any())
    if k_aux == 12:  # some tokens have fewer positive dead latents than k_aux: selected entries with f = 0
        f_dead = cc._pre_acts_normalised(dense.x)[:, dead]
        assert bool(((f_dead > 0).sum(-1) < 12).any())
    assert sparse_grads.keys() == dense_grads.keys() == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name, grad in dense_grads.items():
        assert grad.abs().max() > 0
        torch.testing.assert_close(sparse_grads[name], grad, **tol, msg=lambda m, name=name: f"{name}: {m}")


def test_sparse_gradients_touch_only_the_active_latents() -> None:
    """A latent with no kept entry in the batch (and not dead) gets exactly zero encoder and decoder gradients;
    the active ones get non-zero ones."""
    cc = _cc(n_latents=256)
    x = torch.randn(16, 2, D)
    dead = torch.zeros(256, dtype=torch.bool)
    dead[[5, 77, 200]] = True
    out, grads = _run(cc, x, "sparse", k=2, dead=dead, aux_coef=0.5, k_aux=2)
    touched = torch.zeros(256, dtype=torch.bool)
    touched[out.active.cols] = True
    aux_touched = touched | dead
    assert 0 < int(touched.sum()) < 64  # most latents inactive
    assert not grads["W_dec"][~aux_touched].any() and not grads["W_enc"][..., ~aux_touched].any()
    assert not grads["b_enc"][~aux_touched].any()
    assert grads["W_dec"][touched].flatten(1).norm(dim=-1).min() > 0
    assert grads["W_enc"][..., touched].flatten(0, 1).norm(dim=0).min() > 0


def test_sparse_step_under_no_grad_and_with_input_gradients() -> None:
    """The step runs under ``torch.no_grad`` (the module's tests call it so) and, if the input requires a
    gradient, gives the dense step's input gradient."""
    cc = _cc(torch.float64)
    x = torch.randn(B, 2, D, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(cc.step(x, 3, impl="sparse").loss, cc.step(x, 3, impl="dense").loss)
    grads = []
    dead = torch.arange(F) % 4 == 1
    for impl in ("dense", "sparse"):
        xg = x.clone().requires_grad_()
        cc.step(xg, 3, dead, aux_coef=0.5, k_aux=3, impl=impl).loss.backward()
        grads.append(xg.grad)
    torch.testing.assert_close(grads[1], grads[0], **TOL[torch.float64])


def test_impl_option_is_compared_by_value(monkeypatch) -> None:
    """Each impl runs its own forward, and an impl name read from a config file is an equal string, not
    necessarily the same object."""
    calls = []
    for name in ("_forward_sparse", "_forward_dense"):
        forward = getattr(step_impls, name)
        monkeypatch.setattr(step_impls, name, lambda cc, *a, name=name, forward=forward: calls.append(name) or forward(cc, *a))
    for impl in ("sparse", "dense"):
        _cc().step(torch.randn(4, 2, D), 3, impl="".join(list(impl)))
    assert calls == ["_forward_sparse", "_forward_dense"]


def test_unknown_impl_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"impl='fast' is not one of \('sparse', 'dense'\)"):
        _cc().step(torch.randn(4, 2, D), 3, impl="fast")
    with pytest.raises(ValueError, match="crosscoder.step_impl='fast' must be one of 'sparse', 'dense'"):
        CrossCoderModule(D, {"n_latents": F, "k": 3, "step_impl": "fast"})


def test_pre_acts_at_matches_autograd_of_the_dense_relu() -> None:
    """Entries anywhere (negative pre-activations, repeats) and a block of columns: values and the gradients
    of x, W and b equal those of ``relu(x @ W + b)`` at the entries and ``x @ W + b`` in the block (AuxK's dead
    columns come before the ReLU), indexed the same way."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(12, 10, dtype=torch.float64, generator=g)
    W = torch.randn(10, 30, dtype=torch.float64, generator=g)
    b = torch.randn(30, dtype=torch.float64, generator=g)
    rows = torch.randint(12, (50,), generator=g).sort().values
    cols = torch.randint(30, (50,), generator=g)
    block_cols = torch.tensor([3, 7, 7, 29])
    w_values = torch.randn(50, dtype=torch.float64, generator=g)
    w_block = torch.randn(12, 4, dtype=torch.float64, generator=g)
    grads = []
    for use_sparse in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x, W, b)]
        if use_sparse:
            pre = torch.addmm(leaves[2], leaves[0], leaves[1]).detach()
            values, block = sparse.pre_acts_at(*leaves, pre, rows, cols, block_cols)
        else:
            pre = leaves[0] @ leaves[1] + leaves[2]
            values, block = pre.relu()[rows, cols], pre[:, block_cols]
        ((values * w_values).sum() + (block * w_block).sum()).backward()
        grads.append([values.detach(), block.detach(), *(t.grad for t in leaves)])
    assert bool((grads[1][0] == 0).any())  # some entries sit where the ReLU is off
    assert bool((grads[1][1] < 0).any())  # and the block keeps negative pre-activations
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("needs", ["x", "W", "b", "xb"])
def test_pre_acts_at_gives_each_requested_gradient_alone(needs: str) -> None:
    """Only some of ``x``, ``W``, ``b`` require a gradient (a frozen encoder, a data gradient): each one that does
    gets the dense ReLU's gradient, the others none."""
    g = torch.Generator().manual_seed(10)
    x = torch.randn(9, 6, dtype=torch.float64, generator=g)
    W = torch.randn(6, 20, dtype=torch.float64, generator=g)
    b = torch.randn(20, dtype=torch.float64, generator=g)
    rows = torch.randint(9, (30,), generator=g).sort().values
    cols = torch.randint(20, (30,), generator=g)
    block_cols = torch.tensor([2, 11])
    w_values = torch.randn(30, dtype=torch.float64, generator=g)
    w_block = torch.randn(9, 2, dtype=torch.float64, generator=g)
    grads = []
    for use_sparse in (True, False):
        leaves = [t.clone().requires_grad_(name in needs) for name, t in zip("xWb", (x, W, b))]
        if use_sparse:
            values, block = sparse.pre_acts_at(*leaves, torch.addmm(b, x, W), rows, cols, block_cols)
        else:
            pre = leaves[0] @ leaves[1] + leaves[2]
            values, block = pre.relu()[rows, cols], pre[:, block_cols]
        ((values * w_values).sum() + (block * w_block).sum()).backward()
        grads.append([t.grad for t in leaves])
    for name, got, want in zip("xWb", *grads):
        assert (got is None) == (want is None) == (name not in needs), name
        if want is not None:
            torch.testing.assert_close(got, want, **TOL[torch.float64])


# ------------------------------------------------------------------------------------------ selection
def _flat(pre: torch.Tensor, weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: dense codes and min_kept of the flat top-k (CrossCoder.batch_topk's rule)."""
    f = pre.relu()
    scores = (f * weight).reshape(-1)
    values, idx = scores.topk(min(k * pre.shape[0], pre.numel()))
    codes = torch.zeros_like(f).view(-1).index_put((idx,), f.reshape(-1)[idx]).view_as(f)
    positive = values[values > 0]
    return codes, positive.min() if positive.numel() else torch.tensor(float("inf"))


def _two_stage(pre: torch.Tensor, weight: torch.Tensor, k: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    flat, scores, min_kept = select_batch_topk(pre, weight, k, **kw)
    assert torch.equal(flat, flat.sort().values) and flat.unique().numel() == flat.numel()
    torch.testing.assert_close(scores, (pre.reshape(-1)[flat] * weight.repeat(pre.shape[0])[flat]), rtol=0, atol=0,
                               equal_nan=True)
    codes = torch.zeros_like(pre).view(-1).index_put((flat,), pre.reshape(-1)[flat]).view_as(pre)
    return codes, min_kept


def _assert_same_selection(pre: torch.Tensor, weight: torch.Tensor, k: int, **kw) -> torch.Tensor:
    codes, min_kept = _two_stage(pre, weight, k, **kw)
    want, want_min = _flat(pre, weight, k)
    torch.testing.assert_close(codes, want, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(min_kept, want_min)
    return codes


def test_selection_equals_flat_topk_on_random_scores() -> None:
    g = torch.Generator().manual_seed(1)
    for n_rows, n_cols, k in ((64, 512, 4), (7, 33, 5), (300, 1024, 32), (1, 100, 9)):
        pre = torch.randn(n_rows, n_cols, generator=g)
        weight = torch.rand(n_cols, generator=g) + 0.1
        codes = _assert_same_selection(pre, weight, k)
        assert int((codes > 0).sum()) == k * n_rows


def test_selection_when_one_token_holds_every_winner() -> None:
    """Adversarial for any per-row candidate scheme: all k * batch winners sit in one row."""
    g = torch.Generator().manual_seed(2)
    pre = torch.rand(64, 512, generator=g)
    pre[17] += 10.0  # row 17 outscores every other entry; k * batch = 256 <= 512 winners, all in it
    weight = torch.rand(512, generator=g) + 0.5
    codes = _assert_same_selection(pre, weight, 4)
    assert int((codes[17] > 0).sum()) == 256 and not codes[torch.arange(64) != 17].any()
    # half the winners in one row, the rest spread
    pre = torch.rand(64, 512, generator=g)
    pre[3, :128] += 10.0
    _assert_same_selection(pre, weight, 4)


def test_selection_winners_in_few_columns_and_rows_with_nothing_positive() -> None:
    g = torch.Generator().manual_seed(3)
    pre = torch.randn(128, 256, generator=g) - 3.0  # few positive entries
    pre[:, :5] += 6.0  # and five latents that win on every token
    weight = torch.rand(256, generator=g) + 0.5
    _assert_same_selection(pre, weight, 8)
    # fewer positive scores than k * batch: every positive entry is kept, the rest are zeros
    pre = torch.randn(32, 64, generator=g) - 2.5
    n_positive = int((pre > 0).sum())
    assert 0 < n_positive < 4 * 32
    codes = _assert_same_selection(pre, torch.rand(64, generator=g) + 0.5, 4)
    assert int((codes > 0).sum()) == n_positive
    # nothing positive at all, and k * batch equal to every entry
    _assert_same_selection(-torch.rand(8, 16, generator=g), torch.ones(16), 3)
    _assert_same_selection(torch.randn(8, 16, generator=g), torch.rand(16, generator=g), 16)


@pytest.mark.parametrize("guess", ["too_high", "exactly_the_kth", "too_low", "one_and_too_high"])
def test_selection_is_exact_whatever_the_first_threshold(guess: str, monkeypatch) -> None:
    """The sample only places the first threshold: planted wrong guesses cost a second pass, never a wrong set."""
    g = torch.Generator().manual_seed(4)
    pre = torch.randn(50, 200, generator=g)
    if guess == "one_and_too_high":  # a threshold of exactly 1.0 with fewer than k * batch scores above it
        pre = pre * 0.25
    weight = torch.rand(200, generator=g) + 0.5
    k = 6
    scores = (pre.relu() * weight).reshape(-1).sort(descending=True).values
    first = {"too_high": scores[20], "exactly_the_kth": scores[k * 50 - 1], "too_low": scores[1000],
             "one_and_too_high": torch.tensor(1.0)}[guess]
    if guess == "one_and_too_high":
        assert 0 < int((scores > 1.0).sum()) < k * 50
    assert float(first) > 0  # a positive guess: only a pass at 0 could end the search otherwise
    monkeypatch.setattr(sparse, "_thresholds", lambda *a: [float(first), 0.0])
    passes = []
    candidates = sparse._candidates
    monkeypatch.setattr(sparse, "_candidates", lambda *a: passes.append(a[2]) or candidates(*a))
    _assert_same_selection(pre, weight, k)
    # the K-th score itself is not a candidate (strictly greater), so that guess needs the second pass too
    assert passes == ([float(first)] if guess == "too_low" else [float(first), 0.0])


def test_sample_thresholds_decrease_to_zero_and_pass_about_twice_k() -> None:
    g = torch.Generator().manual_seed(5)
    pre = torch.randn(1024, 4096, generator=g)
    weight = torch.rand(4096, generator=g) + 0.5
    n_keep = 32 * 1024
    thresholds = sparse._thresholds(pre.reshape(-1), weight, n_keep, sparse.SAMPLE_SIZE)
    assert thresholds[-1] == 0.0 and thresholds == sorted(thresholds, reverse=True)
    assert len(set(thresholds)) == len(thresholds)
    passed = int(((pre * weight) > thresholds[0]).sum())
    assert n_keep < passed < 4 * n_keep  # one pass suffices, and stage 2 ranks a few times k * batch


def test_sample_thresholds_score_each_entry_with_its_own_latents_weight() -> None:
    """Latents of two kinds: large pre-activations with tiny weights, small ones with weight 1. Only scores taken
    with each entry's own latent's weight place the first threshold where about twice k * batch pass."""
    g = torch.Generator().manual_seed(12)
    n_rows, n_cols = 512, 1024
    even = torch.arange(n_cols) % 2 == 0
    pre = torch.where(even, 10.0, 1.0) * (1 + 0.1 * torch.rand(n_rows, n_cols, generator=g))
    weight = torch.where(even, 0.01, 1.0) * (1 + 0.1 * torch.rand(n_cols, generator=g))
    n_keep = 16 * n_rows
    thresholds = sparse._thresholds(pre.reshape(-1), weight, n_keep, sparse.SAMPLE_SIZE)
    passed = int(((pre * weight) > thresholds[0]).sum())
    assert n_keep < passed < 4 * n_keep


def test_sample_thresholds_are_positive_distinct_and_end_with_zero_on_any_scores() -> None:
    """Few distinct values (ties at the sampled ranks), exact zeros, negative and NaN scores: the list strictly
    decreases through positive values to a single final 0."""
    g = torch.Generator().manual_seed(13)
    cases = [
        (torch.rand(256, 512, generator=g) * 4).floor(),  # 0, 1, 2, 3: ties and zeros
        (torch.rand(256, 512, generator=g) > 0.99).float(),  # mostly exact zeros
        -torch.rand(64, 64, generator=g),  # every score negative
        torch.where(torch.rand(128, 256, generator=g) > 0.5, float("nan"), 1.0),  # half NaN
        torch.where(torch.rand(512, 256, generator=g) > 0.99, 5.0, 1.0),  # 1% high, then one value at every rank
    ]
    for pre in cases:
        weight = torch.ones(pre.shape[1])
        for n_keep in (4, 512, 4096):
            thresholds = sparse._thresholds(pre.reshape(-1), weight, n_keep, sparse.SAMPLE_SIZE)
            assert thresholds[-1] == 0.0 and all(t > 0 for t in thresholds[:-1]), thresholds
            assert all(a > b for a, b in itertools.pairwise(thresholds)), thresholds


def test_selection_equals_flat_topk_on_every_small_shape() -> None:
    """Every small shape and k, down to one entry and k * batch equal to every entry (the sampled ranks reach the
    sample's size there)."""
    g = torch.Generator().manual_seed(14)
    for n_rows in (1, 2, 3):
        for n_cols in range(1, 25):
            for k in sorted({1, 2, 5, n_cols}):
                pre = torch.randn(n_rows, n_cols, generator=g)
                _assert_same_selection(pre, torch.rand(n_cols, generator=g) + 0.5, k)


def test_selection_ties_keep_the_same_scores() -> None:
    """Many entries share the k*batch-th score: which of them are kept may differ from the flat top-k's choice,
    but the count, the kept score multiset, every entry above the tie and min_kept are the same."""
    g = torch.Generator().manual_seed(6)
    pre = (torch.rand(40, 64, generator=g) * 4).floor() / 4  # 4 distinct values
    weight = torch.ones(64)
    flat, scores, min_kept = select_batch_topk(pre, weight, 5)
    want, want_min = _flat(pre, weight, 5)
    kept = pre.reshape(-1)[flat]
    assert kept.numel() == int((want > 0).sum())
    assert torch.equal(kept.sort().values, want[want > 0].sort().values)
    assert torch.equal(min_kept, want_min)
    above = pre.reshape(-1) > want_min
    assert torch.isin(above.nonzero().squeeze(1), flat).all()


def test_selection_keeps_nan_first_and_min_kept_ignores_it() -> None:
    """As the flat top-k: a NaN score ranks first and is kept (the loss turns NaN and the module raises)."""
    g = torch.Generator().manual_seed(7)
    pre = torch.randn(16, 32, generator=g)
    pre[3, 4] = float("nan")
    codes = _assert_same_selection(pre, torch.rand(32, generator=g) + 0.5, 2)
    assert codes[3, 4].isnan()


def test_selection_of_an_empty_batch_keeps_nothing() -> None:
    """A rank may hold no tokens: nothing kept, min_kept inf, as the flat top-k of nothing."""
    flat, scores, min_kept = select_batch_topk(torch.zeros(0, 16), torch.ones(16), 3)
    assert flat.numel() == 0 and scores.numel() == 0 and flat.dtype == torch.long
    assert float(min_kept) == float("inf")


def test_selection_when_one_row_is_wider_than_a_cpu_chunk() -> None:
    """More latents than one CPU chunk holds (CHUNK_ELEMENTS): one row per chunk, the same selection."""
    g = torch.Generator().manual_seed(11)
    n_cols = sparse.CHUNK_ELEMENTS + 7
    pre = torch.randn(3, n_cols, generator=g)
    _assert_same_selection(pre, torch.rand(n_cols, generator=g) + 0.5, 5)


# ------------------------------------------------------------------------------------------ codes
def test_sparse_codes_round_trip_and_statistics() -> None:
    g = torch.Generator().manual_seed(8)
    codes = torch.rand(6, 10, generator=g) * (torch.rand(6, 10, generator=g) > 0.7)
    active = SparseCodes.from_dense(codes)
    assert torch.equal(active.to_dense(), codes)
    assert torch.equal(active.fired(), (codes > 0).any(0))
    assert torch.equal(active.l0(), (codes > 0).sum(-1))
    assert active.shape == (6, 10) and torch.equal(active.rows, active.rows.sort().values)
    with pytest.raises(dataclasses.FrozenInstanceError):  # StepOutput holds it: frozen too
        active.values = torch.zeros(1)


def test_sparse_codes_statistics_count_only_positive_entries() -> None:
    """Entries given explicitly (zero, negative and NaN values included): fired() and l0() are those of the dense
    codes, ``(codes > 0).any(0)`` and ``(codes > 0).sum(-1)``."""
    rows = torch.tensor([0, 1, 2, 3, 3, 4])
    cols = torch.tensor([1, 4, 2, 0, 3, 5])
    values = torch.tensor([0.5, 0.0, -1.0, float("nan"), 2.0, 3.0])  # 0, -1 and NaN alone in their row and column
    active = SparseCodes(rows, cols, values, (6, 6))
    dense = active.to_dense()
    assert dense[3, 0].isnan() and dense[2, 2] == -1.0
    assert active.fired().tolist() == (dense > 0).any(0).tolist() == [False, True, False, True, False, True]
    assert active.l0().tolist() == (dense > 0).sum(-1).tolist() == [1, 0, 0, 1, 1, 0]


# ------------------------------------------------------------------------------------------ settings
def test_module_trains_with_the_configured_step(monkeypatch) -> None:
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    calls = []
    step = CrossCoder.step
    monkeypatch.setattr(CrossCoder, "step", lambda self, *a, **kw: calls.append(kw["impl"]) or step(self, *a, **kw))
    x = torch.randn(64, 2, D)
    for impl in ("dense", "sparse"):
        module = CrossCoderModule(D, {"n_latents": F, "k": 3, "scales": [1.0, 1.0], "step_impl": impl})
        trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, accelerator="cpu", gradient_clip_val=1.0)
        trainer.fit(module, DataLoader(TensorDataset(x), batch_size=16))
        assert trainer.optimizers[0].param_groups[0]["fused"] is True
    assert calls == ["dense", "dense", "sparse", "sparse"]


def _compose(*overrides: str):
    from pathlib import Path

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_step_impl_and_threads_are_settings() -> None:
    cfg = _compose("output_dir=/tmp/x")
    assert cfg.crosscoder.step_impl == "sparse" and cfg.threads is None
    assert _compose("+experiment=papergrade").crosscoder.step_impl == "sparse"


def test_threads_setting_is_applied_at_the_start_of_training(monkeypatch) -> None:
    import crosscoder_pl.training as training

    before, precision = torch.get_num_threads(), torch.get_float32_matmul_precision()
    want = before + 1
    seen = []

    class Stop(Exception):
        pass

    def first_build(*args, **kwargs):  # the model pair: the first thing built after the settings
        seen.append(torch.get_num_threads())
        raise Stop

    monkeypatch.setattr(training, "build_pair", first_build)
    try:
        with pytest.raises(Stop):
            training.train(training.RunConfig.from_hydra(_compose(f"threads={want}", "output_dir=/tmp/x")))
        assert seen == [want]
        torch.set_num_threads(before)
        with pytest.raises(Stop):
            training.train(training.RunConfig.from_hydra(_compose("output_dir=/tmp/x")))  # null: torch's default left alone
        assert seen == [want, before]
    finally:  # train() also sets the matmul precision before it builds anything
        torch.set_num_threads(before)
        torch.set_float32_matmul_precision(precision)


@pytest.mark.parametrize("threads", [0, -2, 1.5, True])
def test_bad_threads_fail_at_validation_naming_the_key(threads) -> None:
    from crosscoder_pl.training import check_config

    with pytest.raises(ValueError, match="threads="):
        check_config(_compose(f"threads={str(threads).lower()}", "output_dir=/tmp/x"))
