"""Base→chat latent patching (Minder, Dumas et al. 2025; docs/method.md "Base→chat latent patching").

The chat model runs on held-out chats with its layer-L output, at every content position (not BOS, not
padding: the crosscoder never saw them), replaced by the base model's plus chosen latents' decoder differences:

    h = x_base + Σ_{j∈S} f_j (d_j^chat − d_j^base)  [+ e],   e = x_chat − x_base − Σ_{all j} f_j (d_j^chat − d_j^base)

with ``f`` the eval-mode codes of the paired clean residuals and ``e`` the error term: everything in the
activation difference that no latent explains, ``(ε_chat − ε_base) + (b_dec^chat − b_dec^base)``. S = all
latents with the error term gives back ``x_chat`` exactly; S = none is the base activation (the gap). Scored:
``KL(chat ‖ patched)`` of the next-token distributions, pooled over the positions of each class
(`position_classes`), and the share of the base–chat gap closed, ``(KL_none − KL_S) / KL_none``.

Cost: one clean forward of each model (`probes.clean_run`, reused by every set) and one chat forward per set,
a budgeted number of chats at a time; the LM head runs a budgeted number of positions at a time
(`probes.compare_positions`): never ``[n, seq, vocab]`` at once.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from crosscoder_pl.analysis.eval_mode import check_eval_mode
from crosscoder_pl.analysis.probes import (
    check_head,
    check_probes,
    clean_run,
    compare_positions,
    content_mask,
    encode_content,
    final_hidden,
    memory_budget_bytes,
    pair_models,
    positions_per_chunk,
    rows_per_chunk,
)
from crosscoder_pl.analysis.scaling import LatentScaling
from crosscoder_pl.analysis.taxonomy import CHAT_ONLY, Taxonomy
from crosscoder_pl.config import PatchingSettings
from crosscoder_pl.crosscoder import CrossCoder
from crosscoder_pl.data.cache import NoHeldoutChats
from crosscoder_pl.data.chat_positions import (
    ChatMarkers,
    chat_markers,
    first_of_runs,
    reply_mask,
    template_mask,
)

log = logging.getLogger(__name__)

CSV, FIGURE = "patching.csv", "patching.png"
POSITION_CLASSES = ("reply", "first_reply", "template")
CLASS_LABELS = {"reply": "reply tokens", "first_reply": "first reply tokens", "template": "template tokens"}
NONE = "none"
# float32 [F] code vectors alive per token while a chunk is patched (codes, a set's slice of them, one spare).
CODE_COPIES = 3


ChatSource = Callable[[int], tuple[torch.Tensor, torch.Tensor]]
"""``chats(n)``: up to ``n`` held-out chats, ``input_ids, attention_mask [n, seq]`` (a data module's
``chat_probe_batch``); raises `NoHeldoutChats` when it has none."""


@dataclass(frozen=True)
class PatchSet:
    """One patch: the decoder differences of ``latents`` (ids ``[L]``, possibly none) and, with ``error``, the
    error term, added to the base model's activation."""

    name: str
    latents: torch.Tensor
    error: bool = False


