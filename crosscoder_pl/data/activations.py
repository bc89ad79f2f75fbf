"""Paired activations: both models read the same token ids; their residuals at one layer, side by side.

Texts are tokenised once with the chat model's tokenizer (one BOS per sequence, truncated to ``seq_len``,
padded left or right). Both models run on the same ``input_ids`` / ``attention_mask`` / ``position_ids``
through `crosscoder_pl.hooks.residual_at`, which stops after block ``layer``. BOS and padding positions are
dropped (BOS norms are hundreds of times larger than the rest), and optionally tokens whose norm in
either model exceeds ``outlier_factor`` times that model's median norm over the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import torch
from transformers import BatchEncoding, PreTrainedModel, PreTrainedTokenizerBase

from crosscoder_pl.hooks import residual_at

PaddingSide = Literal["left", "right"]


class PairLike(Protocol):
    """What the data pipeline needs of `crosscoder_pl.models.pair.ModelPair`."""

    base: PreTrainedModel
    chat: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    layer: int


def tokenize(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], seq_len: int, padding_side: PaddingSide = "right"
) -> BatchEncoding:
    """``input_ids`` and ``attention_mask`` ``[batch, seq <= seq_len]``, BOS added by the tokenizer."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r} must be 'left' or 'right'")
    return tokenizer(
        list(texts), padding=True, truncation=True, max_length=seq_len, padding_side=padding_side, return_tensors="pt"
    )


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]`` positions counted from each sequence's first real token, as ``generate`` does.

    Otherwise a left-padded sequence starts at position ``n_pad``: RoPE only sees relative positions, but the
    rounding then differs from right padding, and models with absolute positions would be wrong.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def content_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Valid positions other than each row's first (its BOS, or attention sink): ``[batch, seq]`` bool."""
    valid = attention_mask.bool()
    return valid & (valid.cumsum(-1) > 1)


def token_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, bos_token_id: int | None) -> torch.Tensor:
    """``[batch, seq]`` bool: True at positions that reach the crosscoder: not padding, not a sequence's first
    token (huge-norm even for tokenizers without a BOS token), and not any other BOS id."""
    keep = content_mask(attention_mask)
    return keep if bos_token_id is None else keep & (input_ids != bos_token_id)


def outlier_mask(acts: torch.Tensor, factor: float) -> torch.Tensor:
    """``[tokens]`` bool for ``acts [tokens, 2, d_model]``: True where neither model's norm exceeds ``factor`` times
    that model's median norm."""
    norms = acts.norm(dim=-1)  # [tokens, 2]
    return (norms <= factor * norms.median(dim=0).values).all(dim=-1)


def paired_activations(
    pair: PairLike,
    texts: Sequence[str],
    seq_len: int,
    padding_side: PaddingSide = "right",
    outlier_factor: float | None = None,
) -> torch.Tensor:
    """Residuals of both models at ``pair.layer`` for ``texts``: float32 ``[tokens, 2, d_model]`` (0 base, 1 chat).

    Tokens of all texts are concatenated in order; the tensor lives on the models' device.
    """
    device = next(pair.base.parameters()).device
    batch = tokenize(pair.tokenizer, texts, seq_len, padding_side).to(device)
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "position_ids": position_ids(batch["attention_mask"]),
    }
    with torch.inference_mode():
        residuals = [residual_at(model, pair.layer, **inputs) for model in (pair.base, pair.chat)]
    # Stacked outside inference mode: the result is a normal tensor, which autograd may save downstream.
    acts = torch.stack(residuals, dim=2)  # [batch, seq, 2, d_model]
    acts = acts[token_mask(batch["input_ids"], batch["attention_mask"], pair.tokenizer.bos_token_id)].float()
    if outlier_factor is not None and len(acts):
        acts = acts[outlier_mask(acts, outlier_factor)]
    return acts
