"""Outlier tokens: counted per model in every pass the data modules make, kept unless drop_outliers, resumable,
and stated in the model card and metrics.json."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest
import torch
from test_data_datamodule import datamodule
from test_resume import weights_only_roundtrip

from crosscoder_pl.artifact.writer import run_analyses
from crosscoder_pl.config import AnalysisConfig, CachedDataConfig, ConfigError
from crosscoder_pl.data import datamodule as datamodule_module
from crosscoder_pl.data.cache import read_meta, write_cache
from crosscoder_pl.data.cached import CachedActivationDataModule
from crosscoder_pl.data.datamodule import write_activation_cache
from crosscoder_pl.data.outliers import OutlierCounts, outlier_flags, screen, upgraded

PLANTED = 3  # chat outliers planted in every group of texts, at 10x the median norm


def planted(n: int = 100, rows: tuple[int, ...] = (7, 20, 61), seed: int = 0) -> torch.Tensor:
    """``[n, 2, 8]`` tokens of norm 1 in both models, except ``rows``: norm 10 in the chat model only."""
    acts = torch.randn(n, 2, 8, generator=torch.Generator().manual_seed(seed))
    acts = acts / acts.norm(dim=-1, keepdim=True)
    acts[list(rows), 1] *= 10
    return acts


def test_planted_chat_outliers_are_counted_per_model_and_dropped_only_when_asked() -> None:
    acts = planted()
    assert acts.norm(dim=-1).median(dim=0).values.tolist() == pytest.approx([1.0, 1.0])
    kept = OutlierCounts()
    assert screen(acts, 3.0, False, kept) is None  # counted, every row kept
    assert kept == OutlierCounts(tokens=100, base=0, chat=3, either=3)
    dropped = OutlierCounts()
    keep = screen(acts, 3.0, True, dropped)
    assert dropped == kept and keep.sum() == 97 and (~keep).nonzero().flatten().tolist() == [7, 20, 61]
    nothing = OutlierCounts()
    assert screen(acts, None, True, nothing) is None and nothing == OutlierCounts()  # no factor: nothing counted


def test_counts_add_up_round_trip_and_log_as_fractions() -> None:
    flags = outlier_flags(planted(), 3.0)
    assert flags.shape == (100, 2) and flags[:, 0].sum() == 0
    total = OutlierCounts()
    for _ in range(2):
        total.add(OutlierCounts.of(flags))
    again = OutlierCounts()
    again.load_state_dict(weights_only_roundtrip(total.state_dict()))
    assert again == total == OutlierCounts(200, 0, 6, 6)
    logged = total.as_dict()
    assert logged["data/outlier_frac_chat"] == 0.03 and logged["data/outlier_frac_base"] == 0.0
    assert logged["data/outliers_chat"] == 6.0 and logged["data/outlier_screened_tokens"] == 200.0
    assert OutlierCounts().as_dict() == {}


def test_settings_written_before_drop_outliers_keep_their_meaning() -> None:
    assert upgraded({"outlier_factor": 5.0})["drop_outliers"] is True  # a factor used to drop
    assert upgraded({"outlier_factor": None})["drop_outliers"] is False
    assert upgraded({"outlier_factor": 5.0, "drop_outliers": False})["drop_outliers"] is False
    assert "drop_outliers" not in upgraded({"layer": 1})


def test_dropping_without_a_factor_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.drop_outliers=true but data.outlier_factor=null.*set "
                                          r"data.outlier_factor \(e.g. 3.0"):
        datamodule(tmp_path, outlier_factor=None, drop_outliers=True)


# ------------------------------------------------------------------------------------------- the data module
@pytest.fixture()
def groups(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every extraction returns tokens of norm 1 with the first `PLANTED` chat tokens at norm 10; records the rows
    of each call (one call per group of texts, unless the memo holds some of its documents)."""
    extract = datamodule_module.paired_activations_with_tokens
    sizes: list[int] = []

    def planting(pair, texts, *args, **kwargs):
        acts, table = extract(pair, texts, *args, **kwargs)
        acts = acts / acts.norm(dim=-1, keepdim=True)
        acts[:PLANTED, 1] *= 10
        sizes.append(len(acts))
        return acts, table

    monkeypatch.setattr(datamodule_module, "paired_activations_with_tokens", planting)
    return sizes