@dataclass
class PatchingResult:
    """``kl [n_sets, n_classes]``: mean KL(chat ‖ patched) per set and position class (`POSITION_CLASSES`),
    pooled over ``n_positions [n_classes]`` positions of ``n_chats`` chats (nan for a class without any)."""

    sets: list[PatchSet]
    kl: torch.Tensor
    n_positions: torch.Tensor
    n_chats: int

    def gap_closed(self) -> torch.Tensor:
        """``[n_sets, n_classes]``: ``(KL_none − KL_S) / KL_none``, nan without a "none" set or a positive gap."""
        names = [s.name for s in self.sets]
        if NONE not in names:
            return torch.full_like(self.kl, math.nan)
        return gap_closed(self.kl[names.index(NONE)], self.kl)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per set: name, latents, error term, then KL and gap closed per class."""
        closed = self.gap_closed()
        return [
            {"set": s.name, "n_latents": s.latents.numel(), "error_term": s.error,
             **{f"kl_{c}": float(self.kl[i, k]) for k, c in enumerate(POSITION_CLASSES)},
             **{f"gap_closed_{c}": float(closed[i, k]) for k, c in enumerate(POSITION_CLASSES)}}
            for i, s in enumerate(self.sets)
        ]

    def summary(self) -> dict[str, Any]:
        """The metrics.json entry: per set its figures, and the positions scored per class."""
        sets = {}
        for row in self.rows():
            sets[row["set"]] = {
                "n_latents": row["n_latents"], "error_term": row["error_term"],
                "kl": {c: row[f"kl_{c}"] for c in POSITION_CLASSES},
                "gap_closed": {c: row[f"gap_closed_{c}"] for c in POSITION_CLASSES},
            }
        return {"sets": sets, "n_chats": self.n_chats,
                "n_positions": dict(zip(POSITION_CLASSES, self.n_positions.tolist()))}


def gap_closed(kl_none: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
    """``(KL_none − KL_S) / KL_none`` elementwise (broadcast); nan where the gap ``KL_none`` is not positive."""
    return torch.where(kl_none > 0, (kl_none - kl) / kl_none, math.nan)


# --- which latents ---------------------------------------------------------------------------------------


def halves(latents: torch.Tensor, score: torch.Tensor, descending: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The first and last ``n // 2`` of ``latents [n]`` ordered by ``score [n]`` (ties: lower id first). Equal
    sizes, as in the reference code: with an odd ``n`` the median latent is in neither half."""
    by_id = latents.argsort()
    order = by_id[score[by_id].argsort(descending=descending, stable=True)]
    half = latents.numel() // 2
    return latents[order[:half]], latents[order[latents.numel() - half:]]


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of ``values [n]``, ties sharing their average rank (pandas' ``rank()``)."""
    _, inverse, counts = values.unique(sorted=True, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()
    return (last - (counts.double() - 1) / 2)[inverse]


def patch_sets(
    taxonomy: Taxonomy, scaling: LatentScaling | None, nu_min: float, nu_max: float
) -> tuple[list[PatchSet], dict[str, Any]]:
    """The report's sets: none, the error term, all latents, all chat-only latents, and the top / bottom halves of
    a pool of chat-only latents by Δnorm (top: highest) and by the ν rank sum (rank of ν_r + rank of ν_ε; top:
    lowest, the most chat-specific). As in the reference code, the pool is the chat-only latents latent scaling
    tested with ``nu_min <= ν_r, ν_ε <= nu_max``, the same for both rankings; without scaling results the Δnorm
    halves split all chat-only latents and the ν sets are left out. Returns the sets and how they were chosen."""
    empty = torch.zeros(0, dtype=torch.long)
    chat_only = taxonomy.members("chat_only")
    sets = [PatchSet(NONE, empty), PatchSet("error", empty, error=True),
            PatchSet("all_latents", torch.arange(taxonomy.delta_norm.numel())), PatchSet("chat_only", chat_only)]
    if scaling is None:
        pool, note = chat_only, "all chat-only latents (no latent scaling results: the ν sets are left out)"
    else:
        keep = taxonomy.classes[scaling.latents] == CHAT_ONLY
        for nu in (scaling.nu_r, scaling.nu_eps):
            keep &= nu.isfinite() & (nu >= nu_min) & (nu <= nu_max)
        pool = scaling.latents[keep]
        note = f"chat-only latents tested by latent scaling with {nu_min:g} <= ν_r, ν_ε <= {nu_max:g}"
    top, bottom = halves(pool, taxonomy.delta_norm[pool], descending=True)
    sets += [PatchSet("delta_top", top), PatchSet("delta_bottom", bottom)]
    if scaling is not None:
        keep_nu = keep.nonzero().flatten()
        rank_sum = average_ranks(scaling.nu_r[keep_nu]) + average_ranks(scaling.nu_eps[keep_nu])
        top, bottom = halves(pool, rank_sum, descending=False)
        sets += [PatchSet("nu_top", top), PatchSet("nu_bottom", bottom)]
    if pool.numel() < 2:
        log.warning("patching: %d latent(s) in the pool (%s): the halves are empty", pool.numel(), note)
    return sets, {"pool": note, "n_pool": pool.numel(), "n_chat_only": chat_only.numel()}


# --- which positions -------------------------------------------------------------------------------------


def position_classes(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, markers: ChatMarkers, first_reply_tokens: int
) -> torch.Tensor:
    """``[n_classes, n, seq]`` bool, `POSITION_CLASSES` order; position t is scored by the next-token distribution
    there, and only at content positions whose next token exists.

    - reply: where a reply token (or a reply's closing tag) is predicted: a reply token's position, and the
      newline before the reply's first token (the reference code's assistant prediction mask);
    - first_reply: the positions of each reply's first ``first_reply_tokens`` tokens (the reference's
      ``k_first``: its first 10 prediction positions less the template newline, i.e. 9);
    - template: the positions of template tokens (turn tags, role names, their newlines).
    """
    reply = reply_mask(input_ids, markers, attention_mask)
    predicts_reply = torch.zeros_like(reply)
    predicts_reply[:, :-1] = reply[:, 1:]
    has_next = torch.zeros_like(reply)
    has_next[:, :-1] = attention_mask[:, 1:].bool()
    scored = content_mask(attention_mask) & has_next
    classes = (reply | predicts_reply, first_of_runs(reply, first_reply_tokens),
               template_mask(input_ids, markers, attention_mask))
    return torch.stack(classes) & scored


# --- the experiment --------------------------------------------------------------------------------------


@torch.inference_mode()
def base_to_chat_patching(
    crosscoder: CrossCoder,
    pair: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    markers: ChatMarkers,
    sets: Sequence[PatchSet],
    first_reply_tokens: int = 9,
    memory_budget_mb: float | None = None,
) -> PatchingResult:
    """KL(chat ‖ patched) per set and position class on chats ``input_ids, attention_mask [n, seq]`` (BOS first).

    Args:
        crosscoder: folded, in eval mode (raw activations in and out).
        pair: ``base``, ``chat``, ``layer``.
        markers: the chat template's token ids (`crosscoder_pl.data.chat_positions.chat_markers`).
        sets: what to patch; a set named "none" is the gap the others are measured against.
        memory_budget_mb: working memory of the forwards (None: from the device, `probes.memory_budget_bytes`).
    """
    check_eval_mode(crosscoder)
    check_probes(input_ids, attention_mask)
    if not sets:
        raise ValueError("no set to patch: pass at least one PatchSet")
    chat = pair.chat
    check_head(chat)
    classes = position_classes(input_ids, attention_mask, markers, first_reply_tokens)  # [C, n, seq]
    for name, count in zip(POSITION_CLASSES, classes.flatten(1).sum(1).tolist()):
        if count == 0:
            log.warning("patching: no %s position in the %d chats: its KL is nan", name, input_ids.shape[0])
    content, scored = content_mask(attention_mask), classes.any(0)
    budget = memory_budget_bytes(memory_budget_mb, next(chat.parameters()).device)
    seq = input_ids.shape[1]
    rows = min(rows_per_chunk(budget, model, seq) for model in pair_models(pair))
    rows = min(rows, max(1, budget // (CODE_COPIES * seq * crosscoder.n_latents * 4)))  # codes [rows, seq, F]
    chunk = positions_per_chunk(budget, chat.config.get_text_config().vocab_size)
    clean = clean_run(pair, input_ids, attention_mask, rows)
    difference = crosscoder.W_dec[:, 1] - crosscoder.W_dec[:, 0]  # [F, d_model], raw space (folded)
    kl_sum = torch.zeros(len(sets), len(POSITION_CLASSES), dtype=torch.float64)
    for part in torch.arange(input_ids.shape[0]).split(rows):
        row, pos = scored[part].nonzero(as_tuple=True)
        if row.numel() == 0:
            continue
        patches = _patches(crosscoder, clean.residual[part.to(clean.residual.device)], content[part], difference, sets)
        ids, mask = input_ids[part], attention_mask[part]
        edited = []
        for patch in patches:
            final = final_hidden(chat, pair.layer, ids, mask, _at_content(content[part], patch))
            edited.append(final[row.to(final.device), pos.to(final.device)])
            del final
        reference = clean.final[1][part.to(edited[0].device)][row.to(edited[0].device), pos.to(edited[0].device)]
        kl, _ = compare_positions(chat, reference, edited, None, chunk)  # [sets, n]
        kl_sum += kl.double().cpu() @ classes[:, part][:, row, pos].double().T
    n_positions = classes.flatten(1).sum(1)
    return PatchingResult(list(sets), kl_sum / n_positions, n_positions, input_ids.shape[0])


def _patches(
    crosscoder: CrossCoder, residual: torch.Tensor, content: torch.Tensor, difference: torch.Tensor,
    sets: Sequence[PatchSet],
) -> list[torch.Tensor]:
    """Per set, the patched layer output ``[rows, seq, d_model]`` (float32) of paired residuals ``[rows, seq, 2, d]``."""
    residual = residual.to(difference)
    base, chat = residual[..., 0, :], residual[..., 1, :]
    codes = encode_content(crosscoder, residual, content)  # [rows, seq, F], zero at BOS and padding
    error = chat - base - codes @ difference if any(s.error for s in sets) else None
    patches = []
    for s in sets:
        latents = s.latents.to(codes.device)
        patch = base + codes[..., latents] @ difference[latents] if latents.numel() else base
        patches.append(patch + error if s.error else patch)
    return patches


def _at_content(content: torch.Tensor, value: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Edit that puts ``value [rows, seq, d]`` at content positions and keeps the model's own elsewhere."""

    def edit(hidden: torch.Tensor) -> torch.Tensor:
        return torch.where(content.to(hidden.device)[..., None], value.to(hidden), hidden)

    return edit


# --- the report's entry point ----------------------------------------------------------------------------


def patching_inputs(
    pair: Any, chats: ChatSource | None, max_chats: int
) -> tuple[torch.Tensor, torch.Tensor, ChatMarkers] | str:
    """The held-out chats and the template's markers, or the reason the patching cannot run."""
    if chats is None:
        return "the data module provides no held-out chats (it has no chat_probe_batch)"
    tokenizer = getattr(pair, "tokenizer", None)
    if tokenizer is None:
        return "the model pair has no tokenizer: the chat template's tokens cannot be found"
    try:
        markers = chat_markers(tokenizer)
        input_ids, attention_mask = chats(max_chats)
    except (ValueError, NoHeldoutChats) as err:
        return str(err)
    return input_ids, attention_mask, markers


def run_patching(
    crosscoder: CrossCoder,
    pair: Any,
    inputs: tuple[torch.Tensor, torch.Tensor, ChatMarkers],
    taxonomy: Taxonomy,
    scaling: LatentScaling | None,
    cfg: PatchingSettings,
    nu_range: tuple[float, float],
    memory_budget_mb: float | None,
    out: Path,
) -> dict[str, Any]:
    """The report's sets (`patch_sets`) patched on ``inputs`` (`patching_inputs`); writes `CSV` and `FIGURE` into
    ``out`` and returns the metrics.json entry. ``nu_range``: latent scaling's reliability filter (``analysis.scaling``
    ``nu_min``, ``nu_max``), the pool of the ranked halves."""
    sets, selection = patch_sets(taxonomy, scaling, *nu_range)
    result = base_to_chat_patching(crosscoder, pair, *inputs, sets, cfg.first_reply_tokens, memory_budget_mb)
    write_csv(result, out / CSV)
    plot_patching(result, out / FIGURE)
    return {**result.summary(), "first_reply_tokens": cfg.first_reply_tokens, "selection": selection}


# --- files -----------------------------------------------------------------------------------------------


def write_csv(result: PatchingResult, path: Path) -> Path:
    """``patching.csv``: one row per set (`PatchingResult.rows`)."""
    rows = result.rows()
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def patching_figure(result: PatchingResult) -> Figure:
    """Grouped bars: KL(chat ‖ patched) per set (x) and position class (bars), the gap ("none") dashed."""
    fig = Figure(figsize=(8, 3.8))
    FigureCanvasAgg(fig)  # Agg explicitly; no pyplot global state in a training process
    ax = fig.subplots()
    names = [s.name for s in result.sets]
    width = 0.8 / len(POSITION_CLASSES)
    for k, name in enumerate(POSITION_CLASSES):
        xs = [i + (k - (len(POSITION_CLASSES) - 1) / 2) * width for i in range(len(names))]
        label = f"{CLASS_LABELS[name]} ({int(result.n_positions[k])} positions)"
        bars = ax.bar(xs, result.kl[:, k].nan_to_num(0).tolist(), width, label=label)
        if NONE in names:
            ax.axhline(float(result.kl[names.index(NONE), k]), color=bars.patches[0].get_facecolor(),
                       linestyle="--", linewidth=0.8)
    ax.set_xticks(range(len(names)), [f"{n}\n({s.latents.numel()}{' + ε' if s.error else ''})"
                                      for n, s in zip(names, result.sets)], fontsize=7)
    ax.set_ylabel("KL(chat ‖ patched), nats per position")
    ax.set_xlabel("patched set (latents; + ε: with the error term); dashed: no patch, the base–chat gap")
    ax.set_title(f"Base→chat latent patching on {result.n_chats} held-out chats")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_patching(result: PatchingResult, path: Path) -> Path:
    """`patching_figure` into ``path``."""
    patching_figure(result).savefig(path, dpi=120)
    return path
