"""One table and one figure across the jobs of a Hydra multirun (``python analyze.py sweep=multirun/<run>/<date>``).

Each job directory holds ``.hydra/overrides.yaml`` (its command-line overrides) and ``artifact/metrics.json``.
The swept parameters are the override keys whose values differ between jobs; every job gets one row with them
and the card's headline figures. Writes ``sweep_summary.csv``, ``sweep_summary.md`` and ``sweep_summary.png``
into the multirun directory.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from crosscoder_pl.headline import headline_figures, is_number

log = logging.getLogger(__name__)
OVERRIDES = Path(".hydra") / "overrides.yaml"
METRICS = Path("artifact") / "metrics.json"
# Column -> (title on the plots, unit)
FIGURES: dict[str, tuple[str, str]] = {
    "ve_base": ("variance explained, base", "fraction"),
    "ve_chat": ("variance explained, chat", "fraction"),
    "l0": ("L0", "active latents / token"),
    "dead_fraction": ("dead fraction (held-out)", "fraction of latents"),
    "shared": ("shared latents", "latents"),
    "base_only": ("base-only latents", "latents"),
    "chat_only": ("chat-only latents", "latents"),
    "unclassified": ("unclassified latents", "latents"),
    "dead": ("dead latents", "latents"),
    "chat_specific": ("truly chat-specific latents", "latents"),
    "median_causal_pearson": ("median causal Pearson", "Pearson r"),
}
FILES = ("sweep_summary.csv", "sweep_summary.md", "sweep_summary.png")


def job_figures(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The `FIGURES` of one job's ``metrics.json`` (nan where an analysis was disabled)."""
    figures = headline_figures(metrics)
    return {key: float(figures[key]) if is_number(figures[key]) else math.nan for key in FIGURES}


def read_overrides(job: Path) -> dict[str, Any]:
    """``key -> value`` of a job's overrides (``+``/``++`` prefixes dropped, values as YAML reads them)."""
    path = job / OVERRIDES
    entries = yaml.safe_load(path.read_text()) if path.is_file() else []
    out: dict[str, Any] = {}
    for entry in entries or []:
        key, _, value = str(entry).partition("=")
        out[key.lstrip("+~")] = yaml.safe_load(value) if value else None
    return out


def collect(sweep: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """(the swept keys, one row per job: ``job``, the swept values, ``status`` and `FIGURES`), jobs in Hydra's order."""
    jobs = sorted((p for p in sweep.iterdir() if _is_multirun_job(p)), key=_job_number)
    if not jobs:
        raise FileNotFoundError(
            f"sweep={sweep}: no job directories (with {OVERRIDES}) in it; pass the directory of a multirun "
            "(python train.py -m ... writes multirun/<run_name>/<date>/<job>/)"
        )
    overrides = {job: read_overrides(job) for job in jobs}
    keys = list(dict.fromkeys(k for o in overrides.values() for k in o))
    swept = [k for k in keys if len({json.dumps(o.get(k), sort_keys=True, default=str) for o in overrides.values()}) > 1]
    rows = []
    for job in jobs:
        metrics_path = job / METRICS
        row: dict[str, Any] = {"job": job.name, **{k: overrides[job].get(k) for k in swept}}
        if metrics_path.is_file():
            row.update(status="ok", **job_figures(json.loads(metrics_path.read_text())))
        else:  # a failed or unfinished job: listed, so the table says what is missing
            row.update(status=f"no {METRICS}", **{k: math.nan for k in FIGURES})
        rows.append(row)
    return swept, rows


def summarise_sweep(sweep: str | Path) -> dict[str, Any]:
    """Write the sweep's table (CSV and Markdown) and figure; return ``{"swept": [...], "rows": [...]}``."""
    sweep = Path(sweep)
    if not sweep.is_dir():
        raise FileNotFoundError(f"sweep={sweep} is not a directory: pass a multirun directory (multirun/<run>/<date>)")
    swept, rows = collect(sweep)
    columns = ["job", *swept, "status", *FIGURES]
    with (sweep / FILES[0]).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    markdown = to_markdown(rows, columns)
    (sweep / FILES[1]).write_text(markdown)
    plot_sweep(rows, swept, sweep / FILES[2])
    print(markdown)
    print(f"sweep summary of {len(rows)} jobs written to {sweep.resolve()} ({', '.join(FILES)})")
    return {"swept": swept, "rows": rows}


def to_markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = [FIGURES[c][0] if c in FIGURES else c for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(columns)]
    # The job's number only: Hydra's directory names repeat every override (the CSV keeps them whole).
    lines += ["| " + " | ".join(_cell(row["job"].split("_", 1)[0] if c == "job" else row.get(c)) for c in columns)
              + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_sweep(rows: list[dict[str, Any]], swept: list[str], path: Path) -> Path:
    """One panel per figure against the first swept key (x axis), one line per value of the others."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key = swept[0] if swept else "job"
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        label = ", ".join(f"{k}={row[k]}" for k in swept[1:]) or "all jobs"
        groups.setdefault(label, []).append(row)
    n_cols = 4
    n_rows = math.ceil(len(FIGURES) / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.2 * n_cols, 3.2 * n_rows), squeeze=False)
    numeric = all(isinstance(r.get(x_key), (int, float)) for r in rows)
    for ax, (key, (title, unit)) in zip(axes.flat, FIGURES.items()):
        for label, members in groups.items():
            members = sorted(members, key=lambda r: r[x_key]) if numeric else members
            xs = [r[x_key] if numeric else str(r[x_key]) for r in members]
            ax.plot(xs, [r[key] for r in members], marker="o", label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(x_key)
        ax.set_ylabel(unit)
        if numeric and len({r[x_key] for r in rows}) > 1 and min(r[x_key] for r in rows) > 0:
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({r[x_key] for r in rows}), labels=[str(v) for v in sorted({r[x_key] for r in rows})])
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(FIGURES):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"sweep over {', '.join(swept) or 'jobs'} ({len(rows)} jobs)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _is_multirun_job(path: Path) -> bool:
    """A job of a multirun (Hydra records ``mode: MULTIRUN``), not e.g. an analyze.py run written inside it."""
    hydra = path / ".hydra" / "hydra.yaml"
    if not (path / OVERRIDES).is_file() or not hydra.is_file():
        return False
    return (yaml.safe_load(hydra.read_text()) or {}).get("hydra", {}).get("mode") == "MULTIRUN"


def _job_number(job: Path) -> tuple[int, str]:
    head = job.name.split("_", 1)[0]
    return (int(head), job.name) if head.isdigit() else (1 << 30, job.name)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)
