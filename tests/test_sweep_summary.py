"""``python analyze.py sweep=DIR`` on a real 2x2 tiny multirun: one row per job, the figures of its metrics.json."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from crosscoder_pl.sweep import FIGURES, job_figures, read_overrides, summarise_sweep

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_two_by_two_multirun_summary(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun"
    result = run("train.py", "-m", "+experiment=tiny", "crosscoder.k=4,8", "crosscoder.n_latents=64,128",
                 "trainer.max_steps=4", "crosscoder.k_anneal_steps=2", "trainer.val_check_interval=4",
                 "analysis.causal.max_latents=2", "analysis.splice.enabled=false", "dashboard.enabled=false",
                 f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]
    # analyze.py's own run directory inside the sweep is no job of it
    result = run("analyze.py", f"sweep={sweep}", f"hydra.run.dir={sweep / 'summary_run'}")
    assert result.returncode == 0, result.stderr[-3000:]

    with (sweep / "sweep_summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert {(int(r["crosscoder.k"]), int(r["crosscoder.n_latents"])) for r in rows} == {(4, 64), (4, 128), (8, 64), (8, 128)}
    assert list(rows[0])[:3] == ["job", "crosscoder.k", "crosscoder.n_latents"]  # only the swept keys
    for row in rows:
        job = sweep / row["job"]
        assert read_overrides(job)["crosscoder.k"] == int(row["crosscoder.k"])
        want = job_figures(json.loads((job / "artifact" / "metrics.json").read_text()))
        assert row["status"] == "ok"
        for key, value in want.items():
            assert (math.isnan(value) and row[key] == "nan") or float(row[key]) == pytest.approx(value), key
        counts = sum(float(row[k]) for k in ("shared", "base_only", "chat_only", "unclassified", "dead"))
        assert counts == int(row["crosscoder.n_latents"])  # every latent in one class
        assert not math.isnan(float(row["median_causal_pearson"]))

    markdown = (sweep / "sweep_summary.md").read_text().splitlines()
    assert len(markdown) == 2 + 4 and all(title in markdown[0] for title, _ in FIGURES.values())
    assert (sweep / "sweep_summary.png").stat().st_size > 10_000
    # A failed job is listed, not dropped.
    (sweep / rows[0]["job"] / "artifact" / "metrics.json").unlink()
    summarise_sweep(sweep)
    with (sweep / "sweep_summary.csv").open() as f:
        again = list(csv.DictReader(f))
    assert len(again) == 4 and again[0]["status"] == "no artifact/metrics.json" and again[0]["ve_base"] == "nan"


def test_sweep_of_a_directory_without_jobs_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no job directories"):
        summarise_sweep(tmp_path)
