"""Causal validation of latents across the two models (docs/method.md "Causal validation").

For latent j and model m, the ablation subtracts ``f_j * W_dec[j, m]`` (raw space; ``f`` encodes the
paired residuals of both models at that position) from model m's layer output at every content
position, and the rest of the model runs on the edited stream. Per probe, ``KL(clean || ablated)`` of
the next-token distributions is averaged over the content positions (BOS is never edited, so its KL
is exactly 0 and is left out; padding is never scored): ``kl[j, m, probe]``. Causal equivalence of j
is the Pearson correlation of ``kl[j, base]`` and ``kl[j, chat]`` over the probes where j fires; nan with
fewer than 3 such probes or when either vector is constant on them.

Cost: one clean forward per model over the probes (kept: final hidden states, ``n_probes * seq *
d_model`` per model), then per latent ``2 * n_probes_active`` sequence forwards, one per model and probe
where the latent fires. Probes where it never fires are not run: their ablation edits nothing, so their KL
is exactly 0. The (latent, probe) pairs are packed into the batch dimension of shared forward passes, at
most ``latents_per_batch * n_probes`` sequences per forward and fewer when the memory budget asks; the
LM head then runs on a budgeted number of positions at a time, clean log-probs recomputed alongside
(``probes.compare_positions``). Memory does not grow with ``n_probes * seq * vocab``.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from crosscoder_pl.analysis.decoder_norms import decoder_cosine, delta_norm
from crosscoder_pl.analysis.eval_mode import check_eval_mode
from crosscoder_pl.analysis.probes import (
    check_head,
    check_probes,
    clean_run,
    compare_positions,
    content_mask,
    encode_content,
    final_hidden,
    masked_mean,
    memory_budget_bytes,
    pair_models,
    positions_per_chunk,
    rows_per_chunk,
)
from crosscoder_pl.analysis.stats import nan_median
from crosscoder_pl.crosscoder import CrossCoder

PROBES_PER_ENCODE = 8
CSV_COLUMNS = (
    "latent",
    "delta_norm",
    "decoder_cosine",
    "pearson",
    "mean_kl_base",
    "mean_kl_chat",
    "n_probes",
    "n_probes_active",
)


@dataclass
class CausalResult:
    """Per tested latent ``[L]``: ids, Δnorm, decoder cosine, ``kl [L, 2, n_probes]``, active probes, Pearson."""

    latents: torch.Tensor
    delta_norm: torch.Tensor
    decoder_cosine: torch.Tensor
    kl: torch.Tensor
    n_probes_active: torch.Tensor
    pearson: torch.Tensor

    def rows(self) -> list[dict[str, Any]]:
        """One dict per latent with the keys of ``CSV_COLUMNS``."""
        mean_kl = self.kl.mean(-1)
        n_probes = torch.full_like(self.latents, self.kl.shape[-1])
        columns = (
            self.latents,
            self.delta_norm,
            self.decoder_cosine,
            self.pearson,
            mean_kl[:, 0],
            mean_kl[:, 1],
            n_probes,
            self.n_probes_active,
        )
        return [dict(zip(CSV_COLUMNS, values)) for values in zip(*(c.tolist() for c in columns))]

    def summary(self) -> dict[str, float | int]:
        """Medians over the latents whose Pearson is defined (the points of the figure)."""
        defined = ~self.pearson.isnan()
        return {
            "n_latents_tested": self.latents.numel(),
            "n_pearson_nan": int((~defined).sum()),
            "median_pearson": nan_median(self.pearson[defined]),
            "median_decoder_cosine": nan_median(self.decoder_cosine[defined]),
            "median_decoder_cosine_all_tested": nan_median(self.decoder_cosine),
            "mean_kl_base": float(self.kl[:, 0].mean()),  # nan when no latent was tested
            "mean_kl_chat": float(self.kl[:, 1].mean()),
        }


def most_frequent(candidates: torch.Tensor, frequency: torch.Tensor, max_latents: int) -> torch.Tensor:
    """The ``max_latents`` ids among ``candidates [n]`` with the highest ``frequency [F]``, most frequent first."""
    order = frequency[candidates].argsort(descending=True, stable=True)
    return candidates[order[:max_latents]]


def pearson(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Row-wise Pearson correlation of ``a, b [L, n]`` over the entries where ``mask [L, n]`` holds (all when
    None): ``[L]``, nan where a row has fewer than 3 such entries or is constant on them."""
    w = torch.ones_like(a, dtype=torch.float64) if mask is None else mask.double()
    n = w.sum(-1, keepdim=True)
    a = (a.double() - (a.double() * w).sum(-1, keepdim=True) / n.clamp_min(1)) * w
    b = (b.double() - (b.double() * w).sum(-1, keepdim=True) / n.clamp_min(1)) * w
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    defined = (norms > 0) & (n.squeeze(-1) >= 3)
    return torch.where(defined, (a * b).sum(-1) / norms.clamp_min(1e-300), torch.nan).float()