def chat_outliers(batches: list[torch.Tensor]) -> int:
    return int(sum((b[:, 1].norm(dim=-1) > 5).sum() for b in batches))


@pytest.mark.parametrize("memo_gb", [0.0, 1.0])
@pytest.mark.parametrize("drop", [False, True])
def test_the_stream_counts_planted_outliers_and_keeps_them_unless_asked(
    tmp_path: Path, groups: list[int], drop: bool, memo_gb: float
) -> None:
    dm = datamodule(tmp_path, batch_size=128, drop_outliers=drop, memo_gb=memo_gb)
    dm.train_dataloader()
    served = list(islice(iter(dm.stream), 10))  # within the first pass: one extraction per group
    stats = dm.stream.stats
    screened = sum(groups)
    assert stats.outliers == OutlierCounts(screened, 0, PLANTED * len(groups), PLANTED * len(groups))
    assert sum(stats.tokens.values()) == screened - drop * PLANTED * len(groups)  # rows kept unless dropped
    assert (chat_outliers(served) == 0) == drop  # kept ones reach the batches
    logged = dm.stats()
    assert logged["data/outliers_base"] == 0 and logged["data/outliers_chat"] == PLANTED * len(groups)
    assert logged["data/outlier_frac_chat"] == pytest.approx(PLANTED * len(groups) / screened)


@pytest.mark.parametrize("drop", [False, True])
def test_the_heldout_set_is_screened_as_the_stream_is(tmp_path: Path, groups: list[int], drop: bool) -> None:
    dm = datamodule(tmp_path, drop_outliers=drop, val_tokens=10_000)  # every held-out document
    val = dm.heldout_activations()
    assert dm.heldout_counts == OutlierCounts(sum(groups), 0, PLANTED * len(groups), PLANTED * len(groups))
    assert len(val) == sum(groups) - drop * PLANTED * len(groups)
    assert (chat_outliers([val]) == 0) == drop
    report = dm.outlier_report()
    assert set(report) == {"heldout"}  # no training stream yet
    assert report["heldout"]["dropped"] is drop and report["heldout"]["factor"] == 3.0
    assert report["heldout"]["counts"] == {"base": 0, "chat": PLANTED * len(groups), "either": PLANTED * len(groups)}


def test_no_factor_counts_nothing(tmp_path: Path, groups: list[int]) -> None:
    dm = datamodule(tmp_path, outlier_factor=None)
    dm.train_dataloader()
    list(islice(iter(dm.stream), 3))
    assert dm.stream.stats.outliers == OutlierCounts() and dm.outlier_report() == {}
    assert not any(key.startswith("data/outlier") for key in dm.stats())


def test_the_counts_resume_exactly(tmp_path: Path) -> None:
    def stream():
        dm = datamodule(tmp_path, batch_size=128, outlier_factor=1.2)  # about 8% of the tiny pair's tokens
        dm.train_dataloader()
        return dm.stream

    uninterrupted = stream()
    list(islice(iter(uninterrupted), 20))
    first = stream()
    served = iter(first)
    next(served)  # Lightning's prefetch
    for _ in range(12):
        next(served)
        first.consumed()
    resumed = stream()
    resumed.load_state_dict(weights_only_roundtrip(first.state_dict()))
    list(islice(iter(resumed), 20 - 12))
    assert resumed.stats.outliers == uninterrupted.stats.outliers and uninterrupted.stats.outliers.either > 0


