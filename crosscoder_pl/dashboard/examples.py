"""Per latent: its strongest held-out tokens in context, an activation histogram and firing frequencies.

One streaming pass (:func:`scan`) over held-out paired activations ``[tokens, 2, d_model]`` and their
`TokenTable`: each chunk of ``chunk_tokens`` rows is encoded once (eval mode, the learned threshold:
``[chunk, F]``, the only tokens-by-latents tensor ever alive), then

- per source (web, chat), the chunk's ``top_n`` largest activations of every latent are merged with the
  running top-N (:class:`RunningTopN`): memory ``O(F * top_n)`` whatever the number of tokens;
- positive activations are counted per source (firing frequency) and binned (:class:`RunningHistogram`):
  per latent ``bins`` equal bins over ``[0, 2^e)``, ``2^e`` the smallest power of two above its largest
  activation so far; when a chunk raises it, adjacent bins are summed (exact, since bin edges at a power of
  two range nest), so the counts equal a direct binning of all activations with the final range.

Then :func:`example_windows` cuts each kept token's context window out of the token table and computes the
latent's activation at every window position (only that latent's encoder column, a chunk of examples at a
time), and :func:`turn_roles` marks which chat turn each position belongs to.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from crosscoder_pl.analysis.eval_mode import check_eval_mode
from crosscoder_pl.crosscoder import CrossCoder
from crosscoder_pl.data.activations import SOURCE_CODES, TokenTable
from crosscoder_pl.names import SOURCES  # index = source code (SOURCE_CODES)

# Turn-start markers of common chat templates; the role name is the text that follows, up to a newline or the
# header end (Gemma: <start_of_turn>user\n, ChatML: <|im_start|>user\n,
# Llama-3: <|start_header_id|>user<|end_header_id|>).
TURN_MARKERS = ("<start_of_turn>", "<|im_start|>", "<|start_header_id|>")
ROLE_END = ("\n", "<|end_header_id|>")
KNOWN_ROLES = frozenset({"user", "model", "assistant", "system", "developer", "tool"})
MAX_ROLE_TOKENS = 4


class RunningTopN:
    """The ``n`` largest values per latent of a stream of ``[rows, F]`` chunks, and the rows they were at.

    ``values [F, n]`` descending, ``rows [F, n]`` global row ids (-1 until filled). Only positive values are
    examples: entries ``<= 0`` are reported with row -1 by :meth:`result`.
    """

    def __init__(self, n_latents: int, n: int, device: torch.device | str = "cpu") -> None:
        if n < 1:
            raise ValueError(f"top_n={n} must be at least 1")
        self.n = n
        self.values = torch.zeros(n_latents, n, device=device)
        self.rows = torch.full((n_latents, n), -1, dtype=torch.long, device=device)

    def update(self, codes: torch.Tensor, row_ids: torch.Tensor) -> None:
        """Merge a chunk: ``codes [c, F]`` at global rows ``row_ids [c]``."""
        if codes.shape[0] == 0:
            return
        k = min(self.n, codes.shape[0])
        values, where = codes.topk(k, dim=0)  # [k, F]
        candidates = torch.cat([self.values, values.T], dim=1)  # [F, n + k]
        rows = torch.cat([self.rows, row_ids.to(where.device)[where].T], dim=1)
        self.values, keep = candidates.topk(self.n, dim=1)
        self.rows = rows.gather(1, keep)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``values [F, n]``, ``rows [F, n]`` (-1 where the value is not positive)."""
        return self.values, torch.where(self.values > 0, self.rows, -1)


