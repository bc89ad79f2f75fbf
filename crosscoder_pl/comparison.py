"""Two artifacts of the same model pair side by side (``python analyze.py artifact=A compare=B``): Minder et al.
2025's L1-vs-BatchTopK comparison for any two crosscoders.

Reads each artifact's ``metrics.json`` and ``latents.csv`` (nothing is recomputed: re-analyse an artifact first
if it predates an analysis) and writes into the output directory:

- ``comparison.md``: one table (validation, taxonomy counts, latent scaling, the sparsity-artifact diagnostics,
  the base→chat patching); ``comparison.json``: the same rows, and every number of both artifacts' diagnostics
  and patching;
- ``comparison_nu.png``: ν_r and ν_ε of the chat-only and shared latents, one column per artifact;
- ``comparison_patching.png``: the share of the base–chat gap each patching set closes, per position class, the
  two artifacts side by side.

Both artifacts must describe the same pair and layer: a comparison across pairs is refused.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crosscoder_pl.headline import headline_figures, is_number

FILES = ("comparison.md", "comparison.json", "comparison_nu.png", "comparison_patching.png")
# (row title, headline figure), in the table's order.
HEADLINE_ROWS = (
    ("variance explained, base", "ve_base"), ("variance explained, chat", "ve_chat"), ("L0 (held-out)", "l0"),
    ("dead fraction (held-out)", "dead_fraction"), ("shared latents", "shared"), ("base-only latents", "base_only"),
    ("chat-only latents", "chat_only"), ("dead latents", "dead"), ("truly chat-specific latents", "chat_specific"),
    ("median causal Pearson (shared)", "median_causal_pearson"),
)
# (row title, path in metrics.json): the sparsity-artifact diagnostics (crosscoder_pl.analysis.diagnostics).
DIAGNOSTIC_ROWS = (
    ("chat-only latents tested by latent scaling", "diagnostics.complete_shrinkage.n_chat_only"),
    ("Complete Shrinkage: share with ν_ε inside the shared 95%", "diagnostics.complete_shrinkage.share_inside"),
    ("Latent Decoupling: share with ν_r inside the shared 95%", "diagnostics.latent_decoupling.share_inside"),
    ("twin pairs (chat-only/base-only, decoder cosine > 0.9)", "diagnostics.twins.n_pairs"),
    ("twins: median co-firing (both / either)", "diagnostics.twins.median_cofiring"),
    ("chat-only latents firing mainly on template tokens", "diagnostics.template.chat_only.share_mainly_template"),
    ("patching: chat-only latents in the ν filter (the halves' pool)", "patching.selection.n_pool"),
)
# The base→chat patching sets (crosscoder_pl.analysis.patching) and position classes, in the table's order.
PATCH_SETS = ("none", "error", "all_latents", "chat_only", "delta_top", "delta_bottom", "nu_top", "nu_bottom")
PATCH_CLASSES = ("reply", "first_reply", "template")
NU_CLASSES = ("chat_only", "shared")


@dataclass(frozen=True)
class Artifact:
    """What a comparison reads of one artifact: its name, ``metrics.json`` and ``latents.csv`` rows."""

    name: str
    metrics: Mapping[str, Any]
    latents: list[dict[str, str]]

    @classmethod
    def read(cls, directory: Path) -> Artifact:
        metrics_path, latents_path = directory / "metrics.json", directory / "latents.csv"
        if not metrics_path.is_file():
            raise FileNotFoundError(f"{directory} is not an artifact: no metrics.json (train.py or analyze.py "
                                    "writes one)")
        latents: list[dict[str, str]] = []
        if latents_path.is_file():
            with latents_path.open(newline="") as f:
                latents = list(csv.DictReader(f))
        metrics = json.loads(metrics_path.read_text())
        return cls(_label(metrics), metrics, latents)

    def nu(self, column: str, class_name: str) -> list[float]:
        """The finite values of ``column`` (``nu_r``, ``nu_eps``) over the latents of ``class_name``."""
        values = [_float(row.get(column)) for row in self.latents if row.get("class") == class_name]
        return [v for v in values if math.isfinite(v)]


def compare_artifacts(first: Path, second: Path, out_dir: Path) -> dict[str, Any]:
    """Write the `FILES` of ``first`` vs ``second`` into ``out_dir``; return ``{"artifacts": [...], "rows": [...]}``
    (each row: ``title`` and one value per artifact, None where an artifact lacks the figure)."""
    a, b = Artifact.read(Path(first)), Artifact.read(Path(second))
    _check_same_pair(a, b, first, second)
    if a.name == b.name:
        a, b = Artifact(f"{a.name} ({Path(first).parent.name})", a.metrics, a.latents), \
            Artifact(f"{b.name} ({Path(second).parent.name})", b.metrics, b.latents)
    rows = comparison_rows(a.metrics, b.metrics)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"artifacts": [str(Path(first).resolve()), str(Path(second).resolve())], "names": [a.name, b.name],
              "rows": rows, "all": [{block: m.get(block) for block in ("diagnostics", "patching")}
                                    for m in (a.metrics, b.metrics)]}
    (out_dir / "comparison.json").write_text(json.dumps(_plain(result), indent=2) + "\n")
    (out_dir / "comparison.md").write_text(render_table(a.name, b.name, rows, a.metrics))
    plot_nu(a, b, out_dir / "comparison_nu.png")
    plot_patching(a, b, out_dir / "comparison_patching.png")
    return result


def comparison_rows(first: Mapping[str, Any], second: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The table's rows (each ``title`` and one value per artifact, None where it lacks the figure): the headline
    figures, the sparsity-artifact diagnostics and, per patching set and position class, KL(chat ‖ patched) and the
    share of the base–chat gap it closes (``{"kl": ..., "gap_closed": ...}``)."""
    both = (first, second)
    heads = [headline_figures(m) for m in both]
    rows = [{"title": "sparsity", "values": [m.get("artifact", {}).get("sparsity", "batchtopk") for m in both]}]
    rows += [{"title": title, "values": [h[key] for h in heads]} for title, key in HEADLINE_ROWS]
    rows += [{"title": title, "values": [_at(m, path) for m in both]} for title, path in DIAGNOSTIC_ROWS]
    for name in PATCH_SETS:
        for where in PATCH_CLASSES:
            values = [_patch_cell(m, name, where) for m in both]
            if any(v is not None for v in values):
                rows.append({"title": f"patching {name}: KL on {where.replace('_', ' ')} tokens (gap closed)",
                             "values": values})
    return rows


