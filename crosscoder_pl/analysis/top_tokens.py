"""The tokens a latent fires on most: what the card shows next to each chat-specific latent.

The probes (held-out sequences with their token ids) run through both models up to the hooked layer;
the folded crosscoder encodes the paired residuals at every content position (no BOS, no padding) with
its inference threshold, and for each requested latent the ``n_top`` positions with the highest
activation are kept with a short context. Memory: ``[n_probes, seq, n_requested]`` activations, never
``[tokens, F]`` for the whole dictionary beyond one probe chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from crosscoder_pl.analysis.eval_mode import check_eval_mode
from crosscoder_pl.analysis.probes import content_mask, pair_models
from crosscoder_pl.crosscoder import CrossCoder
from crosscoder_pl.hooks import residual_at

CONTEXT_TOKENS = 6  # tokens shown before the firing token


@dataclass(frozen=True)
class TopToken:
    """One firing position: the token, the text just before it, the activation, where it was."""

    token: str
    context: str
    activation: float
    probe: int
    position: int


@torch.inference_mode()
def latent_activations(
    crosscoder: CrossCoder, pair: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, latents: torch.Tensor,
    probes_per_chunk: int = 8,
) -> torch.Tensor:
    """Inference-mode codes of ``latents [L]`` at every probe position: ``[n_probes, seq, L]``; 0 at BOS/padding."""
    check_eval_mode(crosscoder)
    base, chat = pair_models(pair)
    device = crosscoder.W_enc.device
    content = content_mask(attention_mask)
    out = torch.zeros(*input_ids.shape, latents.numel())
    for start in range(0, input_ids.shape[0], probes_per_chunk):
        rows = slice(start, start + probes_per_chunk)
        inputs = {"input_ids": input_ids[rows].to(device), "attention_mask": attention_mask[rows].to(device)}
        residual = torch.stack([residual_at(m, pair.layer, **inputs) for m in (base, chat)], dim=2)  # [b, s, 2, d]
        codes = crosscoder.encode(residual.float())[..., latents.to(device)]  # [b, s, L]
        out[rows] = (codes * content[rows, :, None].to(device)).cpu()
    return out


def top_tokens(
    activations: torch.Tensor, input_ids: torch.Tensor, tokenizer: Any | None, n_top: int = 5
) -> list[list[TopToken]]:
    """Per latent (last axis of ``activations [n_probes, seq, L]``), its ``n_top`` strongest positions
    (activation > 0 only, strongest first; ties in position order). Without a tokenizer, tokens are
    shown as ``[id]``."""
    decode = tokenizer.decode if tokenizer is not None else (lambda ids: "".join(f"[{i}]" for i in ids.tolist()))
    n_probes, seq, n_latents = activations.shape
    flat = activations.reshape(-1, n_latents)  # [n_probes * seq, L]
    # A stable descending sort, so that equal activations keep position order (topk's order is unspecified).
    values, where = flat.sort(dim=0, descending=True, stable=True)
    values, where = values[:n_top], where[:n_top]  # [n_top, L]
    result: list[list[TopToken]] = []
    for j in range(n_latents):
        rows = []
        for value, index in zip(values[:, j].tolist(), where[:, j].tolist()):
            if value <= 0:
                break
            probe, pos = divmod(index, seq)
            ids = input_ids[probe]
            rows.append(TopToken(
                token=decode(ids[pos : pos + 1]),
                context=decode(ids[max(1, pos - CONTEXT_TOKENS) : pos]),
                activation=value,
                probe=probe,
                position=pos,
            ))
        result.append(rows)
    return result
