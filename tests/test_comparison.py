"""analyze.py compare: two artifacts of one pair side by side, from their metrics.json and latents.csv."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from crosscoder_pl.comparison import FILES, compare_artifacts

PAIR = {"base_model": "b", "chat_model": "c", "layer": 3, "d_model": 16}


def _artifact(directory: Path, sparsity: str, chat_only: int, l0: float, nu: dict[str, list[float]],
              extra: dict | None = None, pair: dict | None = None) -> Path:
    directory.mkdir(parents=True)
    metrics = {
        "artifact": {**(pair or PAIR), "sparsity": sparsity, "n_latents": 64},
        "validation": {"variance_explained": {"base": 0.9, "chat": 0.8}, "l0": l0, "dead_fraction": 0.25},
        "taxonomy": {"counts": {"shared": 40, "chat_only": chat_only, "base_only": 2, "dead": 3, "unclassified": 1}},
        **(extra or {}),
    }
    (directory / "metrics.json").write_text(json.dumps(metrics))
    with (directory / "latents.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["latent", "class", "nu_r", "nu_eps"])
        writer.writeheader()
        i = 0
        for class_name, values in nu.items():
            for v in values:
                writer.writerow({"latent": i, "class": class_name, "nu_r": v, "nu_eps": "nan" if v < 0 else v / 2})
                i += 1
    return directory


def test_the_table_holds_each_artifacts_figures_diagnostics_and_patching(tmp_path: Path) -> None:
    patching = {"sets": {"none": {"kl": {"reply": 0.3}, "gap_closed": {"reply": 0.0}},
                         "delta_top": {"kl": {"reply": 0.2}, "gap_closed": {"reply": 1 / 3}}},
                "selection": {"n_pool": 4}}
    topk = _artifact(tmp_path / "topk", "batchtopk", 5, 32.0, {"chat_only": [0.1, 0.2], "shared": [0.9, 1.1, -3.0]},
                     {"diagnostics": {"complete_shrinkage": {"share_inside": 0.0}}, "patching": patching})
    l1 = _artifact(tmp_path / "l1", "l1", 50, 30.5, {"chat_only": [0.95], "shared": [1.0]},
                   {"diagnostics": {"complete_shrinkage": {"share_inside": 0.4}, "twins": {"n_pairs": 7}}})
    out = tmp_path / "out"
    result = compare_artifacts(topk, l1, out)
    assert {p.name for p in out.iterdir()} == set(FILES)
    rows = {row["title"]: row["values"] for row in result["rows"]}
    assert result["names"] == ["BatchTopK", "L1"]
    assert rows["sparsity"] == ["batchtopk", "l1"]
    assert rows["chat-only latents"] == [5, 50] and rows["L0 (held-out)"] == [32.0, 30.5]
    assert rows["Complete Shrinkage: share with ν_ε inside the shared 95%"] == [0.0, 0.4]
    # absent in one artifact: an empty cell, not a zero
    assert rows["twin pairs (chat-only/base-only, decoder cosine > 0.9)"] == [None, 7]
    assert rows["patching delta_top: KL on reply tokens (gap closed)"] == [{"kl": 0.2, "gap_closed": 1 / 3}, None]
    assert not any(title.startswith("patching nu_top") for title in rows)  # a set neither artifact has: no row
    table = (out / "comparison.md").read_text()
    assert "| chat-only latents | 5 | 50 |" in table
    assert "| twin pairs (chat-only/base-only, decoder cosine > 0.9) | — | 7 |" in table
    assert "| patching delta_top: KL on reply tokens (gap closed) | 0.2 (33%) | — |" in table
    written = json.loads((out / "comparison.json").read_text())
    assert written["rows"] == result["rows"] and written["all"][1]["diagnostics"]["twins"] == {"n_pairs": 7}


def test_two_artifacts_of_different_pairs_are_refused(tmp_path: Path) -> None:
    a = _artifact(tmp_path / "a", "batchtopk", 1, 8.0, {})
    b = _artifact(tmp_path / "b", "l1", 1, 8.0, {}, pair={**PAIR, "layer": 4})
    with pytest.raises(ValueError, match=r"not trained on the same pair \(layer: 3 vs 4\)"):
        compare_artifacts(a, b, tmp_path / "out")


def test_a_directory_without_metrics_is_named(tmp_path: Path) -> None:
    a = _artifact(tmp_path / "a", "batchtopk", 1, 8.0, {})
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty is not an artifact: no metrics.json"):
        compare_artifacts(a, tmp_path / "empty", tmp_path / "out")


def test_analyze_py_compare_prints_and_writes_the_table(tmp_path: Path) -> None:
    from test_app import run

    a = _artifact(tmp_path / "a", "batchtopk", 4, 8.0, {"chat_only": [0.1]})
    b = _artifact(tmp_path / "b", "l1", 9, 9.0, {"chat_only": [1.0]})
    result = run("analyze.py", f"artifact={a}", f"compare={b}", f"compare_out={tmp_path / 'cmp'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| chat-only latents | 4 | 9 |" in result.stdout
    assert (tmp_path / "cmp" / "comparison_nu.png").stat().st_size > 0