def test_an_old_checkpoint_that_dropped_continues_under_drop_outliers(tmp_path: Path) -> None:
    dm = datamodule(tmp_path, outlier_factor=5.0, drop_outliers=True)
    next(iter(dm.train_dataloader()))
    state = weights_only_roundtrip(dm.state_dict())
    del state["settings"]["drop_outliers"]  # as written before the key existed: a factor meant dropping
    same = datamodule(tmp_path, outlier_factor=5.0, drop_outliers=True)
    same.load_state_dict(state)
    same.train_dataloader()
    assert same.stream._resume is not None
    counting = datamodule(tmp_path, outlier_factor=5.0)  # another stream: counted but kept
    counting.load_state_dict(state)
    with pytest.warns(UserWarning, match=r"other settings \(drop_outliers\)"):
        counting.train_dataloader()


# ------------------------------------------------------------------------------------------- the cache
def test_the_cache_records_the_settings_and_the_writers_counts(tmp_path: Path, groups: list[int]) -> None:
    dm = datamodule(tmp_path / "corpus", drop_outliers=True)
    path = write_activation_cache(dm, tmp_path / "cache", n_tokens=200, tokens_per_shard=64)
    meta = read_meta(path)
    assert meta["source"]["outlier_factor"] == 3.0 and meta["source"]["drop_outliers"] is True
    written = meta["stats"]["outliers"]
    assert written["training"]["counts"]["base"] == 0 and written["training"]["counts"]["chat"] > 0
    assert written["training"]["dropped"] is True and written["heldout"]["counts"]["base"] == 0
    cached = CachedActivationDataModule(CachedDataConfig(path=str(path), batch_size=32))
    assert cached.outlier_report() == {"cache_training": written["training"], "heldout": written["heldout"]}


def cached_module(tmp_path: Path, **source) -> CachedActivationDataModule:
    """A cache of 300 planted tokens (chat outliers at rows 0, 10, ..., 290) written with ``source``."""
    acts = planted(300, rows=tuple(range(0, 300, 10)))
    path = write_cache(tmp_path / "acts", [acts], 300, tokens_per_shard=100, val=acts[:10], source=source)
    return CachedActivationDataModule(CachedDataConfig(path=str(path), batch_size=32, seed=3))


def test_the_cached_module_counts_the_batches_trained_on_and_resumes_them(tmp_path: Path) -> None:
    dm = cached_module(tmp_path, outlier_factor=3.0, drop_outliers=False)
    dm.train_dataloader()
    served = iter(dm.reader)
    taken = [next(served)]  # Lightning's prefetch: served, not yet trained on
    for _ in range(5):
        taken.append(next(served))
        dm.reader.consumed()
    assert dm.reader.outliers == OutlierCounts(5 * 32, 0, chat_outliers(taken[:5]), chat_outliers(taken[:5]))
    assert dm.stats()["data/outliers_chat"] == chat_outliers(taken[:5])
    resumed = cached_module(tmp_path / "again", outlier_factor=3.0, drop_outliers=False)
    resumed.load_state_dict(weights_only_roundtrip(dm.state_dict()))
    resumed.train_dataloader()
    more = iter(resumed.reader)
    again = [next(more) for _ in range(4)]
    for _ in range(4):
        resumed.reader.consumed()
    assert torch.equal(again[0], taken[5])  # the prefetched batch is served again, and counted once trained on
    assert resumed.reader.outliers.chat == chat_outliers(taken[:5] + again)
    report = resumed.outlier_report()["training"]
    assert report["tokens"] == 9 * 32 and report["dropped"] is False and "from the cache" in report["median_over"]


def test_a_cache_without_a_factor_counts_nothing(tmp_path: Path) -> None:
    dm = cached_module(tmp_path, layer=1)
    dm.train_dataloader()
    next(iter(dm.reader))
    dm.reader.consumed()
    assert dm.stats() == {} and dm.outlier_report() == {} and "outliers" not in dm.reader.state_dict()
    old = cached_module(tmp_path / "old", outlier_factor=5.0)  # written before drop_outliers: it dropped
    assert old.written_with["drop_outliers"] is True


