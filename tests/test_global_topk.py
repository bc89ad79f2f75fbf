"""The step under data parallelism is the single-process step, without processes: ranks are threads
(tests/threaded_ranks.py) holding slices of one batch.

Known answers: the union of the ranks' kept entries is the flat single-process selection of the whole batch (the
same entries when scores are distinct; with ties the same count and score multiset), ``min_kept`` is the same
value bitwise; the loss parts equal the single process's and the mean of the ranks' gradients (what DDP
applies) equals the single process's gradient, within float32 summation order: rtol 1e-5, atol 1e-6 (measured
max |Δ| about 1e-7).
"""

import copy
import math

import pytest
import torch
from threaded_ranks import run_ranks

from crosscoder_pl.crosscoder import CrossCoder
from crosscoder_pl.distributed import distributed, keep_global_top

RTOL, ATOL = 1e-5, 1e-6


def _split(n: int, sizes: list[int]) -> list[slice]:
    assert sum(sizes) == n
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [slice(a, a + s) for a, s in zip(starts, sizes)]


def _global_keep(scores: torch.Tensor, n_keep: int, sizes: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """keep_global_top on the ranks' slices of ``scores [n]`` (each rank's candidates: its positive/NaN scores among
    its own top n_keep): the kept global positions (sorted) and every rank's min_kept."""
    parts = _split(scores.numel(), sizes)

    def rank(reducer) -> tuple[torch.Tensor, torch.Tensor]:
        local = scores[parts[reducer.rank]]
        top = local.topk(min(n_keep, local.numel())).indices
        top = top[(local[top] > 0) | local[top].isnan()].sort().values
        keep, min_kept = keep_global_top(local[top], n_keep, reducer)
        return top[keep] + parts[reducer.rank].start, min_kept

    out = run_ranks(len(sizes), rank)
    return torch.cat([kept for kept, _ in out]).sort().values, [m for _, m in out]


def _flat(scores: torch.Tensor, n_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The single-process rule (CrossCoder.batch_topk): top n_keep, positive (or NaN) entries, min positive kept."""
    values, idx = scores.topk(min(n_keep, scores.numel()))
    kept = idx[(values > 0) | values.isnan()].sort().values
    positive = values[values > 0]
    return kept, positive.min() if positive.numel() else torch.tensor(math.inf)


@pytest.mark.parametrize("sizes", [[40, 40], [10, 50, 20], [80, 0], [1, 79]])
@pytest.mark.parametrize("n_keep", [1, 7, 30, 80, 500])
def test_global_cut_keeps_the_flat_selection(sizes: list[int], n_keep: int) -> None:
    g = torch.Generator().manual_seed(n_keep + len(sizes))
    scores = torch.randn(80, generator=g).relu_()  # about half 0: some n_keep exceed the positive entries
    kept, mins = _global_keep(scores, n_keep, sizes)
    want, want_min = _flat(scores, n_keep)
    assert torch.equal(kept, want)
    for m in mins:
        assert torch.equal(m, want_min)


def test_global_cut_when_every_winner_sits_on_one_rank() -> None:
    scores = torch.cat([torch.rand(50) + 1.0, torch.rand(50) * 0.5])  # rank 0's scores all above rank 1's
    for n_keep in (10, 50, 60):
        kept, mins = _global_keep(scores, n_keep, [50, 50])
        want, want_min = _flat(scores, n_keep)
        assert torch.equal(kept, want)
        assert bool((kept < 50).all()) == (n_keep <= 50)
        assert all(torch.equal(m, want_min) for m in mins)


def test_global_cut_with_ties_keeps_the_count_and_the_multiset() -> None:
    scores = torch.tensor([3.0, 2.0, 2.0, 1.0, 2.0, 2.0, 2.0, 0.5, 2.0, 1.0])  # 6 entries tie at 2.0
    for n_keep in (2, 4, 7):
        kept, mins = _global_keep(scores, n_keep, [4, 3, 3])
        want, want_min = _flat(scores, n_keep)
        assert kept.numel() == want.numel() == n_keep
        assert torch.equal(scores[kept].sort().values, scores[want].sort().values)
        assert all(torch.equal(m, want_min) for m in mins)
    kept, _ = _global_keep(scores, 4, [4, 3, 3])
    assert kept.tolist() == [0, 1, 2, 4]  # the ties go to the lowest ranks first, then in each rank's order


def test_global_cut_over_nan_and_nothing_positive() -> None:
    scores = torch.tensor([1.0, float("nan"), 0.0, 2.0, 0.0, 0.0])
    kept, mins = _global_keep(scores, 2, [3, 3])
    assert kept.tolist() == [1, 3]  # NaN first, as torch.topk ranks it
    assert all(float(m) == 2.0 for m in mins)  # and never the smallest positive kept score
    kept, mins = _global_keep(torch.zeros(6), 3, [3, 3])
    assert kept.numel() == 0 and all(float(m) == math.inf for m in mins)


def test_global_cut_at_a_nan_keeps_the_nans_and_no_min_kept() -> None:
    """As many NaN scores as entries to keep: the cut itself is NaN (the top key); the NaNs are kept and, no
    positive score being kept, min_kept is inf, as the flat top-k gives it."""
    scores = torch.tensor([1.0, float("nan"), 3.0, 0.0, float("nan"), 2.0])
    for n_keep in (1, 2):
        kept, mins = _global_keep(scores, n_keep, [3, 3])
        _, want_min = _flat(scores, n_keep)
        assert kept.numel() == n_keep and bool(scores[kept].isnan().all())
        assert float(want_min) == math.inf and all(float(m) == math.inf for m in mins)
    kept, mins = _global_keep(scores, 3, [3, 3])
    assert kept.tolist() == [1, 2, 4] and all(float(m) == 3.0 for m in mins)


def test_global_cut_in_float64_and_bfloat16() -> None:
    for dtype in (torch.float64, torch.bfloat16):
        scores = torch.rand(64, generator=torch.Generator().manual_seed(3)).to(dtype)
        kept, mins = _global_keep(scores, 20, [16, 48])
        want, want_min = _flat(scores, 20)
        assert torch.equal(scores[kept].sort().values, scores[want].sort().values)
        assert all(torch.equal(m, want_min.to(dtype)) for m in mins)


def test_a_world_of_one_is_the_single_process_path() -> None:
    assert run_ranks(1, distributed) == [None]
    assert distributed(None) is None


# --- the whole step: 2 threads x half a batch == one process x the batch ---------------------------------


def _model(seed: int = 0) -> CrossCoder:
    torch.manual_seed(seed)
    cc = CrossCoder(d_model=8, n_latents=64, k=4, scales=[0.7, 1.3])
    with torch.no_grad():
        cc.b_enc.normal_(0.0, 0.05)
        cc.b_dec.normal_(0.0, 0.1)
    return cc


def _batch(n: int, one_sided: bool = False) -> torch.Tensor:
    x = torch.randn(n, 2, 8, generator=torch.Generator().manual_seed(1)) + 0.3
    if one_sided:  # rank 1's tokens get tiny scores: every kept entry sits on rank 0
        x[n // 2 :] *= 1e-3
    return x


def _run(cc: CrossCoder, x: torch.Tensor, sizes: list[int] | None, impl: str, loss: str, dead: torch.Tensor,
         k: int) -> list[dict]:
    """Each rank's step on its slice (one rank with the whole batch when ``sizes`` is None): the kept entries in
    global coordinates, the reported values and the gradients of its loss."""

    def rank(reducer) -> dict:
        part = slice(None) if reducer is None else _split(x.shape[0], sizes)[reducer.rank]
        model = copy.deepcopy(cc)  # a DDP replica
        out = model.step(x[part], k, dead, loss=loss, aux_coef=0.5, k_aux=3, impl=impl, reducer=reducer)
        grads = torch.autograd.grad(out.loss, list(model.parameters()))
        offset = 0 if reducer is None else part.start
        kept = sorted(zip((out.active.rows + offset).tolist(), out.active.cols.tolist()))
        return {"kept": kept, "values": out.active.values.detach(), "min_kept": out.min_kept, "grads": grads,
                **{name: getattr(out, name).detach() for name in ("loss", "recon", "aux", "unit")}, "n": out.n_tokens,
                "calls": 0 if reducer is None else reducer.calls}

    return [rank(None)] if sizes is None else run_ranks(len(sizes), rank)


@pytest.mark.parametrize("impl", ["sparse", "dense"])
@pytest.mark.parametrize(("loss", "sizes", "one_sided"), [
    ("mse", [32, 32], False), ("l2", [32, 32], False), ("mse", [20, 44], False), ("mse", [32, 32], True),
])
def test_two_ranks_compute_the_single_process_step(impl: str, loss: str, sizes: list[int], one_sided: bool) -> None:
    cc, x = _model(), _batch(64, one_sided)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True  # AuxK acts
    k = 4
    (one,) = _run(cc, x, None, impl, loss, dead, k)
    ranks = _run(cc, x, sizes, impl, loss, dead, k)
    kept = sorted(e for r in ranks for e in r["kept"])
    assert kept == one["kept"]  # the entries of the flat selection over the whole batch
    assert len(kept) == k * 64
    if one_sided:
        assert ranks[1]["kept"] == [] and len(ranks[0]["kept"]) == k * 64
    else:  # the ranks keep unequal shares: a per-rank selection could not give this
        assert len(ranks[0]["kept"]) != k * sizes[0]
    for r in ranks:
        assert torch.equal(r["min_kept"], one["min_kept"])
        assert r["n"] == one["n"] == 64
        for name in ("loss", "recon", "aux", "unit"):
            torch.testing.assert_close(r[name], one[name], rtol=RTOL, atol=ATOL, msg=name)
    assert float(one["aux"]) > 0  # AuxK acted
    # DDP applies the mean of the ranks' gradients.
    names = [name for name, _ in cc.named_parameters()]
    for i, name in enumerate(names):
        mean = torch.stack([r["grads"][i] for r in ranks]).mean(0)
        torch.testing.assert_close(mean, one["grads"][i], rtol=RTOL, atol=ATOL, msg=name)
    assert ranks[0]["calls"] == 8  # few collectives: 1 batch sum, 4 histograms + 1 tie count, 2 loss sums


def test_the_sparse_and_dense_steps_keep_the_same_entries_under_two_ranks() -> None:
    cc, x = _model(2), _batch(64)
    dead = torch.zeros(64, dtype=torch.bool)
    sparse = _run(cc, x, [32, 32], "sparse", "mse", dead, 6)
    dense = _run(cc, x, [32, 32], "dense", "mse", dead, 6)
    for s, d in zip(sparse, dense):
        assert s["kept"] == d["kept"]
        assert torch.equal(s["min_kept"], d["min_kept"])


@pytest.mark.parametrize("impl", ["sparse", "dense"])
@pytest.mark.parametrize("case", ["k_is_F", "k_above_F", "small_activations", "nothing_to_explain", "one_token_rank"])
def test_two_ranks_compute_the_single_process_step_at_the_edges(impl: str, case: str) -> None:
    """Every entry kept (k = F, and k above F: the cut clips to B_global * F and zero scores stay out, so min_kept is
    the smallest positive one); activations so small that AuxK's normalisation is far below 1 (used as is, not
    clamped); zero activations and no latent firing (residual exactly 0: AuxK's normalisation is clamped, AuxK is 0,
    not NaN); a rank holding a single token."""
    cc, x = _model(3), _batch(32)
    k = {"k_is_F": 64, "k_above_F": 128}.get(case, 4)
    if case == "small_activations":
        with torch.no_grad():
            cc.b_dec.zero_()
            cc.W_dec.mul_(1e-2)
        x = x * 1e-2
    if case == "nothing_to_explain":
        with torch.no_grad():
            cc.b_dec.zero_()
            cc.b_enc.fill_(-1.0)
        x = torch.zeros(32, 2, 8)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[1::4] = True
    (one,) = _run(cc, x, None, impl, "mse", dead, k)
    ranks = _run(cc, x, [1, 31] if case == "one_token_rank" else [12, 20], impl, "mse", dead, k)
    assert sorted(e for r in ranks for e in r["kept"]) == one["kept"]
    if case in ("k_is_F", "k_above_F"):
        n_positive = len(one["kept"])
        assert 0 < n_positive < 32 * 64  # some scores are 0: all positive ones kept, no zero one
        assert 0 < float(one["min_kept"]) < math.inf
    if case == "small_activations":
        assert float(one["unit"]) < 0.1 and float(one["aux"]) > 0
    if case == "nothing_to_explain":
        assert one["kept"] == [] and float(one["aux"]) == 0.0 and float(one["min_kept"]) == math.inf
    for r in ranks:
        assert torch.equal(r["min_kept"], one["min_kept"])
        for name in ("loss", "recon", "aux", "unit"):
            assert torch.isfinite(r[name]), name
            torch.testing.assert_close(r[name], one[name], rtol=RTOL, atol=ATOL, msg=name)
    names = [name for name, _ in cc.named_parameters()]
    for i, name in enumerate(names):
        mean = torch.stack([r["grads"][i] for r in ranks]).mean(0)
        torch.testing.assert_close(mean, one["grads"][i], rtol=RTOL, atol=ATOL, msg=name)
