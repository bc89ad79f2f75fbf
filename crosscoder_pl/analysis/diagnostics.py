"""Sparsity-artifact diagnostics (Minder, Dumas et al. 2025; docs/method.md "Sparsity-artifact diagnostics").

Two ways a crosscoder (L1 especially) can invent chat-only latents, and one way chat-only latents are often
about the chat format rather than a concept:

- **Complete Shrinkage**: a shared concept whose base decoder was shrunk to ~0. Nothing reconstructs the concept in
  the base model, so the base *error* holds it: the latent's ``nu_eps`` sits inside the shared latents' range
  (its ``nu_r`` stays ~0). `complete_shrinkage`: the share of chat-only latents whose ``nu_eps`` lies in the
  central ``interval`` of the shared latents' ``nu_eps``.
- **Latent Decoupling**: a shared concept split into a chat-only and a base-only latent ("twins"), whose chat and
  base decoder vectors point the same way. Other latents then carry the concept in the base *reconstruction*:
  ``nu_r`` inside the shared range (`latent_decoupling`). `find_twins`: each chat-only latent's most similar
  base-only latent (chat decoder of the one vs base decoder of the other) when the cosine exceeds ``min_cosine``;
  `cofiring`: how often a pair fires on the same held-out tokens, and the reference's twin activation divergence.
- **Template share**: per latent, the share of its firings (and of its activation mass) on chat-template
  tokens, among chat-source tokens (`template_share`).

Only ``encode``, ``W_dec`` and the taxonomy / scaling results are used, so any crosscoder (BatchTopK, L1) works.
Held-out activations are read in chunks of ``chunk_tokens``: memory ``O(chunk_tokens * F)`` whatever their number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from crosscoder_pl.analysis.eval_mode import check_eval_mode
from crosscoder_pl.analysis.scaling import LatentScaling
from crosscoder_pl.analysis.stats import nan_median
from crosscoder_pl.crosscoder import CrossCoder
from crosscoder_pl.data.chat_positions import chat_markers, template_mask

# The reference's twin activation divergence (scripts/twins_activation_analysis.py): activations relative to the
# pair's larger maximum, "high" above 0.4 (buckets 3 and 4 of edges 1e-6, 0.1, 0.4, 0.7), "low" at most 0.1.
HIGH, LOW = 0.4, 0.1


@dataclass(frozen=True)
class DiagnosticRules:
    """``interval``: central mass of the shared latents' ``nu`` that counts as "shared-like"; ``min_cosine``:
    twin decoder cosine (strictly above); ``template_majority``: a latent "fires mainly on template tokens" when
    its template share is strictly above it (the reference's ``lmsys_ctrl_% > 0.5``)."""

    interval: float = 0.95
    min_cosine: float = 0.9
    template_majority: float = 0.5
    # The shared latents whose nu defines the "shared" range: those inside latent scaling's reliability filter
    # (an unreliable fit, e.g. nu_r = -10 on a shared latent whose decoders point apart, would stretch the range
    # until every chat-only latent is "shared-like"). Unbounded by default.
    shared_nu_range: tuple[float, float] = (-math.inf, math.inf)


def central_interval(values: torch.Tensor, mass: float) -> tuple[float, float]:
    """``(low, high)``: the central ``mass`` of the non-nan ``values [N]`` (linear quantiles); nan when empty."""
    values = values[~values.isnan()].double()
    if not values.numel():
        return math.nan, math.nan
    tail = (1 - mass) / 2
    low, high = values.quantile(torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high


def in_shared_range(chat_only: torch.Tensor, shared: torch.Tensor, mass: float) -> tuple[torch.Tensor, dict[str, Any]]:
    """``[C]`` bool: which ``chat_only`` ratios lie inside the central ``mass`` of the ``shared [S]`` ratios (nan:
    False), and a summary: the interval, medians, defined chat-only values, how many inside and their share."""
    low, high = central_interval(shared, mass)
    inside = (chat_only >= low) & (chat_only <= high)
    n, k = int((~chat_only.isnan()).sum()), int(inside.sum())
    return inside, {
        "shared_interval": [low, high],
        "median_chat_only": nan_median(chat_only),
        "median_shared": nan_median(shared),
        "n_shared": int((~shared.isnan()).sum()),
        "n_chat_only": n,
        "n_inside": k,
        "share_inside": k / n if n else math.nan,
    }


def complete_shrinkage(nu_eps_chat_only: torch.Tensor, nu_eps_shared: torch.Tensor, mass: float
                       ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Complete Shrinkage: chat-only latents ``[C]`` whose ``nu_eps`` lies in the shared latents' ``[S]`` central
    ``mass``. A shared-like ``nu_eps`` says the base model's error still holds the latent's direction as much as a
    shared latent's: the concept is in the base model, only its base decoder was shrunk away."""
    return in_shared_range(nu_eps_chat_only, nu_eps_shared, mass)


def latent_decoupling(nu_r_chat_only: torch.Tensor, nu_r_shared: torch.Tensor, mass: float
                      ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Latent Decoupling seen by latent scaling: chat-only latents ``[C]`` whose ``nu_r`` lies in the shared
    latents' ``[S]`` central ``mass``: other latents reconstruct the concept in the base model."""
    return in_shared_range(nu_r_chat_only, nu_r_shared, mass)


@dataclass
class Twins:
    """Chat-only / base-only twin pairs ``[P]`` (one per chat-only latent that has one) and, per base-only latent
    ``[B]``, its most similar chat-only latent above the threshold (-1 and nan where none)."""

    chat: torch.Tensor
    base: torch.Tensor
    cosine: torch.Tensor
    base_only: torch.Tensor
    base_partner: torch.Tensor
    base_cosine: torch.Tensor


@torch.no_grad()
def find_twins(crosscoder: CrossCoder, chat_only: torch.Tensor, base_only: torch.Tensor, min_cosine: float,
               block: int = 1024) -> Twins:
    """Twins by decoder direction: ``cos(W_dec[c, chat], W_dec[b, base])`` for chat-only ``c [C]`` and base-only
    ``b [B]``, in blocks of ``block`` chat-only rows (memory ``O(block * B)``). Cosines are scale-free, so raw and
    normalised decoders give the same pairs."""
    w = crosscoder.W_dec.detach()  # only the rows needed are gathered: the decoder may be GBs
    chat_only, base_only = chat_only.long().cpu(), base_only.long().cpu()
    base_dirs = torch.nn.functional.normalize(w[base_only.to(w.device), 0].float(), dim=-1).cpu()  # [B, d]; 0 stays 0
    best_cos, best_base = [], []
    col_cos = torch.full((base_only.numel(),), -math.inf)
    col_arg = torch.full((base_only.numel(),), -1, dtype=torch.long)
    for start in range(0, chat_only.numel(), block):
        rows = chat_only[start:start + block]
        chat_dirs = torch.nn.functional.normalize(w[rows.to(w.device), 1].float(), dim=-1).cpu()
        cos = chat_dirs @ base_dirs.T  # [block, B]
        if base_only.numel():
            value, arg = cos.max(1)
            best_cos.append(value)
            best_base.append(base_only[arg])
            column_value, column_arg = cos.max(0)
            better = column_value > col_cos
            col_cos = torch.where(better, column_value, col_cos)
            col_arg = torch.where(better, rows[column_arg], col_arg)
    cos_all = torch.cat(best_cos) if best_cos else torch.empty(0)
    base_all = torch.cat(best_base) if best_base else torch.empty(0, dtype=torch.long)
    keep = cos_all > min_cosine
    matched = col_cos > min_cosine
    return Twins(
        chat=chat_only[keep] if cos_all.numel() else chat_only[:0],
        base=base_all[keep],
        cosine=cos_all[keep],
        base_only=base_only,
        base_partner=torch.where(matched, col_arg, -1),
        base_cosine=torch.where(matched, col_cos, math.nan),
    )


@dataclass
class TwinFiring:
    """Per pair ``[P]``: tokens where the chat-only twin fires, the base-only twin fires, both fire; the
    reference's twin activation divergence (nan where neither is ever high)."""

    chat: torch.Tensor
    base: torch.Tensor
    both: torch.Tensor
    divergence: torch.Tensor

    @property
    def jaccard(self) -> torch.Tensor:
        """``[P]`` both / either: 1 = always fire together, 0 = never (nan where neither fires)."""
        either = (self.chat + self.base - self.both).double()
        return torch.where(either > 0, self.both / either, math.nan)


@torch.inference_mode()
def cofiring(crosscoder: CrossCoder, activations: torch.Tensor, chat: torch.Tensor, base: torch.Tensor,
             chunk_tokens: int = 4096) -> TwinFiring:
    """How often the pairs ``(chat [P], base [P])`` fire on the same tokens of ``activations [tokens, 2, d_model]``.

    Two passes (the divergence needs each pair's maximum first); only ``[chunk, 2P]`` of the codes is kept.
    Divergence (reference): with ``a, b`` the activations divided by the pair's larger maximum,
    ``(#[a > 0.4, b <= 0.1] + #[b > 0.4, a <= 0.1]) / #[a > 0.4 or b > 0.4]``.
    """
    check_eval_mode(crosscoder)
    n = chat.numel()
    if n == 0:  # no pair: nothing to encode
        empty = torch.zeros(0, dtype=torch.long)
        return TwinFiring(empty, empty, empty, torch.zeros(0, dtype=torch.float64))
    cols = torch.cat([chat, base]).to(crosscoder.W_dec.device)
    counts = torch.zeros(3, n, dtype=torch.long)  # chat fires, base fires, both fire
    peak = torch.zeros(2 * n)
    for x in activations.split(chunk_tokens):
        f = crosscoder.encode(x.to(crosscoder.W_dec)).float()[:, cols].cpu()  # [chunk, 2P]
        fa, fb = f[:, :n] > 0, f[:, n:] > 0
        counts += torch.stack([fa.sum(0), fb.sum(0), (fa & fb).sum(0)])
        peak = torch.maximum(peak, f.max(0).values) if len(f) else peak
    scale = torch.maximum(peak[:n], peak[n:]).clamp(min=1e-12)  # the reference's "abs_max_act" per pair
    buckets = torch.zeros(3, n, dtype=torch.long)  # only chat high, only base high, either high
    for x in activations.split(chunk_tokens):
        rel = crosscoder.encode(x.to(crosscoder.W_dec)).float()[:, cols].cpu() / scale.repeat(2)
        a, b = rel[:, :n], rel[:, n:]
        buckets += torch.stack([((a > HIGH) & (b <= LOW)).sum(0), ((b > HIGH) & (a <= LOW)).sum(0),
                                ((a > HIGH) | (b > HIGH)).sum(0)])
    divergence = torch.where(buckets[2] > 0, (buckets[0] + buckets[1]) / buckets[2].clamp(min=1), math.nan)
    return TwinFiring(counts[0], counts[1], counts[2], divergence.double())


@dataclass
class TemplateShare:
    """Per latent ``[F]`` on the chat-source tokens: firings and activation mass, in all and on template tokens."""

    fired: torch.Tensor
    fired_template: torch.Tensor
    mass: torch.Tensor
    mass_template: torch.Tensor
    n_tokens: int
    n_template: int

    @property
    def share(self) -> torch.Tensor:
        """``[F]`` share of the latent's firings on template tokens (the reference's ``lmsys_ctrl_%``); nan: never fired."""
        return torch.where(self.fired > 0, self.fired_template / self.fired.clamp(min=1), math.nan)

    @property
    def mass_share(self) -> torch.Tensor:
        """``[F]`` share of the latent's summed activation on template tokens; nan: never fired."""
        return torch.where(self.mass > 0, self.mass_template / self.mass.clamp(min=1e-30), math.nan)


@torch.inference_mode()
def template_share(crosscoder: CrossCoder, activations: torch.Tensor, template: torch.Tensor,
                   chat_rows: torch.Tensor | None = None, chunk_tokens: int = 4096) -> TemplateShare:
    """Firings and activation mass per latent on the rows of ``activations [tokens, 2, d_model]`` where
    ``chat_rows [tokens]`` (bool; None: all rows), split by ``template [tokens]`` (bool: a chat-template token).

    As the reference (scripts/latents_template_stats.py), only chat-source tokens count: web text has no template
    tokens, so counting it would dilute every share by the data mix. BOS is not in the held-out rows.
    """
    check_eval_mode(crosscoder)
    template = template.bool().cpu()
    rows = torch.ones_like(template) if chat_rows is None else chat_rows.bool().cpu()
    if template.shape != (len(activations),) or rows.shape != template.shape:
        raise ValueError(f"template and chat_rows must be [tokens]={len(activations)} bool masks, got "
                         f"{tuple(template.shape)} and {tuple(rows.shape)}")
    device = crosscoder.W_dec.device
    sums = torch.zeros(4, crosscoder.n_latents, dtype=torch.float64)  # fired, on template; mass, on template
    for start in range(0, len(activations), chunk_tokens):
        keep = rows[start:start + chunk_tokens]
        if not keep.any():
            continue
        f = crosscoder.encode(activations[start:start + chunk_tokens][keep].to(crosscoder.W_dec)).float()  # [n, F]
        on_template = template[start:start + chunk_tokens][keep].to(device).float()  # [n]
        fired = (f > 0).float()
        # Per-chunk sums as matrix-vector products (no [n, F] copy); float32 is exact for counts below 2^24.
        ones = torch.ones_like(on_template)
        part = torch.stack([fired.T @ ones, fired.T @ on_template, f.T @ ones, f.T @ on_template])
        sums += part.double().cpu()
    return TemplateShare(sums[0], sums[1], sums[2], sums[3], int(rows.sum()), int((rows & template).sum()))


def heldout_template_mask(tokens: Any, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(template [tokens], chat_rows [tokens])`` bool for held-out rows read from ``tokens`` (a
    `crosscoder_pl.data.activations.TokenTable`): chat-template tokens by `crosscoder_pl.data.chat_positions`, and
    the rows whose sequence came from the chat source. None when the tokenizer or its template markers are missing
    (the template share is then left out, with a log line from the caller)."""
    if tokenizer is None:
        return None
    try:
        markers = chat_markers(tokenizer)
    except ValueError:  # a tokenizer without Gemma's turn tags: nothing to find
        return None
    per_position = template_mask(tokens.input_ids, markers, tokens.attention_mask)  # [n_seq, seq]
    template = per_position[tokens.seq, tokens.pos]
    chat_rows = tokens.row_source() == 1  # SOURCE_CODES["chat"]
    return template, chat_rows


@dataclass
class Diagnostics:
    """The ``metrics.json`` entry and, per latent ``[F]``, the ``latents.csv`` columns (None where not computed)."""

    summary: dict[str, Any]
    columns: dict[str, list[Any]]


COLUMNS = ("shrinkage_suspect", "decoupling_suspect", "twin_latent", "twin_cosine", "twin_cofiring", "template_share",
           "template_mass_share")


def sparsity_diagnostics(
    crosscoder: CrossCoder,
    activations: torch.Tensor,
    classes: dict[str, torch.Tensor],
    scaling: LatentScaling | None,
    rules: DiagnosticRules,
    template: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk_tokens: int = 4096,
    extra_groups: dict[str, torch.Tensor] | None = None,
) -> Diagnostics:
    """All diagnostics of a folded eval-mode crosscoder on raw held-out ``activations [tokens, 2, d_model]``.

    Args:
        classes: latent ids per taxonomy class (``chat_only``, ``base_only``, ``shared``; dead excluded).
        scaling: a `crosscoder_pl.analysis.scaling.LatentScaling` of chat-only and shared latents, or None (then no
            shrinkage / decoupling summary).
        template: ``(template [tokens], chat_rows [tokens])`` bool masks (`heldout_template_mask`), or None.
        extra_groups: further latent groups (ids) whose template majority is reported, e.g. the chat-specific ones.
    """
    n = crosscoder.n_latents
    columns: dict[str, list[Any]] = {name: [None] * n for name in COLUMNS}
    summary: dict[str, Any] = {"rules": {"interval": rules.interval, "min_cosine": rules.min_cosine,
                                         "template_majority": rules.template_majority,
                                         "shared_nu_range": list(rules.shared_nu_range)}}
    if scaling is not None:
        group = {name: torch.isin(scaling.latents, classes[name]) for name in ("chat_only", "shared")}
        tested = scaling.latents[group["chat_only"]].tolist()
        for key, column, test, nu in (("complete_shrinkage", "shrinkage_suspect", complete_shrinkage, scaling.nu_eps),
                                      ("latent_decoupling", "decoupling_suspect", latent_decoupling, scaling.nu_r)):
            low, high = rules.shared_nu_range
            reference = nu[group["shared"]]
            reference = torch.where((reference >= low) & (reference <= high), reference, torch.nan)
            inside, summary[key] = test(nu[group["chat_only"]], reference, rules.interval)
            for j, flag in zip(tested, inside.tolist()):
                columns[column][j] = flag

    twins = find_twins(crosscoder, classes["chat_only"], classes["base_only"], rules.min_cosine)
    firing = cofiring(crosscoder, activations, twins.chat, twins.base, chunk_tokens)
    jaccard = firing.jaccard
    for i, (c, b) in enumerate(zip(twins.chat.tolist(), twins.base.tolist())):
        columns["twin_latent"][c], columns["twin_cosine"][c] = b, float(twins.cosine[i])
        columns["twin_cofiring"][c] = float(jaccard[i])
    for b, partner, cos in zip(twins.base_only.tolist(), twins.base_partner.tolist(), twins.base_cosine.tolist()):
        if partner >= 0:
            columns["twin_latent"][b], columns["twin_cosine"][b] = partner, cos
    summary["twins"] = {
        "n_pairs": int(twins.chat.numel()),
        "n_chat_only": int(classes["chat_only"].numel()),
        "n_base_only": int(classes["base_only"].numel()),
        "n_base_only_with_twin": int((twins.base_partner >= 0).sum()),
        "median_cosine": nan_median(twins.cosine),
        "median_cofiring": nan_median(jaccard),
        "median_divergence": nan_median(firing.divergence),
        "pairs": [
            {"chat": c, "base": b, "cosine": float(cos), "fired_chat": int(fc), "fired_base": int(fb),
             "fired_both": int(both), "cofiring": float(j), "divergence": float(dv)}
            for c, b, cos, fc, fb, both, j, dv in zip(
                twins.chat.tolist(), twins.base.tolist(), twins.cosine, firing.chat, firing.base, firing.both,
                jaccard, firing.divergence)
        ],
    }

    if template is not None:
        result = template_share(crosscoder, activations, *template, chunk_tokens=chunk_tokens)
        share, mass = result.share, result.mass_share
        columns["template_share"] = [None if math.isnan(v) else v for v in share.tolist()]
        columns["template_mass_share"] = [None if math.isnan(v) else v for v in mass.tolist()]
        summary["template"] = {"n_chat_tokens": result.n_tokens, "n_template_tokens": result.n_template,
                               **_majority(share, {"chat_only": classes["chat_only"], "shared": classes["shared"],
                                                   **(extra_groups or {})}, rules.template_majority)}
    return Diagnostics(summary, columns)


def _majority(share: torch.Tensor, groups: dict[str, torch.Tensor], majority: float) -> dict[str, Any]:
    """Per group of latent ids: how many fired on chat tokens, and how many of those fire mainly
    (share > ``majority``) on template tokens."""
    out = {}
    for name, ids in groups.items():
        values = share[ids.long()]
        fired = values[~values.isnan()]
        mainly = int((fired > majority).sum())
        out[name] = {"n_fired": fired.numel(), "n_mainly_template": mainly,
                     "share_mainly_template": mainly / fired.numel() if fired.numel() else math.nan}
    return out
