"""Forward passes over a probe batch, shared by the causal and splice-in analyses.

A probe batch is ``input_ids [n_probes, seq]`` with ``attention_mask [n_probes, seq]`` (1 = token,
0 = padding, left or right). Each row starts with BOS at its first valid position. The crosscoder was
trained without BOS and padding, so only the other valid positions ("content" positions) are ever
encoded, edited or scored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from crosscoder_pl.crosscoder import CrossCoder
from crosscoder_pl.data.activations import content_mask, position_ids
from crosscoder_pl.hooks import edit_residual


def pair_models(pair: Any) -> tuple[nn.Module, nn.Module]:
    """``(base, chat)`` of a model pair (anything with ``.base`` and ``.chat``), in crosscoder order."""
    return pair.base, pair.chat


def check_probes(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """Raise a ValueError naming the problem when a probe batch cannot be scored."""
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"probes must be input_ids [n_probes, seq] with a same-shape attention_mask, got "
            f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
        )
    too_short = (content_mask(attention_mask).sum(-1) == 0).nonzero().flatten()
    if too_short.numel():
        raise ValueError(f"probes {too_short.tolist()} have no token after BOS: nothing to score")


def next_token_logprobs(
    model: nn.Module,
    layer: int,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    edit: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Log-probabilities ``[batch, seq, vocab]`` (float32) with block ``layer``'s output replaced by ``edit(h)``."""
    device = next(model.parameters()).device
    with edit_residual(model, layer, edit):
        mask = attention_mask.to(device)
        # Same positions as the training data's extraction, so left padding gives the same residuals.
        logits = model(input_ids=input_ids.to(device), attention_mask=mask, position_ids=position_ids(mask),
                       use_cache=False).logits
    return logits.float().log_softmax(-1)


@dataclass
class CleanRun:
    """Unedited forward passes of both models on the probes.

    Attributes:
        residual: layer outputs ``[n_probes, seq, 2, d_model]`` (base, chat), on the base model's device.
        logprobs: per model, next-token log-probabilities ``[n_probes, seq, vocab]`` float32.
    """

    residual: torch.Tensor
    logprobs: tuple[torch.Tensor, torch.Tensor]


def clean_run(pair: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> CleanRun:
    """One full forward pass per model that also records the layer output (memory: n_probes * seq * vocab)."""
    residuals, logprobs = [], []
    for model in pair_models(pair):
        captured: list[torch.Tensor] = []

        def record(hidden: torch.Tensor, store: list[torch.Tensor] = captured) -> torch.Tensor:
            store.append(hidden)
            return hidden

        logprobs.append(next_token_logprobs(model, pair.layer, input_ids, attention_mask, record))
        residuals.append(captured[0])
    device = residuals[0].device
    return CleanRun(torch.stack([r.to(device) for r in residuals], dim=2), (logprobs[0], logprobs[1]))


def encode_content(crosscoder: CrossCoder, residual: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """Eval-mode codes ``[n_probes, seq, F]`` of paired residuals ``[n_probes, seq, 2, d_model]``.

    BOS and padding positions get all-zero codes (``where``, not a product: padded positions may hold
    non-finite values).
    """
    codes = crosscoder.encode(residual.to(crosscoder.W_dec))
    return torch.where(content.to(codes.device)[..., None], codes, 0.0)


def kl_per_position(clean: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """``KL(clean || edited)`` of next-token distributions given as log-probs ``[..., vocab]``: ``[...]``."""
    return (clean.exp() * (clean - edited)).sum(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values [rows, seq]`` over the positions where ``mask`` holds, per row: ``[rows]``."""
    mask = mask.to(values.device)
    return torch.where(mask, values, 0.0).sum(-1) / mask.sum(-1)
