"""The offline dashboard: ``artifact/dashboard/``, a page that opens from disk with no network.

:func:`write_dashboard` scans the held-out tokens (`crosscoder_pl.dashboard.examples`), computes the logit
lens (`crosscoder_pl.dashboard.logit_lens`), joins the per-latent numbers of the artifact (``latents.csv``,
``causal_validation.csv``) and writes

- ``index.html``, ``dashboard.js``, ``dashboard.css``: the page (copied from ``static/``);
- ``data/*.js``: the data, split so that the page loads only what it shows: ``meta.js``, ``latents.js`` (the
  table of all latents), ``vocab.js`` (token texts), ``shard-NNNNN.js`` (``latents_per_shard`` latents each:
  examples, histograms, frequencies, logit lens). Each file is ``ccDashboard.receive("<key>",`` / one line of
  JSON / ``);``: a page opened from ``file://`` cannot ``fetch()`` JSON in Chromium, but it can add
  ``<script src>`` tags. :func:`read_data_file` returns the JSON of any of them;
- ``max_activation_examples.db``: the examples in tiny-dashboard's layout (sqlite table ``data_table``, key =
  latent, column ``examples``: JSON list of ``[activation, token strings, token activations]``, web and chat
  together, strongest first), for ``OfflineFeatureCentricDashboard.from_db(path, tokenizer)``.

The layout is documented in ``docs/dashboard.md``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from crosscoder_pl.analysis.decoder_norms import decoder_cosine, delta_norm
from crosscoder_pl.config import DashboardSettings
from crosscoder_pl.crosscoder import CrossCoder
from crosscoder_pl.dashboard.examples import (
    LatentExamples,
    Windows,
    example_windows,
    scan,
    turn_roles,
)
from crosscoder_pl.dashboard.logit_lens import LogitLens, logit_lens
from crosscoder_pl.data.activations import TokenTable
from crosscoder_pl.names import MODELS, SOURCES

log = logging.getLogger(__name__)

FORMAT = 1
DASHBOARD_DIR = "dashboard"
STATIC = Path(__file__).parent / "static"
PAGE_FILES = ("index.html", "dashboard.js", "dashboard.css")
TINY_DASHBOARD_DB = "max_activation_examples.db"
TRAIN_CONFIG = "train_config.yaml"
# The table of all latents: (key, label, help). Values come from the scan, latents.csv and causal_validation.csv.
COLUMNS = (
    ("latent", "latent", "latent index"),
    ("class", "class", "Δnorm class (dead = never fired on the held-out tokens)"),
    ("delta_norm", "Δnorm", "relative decoder norm: 0 base-only, 1 chat-only"),
    ("decoder_cosine", "cos", "cosine of the base and chat decoder vectors"),
    ("firing_frequency", "freq", "share of held-out tokens on which it fires (taxonomy)"),
    ("frequency_web", "freq web", "share of web held-out tokens on which it fires"),
    ("frequency_chat", "freq chat", "share of chat held-out tokens on which it fires"),
    ("max_activation", "max act", "largest activation on the held-out tokens"),
    ("nu_r", "ν_r", "latent scaling ratio, reconstruction target"),
    ("nu_eps", "ν_ε", "latent scaling ratio, error target"),
    ("neg_log_nu_r", "−log ν_r", "base uselessness, reconstruction target"),
    ("neg_log_nu_eps", "−log ν_ε", "base uselessness (seed 002), error target"),
    ("chat_specific", "chat-specific", "Δnorm ≥ 0.9, ν_ε and ν_r below their thresholds, both within the filter"),
    # Sparsity-artifact diagnostics (issue 23): latents.csv's columns of crosscoder_pl.analysis.diagnostics.
    ("nu_a", "ν_a", "latent scaling ratio, activation target"),
    ("neg_log_nu_a", "−log ν_a", "base uselessness, activation target"),
    ("nu_in_range", "ν reliable", "ν_r and ν_ε within the reliability filter (−0.1 ≤ ν ≤ 2): ranked at all"),
    ("shrinkage_suspect", "shrinkage?", "chat-only with ν_ε in the shared latents' range: Complete Shrinkage"),
    ("decoupling_suspect", "decoupling?", "chat-only with ν_r in the shared latents' range: Latent Decoupling"),
    ("twin_latent", "twin", "base-only (or chat-only) latent whose decoder points the same way (cos > 0.9)"),
    ("twin_cosine", "twin cos", "cosine of the twins' decoders (chat of the chat-only, base of the base-only)"),
    ("twin_cofiring", "twin co-firing", "tokens where both twins fire / where either fires"),
    ("template_share", "template", "share of its firings on chat tokens that are chat-template tokens"),
    ("pearson", "causal r", "Pearson of the per-probe KL shifts of its ablation, base vs chat"),
)

# latents.csv's numeric columns and its True/False columns, as the table reads them.
NUMBER_COLUMNS = ("delta_norm", "decoder_cosine", "firing_frequency", "nu_r", "nu_eps", "nu_a", "neg_log_nu_r",
                  "neg_log_nu_eps", "neg_log_nu_a", "twin_cosine", "twin_cofiring", "template_share")
FLAG_COLUMNS = ("chat_specific", "nu_in_range", "shrinkage_suspect", "decoupling_suspect")


def resolve_settings(given: DashboardSettings | None, artifact_dir: str | Path) -> DashboardSettings:
    """The dashboard settings of an analysis run: ``given`` (the run's, or ``analyze.py``'s: conf/dashboard with
    the command line's overrides, read once by the command); else those recorded in the artifact's
    ``train_config.yaml`` (an artifact written without them); else the defaults."""
    if given is not None:
        return given
    recorded = Path(artifact_dir) / TRAIN_CONFIG
    if recorded.is_file():
        node = (yaml.safe_load(recorded.read_text()) or {}).get("dashboard")
        if node:
            return DashboardSettings.read(node)
    return DashboardSettings()


def write_dashboard(
    crosscoder: CrossCoder,
    pair: Any,
    activations: torch.Tensor,
    tokens: TokenTable,
    artifact_dir: str | Path,
    settings: DashboardSettings,
) -> dict[str, Any]:
    """Write ``artifact_dir/dashboard/`` (see the module doc); return a summary for ``metrics.json``.

    Args:
        crosscoder: folded, eval mode, calibrated threshold.
        pair: ``base``, ``chat`` (Hugging Face causal LMs), ``tokenizer`` (optional: ids shown as ``[id]``),
            ``base_id``, ``chat_id``, ``layer``.
        activations: raw held-out paired activations ``[tokens, 2, d_model]``; ``tokens`` where each row was read.
    """
    started = time.perf_counter()
    artifact = Path(artifact_dir)
    out = artifact / DASHBOARD_DIR
    data = out / "data"
    if data.exists():
        shutil.rmtree(data)  # shards of an earlier, larger dictionary must not linger
    data.mkdir(parents=True)
    timings: dict[str, float] = {}

    tick = time.perf_counter()
    result = scan(crosscoder, activations, tokens, settings.top_n, settings.histogram_bins, settings.chunk_tokens,
                  settings.max_tokens)
    timings["scan"] = time.perf_counter() - tick

    tokenizer = getattr(pair, "tokenizer", None)
    text = token_texts(tokenizer)
    tick = time.perf_counter()
    roles, role_names = turn_roles(tokens, text)
    examples = _windows(crosscoder, activations, tokens, result, settings, roles, role_names)
    timings["windows"] = time.perf_counter() - tick

    tick = time.perf_counter()
    lens = logit_lens(crosscoder, (pair.base, pair.chat), settings.logit_lens_tokens)
    timings["logit_lens"] = time.perf_counter() - tick

    tick = time.perf_counter()
    table = latent_table(crosscoder, result, artifact)
    vocab_ids = sorted({i for window in examples.values() for i in window.token_ids.flatten().tolist() if i >= 0})
    n_shards = math.ceil(crosscoder.n_latents / settings.latents_per_shard)
    meta = _meta(crosscoder, pair, result, lens, settings, n_shards, len(tokens))
    _write_data(data / "meta.js", "meta", meta)
    _write_data(data / "latents.js", "latents", table)
    _write_data(data / "vocab.js", "vocab", {str(i): text(i) for i in vocab_ids})
    shard_rows = _shards(result, examples, lens, text, settings)
    for index, latents in enumerate(shard_rows):
        _write_data(data / shard_name(index, suffix=".js"), shard_key(index), {
            "first": index * settings.latents_per_shard, "latents": latents,
        })
    for name in PAGE_FILES:
        shutil.copyfile(STATIC / name, out / name)
    if settings.tiny_dashboard_export:
        write_tiny_dashboard_db(examples, result, tokenizer, out / TINY_DASHBOARD_DB)
    timings["write"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - started
    log.info("dashboard written to %s (%.1f s)", out, timings["total"])
    return {
        # Relative to the artifact: the artifact is written in a temporary directory and renamed when complete.
        "path": f"{out.name}/index.html",
        "n_tokens": {name: int(n) for name, n in zip(SOURCES, result.n_tokens)},
        "n_examples": int((result.rows >= 0).sum()),
        "n_shards": n_shards,
        "bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }


def shard_key(index: int) -> str:
    return f"shard-{index:05d}"


def shard_name(index: int, suffix: str = ".js") -> str:
    return shard_key(index) + suffix


def token_texts(tokenizer: Any | None) -> Callable[[int], str]:
    """id -> displayed text (``tokenizer.decode([id])``, cached; ``[id]`` without a tokenizer)."""
    cache: dict[int, str] = {}

    def text(token_id: int) -> str:
        if token_id not in cache:
            cache[token_id] = tokenizer.decode([token_id]) if tokenizer is not None else f"[{token_id}]"
        return cache[token_id]

    return text


def read_data_file(path: str | Path) -> tuple[str, Any]:
    """``(key, payload)`` of a ``data/*.js`` file: its second line is the JSON."""
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    prefix = 'ccDashboard.receive("'
    if len(lines) < 3 or not lines[0].startswith(prefix) or lines[2] != ");":
        raise ValueError(f"{path} is not a dashboard data file (format {FORMAT}, see docs/dashboard.md)")
    return lines[0][len(prefix) : -len('",')], json.loads(lines[1])


def _write_data(path: Path, key: str, payload: Any) -> None:
    """Strict JSON (a nan or infinity that slipped through raises): every float is made finite or None upstream."""
    body = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    path.write_text(f'ccDashboard.receive("{key}",\n{body}\n);\n', encoding="utf-8")


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _round(values: list[float]) -> list[float | int]:
    """Four significant digits (the page shows three), zeros as ``0``: keeps the shards small."""
    return [0 if v == 0 else float(f"{v:.4g}") for v in values]


def _windows(
    crosscoder: CrossCoder, activations: torch.Tensor, tokens: TokenTable, result: LatentExamples,
    settings: DashboardSettings, roles: torch.Tensor, role_names: list[str],
) -> dict[str, Windows]:
    """Per source, the windows of all its examples, in (latent, rank) order."""
    windows = {}
    for s, name in enumerate(SOURCES):
        rows = result.rows[s]  # [F, N]
        latent, rank = (rows >= 0).nonzero(as_tuple=True)
        windows[name] = example_windows(
            crosscoder, activations, tokens, rows[latent, rank], latent, settings.context_before,
            settings.context_after, roles, role_names,
        )
    return windows


def _shards(
    result: LatentExamples, examples: dict[str, Windows], lens: LogitLens, text: Callable[[int], str],
    settings: DashboardSettings,
) -> list[list[dict[str, Any]]]:
    """Per shard, its latents' records (see docs/dashboard.md)."""
    n_latents = result.values.shape[1]
    frequency = result.frequency()
    per_latent: list[dict[str, Any]] = []
    for j in range(n_latents):
        per_latent.append({
            "latent": j,
            "frequency": {name: _finite(float(frequency[s, j])) for s, name in enumerate(SOURCES)},
            "fired": {name: int(result.fired[s, j]) for s, name in enumerate(SOURCES)},
            "histogram": {
                "max": float(result.histogram_max[j]),
                **{name: result.histogram[s, j].tolist() for s, name in enumerate(SOURCES)},
            },
            "logit_lens": {
                model: {
                    "promoted": _lens_rows(lens.top_ids[m, j], lens.top_values[m, j], text),
                    "suppressed": _lens_rows(lens.bottom_ids[m, j], lens.bottom_values[m, j], text),
                }
                for m, model in enumerate(MODELS)
            },
            "examples": {name: [] for name in SOURCES},
        })
    peak = settings.context_before
    for s, name in enumerate(SOURCES):
        window = examples[name]
        rows = result.rows[s]
        values = result.values[s]
        ranks = (rows >= 0).nonzero(as_tuple=True)[1].tolist()
        for e, (j, rank) in enumerate(zip(window.latents.tolist(), ranks)):
            ids = window.token_ids[e]
            keep = (ids >= 0).nonzero().flatten()
            first, last = int(keep[0]), int(keep[-1]) + 1
            record = {
                "activation": float(f"{float(values[j, rank]):.4g}"),
                "row": int(rows[j, rank]),
                "peak": peak - first,
                "tokens": ids[first:last].tolist(),
                "activations": _round(window.activations[e, first:last].tolist()),
            }
            if name == "chat":
                record["turns"] = _turns(window.roles[e, first:last].tolist(), window.role_names)
            per_latent[j]["examples"][name].append(record)
    size = settings.latents_per_shard
    return [per_latent[start : start + size] for start in range(0, n_latents, size)]


def _lens_rows(ids: torch.Tensor, values: torch.Tensor, text: Callable[[int], str]) -> list[list[Any]]:
    """``[[token text, logit], ...]`` of one model's lens list for one latent."""
    return [[text(i), v] for i, v in zip(ids.tolist(), _round(values.tolist()))]


def _turns(roles: list[int], names: list[str]) -> list[list[Any]]:
    """``[[start, role], ...]``: where each chat turn begins within the window (role "" before the first turn)."""
    turns: list[list[Any]] = []
    for i, role in enumerate(roles):
        name = names[role] if role >= 0 else ""
        if not turns or turns[-1][1] != name:
            turns.append([i, name])
    return turns


def latent_table(crosscoder: CrossCoder, result: LatentExamples, artifact: Path) -> dict[str, Any]:
    """``{"columns": [{key, label, help}], "values": {key: [F values]}}``: the numbers the artifact has per latent
    (``latents.csv``, ``causal_validation.csv``; Δnorm and cosine from the weights when there is no csv) and
    the scan's frequencies per source and largest activation. Missing values are null."""
    n = crosscoder.n_latents
    values: dict[str, list[Any]] = {key: [None] * n for key, _, _ in COLUMNS}
    values["latent"] = list(range(n))
    values["delta_norm"] = delta_norm(crosscoder).tolist()
    values["decoder_cosine"] = decoder_cosine(crosscoder).tolist()
    frequency = result.frequency()
    values["frequency_web"] = frequency[0].tolist()
    values["frequency_chat"] = frequency[1].tolist()
    values["max_activation"] = result.values[:, :, 0].max(0).values.tolist()
    latents_csv = artifact / "latents.csv"
    if latents_csv.is_file():
        for row in _csv_rows(latents_csv):
            j = int(row["latent"])
            for key in (*NUMBER_COLUMNS, "twin_latent"):
                if key in row:
                    values[key][j] = _number(row[key])
            values["class"][j] = row.get("class") or None
            for key in FLAG_COLUMNS:
                values[key][j] = {"True": True, "False": False}.get(row.get(key, ""))
            if values["twin_latent"][j] is not None:
                values["twin_latent"][j] = int(values["twin_latent"][j])
    causal_csv = artifact / "causal_validation.csv"
    if causal_csv.is_file():
        for row in _csv_rows(causal_csv):
            values["pearson"][int(row["latent"])] = _number(row.get("pearson", ""))
    for key in ("frequency_web", "frequency_chat", "max_activation", *NUMBER_COLUMNS, "pearson"):
        values[key] = [None if v is None else float(f"{v:.5g}") if math.isfinite(v) else None for v in values[key]]
    columns = [{"key": key, "label": label, "help": text} for key, label, text in COLUMNS]
    return {"columns": columns, "values": values}


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _meta(
    crosscoder: CrossCoder, pair: Any, result: LatentExamples, lens: LogitLens, settings: DashboardSettings,
    n_shards: int, n_heldout: int,
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "base_model": getattr(pair, "base_id", "base"),
        "chat_model": getattr(pair, "chat_id", "chat"),
        "layer": getattr(pair, "layer", None),
        "n_latents": crosscoder.n_latents,
        "k": crosscoder.k,
        "heldout_tokens": n_heldout,
        "n_tokens": {name: int(n) for name, n in zip(SOURCES, result.n_tokens)},
        "shards": n_shards,
        "settings": settings.model_dump(),
        "logit_lens_norm": dict(zip(MODELS, lens.norm)),
        "sources": list(SOURCES),
    }


def tiny_dashboard_examples(
    examples: dict[str, Windows], result: LatentExamples, tokenizer: Any | None
) -> dict[int, list[tuple[float, list[str], list[float]]]]:
    """tiny-dashboard's ``max_activation_examples``: latent -> ``[(activation, token strings, token activations),
    ...]``, web and chat examples together, strongest first. Token strings are the tokenizer's own
    (``convert_ids_to_tokens``), which tiny-dashboard renders itself (``Ġ`` / ``▁`` as spaces, ``Ċ`` as newlines).
    The first number is the example token's activation (a neighbour in the window may be stronger)."""
    def strings(ids: list[int]) -> list[str]:
        return tokenizer.convert_ids_to_tokens(ids) if tokenizer is not None else [f"[{i}]" for i in ids]

    per_latent: dict[int, list[tuple[float, list[str], list[float]]]] = {}
    for s, name in enumerate(SOURCES):
        window = examples[name]
        ranks = (result.rows[s] >= 0).nonzero(as_tuple=True)[1].tolist()
        for e, (j, rank) in enumerate(zip(window.latents.tolist(), ranks)):
            ids = window.token_ids[e]
            keep = ids >= 0
            activation = float(f"{float(result.values[s, j, rank]):.4g}")
            per_latent.setdefault(j, []).append(
                (activation, strings(ids[keep].tolist()), _round(window.activations[e, keep].tolist()))
            )
    for items in per_latent.values():
        items.sort(key=lambda item: -item[0])
    return per_latent


def write_tiny_dashboard_db(
    examples: dict[str, Windows], result: LatentExamples, tokenizer: Any | None, path: Path
) -> Path:
    """``max_activation_examples.db`` in tiny-dashboard's sqlite layout: table ``data_table``, ``key`` INTEGER
    PRIMARY KEY (the latent), ``examples`` TEXT (JSON of `tiny_dashboard_examples`'s list); latents that never
    fired have no row. Read it with ``OfflineFeatureCentricDashboard.from_db(path, tokenizer)``."""
    per_latent = tiny_dashboard_examples(examples, result, tokenizer)
    path.unlink(missing_ok=True)
    db = sqlite3.connect(path)
    try:
        with db:
            db.execute("CREATE TABLE data_table (key INTEGER PRIMARY KEY, examples TEXT)")
            db.executemany(
                "INSERT INTO data_table VALUES (?, ?)",
                ((j, json.dumps(per_latent[j], ensure_ascii=False, separators=(",", ":"))) for j in sorted(per_latent)),
            )
    finally:
        db.close()
    return path