def test_a_cached_run_may_drop_the_outliers_of_a_cache_that_kept_them(tmp_path: Path) -> None:
    """``data=cached data.drop_outliers=true`` on a cache written without a factor: every planted chat outlier
    leaves the training batches and the held-out set, and nothing else does; without a factor it is refused."""
    acts = planted(300, rows=tuple(range(0, 300, 10)))
    path = write_cache(tmp_path / "acts", [acts], 300, tokens_per_shard=100, val=acts[:40], source={"layer": 1})
    dm = CachedActivationDataModule(CachedDataConfig(path=str(path), batch_size=32, seed=3, outlier_factor=3.0, drop_outliers=True))
    dm.train_dataloader()
    batches = []
    for batch in islice(iter(dm.reader), 9):  # one pass: 9 full batches of 32, each trained on as served
        batches.append(batch)
        dm.reader.consumed()
    assert chat_outliers(batches) == 0 and all(b.norm(dim=-1).max() <= 1 + 1e-5 for b in batches)
    assert sum(len(b) for b in batches) == 9 * 32 - dm.reader.outliers.either
    assert dm.reader.outliers.chat == dm.reader.outliers.either > 0 and dm.reader.outliers.base == 0
    held_out = dm.heldout_activations()
    assert torch.equal(held_out, acts[:40][acts[:40, 1].norm(dim=-1) < 5])  # rows 0, 10, 20, 30 dropped
    assert dm.outlier_report()["training"]["dropped"] is True
    with pytest.raises(ConfigError, match="drop_outliers=true but data.outlier_factor=null"):
        CachedActivationDataModule(CachedDataConfig(path=str(path), batch_size=32, drop_outliers=True))


# ------------------------------------------------------------------------------------------- the card
def test_the_card_and_metrics_state_the_counts(tmp_path: Path) -> None:
    from test_analysis_report import crosscoder, inputs, settings, tiny_pair

    pair = tiny_pair(identical=False)
    paired, ids, mask = inputs(pair)
    paired = paired.clone()  # a normal tensor (inputs' is an inference tensor): planted below
    paired[[1, 4, 9], 1] *= 10 * paired[:, 1].norm(dim=-1).median() / paired[[1, 4, 9], 1].norm(dim=-1, keepdim=True)
    norms = paired.norm(dim=-1)
    expected = (norms > 3.0 * norms.median(dim=0).values).sum(0).tolist()  # the direct computation
    counts = OutlierCounts()
    screen(paired, 3.0, False, counts)
    heldout = counts.summary(3.0, False, "each group of 4 texts read together")
    training = OutlierCounts(tokens=123_456, base=0, chat=789, either=789).summary(3.0, True, "each group of 32 texts")
    cfg = settings()
    for group in ("taxonomy", "scaling", "causal", "splice", "diagnostics", "patching"):
        cfg[group]["enabled"] = False
    cc = crosscoder(paired)
    cc.metadata["outliers"] = {"training": training, "heldout": {"stale": True}}  # recorded at the end of training
    metrics = run_analyses(cc, pair, paired, ids, mask, tmp_path, AnalysisConfig.read(cfg), cc.metadata, "cmd", outliers={"heldout": heldout})

    assert expected[1] >= 3 and [counts.base, counts.chat] == expected
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["outliers"] == metrics["outliers"] == {"training": training, "heldout": heldout}
    card = (tmp_path / "README.md").read_text()
    n = len(paired)
    row = (f"| held-out set | {n:,} | {expected[0]} ({expected[0] / n:.3%}) | {expected[1]} ({expected[1] / n:.3%}) "
           f"| {counts.either} ({counts.either / n:.3%}) | norm > 3× the model's median over each group of 4 texts "
           "read together | kept |")
    assert row in card
    assert "| training data | 123,456 | 0 (0.000%) | 789 (0.639%) | 789 (0.639%) |" in card and "| dropped |" in card
    assert "- outliers:" not in card  # its own section, not a recipe line