@torch.inference_mode()
def causal_validation(
    crosscoder: CrossCoder,
    pair: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    latents: torch.Tensor,
    latents_per_batch: int | None = 4,
    memory_budget_mb: float | None = None,
) -> CausalResult:
    """Ablate each latent of ``latents [L]`` in both models on the probes ``[n_probes, seq]``; see module doc.

    ``latents_per_batch``: latents packed per forward (None: as many as the budget allows);
    ``memory_budget_mb``: working memory for the forwards (None: from the device, ``memory_budget_bytes``).
    """
    check_eval_mode(crosscoder)
    check_probes(input_ids, attention_mask)
    if latents_per_batch is not None and latents_per_batch < 1:
        raise ValueError(f"latents_per_batch must be >= 1 (or null: from the memory budget), got {latents_per_batch}")
    models = pair_models(pair)
    for model in models:
        check_head(model)
    latents = latents.long().cpu()
    n_probes, seq = input_ids.shape
    content = content_mask(attention_mask)
    budget = memory_budget_bytes(memory_budget_mb, next(models[0].parameters()).device)
    rows = min(rows_per_chunk(budget, model, seq) for model in models)
    if latents_per_batch is not None:
        rows = min(rows, latents_per_batch * n_probes)
    clean = clean_run(pair, input_ids, attention_mask, rows)
    codes = _latent_codes(crosscoder, clean.residual, content, latents)  # [P, S, L], crosscoder's device
    active = (codes > 0).any(dim=1).T.cpu()  # [L, P]
    pair_latent, pair_probe = active.nonzero(as_tuple=True)
    decoder = crosscoder.decoder(normalised=False).detach()[latents.to(codes.device)]  # [L, 2, d]
    kl = torch.zeros(latents.numel(), crosscoder.n_models, n_probes)
    for start in tqdm(range(0, pair_latent.numel(), rows), desc="causal validation", unit="batch"):
        lat, probe = pair_latent[start : start + rows], pair_probe[start : start + rows]  # one row per pair
        coef = codes[probe, :, lat]  # [R, S]: the row latent's code at every position of its probe
        where = content[probe]  # [R, S]: the positions edited and scored
        row, pos = where.nonzero(as_tuple=True)
        for m, model in enumerate(models):
            delta = coef[..., None] * decoder[lat, m][:, None, :]  # [R, S, d_model]
            ablated = final_hidden(model, pair.layer, input_ids[probe], attention_mask[probe], _subtract(delta))
            at = (row.to(ablated.device), pos.to(ablated.device))
            reference = clean.final[m][probe.to(ablated.device)]  # [R, S, d_model]
            chunk = positions_per_chunk(budget, model.config.get_text_config().vocab_size)
            shift, _ = compare_positions(model, reference[at], [ablated[at]], None, chunk)
            per_position = torch.zeros(where.shape, device=shift.device).index_put_(at, shift[0])
            kl[lat, m, probe] = masked_mean(per_position, where).cpu()
    return CausalResult(
        latents=latents,
        delta_norm=delta_norm(crosscoder).cpu()[latents],
        decoder_cosine=decoder_cosine(crosscoder).cpu()[latents],
        kl=kl,
        n_probes_active=active.sum(-1),
        # Only probes where the latent fires: elsewhere both KLs are exactly 0, and those shared zeros would
        # make any two latents that fire on the same probes look causally equivalent.
        pearson=pearson(kl[:, 0], kl[:, 1], active),
    )


def write_csv(result: CausalResult, path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(result.rows())
    return path


def cosine_vs_causal_figure(result: CausalResult, max_labelled: int = 20, n_notable: int = 5) -> Figure:
    """Decoder cosine (x) vs causal Pearson (y) per latent, both medians drawn and labelled; every latent named by
    id when at most ``max_labelled`` are plotted, else the ``n_notable`` least causally equivalent ones."""
    summary = result.summary()
    defined = ~result.pearson.isnan()
    ids, xs, ys = result.latents[defined], result.decoder_cosine[defined], result.pearson[defined]
    fig = Figure(figsize=(5.5, 4.8))
    FigureCanvasAgg(fig)  # Agg explicitly; no pyplot global state in a training process
    ax = fig.subplots()
    ax.scatter(xs.numpy(), ys.numpy(), s=12, alpha=0.7)
    cosine, causal = summary["median_decoder_cosine"], summary["median_pearson"]
    ax.axvline(cosine, color="tab:red", linestyle="--", label=f"median cosine {cosine:.3f}")
    ax.axhline(causal, color="tab:green", linestyle="--", label=f"median Pearson {causal:.3f}")
    labelled = range(ids.numel()) if ids.numel() <= max_labelled else ys.argsort()[:n_notable].tolist()
    for i in labelled:
        ax.annotate(f"#{int(ids[i])}", (float(xs[i]), float(ys[i])), xytext=(3, 3), textcoords="offset points",
                    fontsize=7)
    ax.set_xlabel("decoder cosine, base vs chat (dimensionless, −1 to 1)")
    ax.set_ylabel("causal equivalence: Pearson r of per-probe KL shifts (−1 to 1)")
    ax.set_title(f"{int(defined.sum())} latents ({summary['n_pearson_nan']} with undefined Pearson left out)")
    ax.legend(loc="lower left")
    fig.tight_layout()
    return fig


def plot_cosine_vs_causal(result: CausalResult, path: Path) -> Path:
    """Decoder cosine (x) vs causal Pearson (y) per latent into ``path`` (`cosine_vs_causal_figure`)."""
    fig = cosine_vs_causal_figure(result)
    fig.savefig(path, dpi=120)
    return path


def _latent_codes(
    crosscoder: CrossCoder, residual: torch.Tensor, content: torch.Tensor, latents: torch.Tensor
) -> torch.Tensor:
    """Codes of ``latents`` only, ``[n_probes, seq, L]``; a few probes at a time bounds the ``[.., F]`` codes."""
    index = latents.to(crosscoder.W_dec.device)
    steps = zip(residual.split(PROBES_PER_ENCODE), content.split(PROBES_PER_ENCODE))
    return torch.cat([encode_content(crosscoder, r, c)[..., index] for r, c in steps])


def _subtract(delta: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda hidden: hidden - delta.to(hidden)

