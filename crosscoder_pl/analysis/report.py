"""Run the enabled analyses of a trained crosscoder into an artifact directory (no Lightning needed).

``settings`` is the typed ``conf/analysis`` group (`crosscoder_pl.config.AnalysisConfig`), checked once by whoever
read it. Files written into ``out_dir`` (the artifact directory): ``taxonomy.json``, ``latents.csv``,
``delta_norm_histogram.png`` (taxonomy; ``latents.csv`` also holds the scaling and diagnostics columns);
``causal_validation.csv``, ``cosine_vs_causal.png`` (causal); what the
caller's further steps write (the artifact writer's: ``dashboard/``, `crosscoder_pl.artifact.writer.run_analyses`);
``metrics.json`` and ``README.md`` always. Weights and ``config.json`` are written by whoever saves the crosscoder.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from crosscoder_pl.analysis.card import OUTLIERS, write_card, write_metrics
from crosscoder_pl.analysis.causal import (
    causal_validation,
    most_frequent,
    plot_cosine_vs_causal,
    write_csv,
)
from crosscoder_pl.analysis.diagnostics import COLUMNS as DIAGNOSTIC_COLUMNS
from crosscoder_pl.analysis.diagnostics import (
    DiagnosticRules,
    Diagnostics,
    heldout_template_mask,
    sparsity_diagnostics,
)
from crosscoder_pl.analysis.patching import ChatSource, patching_inputs, run_patching
from crosscoder_pl.analysis.probes import content_mask
from crosscoder_pl.analysis.scaling import (
    ChatSpecificRule,
    LatentScaling,
    latent_scaling,
    sample_latents,
)
from crosscoder_pl.analysis.splice import splice_evaluation
from crosscoder_pl.analysis.stats import nan_median
from crosscoder_pl.analysis.taxonomy import (
    HeldoutStats,
    Taxonomy,
    Thresholds,
    build_taxonomy,
    heldout_statistics,
    plot_delta_histogram,
)
from crosscoder_pl.analysis.top_tokens import latent_activations, top_tokens
from crosscoder_pl.config import (
    AnalysisConfig,
    CausalSettings,
    DiagnosticsSettings,
    PatchingSettings,
    ScalingSettings,
)
from crosscoder_pl.crosscoder import CrossCoder
from crosscoder_pl.data.activations import token_table

log = logging.getLogger(__name__)

LATENT_COLUMNS = (
    "latent",
    "delta_norm",
    "decoder_cosine",
    "firing_frequency",
    "nu_r",
    "nu_eps",
    "nu_a",
    "neg_log_nu_r",
    "neg_log_nu_eps",
    "neg_log_nu_a",
    "class",
    "chat_specific",
    "nu_in_range",
    "scaling_note",
    *DIAGNOSTIC_COLUMNS,
)
HISTOGRAM = "delta_norm_histogram.png"
# A further step of `write_analyses`: the folded eval-mode crosscoder -> its metrics.json entry
# (None: it wrote nothing).
Step = Callable[[CrossCoder], dict[str, Any] | None]


def write_analyses(
    crosscoder: CrossCoder,
    pair: Any,
    activations: torch.Tensor,
    probe_ids: torch.Tensor,
    probe_mask: torch.Tensor,
    out_dir: str | Path,
    settings: AnalysisConfig,
    recipe: Mapping[str, Any],
    command: str,
    outliers: Mapping[str, Mapping[str, Any]] | None = None,
    steps: Mapping[str, Step] | None = None,
    chats: ChatSource | None = None,
) -> dict[str, Any]:
    """Run the enabled analyses and write their files, ``metrics.json`` and ``README.md``; return the metrics.

    Args:
        crosscoder: the trained crosscoder (folded or not; analysed as a folded eval-mode copy).
        pair: the models, duck-typed: ``base``, ``chat``, ``layer``, ``base_id``, ``chat_id``.
        activations: raw held-out paired activations ``[tokens, 2, d_model]`` (no BOS, no padding).
        probe_ids, probe_mask: probe batch ``[n_probes, seq]``, BOS first, padding allowed.
        settings: the ``analysis`` group, typed and checked once at start-up (`RunConfig.analysis`).
        recipe: training facts for the card's recipe section (e.g. the crosscoder's metadata).
        command: the exact command that reproduces the artifact.
        outliers: the data module's ``outlier_report()`` (``training``, ``heldout``, ...: each an
            `OutlierCounts.summary`), over the one in ``recipe`` (recorded at the end of training) part by part;
            written to ``metrics.json`` (``outliers``) and the card.
        steps: further steps by name, run in order after the analyses on the folded eval-mode copy, each timed
            and its result stored under its name in the metrics (a step that returns None: neither).
        chats: held-out chats for the base→chat patching (a data module's ``chat_probe_batch``); None: the
            patching is skipped, and metrics.json says why.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cc = crosscoder.fold().eval()  # a copy: the caller's module keeps its mode and weights
    chunk = settings.chunk_tokens
    timings: dict[str, float] = {}
    metrics: dict[str, Any] = {"artifact": _artifact(cc, pair)}

    with _timed("validation", timings):
        stats = heldout_statistics(cc, activations, chunk)
    metrics["validation"] = _validation(stats)
    report = {**(recipe.get(OUTLIERS) or {}), **(outliers or {})}
    if report:
        metrics["outliers"] = report

    if settings.taxonomy.enabled:
        with _timed("taxonomy", timings):
            thresholds = Thresholds(**settings.taxonomy.model_dump(exclude={"enabled"}))
            taxonomy = build_taxonomy(cc, stats, thresholds)
            (out / "taxonomy.json").write_text(json.dumps(taxonomy.counts(), indent=2) + "\n")
            plot_delta_histogram(taxonomy, thresholds, out / HISTOGRAM)
        metrics["taxonomy"] = {"counts": taxonomy.counts(), "thresholds": asdict(thresholds)}

        cfg = settings.scaling
        rule = ChatSpecificRule(thresholds.chat_only_min, cfg.nu_eps_max, cfg.nu_r_max, cfg.nu_min, cfg.nu_max)
        scaling = None
        if cfg.enabled:
            with _timed("scaling", timings):
                scaling, metrics["scaling"] = _scaling(cc, activations, taxonomy, cfg, rule, chunk)
        diagnostics = None
        if settings.diagnostics.enabled:
            with _timed("diagnostics", timings):
                diagnostics = _diagnostics(cc, pair, activations, taxonomy, scaling, rule, settings.diagnostics, chunk)
            metrics["diagnostics"] = diagnostics.summary
        _write_latents(taxonomy, scaling, rule, diagnostics, out / "latents.csv")
        if scaling is not None and cfg.top_latents > 0:
            with _timed("chat_specific_tokens", timings):
                metrics["chat_specific_latents"] = _chat_specific_latents(
                    cc, pair, probe_ids, probe_mask, taxonomy, scaling, rule, cfg
                )

    if settings.causal.enabled:
        with _timed("causal", timings):
            metrics["causal"] = _causal(
                cc, pair, probe_ids, probe_mask, taxonomy, settings.causal, settings.memory_budget_mb, out
            )

    if settings.splice.enabled:
        with _timed("splice", timings):
            metrics["splice"] = {
                **splice_evaluation(cc, pair, probe_ids, probe_mask, settings.memory_budget_mb),
                "n_probes": probe_ids.shape[0],
                "n_tokens": int(content_mask(probe_mask).sum()),
            }

    if settings.patching.enabled:
        metrics["patching"] = _patching(cc, pair, chats, taxonomy, scaling, settings.patching,
                                        (settings.scaling.nu_min, settings.scaling.nu_max),
                                        settings.memory_budget_mb, out, timings)

    for name, step in (steps or {}).items():
        start = time.perf_counter()
        result = step(cc)
        if result is not None:
            metrics[name] = result
            timings[name] = round(time.perf_counter() - start, 3)
            log.info("analysis %s took %.1f s", name, timings[name])

    metrics["timings_s"] = timings
    write_metrics(metrics, out / "metrics.json")
    write_card(metrics, recipe, command, out / "README.md")
    log.info("analyses written to %s", out)
    return metrics


@contextmanager
def _timed(name: str, timings: dict[str, float]) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 3)
    log.info("analysis %s took %.1f s", name, timings[name])