def render_table(first: str, second: str, rows: Sequence[Mapping[str, Any]], metrics: Mapping[str, Any]) -> str:
    art = metrics.get("artifact", {})
    head = (f"# {first} vs {second}\n\n{art.get('base_model')} vs {art.get('chat_model')}, layer {art.get('layer')}."
            "\n\n")
    lines = [f"| | {first} | {second} |", "|---|---|---|"]
    lines += [f"| {row['title']} | " + " | ".join(_cell(v) for v in row["values"]) + " |" for row in rows]
    lines.append("")
    lines.append("Every number of each artifact's diagnostics and patching: comparison.json (\"all\"); the sets and "
                 "position classes: docs/method.md \"Base→chat latent patching\".")
    return head + "\n".join(lines) + "\n"


def plot_nu(a: Artifact, b: Artifact, path: Path) -> Path:
    """Histograms of ν_r and ν_ε (rows) for each artifact (columns), chat-only over shared latents."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 6.5), layout="constrained")
    axes = fig.subplots(2, 2, squeeze=False)
    for col, art in enumerate((a, b)):
        for row, (column, label) in enumerate((("nu_r", "ν_r (reconstruction)"), ("nu_eps", "ν_ε (error)"))):
            ax = axes[row][col]
            for class_name in NU_CLASSES:
                values = art.nu(column, class_name)
                if values:
                    ax.hist(values, bins=40, range=(-1.0, 2.5), alpha=0.6, density=True,
                            label=f"{class_name} ({len(values)})")
            ax.set_title(f"{art.name}: {label}")
            ax.set_xlabel(label)
            ax.set_ylabel("density")
            ax.legend(fontsize="small")
    FigureCanvasAgg(fig).print_png(str(path))
    return path


def plot_patching(a: Artifact, b: Artifact, path: Path) -> Path:
    """Bars: the share of the base–chat gap each patching set closes, one panel per position class, the two
    artifacts side by side (a set an artifact lacks: no bar)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.8), layout="constrained")
    axes = fig.subplots(1, len(PATCH_CLASSES), squeeze=False)[0]
    sets = [name for name in PATCH_SETS if name != "none"]
    width = 0.4
    for ax, where in zip(axes, PATCH_CLASSES):
        for i, art in enumerate((a, b)):
            cells = [_patch_cell(art.metrics, name, where) for name in sets]
            heights = [math.nan if c is None or c["gap_closed"] is None else c["gap_closed"] for c in cells]
            ax.bar([x + (i - 0.5) * width for x in range(len(sets))], heights, width, label=art.name)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xticks(range(len(sets)), sets, rotation=40, ha="right", fontsize="small")
        ax.set_title(f"{where.replace('_', ' ')} tokens")
        ax.set_ylabel("share of the base–chat KL gap closed")
        ax.legend(fontsize="small")
    FigureCanvasAgg(fig).print_png(str(path))
    return path


def _check_same_pair(a: Artifact, b: Artifact, first: Path, second: Path) -> None:
    keys = ("base_model", "chat_model", "layer", "d_model")
    pa, pb = ({k: m.metrics.get("artifact", {}).get(k) for k in keys} for m in (a, b))
    if pa != pb:
        differ = ", ".join(f"{k}: {pa[k]!r} vs {pb[k]!r}" for k in keys if pa[k] != pb[k])
        raise ValueError(f"artifact={first} and compare={second} were not trained on the same pair ({differ}): a "
                         "comparison only means something for two crosscoders of one pair and layer")


def _label(metrics: Mapping[str, Any]) -> str:
    sparsity = metrics.get("artifact", {}).get("sparsity", "batchtopk")
    return {"batchtopk": "BatchTopK", "l1": "L1"}.get(sparsity, sparsity)


def _at(metrics: Mapping[str, Any], path: str) -> Any:
    """The value at dotted ``path`` of ``metrics`` (None where absent)."""
    node: Any = metrics
    for key in path.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _patch_cell(metrics: Mapping[str, Any], name: str, where: str) -> dict[str, float] | None:
    entry = _at(metrics, f"patching.sets.{name}")
    if not isinstance(entry, Mapping):
        return None
    return {"kl": entry.get("kl", {}).get(where), "gap_closed": entry.get("gap_closed", {}).get(where)}


def _float(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def _cell(value: Any) -> str:
    if isinstance(value, Mapping):  # a patching cell
        kl, closed = value.get("kl"), value.get("gap_closed")
        return _cell(kl) + ("" if closed is None else f" ({100 * closed:.0f}%)")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, bool) or not is_number(value):
        return str(value)
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 10:
        return f"{int(value):,}"
    return f"{value:.4g}"


def _plain(value: Any) -> Any:
    """``value`` with nan as None: strict JSON."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value
