"""Latent taxonomy by relative decoder norm (Minder et al. 2025; docs/method.md "Taxonomy").

``Δnorm_j = 0.5 * ((n[j, chat] - n[j, base]) / max(n[j, chat], n[j, base]) + 1)`` with decoder norms
measured in the normalised space: 0 = base-only, 1 = chat-only. A latent whose two decoder vectors are
both zero has no Δnorm (nan) and is "unclassified" unless dead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from crosscoder_pl.analysis.decoder_norms import decoder_cosine, delta_norm
from crosscoder_pl.analysis.eval_mode import check_eval_mode
from crosscoder_pl.crosscoder import CrossCoder
from crosscoder_pl.metrics import FiringCounts, VarianceExplained

# The seed card's key order; "dead" takes precedence over the Δnorm classes.
CLASSES = ("shared", "dead", "unclassified", "base_only", "chat_only")
SHARED, DEAD, UNCLASSIFIED, BASE_ONLY, CHAT_ONLY = range(len(CLASSES))


@dataclass(frozen=True)
class Thresholds:
    """Δnorm class boundaries: base_only ``Δ <= base_only_max``, chat_only ``Δ >= chat_only_min``,
    shared ``shared_min <= Δ < shared_max``."""

    base_only_max: float = 0.1
    chat_only_min: float = 0.9
    shared_min: float = 0.4
    shared_max: float = 0.6

    def __post_init__(self) -> None:
        if not 0 <= self.base_only_max < self.shared_min < self.shared_max <= self.chat_only_min <= 1:
            raise ValueError(
                "taxonomy thresholds must satisfy 0 <= base_only_max < shared_min < shared_max <= "
                f"chat_only_min <= 1, got {self}"
            )


@dataclass
class HeldoutStats:
    """One pass over held-out tokens: firing ``counts [F]``, ``variance_explained [2]`` (base, chat)."""

    counts: torch.Tensor
    variance_explained: torch.Tensor
    n_tokens: int

    @property
    def l0(self) -> float:
        """Mean active latents per token (= total firings / tokens)."""
        return float(self.counts.sum() / self.n_tokens)

    @property
    def dead_fraction(self) -> float:
        """Share of latents that never fired on these ``n_tokens`` tokens."""
        return float((self.counts == 0).double().mean())


@torch.inference_mode()
def heldout_statistics(crosscoder: CrossCoder, activations: torch.Tensor, chunk_tokens: int = 4096) -> HeldoutStats:
    """Firing counts and pooled variance explained on raw held-out activations ``[tokens, 2, d_model]``."""
    check_eval_mode(crosscoder)
    want = (crosscoder.n_models, crosscoder.d_model)
    if activations.dim() != 3 or tuple(activations.shape[1:]) != want or activations.shape[0] == 0:
        raise ValueError(
            f"held-out activations must be [tokens > 0, {want[0]}, {want[1]}], got {tuple(activations.shape)}"
        )
    device = crosscoder.W_dec.device
    # No synchronisation: under DDP only rank 0 writes the artifact, and a sync would wait for ranks that have left.
    firing = FiringCounts(crosscoder.n_latents, sync_on_compute=False).to(device)
    variance = VarianceExplained(crosscoder.n_models, crosscoder.d_model, sync_on_compute=False).to(device)
    for chunk in activations.split(chunk_tokens):
        chunk = chunk.to(crosscoder.W_dec)
        codes = crosscoder.encode(chunk)
        firing.update(codes)
        variance.update(chunk, crosscoder.decode(codes))
    return HeldoutStats(firing.compute().cpu(), variance.compute().cpu(), activations.shape[0])


def classify(delta: torch.Tensor, counts: torch.Tensor, thresholds: Thresholds) -> torch.Tensor:
    """Class index ``[F]`` into ``CLASSES``; a latent with zero ``counts`` is dead whatever its Δnorm."""
    t = thresholds
    classes = torch.full(delta.shape, UNCLASSIFIED, dtype=torch.long)
    classes[(delta >= t.shared_min) & (delta < t.shared_max)] = SHARED
    classes[delta <= t.base_only_max] = BASE_ONLY
    classes[delta >= t.chat_only_min] = CHAT_ONLY
    classes[counts == 0] = DEAD
    return classes


@dataclass
class Taxonomy:
    """Per-latent taxonomy facts, all ``[F]``; ``n_tokens`` is the size of the evaluation window."""

    delta_norm: torch.Tensor
    decoder_cosine: torch.Tensor
    firing_frequency: torch.Tensor
    classes: torch.Tensor
    n_tokens: int

    def counts(self) -> dict[str, int]:
        """Latents per class, keys in the seed card's order; the values sum to ``F``."""
        per_class = torch.bincount(self.classes, minlength=len(CLASSES))
        return {name: int(n) for name, n in zip(CLASSES, per_class)}

    def class_names(self) -> list[str]:
        return [CLASSES[i] for i in self.classes.tolist()]

    def members(self, name: str) -> torch.Tensor:
        """Latent ids ``[n]`` of class ``name``."""
        return (self.classes == CLASSES.index(name)).nonzero().flatten()