def _artifact(cc: CrossCoder, pair: Any) -> dict[str, Any]:
    return {
        "base_model": pair.base_id,
        "chat_model": pair.chat_id,
        "layer": pair.layer,
        "d_model": cc.d_model,
        "n_latents": cc.n_latents,
        "sparsity": cc.sparsity,
        "k": cc.k,
        "threshold": float(cc.threshold),
        "scales": [float(s) for s in cc.scales],
    }


def _validation(stats: HeldoutStats) -> dict[str, Any]:
    base, chat = stats.variance_explained.tolist()
    return {
        "n_tokens": stats.n_tokens,
        "variance_explained": {"base": base, "chat": chat},
        "l0": stats.l0,
        "dead_fraction": stats.dead_fraction,
        "dead_window": f"latents that never fired on the {stats.n_tokens} held-out tokens",
    }


def _scaling(
    cc: CrossCoder,
    activations: torch.Tensor,
    taxonomy: Taxonomy,
    cfg: ScalingSettings,
    rule: ChatSpecificRule,
    chunk: int,
) -> tuple[LatentScaling, dict[str, Any]]:
    """Latent scaling of the chat-only latents and a seeded sample of shared ones, plus its summary."""
    generator = torch.Generator().manual_seed(cfg.seed)
    groups = {
        "chat_only": sample_latents(taxonomy, "chat_only", cfg.max_chat_only, generator),
        "shared": sample_latents(taxonomy, "shared", cfg.max_shared, generator),
    }
    result = latent_scaling(cc, activations, torch.cat(list(groups.values())), chunk)
    group_of = torch.cat([torch.full((len(ids),), i) for i, ids in enumerate(groups.values())])
    summary = {}
    for i, name in enumerate(groups):
        rows = group_of == i
        summary[name] = {
            "n_tested": int(rows.sum()),
            "median_nu_r": nan_median(result.nu_r[rows]),
            "median_nu_eps": nan_median(result.nu_eps[rows]),
            "median_nu_a": nan_median(result.nu_a[rows]),
            "median_neg_log_nu_r": nan_median(result.neg_log_nu_r[rows]),
            "median_neg_log_nu_eps": nan_median(result.neg_log_nu_eps[rows]),
            "n_nu_undefined": int((result.nu_r[rows].isnan() | result.nu_eps[rows].isnan()).sum()),
            # defined but outside the reliability filter: neither ranked nor called chat-specific
            "n_outside_filter": int((~result.in_range(rule)[rows] & ~result.nu_r[rows].isnan()
                                     & ~result.nu_eps[rows].isnan()).sum()),
        }
    n_specific = int(result.chat_specific(taxonomy.delta_norm, rule).sum())
    return result, {"groups": summary, "n_chat_specific": n_specific, "rule": asdict(rule), "seed": cfg.seed}