class RunningHistogram:
    """Per-latent histograms of the positive activations of a stream, per source, with shared edges.

    ``counts [n_sources, F, bins]``; latent j's bin b covers ``[b, b + 1) * 2^exponent[j] / bins`` (the top
    value itself goes into the last bin). ``exponent`` is the smallest power of two ``>=`` every value seen.
    """

    def __init__(self, n_latents: int, bins: int, n_sources: int = 2, device: torch.device | str = "cpu") -> None:
        if bins < 2 or bins % 2:
            raise ValueError(f"histogram_bins={bins} must be an even number >= 2 (bins are merged in pairs)")
        self.bins = bins
        self.counts = torch.zeros(n_sources, n_latents, bins, dtype=torch.long, device=device)
        self.exponent = torch.zeros(n_latents, dtype=torch.long, device=device)
        self.seen = torch.zeros(n_latents, dtype=torch.bool, device=device)
        self.max_merges = math.ceil(math.log2(bins))  # after that many halvings every count is in bin 0

    def update(self, codes: torch.Tensor, source: torch.Tensor) -> None:
        """Add a chunk ``codes [c, F]`` whose rows come from ``source [c]`` (source index per row)."""
        top = codes.max(dim=0).values  # [F]
        fired = top > 0
        needed = torch.ceil(torch.log2(top.clamp_min(torch.finfo(top.dtype).tiny))).long()
        grow = fired & self.seen & (needed > self.exponent)
        shifts = torch.where(grow, needed - self.exponent, 0).clamp(max=self.max_merges)
        for step in range(int(shifts.max()) if grow.any() else 0):
            self._halve(shifts > step)
        self.exponent = torch.where(fired & (~self.seen | grow), needed, self.exponent)
        self.seen |= fired
        row, latent = codes.nonzero(as_tuple=True)
        values = codes[row, latent]
        width = torch.exp2(self.exponent[latent].to(values.dtype)) / self.bins
        index = (values / width).floor().long().clamp(max=self.bins - 1)
        flat = (source.to(row.device)[row].long() * self.counts.shape[1] + latent) * self.bins + index
        self.counts.view(-1).index_add_(0, flat, torch.ones_like(flat))

    def _halve(self, latents: torch.Tensor) -> None:
        """Double the range of ``latents`` (bool ``[F]``): bins ``2i`` and ``2i + 1`` become bin ``i``."""
        part = self.counts[:, latents]  # [S, L, bins]
        merged = part.view(*part.shape[:2], self.bins // 2, 2).sum(-1)
        self.counts[:, latents] = torch.cat([merged, torch.zeros_like(merged)], dim=-1)

    def upper_edges(self) -> torch.Tensor:
        """``[F]`` the top edge ``2^exponent`` of each latent's bins (0 for latents that never fired)."""
        return torch.where(self.seen, torch.exp2(self.exponent.double()), 0.0)


@dataclass
class LatentExamples:
    """Result of :func:`scan`, per source ``s`` (0 web, 1 chat, `SOURCES`) and latent ``j``.

    Attributes:
        values: ``[2, F, top_n]`` strongest activations, descending (0 where fewer tokens fired).
        rows: ``[2, F, top_n]`` held-out row of each (-1 where none).
        fired: ``[2, F]`` tokens on which the latent fired. ``n_tokens``: ``[2]`` tokens scanned per source.
        histogram: ``[2, F, bins]`` counts of positive activations; ``histogram_max [F]`` the top edge of
            the latent's bins (bin ``b`` covers ``[b, b + 1) * max / bins``; 0 when it never fired).
    """

    values: torch.Tensor
    rows: torch.Tensor
    fired: torch.Tensor
    n_tokens: torch.Tensor
    histogram: torch.Tensor
    histogram_max: torch.Tensor

    def frequency(self) -> torch.Tensor:
        """``[2, F]`` share of each source's tokens on which the latent fired (nan for a source with none)."""
        return self.fired.double() / self.n_tokens[:, None].double()


def _source_of_rows(tokens: TokenTable | None, n_rows: int) -> torch.Tensor:
    if tokens is None:
        return torch.full((n_rows,), -1, dtype=torch.int8)
    return tokens.row_source()


@torch.inference_mode()
def scan(
    crosscoder: CrossCoder,
    activations: torch.Tensor,
    tokens: TokenTable | None,
    top_n: int,
    bins: int = 32,
    chunk_tokens: int = 4096,
    max_tokens: int | None = None,
) -> LatentExamples:
    """One pass over ``activations [tokens, 2, d_model]`` (raw, held-out): see the module doc.

    Rows whose source is unknown (no token table, or source -1) are counted as web. ``max_tokens``: scan only
    the first that many rows (None: all).
    """
    check_eval_mode(crosscoder)
    if not crosscoder.encodes_alone:
        raise ValueError("the crosscoder's inference threshold is not calibrated: token-by-token examples need it")
    device = crosscoder.W_enc.device
    n_rows = len(activations) if max_tokens is None else min(max_tokens, len(activations))
    source = _source_of_rows(tokens, len(activations)).long().clamp(min=0)  # unknown -> web
    n_latents = crosscoder.n_latents
    tops = [RunningTopN(n_latents, top_n, device) for _ in SOURCES]
    histogram = RunningHistogram(n_latents, bins, len(SOURCES), device)
    fired = torch.zeros(len(SOURCES), n_latents, dtype=torch.long, device=device)
    n_tokens = torch.zeros(len(SOURCES), dtype=torch.long)
    for start in range(0, n_rows, chunk_tokens):
        stop = min(start + chunk_tokens, n_rows)
        codes = crosscoder.encode(activations[start:stop].to(device, crosscoder.W_enc.dtype)).float()  # [c, F]
        rows = torch.arange(start, stop, device=device)
        chunk_source = source[start:stop].to(device)
        histogram.update(codes, chunk_source)
        for s, top in enumerate(tops):
            mine = chunk_source == s
            part = codes[mine]
            top.update(part, rows[mine])
            fired[s] += (part > 0).sum(0)
            n_tokens[s] += int(mine.sum())
    values, rows = zip(*(top.result() for top in tops))
    return LatentExamples(
        values=torch.stack(values).cpu(),
        rows=torch.stack(rows).cpu(),
        fired=fired.cpu(),
        n_tokens=n_tokens,
        histogram=histogram.counts.cpu(),
        histogram_max=histogram.upper_edges().cpu(),
    )


def latent_codes(crosscoder: CrossCoder, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """Eval-mode code of one latent per row: ``x [n, W, 2, d_model]`` raw, ``latents [n]`` -> ``[n, W]``.

    The same numbers as ``crosscoder.encode(x)[..., latents]`` (threshold on the selection score), with only
    the requested encoder columns.
    """
    flat = crosscoder.normalise(x).reshape(*x.shape[:-2], -1).to(crosscoder.W_enc.dtype)  # [n, W, 2d]
    columns = crosscoder.W_enc.reshape(-1, crosscoder.n_latents)[:, latents].T  # [n, 2d]
    f = torch.relu(torch.einsum("nwd,nd->nw", flat, columns) + crosscoder.b_enc[latents, None])
    score = f * crosscoder.decoder_norms().sum(-1)[latents, None]
    return torch.where(score > crosscoder.threshold, f, 0.0)


@dataclass
class Windows:
    """Context windows of examples ``[E, W]`` (``W = before + 1 + after``; the example token at ``before``).

    ``token_ids`` (-1 outside the sequence), ``activations`` (the example's latent; 0 at positions without
    an activation row: BOS, padding, dropped outliers), ``roles`` (index into ``role_names``, -1: no turn),
    ``latents [E]`` the latent of each example.
    """

    token_ids: torch.Tensor
    activations: torch.Tensor
    roles: torch.Tensor
    role_names: list[str]
    latents: torch.Tensor


@torch.inference_mode()
def example_windows(
    crosscoder: CrossCoder,
    activations: torch.Tensor,
    tokens: TokenTable,
    rows: torch.Tensor,
    latents: torch.Tensor,
    before: int,
    after: int,
    roles: torch.Tensor | None = None,
    role_names: Sequence[str] = (),
    examples_per_chunk: int = 512,
) -> Windows:
    """The windows of the examples at held-out ``rows [E]``, each for its latent ``latents [E]``.

    ``roles``: ``[n_seq, seq]`` per-position turn index (:func:`turn_roles`), or None.
    """
    device = crosscoder.W_enc.device
    offsets = torch.arange(-before, after + 1)
    seq, pos = tokens.seq[rows], tokens.pos[rows]
    columns = pos[:, None] + offsets  # [E, W]
    inside = (columns >= 0) & (columns < tokens.input_ids.shape[1])
    safe = columns.clamp(0, tokens.input_ids.shape[1] - 1)
    valid = inside & tokens.attention_mask[seq[:, None], safe].bool()
    token_ids = torch.where(valid, tokens.input_ids[seq[:, None], safe], -1)
    window_rows = torch.where(valid, tokens.row_index()[seq[:, None], safe], -1)  # [E, W]
    acts = torch.zeros(window_rows.shape)
    for start in range(0, len(rows), examples_per_chunk):
        part = slice(start, start + examples_per_chunk)
        here = window_rows[part]
        x = activations[here.clamp(min=0)].to(device)  # [e, W, 2, d]
        codes = latent_codes(crosscoder, x, latents[part].to(device)).float().cpu()
        acts[part] = torch.where(here >= 0, codes, 0.0)
    role_ids = torch.full(token_ids.shape, -1, dtype=torch.long)
    if roles is not None:
        role_ids = torch.where(valid, roles[seq[:, None], safe], -1)
    return Windows(token_ids, acts, role_ids, list(role_names), latents.cpu())


def turn_roles(tokens: TokenTable, token_text: Any) -> tuple[torch.Tensor, list[str]]:
    """Which chat turn each position of the chat sequences belongs to: ``[n_seq, seq]`` indices into the
    returned role names (-1 before the first turn, and for web sequences).

    A turn starts at a marker token (`TURN_MARKERS`); its role is the text of the next tokens up to a
    newline or a header end, or as soon as it spells a known role name (tokenizers that drop whitespace); at
    most `MAX_ROLE_TOKENS` tokens. ``token_text``: id -> str.
    """
    roles = torch.full(tokens.input_ids.shape, -1, dtype=torch.long)
    names: list[str] = []
    for s in (tokens.source == SOURCE_CODES["chat"]).nonzero().flatten().tolist():
        ids = tokens.input_ids[s].tolist()
        valid = tokens.attention_mask[s].tolist()
        current = -1
        for p, (token_id, is_valid) in enumerate(zip(ids, valid)):
            if not is_valid:
                continue
            if token_text(token_id) in TURN_MARKERS:
                name = _role_after(ids, p + 1, token_text)
                if name not in names:
                    names.append(name)
                current = names.index(name)
            roles[s, p] = current
    return roles, names


def _role_after(ids: list[int], start: int, token_text: Any) -> str:
    text = ""
    for token_id in ids[start : start + MAX_ROLE_TOKENS]:
        piece = token_text(token_id)
        cut = min((piece.find(end) for end in ROLE_END if end in piece), default=-1)
        if cut >= 0:
            return (text + piece[:cut]).strip() or "turn"
        text += piece
        if text.strip() in KNOWN_ROLES:
            return text.strip()
    return text.strip() or "turn"
