"""The activation memo: later passes serve the first pass's activations without running the models again."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import pytest
import torch
from test_data_datamodule import datamodule

from crosscoder_pl.data import datamodule as datamodule_module
from crosscoder_pl.data.datamodule import ActivationStream
from crosscoder_pl.data.memo import ActivationMemo, per_document

BATCHES = 110  # the test corpus gives about 45 batches of 128 tokens a pass: three passes and a bit


def stream(root: Path, **overrides) -> ActivationStream:
    dm = datamodule(root, batch_size=128, **overrides)
    dm.train_dataloader()
    return dm.stream


def count_texts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Texts run through the models per call of the extraction, recorded while the test runs."""
    calls: list[int] = []
    extract = datamodule_module.paired_activations_with_tokens

    def counting(pair, texts, *args, **kwargs):
        calls.append(len(texts))
        return extract(pair, texts, *args, **kwargs)

    monkeypatch.setattr(datamodule_module, "paired_activations_with_tokens", counting)
    return calls


# 1.2: about 8% of the tiny pair's tokens are outliers, dropped here (counted, never dropped, by default)
@pytest.mark.parametrize("outlier_factor", [None, 1.2])
def test_later_passes_serve_the_first_passs_activations_without_the_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outlier_factor: float | None
) -> None:
    drop = {"outlier_factor": outlier_factor, "drop_outliers": outlier_factor is not None}
    models = stream(tmp_path, **drop)
    plain = list(islice(iter(models), BATCHES))
    calls = count_texts(monkeypatch)
    remembered = stream(tmp_path, memo_gb=1.0, **drop)
    served, passes = [], []
    for batch in islice(iter(remembered), BATCHES):
        served.append(batch)
        passes.append(remembered._tracked.pass_index)
    assert passes[-1] >= 2 and passes.count(0) > 30  # the first pass and two more are compared below
    # The first pass runs the models on every document once, the later ones only on the few documents the
    # first did not read (the mix stops each pass when one source runs out: measured 25 of 307 here).
    docs = len(remembered.memo)
    assert docs > 100 and remembered.memo.bytes == sum(t.numel() * 4 for t in remembered.memo._docs.values())
    assert docs <= sum(calls) <= 1.15 * docs
    # The very batches of running the models again, up to float rounding (a document's forward ran in another
    # group of texts): the same documents, in the same order, through the same buffer.
    for a, b in zip(served, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # The outliers of a group are counted (and dropped) over the whole group, from the memo or not.
    assert remembered.stats.outliers == models.stats.outliers
    assert (remembered.stats.outliers.either > 0) == (outlier_factor is not None)


def test_without_a_memo_every_pass_runs_the_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_texts(monkeypatch)
    plain = stream(tmp_path)
    list(islice(iter(plain), BATCHES))
    assert plain.memo is None
    assert sum(calls) > 2.5 * plain.stats.kept.total() / plain.passes  # about three passes' documents


def test_a_side_pass_neither_fills_nor_reads_the_memo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    remembered = stream(tmp_path, memo_gb=1.0)
    tracked = iter(remembered)
    next(tracked)
    stored = len(remembered.memo)
    calls = count_texts(monkeypatch)
    list(islice(iter(remembered), 5))  # a side pass (the scale estimate's look at the data)
    assert len(remembered.memo) == stored
    assert sum(calls) > 0


def test_the_budget_keeps_the_first_documents_only() -> None:
    memo = ActivationMemo(max_bytes=3 * 40)
    docs = [torch.ones(n, 2, 5) for n in (1, 1, 2, 1)]  # 40, 40, 80, 40 bytes
    kept = [memo.put("web", f"doc {i}", doc) for i, doc in enumerate(docs)]
    assert kept == [True, True, False, False]  # the 4th would fit the bytes left, but the pass's order is kept
    assert memo.full and memo.bytes == 80 and len(memo) == 2
    assert torch.equal(memo.get("web", "doc 1"), docs[1]) and memo.get("chat", "doc 1") is None
    assert memo.get("web", "doc 1").data_ptr() != docs[1].data_ptr()  # a copy, not a view of the group's tensor
    assert memo.put("web", "doc 0", docs[0]) is True  # already stored (a repeat within the pass) ...
    assert memo.put("web", "doc 4", docs[3]) is False and len(memo) == 2  # ... but nothing new once full


def test_a_repeated_document_is_stored_and_counted_once() -> None:
    memo = ActivationMemo(max_bytes=1000)
    doc = torch.ones(2, 2, 5)
    assert memo.put("chat", "same", doc) and memo.put("chat", "same", doc.clone())
    assert len(memo) == 1 and memo.bytes == 80


def test_per_document_splits_rows_by_their_document() -> None:
    acts = torch.arange(5 * 2 * 3, dtype=torch.float32).view(5, 2, 3)
    parts = per_document(acts, torch.tensor([0, 0, 2, 2, 2]), n_docs=4)
    assert [len(p) for p in parts] == [2, 0, 3, 0]
    assert torch.equal(torch.cat(parts), acts)


def test_a_negative_budget_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"memo_gb=-1"):
        datamodule(tmp_path, memo_gb=-1)
    with pytest.raises(ValueError, match="budget must be >= 0"):
        ActivationMemo(-5)