def _chat_specific_latents(
    cc: CrossCoder,
    pair: Any,
    probe_ids: torch.Tensor,
    probe_mask: torch.Tensor,
    taxonomy: Taxonomy,
    scaling: LatentScaling,
    rule: ChatSpecificRule,
    cfg: ScalingSettings,
) -> list[dict[str, Any]]:
    """The ``top_latents`` chat-only latents with the highest base uselessness (−log ν_ε, seed 002), each
    with the tokens it fires on most in the probes. Latents whose ν_ε is undefined, or whose ν_r or ν_ε is outside
    the reliability filter (the reference ranks only ``-0.1 <= ν <= 2``), are left out."""
    chat_only = (taxonomy.delta_norm[scaling.latents] >= rule.chat_only_min) & scaling.in_range(rule)
    score = scaling.neg_log_nu_eps
    ranked = [i for i in score.argsort(descending=True).tolist() if chat_only[i] and score[i].isfinite()]
    chosen = ranked[: cfg.top_latents]
    if not chosen:
        return []
    latents = scaling.latents[chosen]
    acts = latent_activations(cc, pair, probe_ids, probe_mask, latents)
    tokens = top_tokens(acts, probe_ids, getattr(pair, "tokenizer", None), cfg.top_tokens)
    specific = scaling.chat_specific(taxonomy.delta_norm, rule)
    return [
        {
            "latent": int(scaling.latents[i]),
            "delta_norm": float(taxonomy.delta_norm[scaling.latents[i]]),
            "nu_r": float(scaling.nu_r[i]),
            "nu_eps": float(scaling.nu_eps[i]),
            "neg_log_nu_eps": float(score[i]),
            "firing_frequency": float(taxonomy.firing_frequency[scaling.latents[i]]),
            "chat_specific": bool(specific[i]),
            "top_tokens": [asdict(t) for t in rows],
        }
        for i, rows in zip(chosen, tokens)
    ]


def _diagnostics(
    cc: CrossCoder,
    pair: Any,
    activations: torch.Tensor,
    taxonomy: Taxonomy,
    scaling: LatentScaling | None,
    rule: ChatSpecificRule,
    cfg: DiagnosticsSettings,
    chunk: int,
) -> Diagnostics:
    """Sparsity-artifact diagnostics; the template share only when the held-out rows carry their token ids and
    the tokenizer has the chat template's markers."""
    tokens = token_table(activations)
    template = None if tokens is None else heldout_template_mask(tokens, getattr(pair, "tokenizer", None))
    if template is None:
        log.warning("template share not computed: the held-out activations carry no token ids, or the tokenizer "
                    "has no chat-template markers (crosscoder_pl.data.chat_positions)")
    classes = {name: taxonomy.members(name) for name in ("chat_only", "base_only", "shared")}
    extra = {}
    if scaling is not None:
        extra["chat_only_in_filter"] = scaling.latents[(taxonomy.delta_norm[scaling.latents] >= rule.chat_only_min)
                                                       & scaling.in_range(rule)]
        extra["chat_specific"] = scaling.latents[scaling.chat_specific(taxonomy.delta_norm, rule)]
    rules = DiagnosticRules(cfg.interval, cfg.twin_min_cosine, cfg.template_majority, (rule.nu_min, rule.nu_max))
    return sparsity_diagnostics(cc, activations, classes, scaling, rules, template, chunk, extra)