def build_taxonomy(crosscoder: CrossCoder, stats: HeldoutStats, thresholds: Thresholds) -> Taxonomy:
    """Δnorm, decoder cosine, firing frequency and class of every latent (window: ``stats``' tokens)."""
    delta = delta_norm(crosscoder).cpu()
    return Taxonomy(
        delta_norm=delta,
        decoder_cosine=decoder_cosine(crosscoder).cpu(),
        firing_frequency=(stats.counts / stats.n_tokens).float(),
        classes=classify(delta, stats.counts, thresholds),
        n_tokens=stats.n_tokens,
    )


def delta_histogram_figure(taxonomy: Taxonomy, thresholds: Thresholds, n_notable: int = 3) -> Figure:
    """Histogram of Δnorm over the latents that fired (log count axis): class boundaries dashed and labelled, the
    ``n_notable`` most base-sided and most chat-sided latents named by id."""
    live = (taxonomy.classes != DEAD) & ~taxonomy.delta_norm.isnan()
    ids = live.nonzero().squeeze(1)
    alive = taxonomy.delta_norm[ids]
    fig = Figure(figsize=(6.5, 3.8))
    FigureCanvasAgg(fig)  # Agg explicitly; no pyplot global state in a training process
    ax = fig.subplots()
    ax.hist(alive.numpy(), bins=100, range=(0.0, 1.0), color="tab:blue")
    bounds = ((thresholds.base_only_max, f"base-only ≤ {thresholds.base_only_max:g}"),
              (thresholds.shared_min, f"shared ≥ {thresholds.shared_min:g}"),
              (thresholds.shared_max, f"shared < {thresholds.shared_max:g}"),
              (thresholds.chat_only_min, f"chat-only ≥ {thresholds.chat_only_min:g}"))
    for x, label in bounds:
        ax.axvline(x, color="grey", linestyle="--", linewidth=0.8)
        ax.text(x, 0.98, label, rotation=90, ha="right", va="top", fontsize=7, color="dimgrey",
                transform=ax.get_xaxis_transform())
    if ids.numel():
        order = alive.argsort()
        low = [f"#{int(ids[i])} ({float(alive[i]):.3f})" for i in order[:n_notable]]
        high = [f"#{int(ids[i])} ({float(alive[i]):.3f})" for i in order.flip(0)[:n_notable]]
        ax.text(0.02, 0.02, "most base-sided: " + ", ".join(low) + "\nmost chat-sided: " + ", ".join(high),
                transform=ax.transAxes, fontsize=7, va="bottom", bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})
    ax.set_yscale("log")
    ax.set_xlabel("Δnorm, relative decoder norm (dimensionless: 0 = base only, 1 = chat only)")
    ax.set_ylabel("latents per 0.01 bin (log scale)")
    ax.set_title(f"Relative decoder norm of {ids.numel()} live latents")
    fig.tight_layout()
    return fig


def plot_delta_histogram(taxonomy: Taxonomy, thresholds: Thresholds, path: Path) -> Path:
    """Histogram of Δnorm over the latents that fired (log count axis) into ``path`` (`delta_histogram_figure`)."""
    fig = delta_histogram_figure(taxonomy, thresholds)
    fig.savefig(path, dpi=120)
    return path