def _write_latents(taxonomy: Taxonomy, scaling: LatentScaling | None, rule: ChatSpecificRule,
                   diagnostics: Diagnostics | None, path: Path) -> Path:
    """``latents.csv``: one row per latent; scaling and diagnostics columns are empty where not computed."""
    n = taxonomy.delta_norm.numel()
    scaled: dict[str, list[Any]] = {}
    if scaling is not None:
        per_latent = {
            "nu_r": scaling.nu_r.tolist(),
            "nu_eps": scaling.nu_eps.tolist(),
            "nu_a": scaling.nu_a.tolist(),
            "neg_log_nu_r": scaling.neg_log_nu_r.tolist(),
            "neg_log_nu_eps": scaling.neg_log_nu_eps.tolist(),
            "neg_log_nu_a": scaling.neg_log_nu_a.tolist(),
            "chat_specific": scaling.chat_specific(taxonomy.delta_norm, rule).tolist(),
            "nu_in_range": scaling.in_range(rule).tolist(),
            "scaling_note": scaling.filter_notes(rule),
        }
        for key, values in per_latent.items():
            scaled[key] = [""] * n
            for j, value in zip(scaling.latents.tolist(), values):
                scaled[key][j] = value
    if diagnostics is not None:
        scaled.update({key: ["" if v is None else v for v in values] for key, values in diagnostics.columns.items()})
    fixed = {
        "latent": range(n),
        "delta_norm": taxonomy.delta_norm.tolist(),
        "decoder_cosine": taxonomy.decoder_cosine.tolist(),
        "firing_frequency": taxonomy.firing_frequency.tolist(),
        "class": taxonomy.class_names(),
    }
    columns = [fixed.get(key) or scaled.get(key) or [""] * n for key in LATENT_COLUMNS]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(LATENT_COLUMNS)
        writer.writerows(zip(*columns))
    return path


def _causal(
    cc: CrossCoder,
    pair: Any,
    probe_ids: torch.Tensor,
    probe_mask: torch.Tensor,
    taxonomy: Taxonomy,
    cfg: CausalSettings,
    memory_budget_mb: float | None,
    out: Path,
) -> dict[str, Any]:
    """Causal validation of the most frequent shared latents; writes its CSV and figure."""
    shared = taxonomy.members("shared")
    latents = most_frequent(shared, taxonomy.firing_frequency, cfg.max_latents)
    result = causal_validation(cc, pair, probe_ids, probe_mask, latents, cfg.latents_per_batch, memory_budget_mb)
    write_csv(result, out / "causal_validation.csv")
    plot_cosine_vs_causal(result, out / "cosine_vs_causal.png")
    selection = (
        f"{latents.numel()} most frequent shared latents on the held-out tokens "
        f"(of {shared.numel()} shared; cap {cfg.max_latents})"
    )
    return {**result.summary(), "n_probes": probe_ids.shape[0], "selection": selection}


def _patching(
    cc: CrossCoder,
    pair: Any,
    chats: ChatSource | None,
    taxonomy: Taxonomy,
    scaling: LatentScaling | None,
    cfg: PatchingSettings,
    nu_range: tuple[float, float],
    memory_budget_mb: float | None,
    out: Path,
    timings: dict[str, float],
) -> dict[str, Any]:
    """Base→chat latent patching on held-out chats (patching.csv, patching.png), or why not (logged, and
    ``{"skipped": reason}`` in metrics.json): never a figure computed on something else."""
    inputs = patching_inputs(pair, chats, cfg.max_chats)
    if isinstance(inputs, str):
        log.warning("base→chat patching skipped: %s", inputs)
        return {"skipped": inputs}
    if scaling is None:
        log.info("base→chat patching: no latent scaling results, so no ν sets (enable analysis.scaling for them)")
    with _timed("patching", timings):
        return run_patching(cc, pair, inputs, taxonomy, scaling, cfg, nu_range, memory_budget_mb, out)
